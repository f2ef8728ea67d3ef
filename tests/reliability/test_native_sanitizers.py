"""awqkit's native CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

``sanitize/harness.c`` (with its reference loops, ``sanitize/reference.h``) is compiled together with
``src/awqkit/kernels/csrc/awqkit_cpu.c`` with the production flags (:data:`awqkit.kernels.native.FLAGS`:
``-O3 -mavx2 -mfma -mf16c -fopenmp``, as an executable) plus ``-fsanitize=address,undefined
-fno-omit-frame-pointer -g``, and run with two OpenMP threads:

* ``check`` drives every exported kernel on valid edge-case shapes (one group / many groups / chunked
  groups, N = 64 and 128, 1..17 rows, N % 4 tails, attention at pos 0 and maxlen - 1 with sliding windows
  and q/k norms, the whole 2-layer decode step) and compares every output with a double-precision C
  reference: no sanitizer report, every case within 1e-4 relative;
* ``overflow`` (negative control) makes a kernel read one element past a buffer: ASan must report it, which
  proves the sanitizer is live in this build;
* ``ub`` (negative control) commits a signed overflow: UBSan must report it.

Skips (with the reason) where the compiler cannot build or run sanitized programs, off x86-64 Linux, and
on CPUs without AVX2/FMA/F16C. Takes a few seconds (the compile).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from awqkit.kernels import native

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "sanitize" / "harness.c"
SANITIZE = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-fno-sanitize-recover=all")
ENV = {
    "OMP_NUM_THREADS": "2",
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
SKIP_CPU = 77  # the harness's exit status on a CPU without AVX2/FMA/F16C
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "WARNING: AddressSanitizer")


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str


def _flags() -> list[str]:
    """native.FLAGS for an executable (no -shared / -fPIC) plus the sanitizers."""
    return [f for f in native.FLAGS if f not in ("-shared", "-fPIC")] + list(SANITIZE)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    return {**env, **ENV}


def _compile(cc: str, sources: list[Path], out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [cc, *_flags(), f"-I{native.SOURCE.parent}", "-o", str(out), *map(str, sources), "-lm"]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sanitized harness executable (skips where sanitized builds are impossible here)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the native kernels need x86-64 Linux (this is {platform.system()} {platform.machine()})")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (set CC or install gcc) for the sanitizer build")
    folder = tmp_path_factory.mktemp("sanitize")
    probe = folder / "probe.c"
    probe.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    try:
        built = _compile(cc, [probe], folder / "probe")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"NOTICE: cannot run the C compiler {cc} for the sanitizer build: {exc}")
    if built.returncode != 0:
        pytest.skip(
            f"NOTICE: {cc} lacks sanitizer support (-fsanitize=address,undefined): "
            f"{(built.stderr or built.stdout).strip()[-300:]}"
        )
    ran = subprocess.run([str(folder / "probe")], capture_output=True, text=True, check=False, timeout=60, env=_env())
    if ran.returncode != 0:
        pytest.skip(f"NOTICE: sanitized programs do not run here (exit {ran.returncode}): {ran.stderr.strip()[-300:]}")
    exe = folder / "harness"
    built = _compile(cc, [HARNESS, native.SOURCE], exe)
    assert built.returncode == 0, f"the sanitized harness does not compile:\n{built.stderr}"
    return exe


def _run(exe: Path, mode: str) -> Run:
    proc = subprocess.run([str(exe), mode], capture_output=True, text=True, check=False, timeout=300, env=_env())
    if proc.returncode == SKIP_CPU:
        pytest.skip(proc.stdout.strip())
    return Run(proc.returncode, proc.stdout, proc.stderr)


def test_every_kernel_is_clean_and_correct_under_asan_and_ubsan(harness: Path) -> None:
    run = _run(harness, "check")
    text = run.out + run.err
    found = [r for r in REPORTS if r in text]
    assert not found, f"sanitizer report {found}:\n{text[-6000:]}"
    assert run.rc == 0, f"harness exit {run.rc}:\n{text[-6000:]}"
    assert "FAIL" not in run.out, run.out
    summary = [ln for ln in run.out.splitlines() if ln.startswith("checked ")]
    assert summary and summary[0].endswith(", 0 failed"), run.out[-2000:]
    n = int(summary[0].split()[1])
    assert n >= 50 and n == run.out.count("\nok "), run.out[-2000:]
    for kernel in ("int4_gemv", "f16_gemv", "rmsnorm", "silu_mul", "decode_attention", "decode_layers"):
        assert f"ok {kernel}" in run.out, f"no case ran {kernel}"


def test_asan_catches_a_read_one_element_past_a_buffer(harness: Path) -> None:
    """Negative control: the sanitizer is live in this build (else the clean run above proves nothing)."""
    run = _run(harness, "overflow")
    assert run.rc != 0, f"the out-of-bounds read went unnoticed:\n{run.out}{run.err}"
    assert "AddressSanitizer: heap-buffer-overflow" in run.err, run.err[-3000:]
    assert "READ of size 4" in run.err and "awqkit_rmsnorm" in run.err, run.err[-3000:]  # in the kernel
    assert "overflow not detected" not in run.out


def test_ubsan_catches_undefined_behaviour(harness: Path) -> None:
    run = _run(harness, "ub")
    assert run.rc != 0 and "runtime error: signed integer overflow" in run.err, run.out + run.err[-3000:]
