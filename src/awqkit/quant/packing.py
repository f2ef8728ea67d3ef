"""Packed integer-weight layouts: AutoAWQ "GEMM" (4 bits) and compressed-tensors "pack-quantized".

Inputs everywhere are the outputs of :mod:`awqkit.quant.primitives`: unsigned integers ``q`` ``[out, in]``
and ``zeros`` ``[out, n_groups]`` in ``[0, 2^bits - 1]``, and float ``scales`` ``[out, n_groups]``; the
dequantized weight is ``(q - zero) * scale``. Every function is vectorized (no Python loop over columns)
and bit-exact: ``unpack(pack(x)) == x``.

AutoAWQ GEMM (``bits == 4``; ``K = in``, ``N = out``, ``G = n_groups = K / group_size``)
-----------------------------------------------------------------------------------------
* ``qweight`` int32 ``[K, N/8]``: word ``qweight[k, c]`` holds the 8 output columns ``c*8 .. c*8+7`` of
  input row ``k``; bits ``4i .. 4i+3`` (``i = 0`` is the least significant nibble) hold
  ``q[c*8 + AWQ_ORDER[i], k]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``. Example: outputs
  ``[1, 2, 3, 4, 5, 6, 7, 8]`` give nibbles (low to high) ``1, 3, 5, 7, 2, 4, 6, 8``, i.e. the word
  ``0x86427531``. A value >= 8 in nibble 7 sets bit 31, so the stored int32 is negative
  (``0x86427531`` is stored as ``-0x79BD8ACF``); packing runs in int64 and wraps explicitly,
  unpacking shifts arithmetically and masks with ``0xF``, so the sign never leaks into a nibble.
* ``qzeros`` int32 ``[G, N/8]``: ``zeros`` transposed to ``[G, N]`` and packed exactly like ``qweight``.
* ``scales`` fp16 ``[G, N]``: ``scales`` transposed.
* Constraints: ``N % 8 == 0``; ``K % G == 0`` (checked by the caller's group size).

compressed-tensors "pack-quantized" (any ``bits`` in 2..8; what llm-compressor writes)
---------------------------------------------------------------------------------------
* ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]``: each row is packed along the input dim as one
  dense little-endian bit stream: element ``i`` occupies stream bits ``i*bits .. i*bits+bits-1``,
  stream bit ``b`` is bit ``b % 32`` of word ``b // 32``. For 3/5/6/7 bits an element may straddle two
  words (low bits at the top of word ``j``, high bits at the bottom of word ``j+1``). The stored
  bits are the *unsigned* ``q``: compressed-tensors keeps ``q_signed = q - 2^(bits-1)`` in memory and
  adds ``2^(bits-1)`` back before packing, so ``q`` is what lands in the word.
* ``weight_zero_point`` int32 ``[ceil(N * bits / 32), G]``: ``zeros`` packed the same way along dim 0
  (the output dim); omitted for symmetric quantization (implicit zero ``2^(bits-1)``).
* ``weight_scale`` fp16 ``[N, G]`` (not transposed). ``weight_shape`` int64 ``[2] = [N, K]``.
* For 2/4/8 bits this equals the older compressed-tensors layout that padded every word with
  ``32 // bits`` whole elements; for 3/5/6/7 bits it matches compressed-tensors >= 0.20 (dense).
  :func:`unpack_ct` also reads the older padded layout (detected from the packed width).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from awqkit.quant.primitives import dequantize, resolve_group_size

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER: tuple[int, ...] = (0, 4, 1, 5, 2, 6, 3, 7)
_MASK32 = 0xFFFFFFFF
_ROW_CHUNK_ELEMS = 1 << 24  # bound int64 temporaries (~128 MiB) while packing big matrices


# --------------------------------------------------------------------------- validation helpers
def _check_int(t: Tensor, name: str, dims: int = 2) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (e.g. int32), got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_range(t: Tensor, name: str, bits: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2**bits - 1):
        raise ValueError(
            f"{name} has values in [{int(t.min())}, {int(t.max())}], outside the {bits}-bit range "
            f"[0, {2**bits - 1}]; quantize with primitives.quantize_weight(bits={bits}) first"
        )


def _check_params(q: Tensor, zeros: Tensor, scales: Tensor, bits: int) -> int:
    """Validate ``q [out,in]``, ``zeros``/``scales [out, n_groups]``; returns n_groups."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; use 2..8")
    _check_int(q, "q")
    _check_int(zeros, "zeros")
    if not isinstance(scales, Tensor) or not scales.is_floating_point() or scales.dim() != 2:
        got = getattr(scales, "dtype", type(scales))
        raise ValueError(f"scales must be a 2-D float tensor [out, n_groups], got {got}")
    out_f, in_f = q.shape
    if zeros.shape != scales.shape or zeros.shape[0] != out_f:
        raise ValueError(
            f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be [out, n_groups] "
            f"with out={out_f} (q is {tuple(q.shape)})"
        )
    n_groups = zeros.shape[1]
    if n_groups == 0 or in_f % n_groups != 0:
        raise ValueError(f"in_features={in_f} is not divisible into n_groups={n_groups} equal groups")
    _check_range(q, "q", bits)
    _check_range(zeros, "zeros", bits)
    return n_groups


def _to_int32(words: Tensor) -> Tensor:
    """int64 words in ``[0, 2^32)`` -> int32 with the same bit pattern (two's complement wrap)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# --------------------------------------------------------------------------- AutoAWQ GEMM
def pack_awq_rows(v: Tensor) -> Tensor:
    """``[R, N]`` nibbles -> int32 ``[R, N/8]`` in AWQ_ORDER (bits 4i.. hold column c*8+AWQ_ORDER[i])."""
    rows, n = v.shape
    order = torch.tensor(AWQ_ORDER, device=v.device)
    shifts = torch.arange(0, 32, 4, device=v.device, dtype=torch.int64)
    grouped = v.to(torch.int64).reshape(rows, n // 8, 8).index_select(2, order)
    return _to_int32((grouped << shifts).sum(dim=-1))


def unpack_awq_rows(words: Tensor) -> Tensor:
    """int32 ``[R, N/8]`` -> int32 nibbles ``[R, N]`` in natural column order.

    Column ``c*8 + j`` sits in nibble ``AWQ_REVERSE_ORDER[j]``, so one shift per column position
    (0, 16, 4, 20, 8, 24, 12, 28) reads the natural order directly, with no gather.
    """
    rows, cols = words.shape
    shifts = torch.tensor([4 * i for i in AWQ_REVERSE_ORDER], device=words.device, dtype=torch.int32)
    return ((words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).reshape(rows, cols * 8)


def pack_gemm(q: Tensor, zeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pack 4-bit ``q``/``zeros``/``scales`` into AutoAWQ GEMM tensors (layout in the module docstring).

    Args:
        q: int ``[out, in]`` in 0..15. zeros: int ``[out, n_groups]`` in 0..15. scales: float ``[out, n_groups]``.
    Returns:
        ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[n_groups, out/8]``, ``scales`` fp16 ``[n_groups, out]``.
    """
    _check_params(q, zeros, scales, 4)
    out_f = q.shape[0]
    if out_f % 8 != 0:
        raise ValueError(
            f"out_features={out_f} is not a multiple of 8, which the AutoAWQ GEMM layout requires; "
            "keep this linear in fp16 (modules_to_not_convert) or use bits != 4"
        )
    qweight = pack_awq_rows(q.t())
    qzeros = pack_awq_rows(zeros.t())
    return qweight.contiguous(), qzeros.contiguous(), scales.t().to(torch.float16).contiguous()


def unpack_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_gemm`.

    Args: ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[n_groups, out/8]``,
        ``scales`` float ``[n_groups, out]``.
    Returns: ``q`` int32 ``[out, in]``, ``zeros`` int32 ``[out, n_groups]``, ``scales`` float32 ``[out, n_groups]``.
    """
    for t, name in ((qweight, "qweight"), (qzeros, "qzeros")):
        _check_int(t, name)
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 (AutoAWQ GEMM layout), got {t.dtype}")
    if not isinstance(scales, Tensor) or not scales.is_floating_point() or scales.dim() != 2:
        raise ValueError("scales must be a 2-D float tensor [n_groups, out]")
    in_f, packed_out = qweight.shape
    n_groups, out_f = scales.shape
    if qzeros.shape != (n_groups, packed_out) or out_f != packed_out * 8:
        raise ValueError(
            f"inconsistent GEMM tensors: qweight {tuple(qweight.shape)} (expects [in, out/8]), qzeros "
            f"{tuple(qzeros.shape)} (expects [n_groups, out/8]), scales {tuple(scales.shape)} (expects [n_groups, out])"
        )
    if n_groups == 0 or in_f % n_groups != 0:
        raise ValueError(f"in_features={in_f} is not divisible into n_groups={n_groups} groups")
    q = unpack_awq_rows(qweight).t().contiguous()
    zeros = unpack_awq_rows(qzeros).t().contiguous()
    return q, zeros, scales.float().t().contiguous()


def dequantize_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """Float32 ``[out, in]`` weight ``(q - z) * s`` of AutoAWQ GEMM tensors; checks ``group_size`` matches."""
    q, zeros, sc = unpack_gemm(qweight, qzeros, scales)
    _check_group_size(q.shape[1], zeros.shape[1], group_size)
    return dequantize(q, sc, zeros, group_size)


def _check_group_size(in_f: int, n_groups: int, group_size: int) -> None:
    g = resolve_group_size(in_f, group_size)
    if in_f // g != n_groups:
        raise ValueError(
            f"group_size={group_size} implies {in_f // g} groups for in_features={in_f}, but the tensors "
            f"hold {n_groups}; read group_size from the checkpoint's quantization_config"
        )


# --------------------------------------------------------------------------- dense bit streams
def _pack_stream(v: Tensor, bits: int) -> Tensor:
    """Rows of ``bits``-bit unsigned values ``[R, n]`` -> int32 ``[R, ceil(n*bits/32)]`` dense LE streams."""
    rows, n = v.shape
    n_words = math.ceil(n * bits / 32)
    blocks = math.ceil(n / 32)  # 32 elements fill exactly `bits` words
    start = torch.arange(32, device=v.device, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    spill = (off + bits) > 32
    out = torch.empty(rows, n_words, dtype=torch.int32, device=v.device)
    chunk = max(1, _ROW_CHUNK_ELEMS // max(1, blocks * 32))
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        vv = torch.zeros(r1 - r0, blocks * 32, dtype=torch.int64, device=v.device)
        vv[:, :n] = v[r0:r1]
        vv = vv.view(r1 - r0, blocks, 32)
        acc = torch.zeros(r1 - r0, blocks, bits, dtype=torch.int64, device=v.device)
        acc.scatter_add_(2, word.expand_as(vv), (vv << off) & _MASK32)  # disjoint fields: add == or
        if bool(spill.any()):
            hi = vv[..., spill] >> (32 - off[spill])
            acc.scatter_add_(2, (word[spill] + 1).expand_as(hi), hi)
        out[r0:r1] = _to_int32(acc.view(r1 - r0, blocks * bits)[:, :n_words])
    return out


def _unpack_stream(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`_pack_stream`: int32 ``[R, ceil(n*bits/32)]`` -> int32 ``[R, n]``."""
    rows, n_words = words.shape
    blocks = math.ceil(n / 32)
    start = torch.arange(32, device=words.device, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    spill = (off + bits) > 32
    w = torch.zeros(rows, blocks * bits, dtype=torch.int64, device=words.device)
    w[:, :n_words] = words.to(torch.int64) & _MASK32
    w = w.view(rows, blocks, bits)
    lo = w[..., word] >> off
    hi = w[..., (word + 1).clamp(max=bits - 1)] << (32 - off)
    vals = torch.where(spill, lo | hi, lo) & (2**bits - 1)
    return vals.reshape(rows, blocks * 32)[:, :n].to(torch.int32)


def _unpack_padded(words: Tensor, bits: int, n: int) -> Tensor:
    """Older compressed-tensors layout: ``32 // bits`` whole elements per word, element j at bit j*bits."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    vals = ((words.to(torch.int64).unsqueeze(-1) & _MASK32) >> shifts) & (2**bits - 1)
    return vals.reshape(words.shape[0], -1)[:, :n].to(torch.int32)


def _unpack_any(words: Tensor, bits: int, n: int, name: str) -> Tensor:
    dense_w, padded_w = math.ceil(n * bits / 32), math.ceil(n / (32 // bits))
    if words.shape[1] == dense_w:
        return _unpack_stream(words, bits, n)
    if words.shape[1] == padded_w:
        return _unpack_padded(words, bits, n)
    raise ValueError(
        f"{name} has {words.shape[1]} packed words per row; {n} {bits}-bit values need {dense_w} (dense) "
        f"or {padded_w} (older padded layout); the tensor does not match weight_shape/num_bits"
    )


# --------------------------------------------------------------------------- compressed-tensors
def pack_ct(
    q: Tensor, zeros: Tensor, scales: Tensor, bits: int, *, include_zero_point: bool = True
) -> dict[str, Tensor]:
    """Pack into compressed-tensors "pack-quantized" tensors (layout in the module docstring).

    Args:
        q: int ``[out, in]``; zeros: int ``[out, n_groups]``; scales: float ``[out, n_groups]``; bits: 2..8.
        include_zero_point: False for symmetric checkpoints (zeros must then all be ``2^(bits-1)``).
    Returns:
        ``{"weight_packed": int32 [out, ceil(in*bits/32)], "weight_scale": fp16 [out, n_groups],
        "weight_zero_point": int32 [ceil(out*bits/32), n_groups] (if included), "weight_shape": int64 [2]}``.
    """
    _check_params(q, zeros, scales, bits)
    out_f, in_f = q.shape
    result = {
        "weight_packed": _pack_stream(q, bits),
        "weight_scale": scales.to(torch.float16).contiguous(),
    }
    if include_zero_point:
        result["weight_zero_point"] = _pack_stream(zeros.t(), bits).t().contiguous()
    elif bool((zeros != 2 ** (bits - 1)).any()):
        raise ValueError(
            f"include_zero_point=False (symmetric) needs every zero == {2 ** (bits - 1)}; "
            "pass include_zero_point=True for asymmetric weights"
        )
    result["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    return result


def unpack_ct(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_shape: Tensor | tuple[int, int],
    bits: int,
    weight_zero_point: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_ct`; ``weight_zero_point=None`` means symmetric (zero ``2^(bits-1)``).

    Returns: ``q`` int32 ``[out, in]``, ``zeros`` int32 ``[out, n_groups]``, ``scales`` float32 ``[out, n_groups]``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; use 2..8")
    _check_int(weight_packed, "weight_packed")
    out_f, in_f = (int(x) for x in (weight_shape.tolist() if isinstance(weight_shape, Tensor) else weight_shape))
    if weight_packed.shape[0] != out_f:
        raise ValueError(f"weight_packed has {weight_packed.shape[0]} rows but weight_shape says out={out_f}")
    if not isinstance(weight_scale, Tensor) or weight_scale.dim() != 2 or weight_scale.shape[0] != out_f:
        got = tuple(getattr(weight_scale, "shape", ()))
        raise ValueError(f"weight_scale must be [out={out_f}, n_groups], got {got}")
    n_groups = weight_scale.shape[1]
    if in_f % n_groups != 0:
        raise ValueError(f"in_features={in_f} is not divisible into n_groups={n_groups} groups")
    q = _unpack_any(weight_packed, bits, in_f, "weight_packed")
    if weight_zero_point is None:
        zeros = torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.int32, device=q.device)
    else:
        _check_int(weight_zero_point, "weight_zero_point")
        if weight_zero_point.shape[1] != n_groups:
            raise ValueError(
                f"weight_zero_point {tuple(weight_zero_point.shape)} must have n_groups={n_groups} columns"
            )
        zeros = _unpack_any(weight_zero_point.t(), bits, out_f, "weight_zero_point").t().contiguous()
    return q, zeros, weight_scale.float()


def dequantize_ct(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_shape: Tensor | tuple[int, int],
    bits: int,
    weight_zero_point: Tensor | None = None,
) -> Tensor:
    """Float32 ``[out, in]`` weight of compressed-tensors pack-quantized tensors."""
    q, zeros, scales = unpack_ct(weight_packed, weight_scale, weight_shape, bits, weight_zero_point)
    return dequantize(q, scales, zeros, q.shape[1] // scales.shape[1])


__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "pack_gemm",
    "unpack_gemm",
    "dequantize_gemm",
    "pack_ct",
    "unpack_ct",
    "dequantize_ct",
]
