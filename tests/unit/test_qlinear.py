"""QuantLinear, the kernel registry and module replacement/matching."""

from __future__ import annotations

import pytest
import torch
from conftest import random_linear  # noqa: E402
from torch import nn

from awqkit import kernels
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import get_module, match_names, name_matches, replace_linears, set_module
from awqkit.quant import primitives as P

_linear = random_linear


@pytest.mark.parametrize(
    "bits,group_size,zero_point,bias,fmt",
    [
        (4, 32, True, True, None),
        (4, -1, False, False, None),
        (3, 32, True, True, None),
        (5, 64, False, True, None),
        (8, -1, True, False, None),
        (4, 32, True, True, "pack-quantized"),
    ],
)
def test_forward_equals_fake_quantized_matmul(bits, group_size, zero_point, bias, fmt):
    lin = _linear(64, 48, bias=bias)
    ql = QuantLinear.from_linear(lin, bits, group_size, zero_point, format=fmt)
    assert ql.format == (fmt or ("gemm" if bits == 4 else "pack-quantized"))
    assert hasattr(ql, "qweight") == (ql.format == "gemm")
    ql.backend = "torch"  # the fp32 reference; faster backends are checked against it in tests/kernels
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    w_fq = P.fake_quantize(lin.weight.detach(), bits, group_size, zero_point)
    expected = x @ w_fq.t()
    if bias:
        expected = expected + lin.bias.detach().half().float()  # bias is stored in fp16
    y = ql(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ql.dequantized_weight(), w_fq)


def test_forward_keeps_input_dtype_and_computes_in_fp32_on_cpu():
    ql = QuantLinear.from_linear(_linear(32, 16), 4, 32)
    x = torch.randn(3, 32)
    y16 = ql(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    # fp32 compute then one rounding: equal to the fp32 result of the same bf16 input, rounded.
    assert torch.equal(y16, ql(x.to(torch.bfloat16).float()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="in_features=32"):
        ql(torch.randn(3, 31))


def test_empty_constructor_buffers():
    ql = QuantLinear(256, 64, bits=4, group_size=128, bias=True, dtype=torch.float16)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in ql.state_dict().items()}
    assert shapes == {
        "qweight": ((256, 8), torch.int32),
        "qzeros": ((2, 8), torch.int32),
        "scales": ((2, 64), torch.float16),
        "bias": ((64,), torch.float16),
    }
    ct = QuantLinear(100, 30, bits=3, group_size=-1, bias=False, dtype=torch.float16)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in ct.state_dict().items()}
    assert shapes == {
        "weight_packed": ((30, 10), torch.int32),  # ceil(100*3/32)
        "weight_scale": ((30, 1), torch.float16),
        "weight_zero_point": ((3, 1), torch.int32),  # ceil(30*3/32)
        "weight_shape": ((2,), torch.int64),
    }
    assert ct.weight_shape.tolist() == [30, 100] and ct.bias is None
    sym = QuantLinear(64, 16, bits=2, group_size=32, zero_point=False)
    assert "weight_zero_point" not in sym.state_dict()
    assert (ql.in_features, ql.out_features, ql.bits, ql.group_size) == (256, 64, 4, 128)


def test_constructor_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantLinear(64, 12, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits=9"):
        QuantLinear(64, 16, bits=9, group_size=32)
    with pytest.raises(ValueError, match="format='gemm' with bits=3"):
        QuantLinear(64, 16, bits=3, group_size=32, format="gemm")
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        QuantLinear(48, 16, bits=4, group_size=32)
    with pytest.raises(ValueError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), 4, 32)
    with torch.device("meta"):
        meta_lin = nn.Linear(32, 16)
    with pytest.raises(ValueError, match="meta"):
        QuantLinear.from_linear(meta_lin, 4, 32)


def test_dtype_casts_keep_stored_scales():
    ql = QuantLinear.from_linear(_linear(32, 16), 4, 32)
    x = torch.randn(3, 32)
    y = ql(x)
    ql.to(torch.bfloat16)
    assert ql.scales.dtype == torch.float16 and ql.bias.dtype == torch.float16
    assert torch.equal(ql(x), y)
    ql.float()
    assert ql.scales.dtype == torch.float16 and ql.qweight.dtype == torch.int32


def test_symmetric_gemm_stores_zero_8():
    ql = QuantLinear.from_linear(_linear(32, 16, bias=False), 4, 32, zero_point=False)
    assert ql.qzeros.tolist() == [[0x88888888 - (1 << 32)] * 2]


# ----------------------------------------------------------------------------- kernel registry
def test_registry_auto_is_the_best_available_and_errors_list_backends():
    # cpu-avx2 (priority 7, where its native kernels build) outranks cpu-int4 (5, where PyTorch ships its
    # int4 CPU ops), which outranks the torch reference (0)
    from awqkit.kernels import cpu_avx2, cpu_int4

    best = "cpu-avx2" if cpu_avx2.is_available() else "cpu-int4" if cpu_int4.is_available() else "torch"
    assert kernels.get_backend("auto").name == best
    assert "torch" in kernels.list_backends(only_available=True)
    with pytest.raises(ValueError, match=r"unknown kernel backend 'nope'.*torch"):
        kernels.get_backend("nope")
    with pytest.raises(ValueError, match="reserved"):
        kernels.register_backend("auto", lambda x, m: x, lambda: True)
    with pytest.raises(ValueError, match="already registered"):
        kernels.register_backend("torch", lambda x, m: x, lambda: True)


def test_registry_priority_supports_and_availability():
    calls = []
    builtin = kernels.list_backends()  # torch, cpu-int4, and triton where it is installed
    assert builtin[-1] == "torch" and "cpu-int4" in builtin

    def fake(x, module):
        calls.append(module.bits)
        return torch.zeros(*x.shape[:-1], module.out_features, dtype=x.dtype)

    kernels.register_backend("fake-hi", fake, lambda: True, priority=10, supports=lambda x, m: m.bits == 4)
    kernels.register_backend("fake-off", fake, lambda: False, priority=20)
    try:
        q4 = QuantLinear.from_linear(_linear(32, 16), 4, 32)
        q3 = QuantLinear.from_linear(_linear(32, 16), 3, 32)
        x = torch.randn(2, 32)
        assert torch.equal(q4(x), torch.zeros(2, 16))  # auto -> fake-hi (fake-off unavailable)
        assert not torch.equal(q3(x), torch.zeros(2, 16))  # fake-hi declines 3 bits -> torch
        assert calls == [4]
        q3.backend = "fake-hi"
        with pytest.raises(ValueError, match="does not support this call"):
            q3(x)
        with pytest.raises(ValueError, match="not available here"):
            kernels.get_backend("fake-off")
    finally:
        kernels.unregister_backend("fake-hi")
        kernels.unregister_backend("fake-off")
    assert kernels.list_backends() == builtin


# ----------------------------------------------------------------------------- replace / match
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.ModuleDict({"gate": nn.Linear(32, 8), "gate_proj": nn.Linear(32, 16), "act": nn.SiLU()})
        self.q_proj = nn.Linear(32, 32, bias=False)


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({"layers": nn.ModuleList([_Block(), _Block()])})


def test_match_names_never_substring():
    names = [n for n, _ in _model().named_modules() if n]
    assert match_names(names, ["layers.0.mlp.gate"]) == ["layers.0.mlp.gate"]
    assert match_names(names, ["gate"]) == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    assert match_names(names, ["mlp.gate"]) == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    assert match_names(names, ["proj", "ate", "layers.0.mlp.gat"]) == []
    assert match_names(names, [r"re:layers\.1\..*proj"]) == ["layers.1.mlp.gate_proj", "layers.1.q_proj"]
    assert match_names(names, [r"re:q_proj"]) == []  # fullmatch, not search
    assert name_matches("a.b.c", "b.c") and not name_matches("a.bb.c", "b.c")
    with pytest.raises(ValueError, match="invalid regex"):
        match_names(names, ["re:("])
    with pytest.raises(ValueError, match="sequence of strings"):
        match_names(names, "gate")


def test_replace_linears_swaps_exact_names():
    model = _model()
    w_before = model["layers"][1].q_proj.weight.detach().clone()
    out = replace_linears(model, ["layers.1.q_proj", "layers.0.mlp.gate_proj"], 4, 32, zero_point=True)
    assert list(out) == ["layers.1.q_proj", "layers.0.mlp.gate_proj"]
    assert get_module(model, "layers.1.q_proj") is out["layers.1.q_proj"]
    assert isinstance(get_module(model, "layers.0.mlp.gate"), nn.Linear)  # untouched neighbour
    assert isinstance(get_module(model, "layers.1.mlp.gate_proj"), nn.Linear)
    assert torch.equal(out["layers.1.q_proj"].dequantized_weight(), P.fake_quantize(w_before, 4, 32))


def test_replace_linears_validates_before_touching_the_model():
    model = _model()
    with pytest.raises(ValueError, match="SiLU, not an nn.Linear"):
        replace_linears(model, ["layers.0.q_proj", "layers.0.mlp.act"], 4, 32)
    assert isinstance(get_module(model, "layers.0.q_proj"), nn.Linear)
    with pytest.raises(ValueError, match="no submodule 'layers.5.q_proj'"):
        replace_linears(model, ["layers.5.q_proj"], 4, 32)
    with pytest.raises(ValueError, match="has no child"):
        set_module(model, "layers.0.nothing", nn.Identity())
