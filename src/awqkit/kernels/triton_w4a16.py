"""``triton`` backend: a Triton W4A16 GEMM/GEMV that reads the AutoAWQ GEMM layout as stored (no repack).

Layout read (see :mod:`awqkit.quant.packing`; ``K = in``, ``N = out``, ``g`` = group size, ``G = K / g``)
-------------------------------------------------------------------------------------------------------
* ``qweight`` int32 ``[K, N/8]``: word ``[k, c]`` holds output columns ``8c .. 8c+7`` of input row ``k``,
  nibble ``i`` (bits ``4i .. 4i+3``) holding column ``8c + AWQ_ORDER[i]``, ``AWQ_ORDER = 0,2,4,6,1,3,5,7``.
  So logical column ``j = n % 8`` sits at shift ``4 * AWQ_REVERSE_ORDER[j] = 4 * [0,4,1,5,2,6,3,7][j]``,
  which the kernel computes as ``4 * (4 * (j % 2) + j // 2)``; an arithmetic shift then ``& 0xF``, so the
  sign of a word with bit 31 set never leaks into a nibble.
* ``qzeros`` int32 ``[G, N/8]`` packed the same way; ``scales`` ``[G, N]`` (fp16 as stored).
* ``w[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]``; ``y[M, N] = x[M, K] @ w + bias``.

Tiling
------
The grid is ``(ceil(M / BLOCK_M) * ceil(N / BLOCK_N), SPLIT_K)`` (M tiles grouped by ``GROUP_M`` for L2
reuse). Each program walks its share of the K loop in ``BLOCK_K`` steps: it loads an ``x`` tile
``[BLOCK_M, BLOCK_K]`` and a ``[BLOCK_K, BLOCK_N/8]`` int32 tile of ``qweight`` and widens it to the
nibbles ``[BLOCK_K, BLOCK_N]`` with shifts and ``& 0xF``. Three equivalent unpackings (``Config.unpack``):
``shift3d`` (default) shifts ``[BLOCK_K, BLOCK_N/8, 1]`` words by the 8 shifts and reshapes ``(p, j)`` to
column ``n = 8p + j``; ``join`` duplicates each word 8 times (``tl.interleave`` of the tile with itself,
three times) and shifts by ``shift(n % 8)``; ``gather`` loads word ``n // 8`` for every column. A zero
row and a scale row are loaded per step: ``BLOCK_K`` divides ``g``, so a K step never straddles two
groups (group ``k0 // g``). The dequantized tile exists only in registers, in ``x``'s dtype (fp16/bf16
on GPU; computed in the scales' dtype when it equals ``x``'s, which is one exact rounding, else in fp32),
and ``tl.dot`` accumulates in fp32. ``BLOCK_M == 1`` (the GEMV configs for one row) skips ``tl.dot``
(which needs 16 rows): each program keeps ``[BLOCK_K, BLOCK_N]`` fp32 partial products ``x[k] * w[k, n]``
on the CUDA cores and reduces them over K once, after the loop. With ``SPLIT_K > 1`` (small M: too few
output tiles to fill the GPU) each K slice writes an fp32 partial ``[SPLIT_K, M, N]`` and a second small
kernel sums them, adds the bias and casts; with ``SPLIT_K == 1`` the bias is added in the epilogue and
``y`` is written in ``x``'s dtype directly. The kernels call only Triton builtins (see
:func:`_w4a16_kernel_body`), so they also run under the interpreter.

Configs: on CUDA a small candidate list per (M bucket, N, K, g, dtype) is timed once
(:func:`bench_device_ms`: CUDA-graph replays, L2 flushed, so host launch cost does not bias the choice)
and the winner cached for the process (``AWQKIT_TRITON_AUTOTUNE=0`` or an
active CUDA-graph capture uses the first, heuristic candidate instead). Under the interpreter nothing
is timed: the heuristic config is used (tests pass explicit ones).

Constraints (:func:`layer_unsupported_reason`): 4 bits, format ``gemm``, effective group size a multiple
of 16 (``tl.dot``'s minimum K; ``group_size=-1`` means ``g = K``), contiguous buffers on ``x``'s device,
fewer than 2^31 elements per tensor (int32 offsets). Inputs (:func:`call_unsupported_reason`): CUDA
``x`` in fp16/bf16, or under the interpreter a CPU ``x`` in fp32/fp16 for a module that asked for this
backend explicitly (``module.backend = "triton"``: ``auto`` never picks the interpreter, see below); no
autograd (calls needing gradients are declined).

Registry: priority 10 (above ``cpu-int4``'s 5 and ``torch``'s 0). ``available()`` is true when triton is
importable and a CUDA device is present or ``TRITON_INTERPRET`` is on. On CPU ``x`` it is only ever used
when asked for by name *and* interpreting, so ``auto`` on a CPU tensor never selects it, whether or not
the interpreter is on (so a stray ``TRITON_INTERPRET=1`` cannot turn every CPU layer into a numpy loop).

Interpreter: ``TRITON_INTERPRET=1`` makes ``triton.jit`` build an ``InterpretedFunction`` that runs the
kernel with numpy on CPU tensors. Triton decides this when a decorator runs, not at launch, and that
holds for its own ``@triton.jit`` helpers too (``tl.zeros``, ``tl.cdiv``, ``tl.sum``, ``tl.interleave``
are decorated at ``import triton``): a kernel calling them runs interpreted only if the variable was set
before triton was first imported ("Cannot call @triton.jit'd outside of the scope of a kernel"
otherwise). So this module (1) applies ``triton.jit`` lazily, at the first launch, keeping one kernel
object per mode (compiled / interpreted) and reading the mode at every launch, and (2) calls only
builtins in its kernels. Setting the variable any time before a launch is then enough, whenever triton
was imported.

Speed: the interpreter says nothing about speed; timings come only from a GPU, through
``scripts/gpu_check_triton.py`` (the development and CI machines have none). First measurements (one
H200, torch 2.11 + triton 3.6, default candidates; an earlier timing method that zeroed a 256 MiB
buffer before each call, which also slows the timed reads): correct in fp16 and bf16 on every shape
tried, but only at parity with fp16 cuBLAS on a dequantized weight for the 7B linears at M = 1 and 16
(0.85x to 1.07x; 0.4 to 0.7 TB/s effective against 1.7 to 2.6 for cuBLAS), so the kernel is bound by
dequantization work, not by memory yet. ``magic`` and ``join`` moved times by under ~10%. Likely next
steps: a packed-half2 unpack (the AWQ order puts columns ``2j`` and ``2j + 1`` at bits ``4j`` and
``4j + 16``, so ``(word >> 4j) & 0x000F000F | 0x64006400`` is both as fp16 ``1024 + q`` in one
instruction; needs ``tl.inline_asm_elementwise``, with the current path kept for the interpreter) and a
profile with ncu.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from awqkit.kernels._cache import effective_group_size

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear

# Imported lazily by _import_triton() (``import triton`` costs ~0.5 s): the kernel bodies below name ``tl``
# only in string annotations and at trace time, when triton.jit resolves it from this module's globals.
triton = None
tl = None

logger = logging.getLogger(__name__)

NAME = "triton"
PRIORITY = 10  # above cpu-int4 (5); CPU inputs are never taken under "auto" (see supports)
MIN_GROUP_MULTIPLE = 16  # tl.dot needs K tiles of >= 16, and BLOCK_K must divide the group size
CUDA_DTYPES = (torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)
_MAX_NUMEL = 2**31 - 1


# --------------------------------------------------------------------------- availability
@functools.cache
@functools.cache
def _triton_importable() -> bool:
    # cached: find_spec walks sys.path (~20-100 us), and auto resolution asks on every forward call
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _import_triton() -> bool:
    """Import triton into this module's globals (once); False if it is missing or broken."""
    global triton, tl
    if triton is not None:
        return True
    if not _triton_importable():
        return False
    try:
        import triton as _triton
        import triton.language as _tl
    except Exception as exc:  # a broken install: not available, say why at debug level
        logger.debug("triton import failed: %s", exc)
        return False
    triton, tl = _triton, _tl
    return True


def interpreting() -> bool:
    """True when Triton would build interpreted kernels now (``TRITON_INTERPRET`` on, as triton reads it).

    Does not import triton when the variable is unset (so CPU-only ``auto`` resolution stays cheap)."""
    if "triton" not in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        return False
    if not _import_triton():
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # triton >= 3.4: the same knob triton.jit reads
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """Triton importable and (a CUDA device present or the interpreter on)."""
    if not _triton_importable():
        return False
    return (_cuda_present() and _import_triton()) or interpreting()


# --------------------------------------------------------------------------- support checks
def layer_unsupported_reason(module: QuantLinear) -> str | None:
    """Why this layer cannot run on the triton kernel at all (independent of ``x``), or None."""
    if not _triton_importable():
        return "triton is not installed"
    if module.bits != 4:
        return f"bits={module.bits} (needs 4)"
    if module.format != "gemm":
        return f"format={module.format!r} (needs 'gemm')"
    g = effective_group_size(module)
    if g % MIN_GROUP_MULTIPLE != 0:
        what = f"group_size={module.group_size}" + (f" (= in_features {g})" if module.group_size == -1 else "")
        return f"{what} is not a multiple of {MIN_GROUP_MULTIPLE}"
    if module.in_features % g != 0:
        return f"in_features={module.in_features} is not a multiple of group_size={g}"
    for name in ("qweight", "qzeros", "scales"):
        t = module._buffers.get(name)
        if t is None:
            return f"{name} is missing"
        if not t.is_contiguous():
            return f"{name} is not contiguous"
        if t.numel() > _MAX_NUMEL:
            return f"{name} has more than 2^31 elements"
    if module.qweight.dtype != torch.int32 or module.qzeros.dtype != torch.int32:
        return "qweight/qzeros are not int32"
    if not module.scales.is_floating_point():
        return f"scales dtype {module.scales.dtype} is not a float dtype"
    return None


def call_unsupported_reason(x: Tensor, module: QuantLinear, *, explicit: bool | None = None) -> str | None:
    """Why the triton kernel cannot run ``module`` on this ``x``, or None if it can.

    ``explicit``: whether the caller asked for this backend by name (default: ``module.backend == "triton"``);
    CPU inputs are only taken then, and only under the interpreter."""
    if not is_available():
        return "triton is not installed, or there is no CUDA device and TRITON_INTERPRET is off"
    if x.requires_grad and torch.is_grad_enabled():
        return "x requires grad (the kernel has no autograd formula)"
    if x.device.type == "cuda":
        if x.dtype not in CUDA_DTYPES:
            return f"x dtype {x.dtype} on CUDA (needs float16 or bfloat16)"
    elif x.device.type == "cpu":
        if not interpreting():
            return "x on cpu (needs CUDA, or TRITON_INTERPRET=1 for the interpreter)"
        if not (module.backend == NAME if explicit is None else explicit):
            return "x on cpu under the interpreter: only used when asked for by name (module.backend='triton')"
        if x.dtype not in INTERPRETER_DTYPES:
            return f"x dtype {x.dtype} under the interpreter (needs float32 or float16)"
    else:
        return f"x on {x.device} (needs cuda)"
    reason = layer_unsupported_reason(module)
    if reason is not None:
        return reason
    devices = {t.device for t in (module.qweight, module.qzeros, module.scales, module.bias) if t is not None}
    if devices != {x.device} and not (
        x.device.type == "cuda"
        and {d.type for d in devices} == {"cuda"}
        and all(d.index in (None, x.device.index) for d in devices)
    ):
        return f"buffers on {sorted(str(d) for d in devices)} but x on {x.device}"
    if x.numel() > _MAX_NUMEL or (x.numel() // max(1, module.in_features)) * module.out_features > _MAX_NUMEL:
        return "x or y has more than 2^31 elements"
    return None


def supports(x: Tensor, module: QuantLinear) -> bool:
    """The registry's ``supports`` hook (see :func:`call_unsupported_reason`)."""
    if x.device.type == "cpu" and module.backend != NAME:  # fast path: auto never takes CPU inputs
        return False
    return call_unsupported_reason(x, module) is None


# --------------------------------------------------------------------------- kernels
UNPACK_SHIFT3D = 0  # [R, BLOCK_N/8, 1] >> [8] -> [R, BLOCK_N/8, 8] -> reshape [R, BLOCK_N]
UNPACK_JOIN = 1  # join the word tile with itself three times (tl.interleave, spelled with builtins)
UNPACK_GATHER = 2  # load word n // 8 for every column n (8 loads of each word, served by L1)
UNPACK_MODES = {"shift3d": UNPACK_SHIFT3D, "join": UNPACK_JOIN, "gather": UNPACK_GATHER}


def _w4a16_kernel_body(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    iters_per_split,
    stride_xm,
    stride_xk,
    stride_qw,
    stride_qz,
    stride_s,
    stride_ym,
    stride_ys,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    UNPACK: tl.constexpr,
    MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] (+ bias) = x[M, K] @ dequant(qweight, qzeros, scales); see the module docstring.

    Only triton *builtins* are called (no ``tl.zeros``/``tl.cdiv``/``tl.sum``/``tl.interleave``, which
    are ``@triton.jit`` helpers decorated when triton is imported): so the interpreter runs this body
    even when triton was imported before ``TRITON_INTERPRET`` was set."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_rows)
    pid_n = (pid % num_pid_in_group) // group_rows

    PACKED_N: tl.constexpr = BLOCK_N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kk = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # logical column j = n % 8 lives at nibble AWQ_REVERSE_ORDER[j] = 4 * (j % 2) + j // 2
    j8 = tl.arange(0, 8)
    shifts8 = ((j8 % 2) * 4 + j8 // 2) * 4  # [8]: 0, 16, 4, 20, 8, 24, 12, 28
    jn = tl.arange(0, BLOCK_N) % 8
    shifts_n = (((jn % 2) * 4 + jn // 2) * 4)[None, :]  # [1, BLOCK_N]
    if UNPACK == 2:
        offs_pn = offs_n // 8
        mask_pn = mask_n
    else:
        offs_pn = pid_n * PACKED_N + tl.arange(0, PACKED_N)
        mask_pn = offs_pn < N // 8

    if USE_DOT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    else:  # GEMV (BLOCK_M == 1): per-thread partial products, reduced over K once after the loop
        acc_k = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
    k_iters = K // BLOCK_K
    it_lo = pid_k * iters_per_split
    it_hi = tl.minimum(it_lo + iters_per_split, k_iters)
    for it in range(it_lo, it_hi):
        k0 = it * BLOCK_K
        offs_k = k0 + offs_kk
        qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :], mask=mask_pn[None, :], other=0)
        grp = k0 // group_size  # BLOCK_K divides group_size: one group per K step
        qz = tl.load(qz_ptr + grp * stride_qz + offs_pn[None, :], mask=mask_pn[None, :], other=0)
        sc = tl.load(s_ptr + grp * stride_s + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        if UNPACK == 0:  # broadcast each word against the 8 shifts, then flatten (p, j) -> n = 8p + j
            q = tl.reshape((qw[:, :, None] >> shifts8[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
            z = tl.reshape((qz[:, :, None] >> shifts8[None, None, :]) & 0xF, (1, BLOCK_N))
        elif UNPACK == 1:  # tl.interleave(a, a) three times: column n holds word n // 8
            qw = tl.reshape(tl.join(qw, qw), (BLOCK_K, 2 * PACKED_N))
            qw = tl.reshape(tl.join(qw, qw), (BLOCK_K, 4 * PACKED_N))
            qw = tl.reshape(tl.join(qw, qw), (BLOCK_K, BLOCK_N))
            qz = tl.reshape(tl.join(qz, qz), (1, 2 * PACKED_N))
            qz = tl.reshape(tl.join(qz, qz), (1, 4 * PACKED_N))
            qz = tl.reshape(tl.join(qz, qz), (1, BLOCK_N))
            q = (qw >> shifts_n) & 0xF
            z = (qz >> shifts_n) & 0xF
        else:  # words already loaded per column
            q = (qw >> shifts_n) & 0xF
            z = (qz >> shifts_n) & 0xF
        if USE_DOT:
            xt = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_m[:, None], other=0.0
            )
            if sc.dtype == xt.dtype:  # (q - z) is exact in fp16/bf16: one rounding, as in fp32
                if MAGIC:  # 0x6400 | q is the fp16 1024 + q (bf16: 0x4300 | q = 128 + q): no int->float cvt
                    if xt.dtype == tl.float16:
                        qf = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                        zf = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                    else:
                        qf = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                        zf = (z | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                    w = (qf - zf) * sc
                else:
                    w = (q - z).to(sc.dtype) * sc
            else:
                w = ((q - z).to(tl.float32) * sc.to(tl.float32)).to(xt.dtype)
            acc = tl.dot(xt, w, acc)
        else:  # GEMV: one row is too few for tl.dot (16 rows); FMAs on the CUDA cores in fp32
            xv = tl.load(x_ptr + pid_m * stride_xm + offs_k * stride_xk)  # the grid has exactly M rows
            if MAGIC:  # 0x4B000000 | q is the fp32 2^23 + q
                d = (q | 0x4B000000).to(tl.float32, bitcast=True) - (z | 0x4B000000).to(tl.float32, bitcast=True)
            else:
                d = (q - z).to(tl.float32)
            acc_k += xv.to(tl.float32)[:, None] * (d * sc.to(tl.float32))
    if not USE_DOT:
        acc = tl.reduce(acc_k, 0, tl.standard._sum_combine)[None, :]  # [1, BLOCK_N]

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _splitk_reduce_body(ws_ptr, b_ptr, y_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y (contiguous [M, N], x dtype) = sum over the SPLIT fp32 partials ws [SPLIT, M, N] (+ bias)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_KERNELS: dict[bool, tuple[object, object]] = {}


def _kernels() -> tuple[object, object]:
    """``(gemm, reduce)`` kernel objects for the current mode, decorated with ``triton.jit`` on first use."""
    mode = interpreting()
    kernels = _KERNELS.get(mode)
    if kernels is None:
        if not _import_triton():
            raise RuntimeError("triton is not installed (or fails to import)")
        kernels = (triton.jit(_w4a16_kernel_body), triton.jit(_splitk_reduce_body))
        got = type(kernels[0]).__name__ == "InterpretedFunction"
        if got != mode:  # e.g. triton.knobs set programmatically in a way we did not read
            raise RuntimeError(
                f"triton built a {'interpreted' if got else 'compiled'} kernel but TRITON_INTERPRET reads as {mode}"
            )
        _KERNELS[mode] = kernels
    return kernels


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Config:
    """One launch configuration (``split_k`` is a runtime value: changing it does not recompile)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    unpack: str = "shift3d"  # see UNPACK_MODES
    magic: bool = False  # int -> float by OR-ing the nibble into a float's mantissa (no cvt instruction)

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16


def check_config(cfg: Config, M: int, N: int, K: int, group_size: int) -> None:
    """Raise ValueError if ``cfg`` cannot run this problem."""
    for v, name in ((cfg.block_m, "block_m"), (cfg.block_n, "block_n"), (cfg.block_k, "block_k")):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    if cfg.block_n < 8:
        raise ValueError(f"block_n={cfg.block_n} must be >= 8 (one packed word)")
    if cfg.block_k < 16 or group_size % cfg.block_k != 0:
        raise ValueError(f"block_k={cfg.block_k} must be >= 16 and divide group_size={group_size}")
    if cfg.use_dot is False and cfg.block_m != 1:
        raise ValueError(f"block_m={cfg.block_m}: use 1 (GEMV, no tl.dot) or >= 16 (tl.dot)")
    if cfg.split_k < 1:
        raise ValueError(f"split_k={cfg.split_k} must be >= 1")
    if cfg.unpack not in UNPACK_MODES:
        raise ValueError(f"unpack={cfg.unpack!r}: use one of {sorted(UNPACK_MODES)}")


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _block_ks(group_size: int, prefer: tuple[int, ...]) -> list[int]:
    return [bk for bk in prefer if group_size % bk == 0] or [16]


def _with_split(cfg: Config, M: int, N: int, K: int, n_sm: int) -> Config:
    """Split K until there are about two programs per SM (only when the output tiles are too few)."""
    tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
    k_iters = K // cfg.block_k
    if tiles >= n_sm or k_iters < 2:
        return replace(cfg, split_k=1)
    split = max(1, min(k_iters // 2 if k_iters >= 4 else k_iters, round(2 * n_sm / tiles), 32))
    return replace(cfg, split_k=split)


def candidates(M: int, N: int, K: int, group_size: int, n_sm: int = 132, *, wide: bool = False) -> list[Config]:
    """Configs worth timing for this problem, the heuristic default first.

    ``wide`` (``AWQKIT_TRITON_AUTOTUNE=wide``) adds more tile shapes, split factors and the ``magic``
    variant for small M: a slower first call, for exploring on a new GPU."""
    if M == 1:  # GEMV: BLOCK_K x BLOCK_N fp32 partials per program (64 per thread at 4 warps)
        shapes = [(128, 64), (256, 32), (128, 32), (64, 128), (256, 64)]
        if wide:
            shapes += [(128, 128), (512, 32), (64, 64)]
        base = [
            Config(1, bn, bk, num_warps=4 if bn * bk <= 8192 else 8, num_stages=3, group_m=1)
            for bn, bk in shapes
            if group_size % bk == 0
        ]
        if not base:
            base = [Config(1, 128, 16, group_m=1)]
        base += [Config(16, 128, _block_ks(group_size, (64, 32, 16))[0], num_warps=4, num_stages=3, group_m=1)]
        if wide:
            base += [
                Config(16, bn, bk, num_warps=4, num_stages=st, group_m=1)
                for bn, bk, st in ((256, 64, 3), (128, 128, 3), (256, 128, 2), (64, 128, 4))
                if group_size % bk == 0
            ]
    elif M <= 16:
        bks = _block_ks(group_size, (128, 64, 32, 16))[:2]
        base = [Config(16, bn, bk, num_warps=4, num_stages=3) for bk in bks for bn in (128, 64, 256)]
        if wide:
            base += [
                Config(16, bn, bk, num_warps=nw, num_stages=st)
                for bk in bks
                for bn, nw, st in ((256, 8, 3), (128, 4, 4), (64, 4, 5))
            ]
    elif M <= 64:
        bks = _block_ks(group_size, (64, 128, 32, 16))[:2]
        base = [Config(bm, 128, bk, num_warps=4, num_stages=3) for bk in bks for bm in (32, 64)]
        base += [Config(32, 64, bks[0], num_warps=4, num_stages=4)]
    else:
        bks = _block_ks(group_size, (64, 32, 128, 16))[:2]
        base = [
            Config(128, 128, bks[0], num_warps=8, num_stages=3),
            Config(64, 128, bks[0], num_warps=4, num_stages=4),
            Config(128, 256, bks[-1], num_warps=8, num_stages=3),
            Config(64, 64, bks[-1], num_warps=4, num_stages=4),
        ]
    out: list[Config] = []

    def add(c: Config) -> None:
        if c not in out:
            out.append(c)

    for cfg in base:
        c = _with_split(cfg, M, N, K, n_sm)
        splits = [c.split_k] + ([max(1, c.split_k // 2)] if c.split_k >= 4 else [])
        if wide and M <= 16:
            splits.append(min(K // c.block_k, c.split_k * 2, 64))
        for sk in splits:
            add(replace(c, split_k=sk))
            if wide and M <= 16:
                add(replace(c, split_k=sk, magic=True))
    return out


def interpreter_config(M: int, N: int, K: int, group_size: int) -> Config:
    """Small tiles for the interpreter (every program is a numpy loop): many tiles, little padding."""
    bk = _block_ks(group_size, (64, 32, 16))[0]
    return Config(1 if M == 1 else 16, 64 if N >= 64 else 32, bk, split_k=1, group_m=1)


def _m_bucket(M: int) -> int:
    if M <= 1:
        return 1
    if M <= 16:
        return 16
    return min(1 << (M - 1).bit_length(), 4096)


_TUNED: dict[tuple, Config] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("AWQKIT_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def _pick_config(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bias: Tensor | None
) -> Config:
    M, K = x.shape
    N = scales.shape[1]
    if x.device.type != "cuda":
        return interpreter_config(M, N, K, group_size)
    key = (x.device.index, x.dtype, scales.dtype, _m_bucket(M), N, K, group_size, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    mode = os.environ.get("AWQKIT_TRITON_AUTOTUNE", "1").lower()
    cands = candidates(_m_bucket(M), N, K, group_size, _num_sms(x.device.index or 0), wide=mode == "wide")
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing or not _autotune_enabled() or len(cands) == 1:
        return cands[0] if capturing else _TUNED.setdefault(key, cands[0])
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    flush = torch.empty(64 * 2**20, dtype=torch.float32, device=x.device)  # 256 MiB > L2 of any current GPU
    best, best_t = None, float("inf")
    for cand in cands:
        try:

            def run(c: Config = cand) -> None:
                _launch(x, qweight, qzeros, scales, group_size, bias, y, c)

            t = bench_device_ms(run, flush)
        except Exception as exc:  # a config the compiler rejects (shared memory, registers): skip it
            logger.debug("triton w4a16: config %s failed: %s", cand, exc)
            continue
        if t < best_t:
            best, best_t = cand, t
    del flush
    if best is None:
        raise RuntimeError(f"no triton w4a16 config ran for M={M}, N={N}, K={K}, group_size={group_size}")
    logger.info("triton w4a16: M~%d N=%d K=%d g=%d -> %s (%.1f us)", _m_bucket(M), N, K, group_size, best, best_t * 1e3)
    _TUNED[key] = best
    return best


def bench_device_ms(fn, flush: Tensor | None = None, reps: int = 25) -> float:
    """Median device time (ms) of ``fn`` on the current CUDA device, without host launch overhead.

    ``fn`` runs once eagerly (compilation), is captured in a CUDA graph, and the graph is replayed
    ``reps`` times between CUDA events, with ``flush`` (a float buffer larger than the L2) *read* before
    each replay so weights come from memory, as in a real forward pass. Read, not zeroed: zeroing leaves
    the L2 full of dirty lines whose write-back then competes with the timed kernel's reads. The
    replay's single host call hides behind the flush, so host-side Python cost is not counted (eager
    calls pay it). Falls back to ``triton.testing.do_bench`` (eager calls) if graph capture fails."""
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replay = graph.replay
    except Exception as exc:  # capture unsupported here: time eager calls instead
        logger.debug("CUDA graph capture failed (%s); timing eager calls", exc)
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))
    replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        if flush is not None:
            flush.amax()
        start.record()
        replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return times[len(times) // 2]


def tuned_configs() -> dict[tuple, Config]:
    """A copy of the per-process autotuning cache (for reports)."""
    return dict(_TUNED)


# --------------------------------------------------------------------------- launch
def _launch(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    group_size: int,
    bias: Tensor | None,
    y: Tensor,
    cfg: Config,
) -> Tensor:
    gemm, reduce = _kernels()
    M, K = x.shape
    N = scales.shape[1]
    k_iters = K // cfg.block_k
    iters = -(-k_iters // cfg.split_k)
    split = -(-k_iters // iters)  # no empty slices
    tiles = -(-M // cfg.block_m) * -(-N // cfg.block_n)
    common = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    consts = dict(
        USE_DOT=cfg.use_dot,
        UNPACK=UNPACK_MODES[cfg.unpack],
        MAGIC=cfg.magic,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
    )
    dummy = bias if bias is not None else scales  # never read when HAS_BIAS is False
    if split == 1:
        gemm[(tiles, 1)](
            x,
            qweight,
            qzeros,
            scales,
            dummy,
            y,
            M,
            N,
            K,
            group_size,
            iters,
            x.stride(0),
            x.stride(1),
            qweight.stride(0),
            qzeros.stride(0),
            scales.stride(0),
            y.stride(0),
            0,
            HAS_BIAS=bias is not None,
            **consts,
            **common,
        )
        return y
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    gemm[(tiles, split)](
        x,
        qweight,
        qzeros,
        scales,
        dummy,
        ws,
        M,
        N,
        K,
        group_size,
        iters,
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        N,
        M * N,
        HAS_BIAS=False,
        **consts,
        **common,
    )
    block = 1024
    reduce[(-(-(M * N) // block),)](ws, dummy, y, M * N, N, split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return y


def w4a16_matmul(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    group_size: int,
    bias: Tensor | None = None,
    *,
    config: Config | None = None,
) -> Tensor:
    """``y [M, N] = x [M, K] @ W + bias`` with ``W`` read from AutoAWQ GEMM tensors (module docstring).

    Args:
        x: ``[M, K]`` float, on CUDA (fp16/bf16) or CPU under the interpreter.
        qweight: int32 ``[K, N/8]``; qzeros: int32 ``[K/g, N/8]``; scales: float ``[K/g, N]``.
        group_size: ``g`` (``-1`` for ``K``), a multiple of 16 dividing ``K``.
        bias: optional ``[N]``.
        config: launch config (default: autotuned on CUDA, :func:`interpreter_config` otherwise).
    Returns ``y`` ``[M, N]`` in ``x.dtype``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    if qweight.dim() != 2 or qweight.shape[0] != K:
        raise ValueError(f"qweight {tuple(qweight.shape)} must be [K={K}, N/8]")
    N = qweight.shape[1] * 8
    g = K if group_size == -1 else int(group_size)
    if g <= 0 or K % g != 0:
        raise ValueError(f"group_size={group_size} does not divide K={K}")
    if scales.shape != (K // g, N) or qzeros.shape != (K // g, N // 8):
        raise ValueError(
            f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} must be "
            f"[{K // g}, {N}] / [{K // g}, {N // 8}] for group_size={g}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias {tuple(bias.shape)} must be [{N}]")
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config if config is not None else _pick_config(x, qweight, qzeros, scales, g, bias)
    check_config(cfg, M, N, K, g)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            return _launch(x, qweight, qzeros, scales, g, bias, y, cfg)
    return _launch(x, qweight, qzeros, scales, g, bias, y, cfg)


def forward(x: Tensor, module: QuantLinear) -> Tensor:
    """``y = x @ W^T + b`` through the Triton kernel; ``x [..., K] -> y [..., N]`` in ``x.dtype``."""
    if x.shape[-1] != module.in_features:
        raise ValueError(
            f"input last dim {x.shape[-1]} does not match in_features={module.in_features} of this QuantLinear"
        )
    x2 = x.reshape(-1, module.in_features)
    y = w4a16_matmul(x2, module.qweight, module.qzeros, module.scales, effective_group_size(module), module.bias)
    return y.reshape(*x.shape[:-1], module.out_features)


__all__ = [
    "NAME",
    "PRIORITY",
    "Config",
    "is_available",
    "interpreting",
    "supports",
    "layer_unsupported_reason",
    "call_unsupported_reason",
    "candidates",
    "interpreter_config",
    "check_config",
    "w4a16_matmul",
    "forward",
    "tuned_configs",
    "bench_device_ms",
]
