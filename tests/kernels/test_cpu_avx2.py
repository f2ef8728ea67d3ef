"""The ``cpu-avx2`` backend (awqkit's native fp32 int4 GEMV) and the fp16-storage LM head, against the
torch reference.

Tolerance. Both sides compute in fp32 and differ only in summation order: the reference sums
``x[k] * (q - z) * s`` over ``k``; the kernel sums ``x[k] * q`` and ``x[k]`` per group and combines them as
``s * a - (z * s) * sum(x)``. A recursive-summation bound for both, on the magnitudes they add up, is
``2 (K + 8) 2^-24 * (|x| @ ((q + z) * s)^T)`` (+1e-6 absolute for outputs near zero).
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

from awqkit import kernels
from awqkit.kernels import cpu_avx2, native, torch_ref
from awqkit.nn.fp16_storage import Fp16Embedding, Fp16Linear, store_head_fp16
from awqkit.nn.qlinear import QuantLinear

if not cpu_avx2.is_available():
    pytest.skip(f"cpu-avx2 unavailable here: {cpu_avx2.unavailable_reason()}", allow_module_level=True)

U_FP32 = 2.0**-24

from conftest import greedy, quantize_decoder_linears, random_linear, set_backend, tiny_fp16_llama  # noqa: E402


def _ql(in_f=256, out_f=128, group_size=64, zero_point=True, bias=True, fmt=None, seed=0, bits=4):
    return QuantLinear.from_linear(random_linear(in_f, out_f, bias, seed), bits, group_size, zero_point, format=fmt)


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _run(ql, x, backend="cpu-avx2"):
    ql.backend = backend
    with torch.no_grad():
        return ql(x)


def _assert_fp32_close(y, ref, x, ql):
    q, zeros, scales = torch_ref.unpack_module(ql)
    g = ql.in_features // scales.shape[1]
    mag_w = (q.float() + zeros.repeat_interleave(g, dim=1).float()) * scales.repeat_interleave(g, dim=1)
    mag = (x.float().abs().reshape(-1, ql.in_features) @ mag_w.t()).reshape(ref.shape)
    if ql.bias is not None:
        mag = mag + ql.bias.float().abs()
    tol = 2 * (ql.in_features + 8) * U_FP32 * mag + 1e-6
    err = (y.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, max excess {(err - tol).max():.3g}"


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("group_size", [32, 48, 64, 128, -1])
@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
@pytest.mark.parametrize("fmt", ["gemm", "pack-quantized"])
def test_matches_reference(group_size, zero_point, fmt):
    ql = _ql(384, 192, group_size, zero_point, bias=True, fmt=fmt)
    for shape in [(1, 384), (3, 384), (7, 384), (2, 5, 384), (cpu_avx2.MAX_ROWS, 384)]:
        x = _x(*shape, seed=sum(shape))
        ref = _run(ql, x, "torch")
        y = _run(ql, x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        _assert_fp32_close(y, ref, x, ql)


def test_many_rows_go_to_the_reference_exactly():
    ql = _ql(128, 64, 32)
    x = _x(cpu_avx2.MAX_ROWS + 1, 128)
    assert torch.equal(_run(ql, x), torch_ref.forward(x, ql))


@pytest.mark.parametrize("group_size", [32, 96, 192, -1])  # 192 and -1: groups of more than one 64-row chunk
def test_multi_row_kernel_equals_row_by_row_bit_for_bit(group_size):
    """3..16 rows take the tile-reusing loop (int4_gemv_rows): the same FMAs in the same order as one row."""
    ql = _ql(384, 128, group_size, seed=group_size % 7)
    for rows in (2, 3, 5, cpu_avx2.MAX_ROWS):
        x = _x(rows, 384, seed=rows)
        y = _run(ql, x)
        assert torch.equal(y, torch.cat([_run(ql, x[i : i + 1]) for i in range(rows)]))


def test_thread_count_does_not_change_results():
    ql = _ql(256, 640, 64)  # 10 column blocks: uneven split over 3 threads
    x = _x(3, 256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = _run(ql, x)
        torch.set_num_threads(3)
        y3 = _run(ql, x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_keep_dtype(dtype):
    ql = _ql(128, 64, 64)
    x = _x(3, 128, dtype=dtype)
    y, ref = _run(ql, x), _run(ql, x, "torch")
    assert y.dtype == dtype and y.shape == (3, 64)
    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 0.0}[dtype]
    # both compute in fp32 from the same rounded x, then round once to `dtype`
    assert torch.allclose(y.float(), ref.float(), rtol=2 * ulp + 1e-5, atol=1e-5)


def test_no_bias_empty_batch_and_wrong_width():
    ql = _ql(64, 64, 32, bias=False)
    x = _x(4, 64)
    _assert_fp32_close(_run(ql, x), _run(ql, x, "torch"), x, ql)
    assert _run(ql, torch.zeros(0, 64)).shape == (0, 64)
    assert _run(ql, torch.zeros(2, 0, 64)).shape == (2, 0, 64)
    with pytest.raises(ValueError, match="in_features=64"):
        _run(ql, torch.zeros(2, 63))


def test_non_contiguous_input():
    ql = _ql(128, 64, 64)
    x = _x(4, 256)[:, ::2]
    assert not x.is_contiguous()
    _assert_fp32_close(_run(ql, x), _run(ql, x.contiguous(), "torch"), x, ql)


# ----------------------------------------------------------------------------- auto / fallback
def test_auto_prefers_cpu_avx2_and_falls_back_per_layer():
    order = kernels.list_backends(only_available=True)
    assert order.index("cpu-avx2") < order.index("cpu-int4") < order.index("torch")
    x = _x(1, 128)
    assert kernels.resolve_backend("auto", x, _ql(128, 64, 64)).name == "cpu-avx2"
    narrow = _ql(128, 48, 64)  # 48 % 64 != 0, but cpu-int4 takes N % 16 == 0
    assert "out_features=48 is not a multiple of 64" in cpu_avx2.layer_unsupported_reason(narrow)
    assert kernels.resolve_backend("auto", x, narrow).name == "cpu-int4"
    # the fallback still matches the reference (cpu-int4 computes in bf16: a few 2^-9 relative)
    ref = torch_ref.forward(x, narrow)
    assert torch.allclose(_run(narrow, x, "auto"), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="kernel backend 'cpu-avx2' does not support this call"):
        _run(narrow, x)
    q3 = _ql(128, 64, 64, bits=3)
    assert "bits=3" in cpu_avx2.layer_unsupported_reason(q3)
    assert kernels.resolve_backend("auto", x, q3).name == "torch"
    f32 = _ql(128, 64, 64)
    f32.scales = f32.scales.float()  # the kernel reads fp16 scales; others fall back
    assert "float16 scales" in cpu_avx2.layer_unsupported_reason(f32)
    assert kernels.resolve_backend("auto", x, f32).name != "cpu-avx2"


def test_grad_falls_back_to_torch():
    ql = _ql(64, 64, 32)
    x = _x(2, 64).requires_grad_()
    assert kernels.resolve_backend("auto", x, ql).name == "torch"
    ql(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_prepare_model_reports_fallbacks(caplog):
    model = nn.ModuleDict({"ok": _ql(64, 64, 32), "narrow": _ql(64, 48, 32)})
    with caplog.at_level(logging.INFO, logger="awqkit.kernels"):
        report = cpu_avx2.prepare_model(model)
    assert report.as_counts() == {"converted": 1, "fallback": 1}
    assert any("narrow falls back" in r.getMessage() and "out_features=48" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"cannot run 1 of 2 quantized layers: narrow: out_features=48"):
        cpu_avx2.prepare_model(model, "cpu-avx2")


# ----------------------------------------------------------------------------- caching
def test_converts_once_and_stays_out_of_state_dict(monkeypatch):
    ql = _ql(128, 64, 64)
    keys = {k: v.clone() for k, v in ql.state_dict().items()}
    calls = []
    real = cpu_avx2._layout
    monkeypatch.setattr(cpu_avx2, "_layout", lambda *a: calls.append(1) or real(*a))
    x = _x(2, 128)
    y1, y2 = _run(ql, x), _run(ql, x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    sd = ql.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], keys[k]) for k in keys)
    assert cpu_avx2.clear_cache(ql) == 1 and cpu_avx2.clear_cache(ql) == 0


def test_pickle_and_deepcopy_drop_the_cache():
    ql = _ql(128, 64, 64)
    x = _x(2, 128)
    y = _run(ql, x)
    buf = io.BytesIO()
    torch.save(ql, buf)
    buf.seek(0)
    for clone in (torch.load(buf, weights_only=False), copy.deepcopy(ql)):
        assert getattr(clone, "_cpu_avx2_cache", None) is None
        assert torch.equal(_run(clone, x), y)


def test_cache_follows_buffer_changes():
    ql, other = _ql(128, 64, 64, seed=0), _ql(128, 64, 64, seed=7)
    x = _x(3, 128)
    _run(ql, x)
    ql.qweight.copy_(other.qweight)  # in place: bumped version counter
    _assert_fp32_close(_run(ql, x), torch_ref.forward(x, ql), x, ql)
    ql.load_state_dict(other.state_dict(), assign=True)  # new tensors
    assert torch.equal(_run(ql, x), _run(other, x))


# ----------------------------------------------------------------------------- fp16 head kernel
@pytest.mark.parametrize("n,k,rows", [(67, 24, 1), (256, 64, 3), (130, 128, cpu_avx2.MAX_ROWS)])
def test_f16_linear_matches_fp32(n, k, rows):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g).half()
    b = torch.randn(n, generator=g).half()
    x = torch.randn(rows, k, generator=g)
    assert cpu_avx2.f16_linear_supported(x, w)
    ref = nn.functional.linear(x, w.float(), b.float())
    y = cpu_avx2.f16_linear(x, w, b)
    tol = 2 * (k + 2) * U_FP32 * (x.abs() @ w.float().abs().t() + b.float().abs()) + 1e-6
    assert y.shape == (rows, n) and bool(((y - ref).abs() <= tol).all())
    big = torch.randn(cpu_avx2.MAX_ROWS + 1, k, generator=g)  # beyond the GEMV: F.linear on the widened weight
    assert not cpu_avx2.f16_linear_supported(big, w)
    assert torch.equal(cpu_avx2.f16_linear(big, w, b), nn.functional.linear(big, w.float(), b.float()))


# ----------------------------------------------------------------------------- whole models
def _tiny_llama(tie=True):
    return tiny_fp16_llama(128, 256, 160, tie)


def _quantized_llama(group_size=32, zero_point=True, tie=True):
    return quantize_decoder_linears(_tiny_llama(tie), group_size, zero_point)


@pytest.mark.parametrize("group_size,zero_point", [(32, True), (64, False)])
def test_greedy_generation_matches_torch(group_size, zero_point):
    model = _quantized_llama(group_size, zero_point)
    ids = torch.tensor([[1, 17, 42, 99, 5, 63]])
    set_backend(model, "torch")
    expected = greedy(model, ids)
    assert cpu_avx2.prepare_model(model, "cpu-avx2").as_counts() == {"converted": 14, "fallback": 0}
    set_backend(model, "cpu-avx2")
    assert greedy(model, ids) == expected


@pytest.mark.parametrize("tie", [True, False])
def test_store_head_fp16_keeps_outputs_and_keys(tie):
    model = _tiny_llama(tie)
    ids = torch.tensor([[1, 17, 42, 99, 5, 63]])
    with torch.no_grad():
        ref = model(ids).logits
    keys = list(model.state_dict())
    assert store_head_fp16(model)
    assert isinstance(model.lm_head, Fp16Linear) and model.lm_head.weight.dtype == torch.float16
    assert isinstance(model.model.embed_tokens, Fp16Embedding if tie else nn.Embedding)
    if tie:
        assert model.model.embed_tokens.weight is model.lm_head.weight
    assert model.dtype == torch.float32 and list(model.state_dict()) == keys
    with torch.no_grad():
        logits = model(ids).logits  # 6 rows: the native fp16 GEMV
        last = model(ids, logits_to_keep=1).logits
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-5) and torch.allclose(last, ref[:, -1:], rtol=1e-5, atol=1e-5)
    assert greedy(model, ids) == greedy(_tiny_llama(tie), ids)


def test_store_head_fp16_refuses_weights_fp16_cannot_hold():
    model = _tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1.0 + 2.0**-20  # not representable in fp16
    assert not store_head_fp16(model)
    assert type(model.lm_head) is nn.Linear


def test_load_quantized_auto_uses_cpu_avx2_and_fp16_head(tmp_path):
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
    ids = torch.tensor([[3, 8, 120, 64]])
    set_backend(model, "torch")
    expected = greedy(model, ids, 6)
    loaded = load_quantized(dst)
    qls = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert all(getattr(m, "_cpu_avx2_cache", None) is not None for m in qls)
    assert isinstance(loaded.lm_head, Fp16Linear)
    assert greedy(loaded, ids, 6) == expected
    plain = load_quantized(dst, backend="torch")
    assert type(plain.lm_head) is nn.Linear  # fp16_head defaults on only for auto / cpu-avx2
    assert greedy(load_quantized(dst, fp16_head=False), ids, 6) == expected


# ----------------------------------------------------------------------------- the native build
def test_build_into_a_fresh_cache_and_disable_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQKIT_KERNEL_CACHE", str(tmp_path))
    lib = native._load()  # compiles anew into tmp_path
    built = list(tmp_path.glob("awqkit_cpu-*.so"))
    assert len(built) == 1 and lib.awqkit_abi_version() == native.ABI_VERSION
    assert not list(tmp_path.glob("*.tmp.so"))
    monkeypatch.setenv("AWQKIT_NATIVE", "0")
    with pytest.raises(RuntimeError, match="AWQKIT_NATIVE=0"):
        native._load()
    monkeypatch.setenv("AWQKIT_NATIVE", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("AWQKIT_KERNEL_CACHE", str(tmp_path / "other"))
    with pytest.raises(RuntimeError, match="cannot run the C compiler|failed"):
        native._load()


# ----------------------------------------------------------------------------- fused siblings (decode loop)
def test_fused_siblings_equal_the_separate_layers():
    """q/k/v-style siblings (different widths, one without bias) as one GEMV: the same numbers as each
    layer's own cpu-avx2 call, bit for bit (same kernel, same order); the modules keep working on views
    of the fused tensors; the in-kernel residual add equals ``residual + y``."""
    from awqkit.runtime.linear import FusedInt4, bind, fusable_reason

    mods = [_ql(256, 128, 64, seed=1), _ql(256, 64, 64, seed=2, bias=False), _ql(256, 64, 64, seed=3)]
    x = _x(3, 256, seed=4)
    before = [_run(m, x) for m in mods]
    op = bind(mods)
    assert isinstance(op, FusedInt4) and op.out_features == 256
    y = op(x)
    assert torch.equal(y, torch.cat(before, dim=-1))
    after = [_run(m, x) for m in mods]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    fused_ptr = op.cache.wq.data_ptr()
    assert mods[1].__dict__[cpu_avx2._CACHE_ATTR].wq.data_ptr() == fused_ptr + 128 // 64 * 256 * 8 * 4
    residual = _x(3, 256, seed=5)
    expected = residual + y
    out = op(x, residual)
    assert out is residual and torch.equal(out, expected)
    # more rows than the GEMV takes: the modules' own forward (the torch reference)
    xl = _x(cpu_avx2.MAX_ROWS + 2, 256, seed=6)
    ref = torch.cat([_run(m, xl, "torch") for m in mods], dim=-1)
    _assert_fp32_close(op(xl)[:, :128], ref[:, :128], xl, mods[0])
    # what cannot fuse is named and runs as module calls
    mods[2].backend = "torch"
    assert "backend 'torch'" in fusable_reason(mods)
    assert bind(mods).kind == "modules"
    assert "different in_features" in fusable_reason([_ql(256, 64), _ql(128, 64)])
