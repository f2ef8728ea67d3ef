"""Bit-exact tests of the packed layouts (AutoAWQ GEMM, compressed-tensors pack-quantized)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from awqkit.quant import primitives as P
from awqkit.quant.packing import (
    AWQ_ORDER,
    dequantize_ct,
    dequantize_gemm,
    pack_ct,
    pack_gemm,
    unpack_ct,
    unpack_gemm,
)

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
TWO32 = 1 << 32


def _rand_int(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)


def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- GEMM
GEMM_CASES = [
    (out_f, in_f, g)
    for out_f, in_f in [(8, 32), (24, 256), (64, 128)]
    for g in (32, 64, 128, -1)
    if g == -1 or in_f % g == 0
]


@pytest.mark.parametrize("out_f,in_f,group_size", GEMM_CASES)
def test_gemm_roundtrip_bit_exact(out_f, in_f, group_size):
    n_groups = 1 if group_size == -1 else in_f // group_size
    q = _rand_int((out_f, in_f), 4, 1)
    zeros = _rand_int((out_f, n_groups), 4, 2)
    scales = torch.rand(out_f, n_groups) + 0.01
    qweight, qzeros, sc = pack_gemm(q, zeros, scales)
    assert qweight.dtype == torch.int32 and qweight.shape == (in_f, out_f // 8)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, out_f // 8)
    assert sc.dtype == torch.float16 and sc.shape == (n_groups, out_f)
    assert bool((qweight < 0).any()), "random nibbles >= 8 in slot 7 must produce negative int32 words"
    q2, z2, s2 = unpack_gemm(qweight, qzeros, sc)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)
    assert torch.equal(s2, scales.half().float())


def test_gemm_hand_worked_word():
    # One input row, outputs 0..7 = [1..8]. Nibble i holds output AWQ_ORDER[i] = [0,2,4,6,1,3,5,7]:
    # nibbles (low->high) 1,3,5,7,2,4,6,8 -> 0x86427531, bit 31 set -> stored as a negative int32.
    q = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8]], dtype=torch.int32)
    zeros = q.clone()
    qweight, qzeros, _ = pack_gemm(q, zeros, torch.ones(8, 1))
    expected = 0x86427531 - TWO32
    assert qweight.tolist() == [[expected]] and qzeros.tolist() == [[expected]]
    assert expected == -2042464975


def test_gemm_hand_worked_top_nibble_and_interleave():
    # 15 at output 7 -> nibble 7 (bits 28..31): 0xF0000000 = -268435456 as int32.
    q = torch.zeros(16, 1, dtype=torch.int32)
    q[7, 0] = 15
    q[1, 0] = 15  # output 1 sits in nibble 4 (AWQ_ORDER[4] == 1): 0x000F0000
    q[8 + 2, 0] = 3  # second word, output 2 -> nibble 1: 0x00000030
    qweight, _, _ = pack_gemm(q, torch.zeros(16, 1, dtype=torch.int32), torch.ones(16, 1))
    assert qweight.tolist() == [[0xF00F0000 - TWO32, 0x00000030]]
    assert int(qweight[0, 0]) == -268435456 + 0x000F0000


def test_awq_order_constants():
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_gemm_matches_documented_autoawq_formula():
    # AutoAWQ (anchors §2.1): intweight [K, N]; for col in N/8: for i in 8:
    #   qweight[:, col] |= intweight[:, col*8 + AWQ_ORDER[i]] << 4*i     (explicit loops as the oracle)
    q = _rand_int((32, 16), 4, 7)
    qweight, _, _ = pack_gemm(q, torch.zeros(32, 1, dtype=torch.int32), torch.ones(32, 1))
    intweight = q.t().to(torch.int64)
    ref = torch.zeros(16, 4, dtype=torch.int64)
    for col in range(4):
        for i in range(8):
            ref[:, col] |= intweight[:, col * 8 + [0, 2, 4, 6, 1, 3, 5, 7][i]] << (4 * i)
    assert torch.equal(_u32(qweight), ref)


def test_gemm_errors():
    ok_z, ok_s = torch.zeros(8, 1, dtype=torch.int32), torch.ones(8, 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_gemm(torch.zeros(12, 4, dtype=torch.int32), torch.zeros(12, 1, dtype=torch.int32), torch.ones(12, 1))
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_gemm(torch.full((8, 4), 16, dtype=torch.int32), ok_z, ok_s)
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_gemm(torch.full((8, 4), -1, dtype=torch.int32), ok_z, ok_s)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_gemm(torch.zeros(8, 4), ok_z, ok_s)
    with pytest.raises(ValueError, match=r"\[out, n_groups\]"):
        pack_gemm(torch.zeros(8, 4, dtype=torch.int32), torch.zeros(8, 2, dtype=torch.int32), ok_s)
    with pytest.raises(ValueError, match="not divisible"):
        pack_gemm(torch.zeros(8, 5, dtype=torch.int32), torch.zeros(8, 2, dtype=torch.int32), torch.ones(8, 2))
    qweight, qzeros, sc = pack_gemm(torch.zeros(8, 4, dtype=torch.int32), ok_z, ok_s)
    with pytest.raises(ValueError, match="must be int32"):
        unpack_gemm(qweight.long(), qzeros, sc)
    with pytest.raises(ValueError, match="inconsistent GEMM tensors"):
        unpack_gemm(qweight, qzeros, torch.ones(1, 16))
    with pytest.raises(ValueError, match="group_size=2 implies 2 groups"):
        dequantize_gemm(qweight, qzeros, sc, group_size=2)


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("zero_point", [True, False])
def test_dequantize_gemm_equals_fake_quantize(group_size, zero_point):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    q, scales, zeros = P.quantize_weight(w, 4, group_size, zero_point)
    packed = pack_gemm(q, zeros, scales)
    deq = dequantize_gemm(*packed, group_size=group_size)
    assert deq.dtype == torch.float32
    assert torch.equal(deq, P.fake_quantize(w, 4, group_size, zero_point))


# ----------------------------------------------------------------------------- compressed-tensors
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("out_f,in_f,n_groups", [(8, 32, 1), (17, 45, 5), (40, 128, 4)])
def test_ct_roundtrip_bit_exact(bits, out_f, in_f, n_groups):
    q = _rand_int((out_f, in_f), bits, bits)
    zeros = _rand_int((out_f, n_groups), bits, 100 + bits)
    scales = torch.rand(out_f, n_groups)
    d = pack_ct(q, zeros, scales, bits)
    assert d["weight_packed"].shape == (out_f, math.ceil(in_f * bits / 32))
    assert d["weight_zero_point"].shape == (math.ceil(out_f * bits / 32), n_groups)
    assert d["weight_shape"].dtype == torch.int64 and d["weight_shape"].tolist() == [out_f, in_f]
    assert d["weight_scale"].dtype == torch.float16
    q2, z2, s2 = unpack_ct(d["weight_packed"], d["weight_scale"], d["weight_shape"], bits, d["weight_zero_point"])
    assert torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(s2, scales.half().float())


def test_ct_hand_worked_words():
    # 3 bits, 11 values -> 33 bits -> 2 words. Element 0 = 7 at bits 0..2 (0x7). Element 10 = 5 = 0b101 starts
    # at bit 30: its low bits 0b01 land in bits 30..31 of word 0 (0x40000000), its top bit in bit 0 of word 1.
    q = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.int32)
    d = pack_ct(q, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), 3)
    assert d["weight_packed"].tolist() == [[0x40000007, 0x00000001]]
    # 4 bits: nibble i = element i (no interleave): [1..8] -> 0x87654321 (negative int32).
    q4 = torch.arange(1, 9, dtype=torch.int32).unsqueeze(0)
    d4 = pack_ct(q4, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), 4)
    assert d4["weight_packed"].tolist() == [[0x87654321 - TWO32]]


def test_ct_symmetric_omits_zero_point():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    q, scales, zeros = P.quantize_weight(w, 3, 32, zero_point=False)
    d = pack_ct(q, zeros, scales, 3, include_zero_point=False)
    assert "weight_zero_point" not in d
    deq = dequantize_ct(d["weight_packed"], d["weight_scale"], d["weight_shape"], 3)
    assert torch.equal(deq, P.fake_quantize(w, 3, 32, zero_point=False))
    with pytest.raises(ValueError, match="symmetric"):
        pack_ct(q, torch.zeros_like(zeros), scales, 3, include_zero_point=False)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (5, -1), (8, 32)])
def test_dequantize_ct_equals_fake_quantize(bits, group_size):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits))
    q, scales, zeros = P.quantize_weight(w, bits, group_size, True)
    d = pack_ct(q, zeros, scales, bits)
    deq = dequantize_ct(d["weight_packed"], d["weight_scale"], d["weight_shape"], bits, d["weight_zero_point"])
    assert torch.equal(deq, P.fake_quantize(w, bits, group_size, True))


def test_ct_reads_older_padded_layout():
    bits, per_word = 3, 10  # old layout: 10 whole 3-bit elements per word, 2 bits unused
    q = _rand_int((4, 64), bits, 11)
    padded = torch.nn.functional.pad(q, (0, 70 - 64)).view(4, 7, per_word).to(torch.int64)
    words = (padded << (torch.arange(per_word) * bits)).sum(-1).to(torch.int32)  # max 30 bits: no sign issue
    assert words.shape[1] != math.ceil(64 * bits / 32)  # 7 vs 6 words: detectable
    q2, _, _ = unpack_ct(words, torch.ones(4, 1), (4, 64), bits)
    assert torch.equal(q2, q)
    with pytest.raises(ValueError, match="packed words per row"):
        unpack_ct(words[:, :5], torch.ones(4, 1), (4, 64), bits)


def test_ct_errors():
    with pytest.raises(ValueError, match="bits=9"):
        pack_ct(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(8, 1, dtype=torch.int32), torch.ones(8, 1), 9)
    with pytest.raises(ValueError, match="outside the 3-bit range"):
        pack_ct(torch.full((8, 8), 8, dtype=torch.int32), torch.zeros(8, 1, dtype=torch.int32), torch.ones(8, 1), 3)
    d = pack_ct(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(8, 1, dtype=torch.int32), torch.ones(8, 1), 3)
    with pytest.raises(ValueError, match="rows but weight_shape"):
        unpack_ct(d["weight_packed"], d["weight_scale"], (9, 8), 3, d["weight_zero_point"])


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors not installed")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_ct_matches_compressed_tensors_library(bits):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(bits))
    q, scales, zeros = P.quantize_weight(w, bits, 32, True)
    d = pack_ct(q, zeros, scales, bits)
    offset = 2 ** (bits - 1)
    assert torch.equal(d["weight_packed"], pack_to_int32((q - offset).to(torch.int8), bits))
    assert torch.equal(d["weight_zero_point"], pack_to_int32((zeros - offset).to(torch.int8), bits, packed_dim=0))
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights={"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
    )
    ct_weight = PackedQuantizationCompressor.decompress(dict(d), scheme)["weight"]
    # compressed-tensors dequantizes in the fp16 scale dtype: one rounding of our exact fp32 product.
    assert torch.equal(ct_weight.float(), P.fake_quantize(w, bits, 32, True).half().float())
