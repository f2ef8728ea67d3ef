"""The ``triton`` W4A16 backend, run by Triton's interpreter on CPU, against the torch reference backend.

How the interpreter is switched on. ``TRITON_INTERPRET=1`` makes ``triton.jit`` return an
``InterpretedFunction`` (numpy on CPU tensors) instead of a GPU-compiled ``JITFunction``; triton reads the
variable (``triton.knobs.runtime.interpret``) *when a decorator runs*, not at launch. That includes
triton's own ``@triton.jit`` helpers (``tl.zeros``, ``tl.sum``, ``tl.cdiv``, ``tl.interleave``), decorated
at ``import triton``: a kernel calling them fails under the interpreter ("Cannot call @triton.jit'd
outside of the scope of a kernel") unless the variable was set before triton was first imported. The
backend avoids both traps: it applies ``triton.jit`` lazily at the first launch, keeping one kernel
object per mode and reading the mode at every launch, and its kernels call only builtins. So the
module-scoped fixture below, which sets the variable with ``MonkeyPatch`` for this module only and
restores it afterwards, is enough, whatever was imported before. This module itself imports triton
(at collection, to skip without it) before the fixture runs, which checks exactly that case;
``test_interpreter_is_what_runs`` checks that the kernel really is an ``InterpretedFunction``. The
variable never leaks into other test modules (``tests/kernels/test_cpu_int4.py`` expects ``auto`` to
pick ``cpu-int4`` on CPU; ``auto`` never takes the interpreter anyway, see the last section), and CI
must not set it globally for the same reason.

Tolerances. With float32 activations the kernel dequantizes in fp32 (``(q - z) * s`` is exact: a 5-bit
integer times an 11-bit scale fits in 24 bits), exactly as the reference does, and accumulates in fp32
(``tl.dot``; split-K partial sums; bias), so the two differ only by the order of the fp32 additions.
Any summation order of ``K`` products plus a bias is within ``(K + 1) u |x| @ |W| + u |b|`` of the exact
sum (``u = 2^-24``), so the bound between two orders is twice that; we use ``2 (K + 2) u (|x| @ |W| + |b|)``.
That is ~1e-5 relative for K = 512, where a nibble-order or group-index slip moves outputs by O(1).
With float16 activations the kernel also rounds each weight to fp16 (``2^-11`` relative) and the output
to fp16, while the reference keeps fp32 weights, so the bound adds ``2^-11 (|x| @ |W| + |y|)``, doubled.
"""

from __future__ import annotations

import pytest
import torch

try:  # a missing *or broken* triton skips the module (importorskip only skips ModuleNotFoundError)
    import triton  # noqa: F401
except ImportError as exc:
    pytest.skip(f"triton is not importable ({exc}); install the optional extra 'triton'", allow_module_level=True)

from awqkit import kernels  # noqa: E402
from awqkit.kernels import cpu_int4, torch_ref  # noqa: E402
from awqkit.kernels import triton_w4a16 as tw  # noqa: E402
from awqkit.nn.qlinear import QuantLinear  # noqa: E402

U_FP32 = 2.0**-24
U_FP16 = 2.0**-11


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """TRITON_INTERPRET=1 for this module only (see the module docstring for why this is enough)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


from conftest import random_linear  # noqa: E402

_linear = random_linear


def _ql(in_f, out_f, group_size, zero_point=True, bias=True, seed=0, backend="triton"):
    ql = QuantLinear.from_linear(_linear(in_f, out_f, bias, seed), 4, group_size, zero_point)
    ql.backend = backend
    return ql


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _mag(x, ql):
    """``|x| @ |W| + |b|`` (float32, ``[M, N]``), the scale of the rounding bounds."""
    w = torch_ref.dequantize_module(ql)
    mag = x.float().abs().reshape(-1, ql.in_features) @ w.abs().t()
    return mag + (ql.bias.float().abs() if ql.bias is not None else 0)


def _assert_close(y, ref, x, ql):
    """fp32: accumulation-order bound; fp16: plus weight and output rounding (module docstring)."""
    mag = _mag(x, ql).reshape(ref.shape)
    tol = 2 * (ql.in_features + 2) * U_FP32 * mag + 1e-6
    if y.dtype == torch.float16:
        tol = tol + 2 * U_FP16 * (mag + ref.float().abs())
    err = (y.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, max err/tol {(err / tol).max():.3g}"


def _run(ql, x):
    with torch.no_grad():
        return ql(x)


# ----------------------------------------------------------------------------- mechanism
def test_interpreter_is_what_runs():
    assert tw.interpreting() and tw.is_available()
    gemm, reduce = tw._kernels()
    assert type(gemm).__name__ == "InterpretedFunction" and type(reduce).__name__ == "InterpretedFunction"
    assert "triton" in kernels.list_backends(only_available=True)


# ----------------------------------------------------------------------------- numerics
CASES = [  # (K, N, group_size, M, zero_point, bias): N not a multiple of 64 in some, M = 17 spills a tile
    (256, 64, 32, 1, True, True),
    (256, 72, 32, 3, False, False),
    (512, 48, 64, 16, True, False),
    (128, 128, 64, 1, False, True),
    (384, 40, 128, 3, True, True),
    (512, 96, 128, 17, False, True),
    (256, 32, 128, 16, True, True),
]


@pytest.mark.parametrize(
    "K,N,g,M,zp,bias",
    CASES,
    ids=[f"K{c[0]}-N{c[1]}-g{c[2]}-M{c[3]}-{'asym' if c[4] else 'sym'}-{'bias' if c[5] else 'nobias'}" for c in CASES],
)
def test_matches_reference(K, N, g, M, zp, bias):
    ql = _ql(K, N, g, zp, bias, seed=K + N + g)
    x = _x(M, K, seed=M)
    ref = torch_ref.forward(x, ql)
    y = _run(ql, x)
    assert y.shape == (M, N) and y.dtype == torch.float32
    _assert_close(y, ref, x, ql)


@pytest.mark.parametrize(
    "cfg",
    [
        tw.Config(16, 32, 32, split_k=3),  # split-K: fp32 partials + the reduce kernel (with bias)
        tw.Config(1, 64, 32, split_k=2),  # GEMV path (no tl.dot) with split-K
        tw.Config(1, 32, 64),  # GEMV path, bias in the epilogue
        tw.Config(16, 64, 16, unpack="join"),  # tl.interleave-style widening of the word tile
        tw.Config(16, 32, 32, unpack="gather", split_k=2),  # per-column word loads
        tw.Config(32, 128, 64, group_m=2),  # N = 80 < BLOCK_N: masked columns
    ],
    ids=["splitk", "gemv-splitk", "gemv", "join", "gather", "wide"],
)
def test_explicit_configs(cfg):
    ql = _ql(256, 80, 64, zero_point=True, bias=True, seed=3)
    for m in (1, 5):
        x = _x(m, 256, seed=10 + m)
        y = tw.w4a16_matmul(x, ql.qweight, ql.qzeros, ql.scales, 64, ql.bias, config=cfg)
        _assert_close(y, torch_ref.forward(x, ql), x, ql)


def test_batched_input_fp16_and_per_row_group():
    ql = _ql(128, 64, -1, zero_point=False, bias=True, seed=7)  # g = K = 128
    x = _x(2, 3, 128, seed=8)
    y = _run(ql, x)
    assert y.shape == (2, 3, 64)
    _assert_close(y, torch_ref.forward(x, ql), x, ql)
    xh = x.half()
    yh = _run(ql, xh)
    assert yh.dtype == torch.float16
    _assert_close(yh, torch_ref.forward(xh.float(), ql), xh, ql)


@pytest.mark.parametrize("dtype,block_m", [(torch.float16, 16), (torch.float32, 1)], ids=["fp16-dot", "fp32-gemv"])
def test_magic_dequant_is_bitwise_identical(dtype, block_m):
    """``magic`` (nibble OR-ed into a float mantissa, then subtracted) computes the same exact ``q - z``."""
    ql = _ql(256, 48, 64, zero_point=True, bias=True, seed=9)
    x = _x(block_m if block_m == 1 else 5, 256, seed=4, dtype=dtype)
    plain = tw.w4a16_matmul(x, ql.qweight, ql.qzeros, ql.scales, 64, ql.bias, config=tw.Config(block_m, 32, 32))
    magic = tw.w4a16_matmul(
        x, ql.qweight, ql.qzeros, ql.scales, 64, ql.bias, config=tw.Config(block_m, 32, 32, magic=True)
    )
    assert torch.equal(plain, magic)
    _assert_close(magic, torch_ref.forward(x.float(), ql), x, ql)


def test_nibble_order_and_sign_bit():
    """All 16 nibble values in every column position, including words with bit 31 set."""
    K, N, g = 32, 16, 32
    q = (torch.arange(N * K).reshape(N, K) * 7 + torch.arange(N).unsqueeze(1)) % 16
    zeros = torch.arange(N).unsqueeze(1) % 16
    scales = torch.linspace(0.5, 2.0, N).unsqueeze(1)
    from awqkit.quant.packing import pack_gemm

    qweight, qzeros, sc = pack_gemm(q, zeros, scales)
    assert bool((qweight < 0).any())
    x = torch.eye(K)  # y = W^T row by row
    y = tw.w4a16_matmul(x, qweight, qzeros, sc, g, config=tw.Config(16, 16, 16))
    expected = ((q - zeros).float() * sc.float().t()).t()
    assert torch.equal(y, expected)


def test_empty_batch_and_bad_input():
    ql = _ql(64, 16, 32, bias=False)
    assert _run(ql, torch.zeros(0, 64)).shape == (0, 16)
    with pytest.raises(ValueError, match="in_features=64"):
        _run(ql, torch.zeros(2, 63))
    with pytest.raises(ValueError, match="block_k=64 must be >= 16 and divide group_size=32"):
        tw.w4a16_matmul(_x(1, 64), ql.qweight, ql.qzeros, ql.scales, 32, config=tw.Config(16, 16, 64))


# ----------------------------------------------------------------------------- registry / fallback
def test_registered_above_cpu_int4():
    order = kernels.list_backends()
    assert order.index("triton") < order.index("cpu-int4") < order.index("torch")
    assert tw.PRIORITY > cpu_int4.PRIORITY


def test_auto_never_takes_cpu_inputs_even_when_interpreting():
    ql = _ql(128, 32, 32, backend="auto")
    x = _x(1, 128)
    assert not tw.supports(x, ql)
    assert kernels.resolve_backend("auto", x, ql).name in ("cpu-int4", "torch")
    ql.backend = "triton"
    assert kernels.resolve_backend("triton", x, ql).name == "triton"


def test_not_available_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not tw.interpreting()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the backend available")
    assert not tw.is_available()
    assert "triton" not in kernels.list_backends(only_available=True)
    ql = _ql(128, 32, 32, backend="auto")
    assert kernels.resolve_backend("auto", _x(1, 128), ql).name != "triton"


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: _ql(200, 32, -1), "group_size=-1 (= in_features 200) is not a multiple of 16"),
        (lambda: _ql(96, 32, 24), "group_size=24 is not a multiple of 16"),
        (lambda: QuantLinear.from_linear(_linear(64, 32), 3, 32), "bits=3"),
        (lambda: QuantLinear.from_linear(_linear(64, 32), 4, 32, format="pack-quantized"), "format='pack-quantized'"),
    ],
    ids=["per-row-200", "g24", "bits3", "pack-quantized"],
)
def test_unsupported_layer_falls_back_under_auto_and_raises_when_explicit(make, reason):
    ql = make()
    x = _x(3, ql.in_features)
    assert reason in tw.layer_unsupported_reason(ql)
    ql.backend = "auto"
    backend = kernels.resolve_backend("auto", x, ql)
    assert backend.name != "triton"
    torch.testing.assert_close(_run(ql, x), backend.fn(x, ql))
    ql.backend = "triton"
    assert not tw.supports(x, ql)
    with pytest.raises(ValueError, match="kernel backend 'triton' does not support this call"):
        _run(ql, x)


def test_grad_and_dtype_declined():
    ql = _ql(64, 32, 32)
    x = _x(2, 64).requires_grad_()
    assert "requires grad" in tw.call_unsupported_reason(x, ql)
    assert "dtype torch.bfloat16" in tw.call_unsupported_reason(_x(2, 64, dtype=torch.bfloat16), ql)
    with torch.no_grad():
        assert tw.call_unsupported_reason(x, ql) is None


def test_heuristic_configs_are_valid():
    for M in (1, 3, 16, 40, 300):
        for K, N, g in ((4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 64), (576, 1536, 32), (256, 80, 16)):
            cands = tw.candidates(M, N, K, g)
            assert cands
            for c in cands:
                tw.check_config(c, M, N, K, g)
            tw.check_config(tw.interpreter_config(M, N, K, g), M, N, K, g)
