"""Input checks for every ctypes call into awqkit's native CPU kernels (``csrc/awqkit_cpu.c``).

The C functions take raw pointers and sizes and trust them: a wrong shape, stride, dtype, device or size
reads or writes past a buffer instead of failing. Every Python caller therefore checks, before the call,
everything the C code relies on, with these helpers, and a wrong input raises
:class:`awqkit.errors.KernelInputError` (a ``ValueError``) with a one-line message::

    <function>: <argument> <what was found>, expected <what the kernel needs>

Message families (each one an entry of ``docs/errors.md``, section "Native kernels"):

* ``f: x has shape (1, 1152), expected (..., 576) (...)`` — a shape or element count (``KERNEL-SHAPE``);
* ``f: x has dtype torch.float16, expected torch.float32`` (also ``has type`` / ``has layout``; ``KERNEL-DTYPE``);
* ``f: x is not contiguous (shape (..), stride (..)), expected a contiguous tensor`` (``KERNEL-CONTIGUOUS``);
* ``f: x is on meta, expected cpu`` (``KERNEL-DEVICE``);
* ``f: h has 17 rows, expected at most 16 (...)`` (``KERNEL-ROWS``);
* ``f: head_dim is 12, expected a multiple of 8 (...)`` — a size the kernel's loops assume (``KERNEL-SIZE``);
* ``f: KV caches k_cache (..) / v_cache (..) do not match [B=.., KV=.., maxlen, D=..]`` (``KERNEL-KV-CACHE``);
* ``f: positions 7..7 do not fit the KV cache of 4 positions (...)`` (``KERNEL-POSITION``).

Cost: these run on the decode hot path (hundreds of calls per token), so each check is a handful of
attribute comparisons on the success path (no tensor ops, no allocations); the message is built only on
failure. Thread counts need no check: the C functions clamp ``n_threads < 1`` to 1.
"""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor

from awqkit.errors import KernelInputError

F32 = torch.float32
_STRIDED = torch.strided

Shape = tuple[int | None, ...]  # None: any size in that dimension


def fail(fn: str, arg: str, found: str, expected: str) -> NoReturn:
    """Raise ``KernelInputError("<fn>: <arg> <found>, expected <expected>")``."""
    raise KernelInputError(f"{fn}: {arg} {found}, expected {expected}")


def _shape_str(shape: tuple[int | None, ...]) -> str:
    inner = ", ".join("*" if s is None else str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _shape_fits(found: tuple[int, ...], want: Shape) -> bool:
    return len(found) == len(want) and all(w is None or f == w for f, w in zip(found, want, strict=True))


def check_tensor(
    fn: str,
    name: str,
    t: Tensor,
    *,
    dtype: torch.dtype = F32,
    shape: Shape | None = None,
    numel: int | None = None,
    what: str = "",
) -> None:
    """``t`` is a dense (strided), contiguous CPU tensor of ``dtype`` (the kernels read host memory with
    the row-major layout of its shape), of shape ``shape`` (None entries: any size) and ``numel`` elements
    when given. ``what`` says in words what the kernel expects (e.g. ``"[B, KV, maxlen, D]"``); it follows
    the expected shape in the message. Raises :class:`KernelInputError` naming ``fn`` and ``name`` (also
    for a ``t`` that is not a tensor at all)."""
    try:  # the success path: attribute comparisons only (no try cost in CPython 3.11+ unless it raises)
        if (
            t.dtype is dtype
            and t.is_cpu
            and t.layout is _STRIDED
            and t.is_contiguous()
            and (shape is None or t.shape == shape)
            and (numel is None or t.numel() == numel)
        ):
            return
    except AttributeError:  # not a tensor: said below
        pass
    if not isinstance(t, Tensor):
        fail(fn, name, f"has type {type(t).__name__}", "torch.Tensor")
    if t.layout is not _STRIDED:
        fail(fn, name, f"has layout {t.layout}", "torch.strided (a dense tensor)")
    if not t.is_cpu:
        fail(fn, name, f"is on {t.device}", "cpu (the native kernels read host memory; move it with .cpu())")
    if t.dtype is not dtype:
        fail(fn, name, f"has dtype {t.dtype}", f"{dtype}")
    note = f" ({what})" if what else ""
    if shape is not None and not _shape_fits(tuple(t.shape), shape):
        fail(fn, name, f"has shape {_shape_str(tuple(t.shape))}", _shape_str(shape) + note)
    if numel is not None and t.numel() != numel:
        fail(fn, name, f"has shape {_shape_str(tuple(t.shape))} ({t.numel()} elements)", f"{numel} elements{note}")
    if not t.is_contiguous():
        fail(
            fn,
            name,
            f"is not contiguous (shape {_shape_str(tuple(t.shape))}, stride {tuple(t.stride())})",
            "a contiguous tensor (call .contiguous())",
        )


def check_optional(
    fn: str, name: str, t: Tensor | None, *, dtype: torch.dtype = F32, shape: Shape | None = None, what: str = ""
) -> None:
    """:func:`check_tensor` for an argument the kernel takes as NULL when it is None (bias, q/k norms)."""
    if t is not None:
        check_tensor(fn, name, t, dtype=dtype, shape=shape, what=what)


def check_last_dim(fn: str, name: str, t: Tensor, n: int, what: str) -> None:
    """``t [..., n]``: at least one dim and the last one ``n``, the size called ``what`` (e.g. ``in_features``;
    the kernel derives its row count from ``numel // n``, so any other last dim reads or writes past a buffer)."""
    shape = t.shape
    if not shape or shape[-1] != n:
        fail(fn, name, f"has shape {_shape_str(tuple(shape))}", f"(..., {n}) (the last dim must equal {what}={n})")


def check_size(fn: str, name: str, value: int, *, minimum: int = 1, multiple_of: int = 1, why: str = "") -> None:
    """An integer size the kernel's loops assume: ``value >= minimum`` and ``value % multiple_of == 0``."""
    if value >= minimum and value % multiple_of == 0:
        return
    want = f"a multiple of {multiple_of}" if multiple_of > 1 else "an integer"
    fail(fn, name, f"is {value}", f"{want} >= {minimum}" + (f" ({why})" if why else ""))


def check_rows(fn: str, name: str, rows: int, limit: int) -> None:
    """At most ``limit`` rows (the kernels' fixed per-row buffers / the one-call path's scope)."""
    if rows > limit:
        fail(fn, name, f"has {rows} rows", f"at most {limit} (MAX_ROWS; run larger batches op by op)")


def check_position(fn: str, pos: int, count: int, maxlen: int) -> None:
    """Positions ``pos .. pos + count - 1`` lie in a KV cache of ``maxlen`` positions."""
    if 0 <= pos and pos + count <= maxlen:
        return
    raise KernelInputError(
        f"{fn}: positions {pos}..{pos + count - 1} do not fit the KV cache of {maxlen} "
        f"positions, expected 0 <= pos and pos + {count} <= maxlen"
    )


def check_kv_caches(
    fn: str,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    batch: int | None,
    kv_heads: int,
    head_dim: int,
    maxlen: int | None = None,
    names: tuple[str, str] = ("k_cache", "v_cache"),
) -> int:
    """Both caches float32 contiguous CPU ``[batch, kv_heads, maxlen, head_dim]`` of the same shape (``batch``
    and ``maxlen`` None: ``k_cache``'s own); returns ``maxlen``."""
    check_tensor(fn, names[0], k_cache)
    check_tensor(fn, names[1], v_cache)
    kshape = k_cache.shape
    own = len(kshape) == 4
    b = batch if batch is not None else (kshape[0] if own else -1)
    n = maxlen if maxlen is not None else (kshape[2] if own else -1)
    if kshape != (b, kv_heads, n, head_dim) or v_cache.shape != kshape:
        want_b = "B" if batch is None else f"B={batch}"
        want_n = "maxlen" if maxlen is None else f"maxlen={maxlen}"
        raise KernelInputError(
            f"{fn}: KV caches {names[0]} {_shape_str(tuple(kshape))} / {names[1]} {_shape_str(tuple(v_cache.shape))} "
            f"do not match [{want_b}, KV={kv_heads}, {want_n}, D={head_dim}], expected two caches of that shape"
        )
    return n


def check_rope(fn: str, cos: Tensor, sin: Tensor, *, batch: int, head_dim: int) -> None:
    """Rotary tables of one decode step: float32 contiguous CPU ``[B, 1, D]`` or ``[B, D]``, both of the same
    shape (the kernel reads ``B * D`` values of each)."""
    check_tensor(fn, "cos", cos)
    check_tensor(fn, "sin", sin)
    shape = cos.shape
    if shape != (batch, 1, head_dim) and shape != (batch, head_dim):
        fail(
            fn,
            "cos",
            f"has shape {_shape_str(tuple(shape))}",
            f"({batch}, 1, {head_dim}) or ({batch}, {head_dim}) ([B, 1, D] or [B, D])",
        )
    if sin.shape != shape:
        fail(fn, "sin", f"has shape {_shape_str(tuple(sin.shape))}", f"{_shape_str(tuple(shape))} (cos's shape)")


def _dense_f32(t: Tensor) -> bool:
    return t.dtype is F32 and t.is_cpu and t.layout is _STRIDED and t.is_contiguous()


def check_decode_attention(
    fn: str,
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: int,
    cos: Tensor,
    sin: Tensor,
    q_norm: Tensor | None,
    k_norm: Tensor | None,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> int:
    """Everything ``awqkit_decode_attention`` reads and writes for one decode step of ``B`` rows: ``qkv [B,
    (H + 2 KV) * D]`` (rows of exactly that width), caches ``[B, KV, maxlen, D]``, ``cos``/``sin [B, 1, D]`` or
    ``[B, D]``, ``q_norm``/``k_norm [D]`` or None, all float32 contiguous CPU; ``D % 8 == 0`` (8-float
    vectors), ``H % KV == 0`` (a query head's KV head is ``h / (H / KV)``), ``0 <= pos < maxlen`` (the
    cache row written). Returns ``maxlen``. The caller sizes ``out [B, H * D]`` and the scratch
    ``B * H * maxlen`` from these checked numbers."""
    h, kv, d = heads, kv_heads, head_dim
    try:  # the success path in one expression (~1.5 us: this runs once per layer and token)
        b, ks, cs = qkv.shape[0], k_cache.shape, cos.shape
        if (
            d >= 8
            and d % 8 == 0
            and h >= kv >= 1
            and h % kv == 0
            and qkv.shape == (b, (h + 2 * kv) * d)
            and ks == (b, kv, ks[2], d)
            and v_cache.shape == ks
            and 0 <= pos < ks[2]
            and (cs == (b, 1, d) or cs == (b, d))
            and sin.shape == cs
            and _dense_f32(qkv)
            and _dense_f32(k_cache)
            and _dense_f32(v_cache)
            and _dense_f32(cos)
            and _dense_f32(sin)
            and (q_norm is None or (q_norm.shape == (d,) and _dense_f32(q_norm)))
            and (k_norm is None or (k_norm.shape == (d,) and _dense_f32(k_norm)))
        ):
            return int(ks[2])
    except (AttributeError, IndexError, TypeError):  # not tensors, too few dims: the checks below say which
        pass
    check_size(fn, "head_dim", d, minimum=8, multiple_of=8, why="the kernel reads 8 floats at a time")
    check_size(fn, "kv_heads", kv)
    check_size(fn, "heads", h, multiple_of=kv, why=f"whole groups of kv_heads={kv}")
    check_tensor(fn, "qkv", qkv)
    if qkv.dim() != 2:
        fail(fn, "qkv", f"has shape {_shape_str(tuple(qkv.shape))}", "[B, (heads + 2 kv_heads) * head_dim] (2 dims)")
    b = qkv.shape[0]
    check_tensor(fn, "qkv", qkv, shape=(b, (h + 2 * kv) * d), what="[B, (heads + 2 kv_heads) * head_dim]")
    maxlen = check_kv_caches(fn, k_cache, v_cache, batch=b, kv_heads=kv, head_dim=d)
    check_position(fn, pos, 1, maxlen)
    check_rope(fn, cos, sin, batch=b, head_dim=d)
    check_optional(fn, "q_norm", q_norm, shape=(d,), what="[head_dim]")
    check_optional(fn, "k_norm", k_norm, shape=(d,), what="[head_dim]")
    return maxlen


__all__ = [
    "F32",
    "check_decode_attention",
    "check_kv_caches",
    "check_last_dim",
    "check_optional",
    "check_position",
    "check_rope",
    "check_rows",
    "check_size",
    "check_tensor",
    "fail",
]
