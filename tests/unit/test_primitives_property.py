"""Property tests of the quantizer primitives and packers against an independent reference.

The reference below is written from the formulas of :mod:`awqkit.quant.primitives`' docstring in NumPy, one
group at a time (no shared code with awqkit): per group of ``g`` input channels,

* asymmetric: ``scale = max(max - min, 1e-5) / (2^b - 1)``, rounded to the scale dtype;
  ``zero = clamp(round(-min / scale), 0, 2^b - 1)``;
* symmetric: ``scale = max(max|w|, 1e-5) / (2^(b-1) - 1)``, rounded; ``zero = 2^(b-1)``;
* ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, ``dq = (q - zero) * scale``,

all in float32 arithmetic (as the docstring says), ``round`` half to even, fp16 rounding by NumPy's own
float16 conversion and bf16 rounding by hand on the float32 bits. The packers are checked against bit
layouts rebuilt with Python integers from :mod:`awqkit.quant.packing`'s docstring (AWQ nibble order, dense
little-endian bit streams). Hypothesis draws bits 2..8, group sizes 32/64/128/-1, shapes, symmetric or not,
scale dtypes fp16/bf16/fp32 and value ranges including constant groups, tiny ranges, one-signed groups and
wide ones; ``derandomize=True`` keeps CI reproducible.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awqkit.quant import primitives as P
from awqkit.quant.packing import pack_ct, pack_gemm, unpack_ct, unpack_gemm

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # from the packing docstring: nibble i holds column c*8 + AWQ_ORDER[i]
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
# relative rounding unit of each scale dtype for normal numbers (fp16: 10 stored mantissa bits, bf16: 7)
F32_EPS = np.float32(2.0**-23)


# --------------------------------------------------------------------------- the independent reference
def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and back, on the bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def _round_scale(x: np.float32, kind: str) -> np.float32:
    if kind == "fp16":
        return np.float32(np.float16(x))
    if kind == "bf16":
        return _bf16(np.array([x], dtype=np.float32))[0]
    return np.float32(x)


def reference(w: np.ndarray, bits: int, group: int, zero_point: bool, kind: str) -> dict[str, np.ndarray]:
    """scales/zeros ``[out, n_groups]``, q/dq ``[out, in]`` and the unrounded scales, group by group."""
    out_f, in_f = w.shape
    g = in_f if group == -1 else group
    n = in_f // g
    max_int = 2**bits - 1
    scales = np.zeros((out_f, n), np.float32)
    exact = np.zeros((out_f, n), np.float64)
    zeros = np.zeros((out_f, n), np.int64)
    q = np.zeros((out_f, in_f), np.int64)
    dq = np.zeros((out_f, in_f), np.float32)
    for r in range(out_f):
        for j in range(n):
            x = w[r, j * g : (j + 1) * g].astype(np.float32)
            if zero_point:
                span = np.float32(max(np.float32(x.max()) - np.float32(x.min()), np.float32(1e-5)))
                s_exact = np.float32(span / np.float32(max_int))
                s = _round_scale(s_exact, kind)
                z = int(np.clip(np.round(np.float32(-x.min()) / s), 0, max_int))
            else:
                half = 2 ** (bits - 1)
                amax = np.float32(max(np.float32(np.abs(x).max()), np.float32(1e-5)))
                s_exact = np.float32(amax / np.float32(half - 1))
                s = _round_scale(s_exact, kind)
                z = half
            qq = np.clip(np.round(x / s) + z, 0, max_int).astype(np.int64)
            scales[r, j], exact[r, j], zeros[r, j] = s, s_exact, z
            q[r, j * g : (j + 1) * g] = qq
            dq[r, j * g : (j + 1) * g] = (qq - z).astype(np.float32) * s
    return {"scales": scales, "exact": exact, "zeros": zeros, "q": q, "dq": dq, "g": np.array(g)}


# --------------------------------------------------------------------------- strategies
@st.composite
def weights(draw: st.DrawFn, out_choices: tuple[int, ...] = (1, 2, 3, 5, 8)) -> tuple[np.ndarray, int]:
    """A float32 ``[out, in]`` weight whose groups are drawn from several kinds of value ranges, and its group
    size (32/64/128 or -1)."""
    group = draw(st.sampled_from([32, 64, 128, -1]))
    n_groups = draw(st.integers(1, 3))
    in_f = (group if group > 0 else draw(st.sampled_from([32, 64, 96, 160]))) * (n_groups if group > 0 else 1)
    out_f = draw(st.sampled_from(out_choices))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = group if group > 0 else in_f
    w = np.empty((out_f, in_f), np.float32)
    for r in range(out_f):
        for j in range(in_f // g):
            kind = draw(
                st.sampled_from(["normal", "constant", "tiny", "positive", "negative", "wide", "zero", "outlier"])
            )
            scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 30.0]))
            if kind == "normal":
                x = rng.normal(0, scale, g)
            elif kind == "constant":
                x = np.full(g, draw(st.floats(-2, 2, width=32)))
            elif kind == "tiny":
                x = draw(st.floats(-1, 1, width=32)) + rng.uniform(-1, 1, g) * draw(st.sampled_from([1e-7, 1e-5, 1e-3]))
            elif kind == "positive":
                x = rng.uniform(0.5, 1.5, g) * scale
            elif kind == "negative":
                x = -rng.uniform(0.5, 1.5, g) * scale
            elif kind == "wide":
                x = rng.uniform(-1, 1, g) * 1e4
            elif kind == "zero":
                x = np.zeros(g)
            else:
                x = rng.normal(0, 0.02, g)
                x[rng.integers(g)] = draw(st.sampled_from([-8.0, 5.0, 100.0]))
            w[r, j * g : (j + 1) * g] = x.astype(np.float32)
    return w, group


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# --------------------------------------------------------------------------- primitives
@PROPS
@given(wg=weights(), bits=st.integers(2, 8), zero_point=st.booleans(), kind=st.sampled_from(sorted(SCALE_DTYPES)))
def test_primitives_match_the_reference(wg: tuple[np.ndarray, int], bits: int, zero_point: bool, kind: str) -> None:
    w, group = wg
    ref = reference(w, bits, group, zero_point, kind)
    wt = _t(w)
    scales, zeros = P.compute_qparams(wt, bits, group, zero_point, scale_dtype=SCALE_DTYPES[kind])
    assert scales.dtype == torch.float32 and zeros.dtype == torch.int32
    np.testing.assert_array_equal(scales.numpy(), ref["scales"])
    np.testing.assert_array_equal(zeros.numpy(), ref["zeros"])
    q = P.quantize(wt, scales, zeros, bits, group)
    np.testing.assert_array_equal(q.numpy(), ref["q"])
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    dq = P.dequantize(q, scales, zeros, group)
    np.testing.assert_array_equal(dq.numpy(), ref["dq"])
    np.testing.assert_array_equal(P.fake_quantize(wt, bits, group, zero_point, SCALE_DTYPES[kind]).numpy(), ref["dq"])
    buf = wt.clone()  # the in-place form writes the same values into its argument
    assert P.fake_quantize(buf, bits, group, zero_point, SCALE_DTYPES[kind], inplace=True) is buf
    np.testing.assert_array_equal(buf.numpy(), ref["dq"])
    # the dequantized grid points are fixed points of quantization with the same parameters
    assert torch.equal(P.quantize(dq, scales, zeros, bits, group), q)


@PROPS
@given(wg=weights(), bits=st.integers(2, 8), zero_point=st.booleans(), kind=st.sampled_from(sorted(SCALE_DTYPES)))
def test_error_is_at_most_half_a_step(wg: tuple[np.ndarray, int], bits: int, zero_point: bool, kind: str) -> None:
    """``|w - dq| <= scale / 2 + slack`` for every value the formula does not clip.

    Slack, derived: the grid is ``(j - zero) * s`` for ``j = 0..M`` (``M = 2^b - 1``). Rounding to the nearest
    grid point costs at most ``s / 2``. Values can fall outside the grid only because ``s`` is the scale
    *rounded* to its dtype: the grid spans ``M * s`` (asymmetric; ``(2^(b-1) - 1) * s`` above zero for
    symmetric) where the range needs ``M * s_exact``, so a value at the range's end is at most
    ``M * |s - s_exact|`` beyond the last grid point (the zero point's own rounding is the ``s / 2`` already
    counted). That is the first slack term; it is about ``(max - min) * 2^-11`` for fp16 scales (``2^-8`` for
    bf16), and can be larger in relative terms for scales in the fp16 subnormal range (tiny groups). The
    second is float32 arithmetic: ``w / s`` and ``(q - zero) * s`` each round once (relative ``2^-24``), so a
    few ulps of the largest magnitude involved. Where the formula itself clips -- asymmetric groups whose
    ``round(-min / scale)`` falls outside ``[0, M]`` (one-signed groups away from zero, constant groups), so
    the zero point is clamped and the grid cannot reach the range -- values beyond the grid's ends must sit
    exactly on the end point (``q`` is ``0`` or ``M``).
    """
    w, group = wg
    ref = reference(w, bits, group, zero_point, kind)
    g = int(ref["g"])
    max_int = 2**bits - 1
    above = max_int if zero_point else 2 ** (bits - 1) - 1  # grid steps above zero that the range needs
    for r in range(w.shape[0]):
        for j in range(w.shape[1] // g):
            x = w[r, j * g : (j + 1) * g].astype(np.float64)
            s, s_exact, z = float(ref["scales"][r, j]), float(ref["exact"][r, j]), int(ref["zeros"][r, j])
            q, dq = ref["q"][r, j * g : (j + 1) * g], ref["dq"][r, j * g : (j + 1) * g].astype(np.float64)
            err = np.abs(x - dq)
            arith = 8 * float(F32_EPS) * max(float(np.abs(x).max()), max_int * s)
            bound = s / 2 + above * abs(s - s_exact) + arith
            clamped = zero_point and not 0 <= np.round(np.float32(-x.min()) / np.float32(s)) <= max_int
            if not clamped:
                assert err.max() <= bound, (r, j, err.max(), bound, s, s_exact)
                continue
            lo, hi = -z * s, (max_int - z) * s
            inside = (x >= lo - s / 2) & (x <= hi + s / 2)
            assert (err[inside] <= s / 2 + arith).all()
            assert np.isin(q[~inside], (0, max_int)).all()
            assert np.allclose(dq[~inside & (x > hi)], hi) and np.allclose(dq[~inside & (x < lo)], lo)


# --------------------------------------------------------------------------- packers
def _gemm_reference(q: np.ndarray) -> np.ndarray:
    """``[out, in]`` nibbles -> uint32 ``[in, out/8]`` words: nibble i of word [k, c] = q[c*8 + AWQ_ORDER[i], k]."""
    out_f, in_f = q.shape
    words = np.zeros((in_f, out_f // 8), np.uint64)
    for k in range(in_f):
        for c in range(out_f // 8):
            words[k, c] = sum(int(q[c * 8 + AWQ_ORDER[i], k]) << (4 * i) for i in range(8))
    return words.astype(np.uint32)


def _stream_reference(rows: np.ndarray, bits: int) -> np.ndarray:
    """Each row's values as one little-endian bit stream of ``bits``-bit fields, cut into uint32 words."""
    n_rows, n = rows.shape
    n_words = -(-n * bits // 32)
    out = np.zeros((n_rows, n_words), np.uint32)
    for r in range(n_rows):
        stream = 0
        for i in range(n):
            stream |= int(rows[r, i]) << (i * bits)
        for j in range(n_words):
            out[r, j] = (stream >> (32 * j)) & 0xFFFFFFFF
    return out


def _u32(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.int32
    return t.numpy().view(np.uint32)


@PROPS
@given(
    out_f=st.sampled_from([8, 16, 24]),
    in_f=st.sampled_from([32, 64, 128]),
    group=st.sampled_from([32, -1]),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["fp16", "bf16", "fp32"]),
)
def test_gemm_pack_matches_the_layout_and_round_trips(out_f: int, in_f: int, group: int, seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    n = in_f // (in_f if group == -1 else group)
    q = rng.integers(0, 16, (out_f, in_f))
    zeros = rng.integers(0, 16, (out_f, n))
    scales = _t(rng.uniform(1e-4, 1, (out_f, n)).astype(np.float32))
    if SCALE_DTYPES[kind] is not None:
        scales = scales.to(SCALE_DTYPES[kind]).float()
    qweight, qzeros, packed_scales = pack_gemm(_t(q).int(), _t(zeros).int(), scales)
    np.testing.assert_array_equal(_u32(qweight), _gemm_reference(q))
    np.testing.assert_array_equal(_u32(qzeros), _gemm_reference(zeros))
    assert packed_scales.dtype == torch.float16 and packed_scales.shape == (n, out_f)
    uq, uz, us = unpack_gemm(qweight, qzeros, packed_scales)
    np.testing.assert_array_equal(uq.numpy(), q)
    np.testing.assert_array_equal(uz.numpy(), zeros)
    assert torch.equal(us, scales.half().float())


@PROPS
@given(
    bits=st.integers(2, 8),
    out_f=st.integers(1, 12),
    in_f=st.sampled_from([32, 64, 96, 128]),
    group=st.sampled_from([32, -1]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_ct_pack_matches_the_layout_and_round_trips(
    bits: int, out_f: int, in_f: int, group: int, symmetric: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    n = in_f // (in_f if group == -1 else group)
    q = rng.integers(0, 2**bits, (out_f, in_f))
    zeros = np.full((out_f, n), 2 ** (bits - 1)) if symmetric else rng.integers(0, 2**bits, (out_f, n))
    scales = _t(np.float16(rng.uniform(1e-4, 1, (out_f, n))).astype(np.float32))
    packed = pack_ct(_t(q).int(), _t(zeros).int(), scales, bits, include_zero_point=not symmetric)
    np.testing.assert_array_equal(_u32(packed["weight_packed"]), _stream_reference(q, bits))
    if symmetric:
        assert "weight_zero_point" not in packed
    else:  # zero points are streamed along the output dim: one stream per group column
        np.testing.assert_array_equal(_u32(packed["weight_zero_point"]).T, _stream_reference(zeros.T, bits))
    assert packed["weight_shape"].tolist() == [out_f, in_f]
    uq, uz, us = unpack_ct(
        packed["weight_packed"], packed["weight_scale"], packed["weight_shape"], bits, packed.get("weight_zero_point")
    )
    np.testing.assert_array_equal(uq.numpy(), q)
    np.testing.assert_array_equal(uz.numpy(), zeros)
    assert torch.equal(us, scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_reference_is_not_vacuous(bits: int) -> None:
    """Sanity of the reference itself on a hand-computed group: [-1, 0, 0.5, 2] at ``bits`` asymmetric fp32."""
    w = np.array([[-1.0, 0.0, 0.5, 2.0] * 8], np.float32)
    ref = reference(w, bits, 32, True, "fp32")
    s = np.float32(np.float32(3.0) / np.float32(2**bits - 1))
    assert ref["scales"][0, 0] == s and ref["zeros"][0, 0] == int(np.round(np.float32(1.0) / s))
    assert ref["q"][0, 0] == 0 and ref["q"][0, 3] == 2**bits - 1


def test_fake_quantize_inplace_refuses_what_it_cannot_overwrite() -> None:
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="contiguous float32"):
        P.fake_quantize(w.bfloat16(), 4, 32, inplace=True)
    with pytest.raises(ValueError, match="not contiguous"):
        P.fake_quantize(torch.randn(64, 4).T, 4, 32, inplace=True)
    before = w.clone()
    P.fake_quantize(w, 4, 32)  # the default leaves its argument alone
    assert torch.equal(w, before)
