"""The ``cpu-int4`` backend (aten int4 weight-only CPU kernels) against the torch reference backend.

Tolerances. The default compute dtype is bfloat16 (the only vectorized path of the aten kernel on x86):
``x``, the scales and the float zeros are rounded to bf16 (unit roundoff ``u = 2^-9``), the kernel
accumulates in fp32 and rounds its output to bf16. So against the fp32 reference we use the forward
error bound ``|y - y_ref| <= 2u * (|x| @ (|W| + A)^T + |y_ref|)`` where ``A = (|q - 8| + |8 - z|) * s``
bounds what the rounding of ``scale`` and ``zero`` can move one weight by (they enter the kernel as
``(q - 8) * scale + zero``); the factor 2 covers second-order terms and fp32 accumulation order. That
bound is loose, so the bf16 data path is also checked tightly against an fp32 emulation of the same
bf16-rounded operands (one output rounding: ``2^-8 |y|``, plus fp32 accumulation-order noise), and the
layout conversion (nibble order, zeros) is checked in the fp32 compute mode against the reference to
fp32 accumulation-order noise only: ``2 (K + 8) 2^-24 * (|x| @ (|W| + A)^T)`` (recursive-summation bound
for both sides, plus the kernel's two fma's to rebuild a weight).
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

from awqkit import kernels
from awqkit.kernels import cpu_int4, torch_ref
from awqkit.nn.qlinear import QuantLinear

if not cpu_int4.is_available():
    pytest.skip(
        "torch has no working aten._weight_int4pack_mm_for_cpu / _convert_weight_to_int4pack_for_cpu",
        allow_module_level=True,
    )

U_BF16 = 2.0**-9
U_FP32 = 2.0**-24


from conftest import greedy, quantize_decoder_linears, random_linear, set_backend, tiny_fp16_llama  # noqa: E402

_linear = random_linear


def _ql(in_f=256, out_f=48, group_size=64, zero_point=True, bias=True, fmt=None, seed=0):
    return QuantLinear.from_linear(_linear(in_f, out_f, bias, seed), 4, group_size, zero_point, format=fmt)


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _weights(ql):
    """Reference ``W`` and the rounding-sensitivity magnitude ``A`` (both float32 [N, K])."""
    q, zeros, scales = torch_ref.unpack_module(ql)
    g = ql.in_features // scales.shape[1]
    z = zeros.repeat_interleave(g, dim=1).float()
    s = scales.repeat_interleave(g, dim=1)
    w = (q.float() - z) * s
    a = ((q.float() - 8).abs() + (8 - z).abs()) * s
    return w, a, q, z, s


def _bound_terms(x, ql):
    w, a, *_ = _weights(ql)
    return x.float().abs().reshape(-1, ql.in_features) @ (w.abs() + a).t()


def _assert_bf16_close(y, ref, x, ql):
    mag = _bound_terms(x, ql).reshape(ref.shape)
    tol = 2 * U_BF16 * (mag + ref.abs())
    err = (y.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, max excess {(err - tol).max():.3g}"


def _assert_fp32_close(y, ref, x, ql):
    mag = _bound_terms(x, ql).reshape(ref.shape)
    tol = 2 * (ql.in_features + 8) * U_FP32 * mag + 1e-6
    err = (y - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, max excess {(err - tol).max():.3g}"


def _run(ql, x, backend="cpu-int4"):
    ql.backend = backend
    with torch.no_grad():
        return ql(x)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("group_size", cpu_int4.GROUP_SIZES)
@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
@pytest.mark.parametrize("fmt", ["gemm", "pack-quantized"])
def test_matches_reference_every_group_size(group_size, zero_point, fmt):
    ql = _ql(512, 48, group_size, zero_point, bias=True, fmt=fmt)
    for shape in [(1, 512), (3, 512), (7, 512), (2, 5, 512)]:
        x = _x(*shape, seed=sum(shape))
        ref = _run(ql, x, "torch")
        cpu_int4.prepare_module(ql, torch.float32)  # exact mode: checks the conversion itself
        y32 = _run(ql, x)
        assert y32.shape == ref.shape and y32.dtype == torch.float32
        _assert_fp32_close(y32, ref, x, ql)
        cpu_int4.prepare_module(ql, torch.bfloat16)  # the default, fast mode
        y = _run(ql, x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        _assert_bf16_close(y, ref, x, ql)


@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
def test_bf16_path_equals_emulation_of_rounded_operands(zero_point):
    """Tight check of the default path: the kernel is one bf16 rounding of an fp32 product of the
    bf16-rounded x, scales and float zeros (so any layout slip would show far above 2^-8)."""
    ql = _ql(256, 64, 32, zero_point, bias=True, seed=4)
    cpu_int4.prepare_module(ql, torch.bfloat16)
    x = _x(7, 256, seed=5)
    _, a, q, z, s = _weights(ql)
    s_b = s.bfloat16().float()
    zf_b = ((8 - z) * s).bfloat16().float()
    w_b = (q.float() - 8) * s_b + zf_b
    x_b = x.bfloat16().float()
    emul = x_b @ w_b.t()
    y = _run(ql, x) - ql.bias.float()
    tol = 2 * U_BF16 * emul.abs() + 2 * (256 + 8) * U_FP32 * (x_b.abs() @ (w_b.abs() + a).t()) + 1e-6
    err = (y - emul).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_keep_dtype(dtype):
    ql = _ql(128, 32, 64, bias=True)
    x = _x(3, 128, dtype=dtype)
    ref = _run(ql, x, "torch")
    y = _run(ql, x)
    assert y.dtype == dtype and y.shape == (3, 32)
    # both end with one rounding to `dtype`: add one ulp of it (relative) to the bf16 bound
    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 0.0}[dtype]
    tol = 2 * U_BF16 * (_bound_terms(x, ql) + ref.float().abs()) + 2 * ulp * ref.float().abs()
    err = (y.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}"


def test_no_bias_and_empty_batch():
    ql = _ql(64, 16, 32, bias=False)
    x = _x(4, 64)
    _assert_bf16_close(_run(ql, x), _run(ql, x, "torch"), x, ql)
    assert _run(ql, torch.zeros(0, 64)).shape == (0, 16)
    assert _run(ql, torch.zeros(2, 0, 64)).shape == (2, 0, 16)
    with pytest.raises(ValueError, match="in_features=64"):
        _run(ql, torch.zeros(2, 63))


def test_per_row_group_inside_the_kernel_range():
    ql = _ql(128, 32, -1, bias=True)  # one group of 128 per row: the kernel's g=128
    assert kernels.resolve_backend("auto", _x(1, 128), ql).name == "cpu-int4"
    x = _x(3, 128)
    _assert_bf16_close(_run(ql, x), _run(ql, x, "torch"), x, ql)


# ----------------------------------------------------------------------------- auto / fallback
@pytest.mark.parametrize(
    "in_f,out_f,group_size,reason",
    [
        (128, 24, 32, "out_features=24 is not a multiple of 16"),
        (128, 32, 16, "group_size=16"),
        (512, 32, -1, "group_size=-1 (= in_features 512)"),
    ],
)
def test_unsupported_layer_falls_back_under_auto_and_raises_when_explicit(in_f, out_f, group_size, reason):
    ql = _ql(in_f, out_f, group_size, bias=True)
    x = _x(3, in_f)
    assert reason in cpu_int4.layer_unsupported_reason(ql)
    assert kernels.resolve_backend("auto", x, ql).name == "torch"
    y_auto = _run(ql, x, "auto")
    assert torch.equal(y_auto, torch_ref.forward(x, ql))  # it *is* the torch backend
    with pytest.raises(ValueError, match="kernel backend 'cpu-int4' does not support this call"):
        _run(ql, x, "cpu-int4")


def test_other_bits_and_grad_fall_back():
    q3 = QuantLinear.from_linear(_linear(64, 32), 3, 32)
    assert kernels.resolve_backend("auto", _x(1, 64), q3).name == "torch"
    assert "bits=3" in cpu_int4.layer_unsupported_reason(q3)
    ql = _ql(64, 32, 32)
    x = _x(2, 64).requires_grad_()
    assert kernels.resolve_backend("auto", x, ql).name == "torch"  # the aten op has no autograd
    ql(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert kernels.resolve_backend("auto", x, ql).name == "cpu-int4"


def test_auto_picks_cpu_int4_on_cpu():
    order = kernels.list_backends(only_available=True)
    assert order.index("cpu-int4") < order.index("torch")
    # 32 output columns: below cpu-avx2's 64-column blocks, so cpu-int4 is the best taker
    assert kernels.resolve_backend("auto", _x(1, 64), _ql(64, 32, 32)).name == "cpu-int4"


# ----------------------------------------------------------------------------- caching
def test_converts_once_and_stays_out_of_state_dict(monkeypatch):
    ql = _ql(128, 32, 64)
    keys = {k: v.clone() for k, v in ql.state_dict().items()}
    calls = []
    real = cpu_int4.convert
    monkeypatch.setattr(cpu_int4, "convert", lambda m, dt: calls.append(1) or real(m, dt))
    x = _x(2, 128)
    y1, y2 = _run(ql, x), _run(ql, x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    sd = ql.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], keys[k]) for k in keys)
    assert [n for n, _ in ql.named_buffers()] == list(keys)
    assert cpu_int4.clear_cache(ql) == 1 and cpu_int4.clear_cache(ql) == 0
    _run(ql, x)
    assert len(calls) == 2


def test_pickle_and_deepcopy_drop_the_cache():
    ql = _ql(128, 32, 64)
    x = _x(2, 128)
    y = _run(ql, x)
    buf = io.BytesIO()
    torch.save(ql, buf)  # whole-module pickle: the cache holds weak references, which do not pickle
    buf.seek(0)
    for clone in (torch.load(buf, weights_only=False), copy.deepcopy(ql)):
        assert getattr(clone, "_cpu_int4_cache", None) is None
        assert torch.equal(_run(clone, x), y)
        assert getattr(clone, "_cpu_int4_cache", None) is not None


def test_cache_follows_buffer_changes():
    ql, other = _ql(128, 32, 64, seed=0), _ql(128, 32, 64, seed=7)
    x = _x(3, 128)
    _run(ql, x)  # builds the cache
    ql.qweight.copy_(other.qweight)  # in place: same tensor, bumped version counter
    _assert_bf16_close(_run(ql, x), torch_ref.forward(x, ql), x, ql)
    ql.load_state_dict(other.state_dict(), assign=True)  # new tensors
    y = _run(ql, x)
    assert torch.equal(y, _run(other, x))
    _assert_bf16_close(y, torch_ref.forward(x, other), x, other)


# ----------------------------------------------------------------------------- whole models
def _quantized_llama(group_size=32, zero_point=True):
    return quantize_decoder_linears(tiny_fp16_llama(64, 128, 128), group_size, zero_point)


@pytest.mark.parametrize("group_size,zero_point", [(32, True), (64, False)])
def test_greedy_generation_matches_torch(group_size, zero_point):
    model = _quantized_llama(group_size, zero_point)
    ids = torch.tensor([[1, 17, 42, 99, 5, 63]])
    set_backend(model, "torch")
    expected = greedy(model, ids)
    report = cpu_int4.prepare_model(model, "cpu-int4")
    assert report.as_counts() == {"converted": 14, "fallback": 0}
    set_backend(model, "cpu-int4")
    assert greedy(model, ids) == expected
    set_backend(model, "auto")
    assert greedy(model, ids) == expected


def test_prepare_model_reports_fallbacks(caplog):
    model = nn.ModuleDict(
        {
            "ok": _ql(64, 32, 32),
            "narrow": _ql(64, 24, 32),
            "g16": _ql(64, 32, 16),
            "b3": QuantLinear.from_linear(_linear(64, 32), 3, 32),
        }
    )
    with caplog.at_level(logging.INFO, logger="awqkit.kernels"):
        report = cpu_int4.prepare_model(model)
    assert report.as_counts() == {"converted": 1, "fallback": 3}
    assert set(report.reasons) == {"narrow", "g16", "b3"}
    lines = [r.getMessage() for r in caplog.records]
    assert any("narrow falls back" in s and "out_features=24" in s for s in lines)
    assert any("g16 falls back" in s and "group_size=16" in s for s in lines)
    assert any("b3 falls back" in s and "bits=3" in s for s in lines)
    assert getattr(model["ok"], "_cpu_int4_cache", None) is not None
    assert getattr(model["narrow"], "_cpu_int4_cache", None) is None
    with pytest.raises(ValueError, match=r"cannot run 3 of 4 quantized layers: narrow: out_features=24"):
        cpu_int4.prepare_model(model, "cpu-int4")
    with pytest.raises(ValueError, match="prepares for backend"):
        cpu_int4.prepare_model(model, "torch")
    with pytest.raises(ValueError, match="compute_dtype"):
        cpu_int4.prepare_model(model, compute_dtype=torch.float16)


def test_load_quantized_with_cpu_int4(tmp_path):
    from awqkit.config import QuantConfig
    from awqkit.io.load import load_quantized
    from awqkit.io.save import save_quantized

    model = _quantized_llama(32, True)
    dst = save_quantized(
        model,
        tmp_path / "q",
        quant_config=QuantConfig(bits=4, group_size=32, zero_point=True),
        src_dir=None,
        metadata={},
        modules_to_not_convert=[],
    )
    loaded = load_quantized(dst, backend="cpu-int4")
    ids = torch.tensor([[3, 8, 120, 64]])
    set_backend(model, "torch")
    assert greedy(loaded, ids, 6) == greedy(model, ids, 6)
    qls = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(m.backend == "cpu-int4" for m in qls)
    assert all(getattr(m, "_cpu_int4_cache", None) is not None for m in qls)  # converted (lazily or up front)
