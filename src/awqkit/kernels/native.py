"""Build and load awqkit's native CPU kernels (``csrc/awqkit_cpu.c``) with the system C compiler.

The C file (with its header ``csrc/awqkit_cpu.h``) is compiled on first use (about a second) with ``-O3 -mavx2 -mfma
-mf16c -fopenmp -shared -fPIC`` into a cache folder and loaded with :mod:`ctypes`; later processes reuse the built
library. The file name carries a hash of the source and header, the compiler's version line and the flags, so an edit
or another
compiler builds a new one; the build writes a temporary file and renames it into place, so concurrent
first uses do not see a half-written library.

Where it is not available (``library()`` returns None, :func:`unavailable_reason` says why): not x86-64
Linux, no C compiler (``$CC``, ``cc`` or ``gcc`` on ``PATH``), a failed build, a CPU without AVX2 + FMA +
F16C, or ``AWQKIT_NATIVE=0`` in the environment. Backends that need it then report themselves unavailable
and ``auto`` picks the next one.

Threads: the library links ``libgomp.so.1``; ``import torch`` has loaded torch's copy under that name
already, so the kernels' OpenMP regions run on torch's runtime. Callers pass ``torch.get_num_threads()``.

Environment: ``AWQKIT_NATIVE=0`` disables it; ``AWQKIT_KERNEL_CACHE`` sets the cache folder (default
``~/.cache/awqkit/kernels``); ``CC`` picks the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401 - loads torch's libgomp.so.1 before the library asks for one

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "awqkit_cpu.c"
HEADER = SOURCE.with_suffix(".h")  # its declarations, shared with the sanitizer harness
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")
ABI_VERSION = 6  # must equal awqkit_abi_version() in the C file

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    # wq, sp (fp16 scales), zq (uint8 zeros), bias, K, N, group | x, y, M, n_threads, accumulate
    "awqkit_int4_gemv": [_P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _I64, _INT, _INT],
    # x, w, bias, y, M, K, N, n_threads
    "awqkit_f16_gemv": [_P, _P, _P, _P, _I64, _I64, _I64, _INT],
    # x, w, y, rows, n, eps, offset
    "awqkit_rmsnorm": [_P, _P, _P, _I64, _I64, _F, _F],
    # gu, y, rows, n
    "awqkit_silu_mul": [_P, _P, _I64, _I64],
    # qkv, row_stride, kc, vc, cos, sin, qn, kn, norm_eps, out, scratch, B, H, KV, D, pos, maxlen, window,
    # scale, n_threads
    "awqkit_decode_attention": [
        _P,
        _I64,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _F,
        _P,
        _P,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,
        _F,
        _INT,
    ],
    # layers (awqkit_layer array, see awqkit.runtime.stack), n_layers, h, B, hidden, pos, cos, sin, scratch, n_threads
    "awqkit_decode_layers": [_P, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _INT],
}

_reason: str | None = None


def cache_dir() -> Path:
    """Where built libraries are kept: ``$AWQKIT_KERNEL_CACHE`` or ``~/.cache/awqkit/kernels``."""
    env = os.environ.get("AWQKIT_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "awqkit" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


def _build(cc: str, target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` (atomically). Raises RuntimeError with the compiler's output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # not files.write_atomic: the compiler writes the temporary itself (-o tmp); only the rename is ours
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    if os.environ.get("AWQKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError("disabled by AWQKIT_NATIVE=0")
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"needs x86-64 Linux (this is {platform.system()} {platform.machine()})")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc: apt-get install gcc)")
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, check=False, timeout=60
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run the C compiler {cc}: {exc}") from exc
    digest = hashlib.sha256(SOURCE.read_bytes() + HEADER.read_bytes() + repr((version, FLAGS)).encode()).hexdigest()[
        :16
    ]
    target = cache_dir() / f"awqkit_cpu-{digest}.so"
    if not target.is_file():
        logger.info("building awqkit's native CPU kernels with %s into %s", cc, target)
        _build(cc, target)
    lib = ctypes.CDLL(str(target))
    if lib.awqkit_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{target} has ABI {lib.awqkit_abi_version()}, expected {ABI_VERSION}; delete it")
    if not lib.awqkit_cpu_supported():
        raise RuntimeError("this CPU lacks AVX2, FMA or F16C")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded native library, or None when it cannot be built or used here (see :func:`unavailable_reason`)."""
    global _reason
    try:
        return _load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _reason = str(exc)
        logger.debug("awqkit native CPU kernels unavailable: %s", exc)
        return None


def unavailable_reason() -> str | None:
    """Why :func:`library` is None (None when it loaded)."""
    library()
    return _reason


def loaded() -> ctypes.CDLL:
    """:func:`library` for callers that already checked it is available; RuntimeError (with the reason) if not."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"awqkit native CPU kernels unavailable: {unavailable_reason()}")
    return lib


__all__ = ["library", "loaded", "unavailable_reason", "cache_dir", "SOURCE", "HEADER", "FLAGS"]
