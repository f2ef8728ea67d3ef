"""The native boundary never trusts its callers: every ctypes entry point checks what the C code relies on
(shapes, strides, dtypes, device, sizes) before the call and raises KernelInputError naming the function,
the argument, what it found and what it expected; valid inputs still give the reference's results.

Covers ``cpu_avx2.forward`` / ``f16_linear`` / the converted-layer cache, ``decode_ops.rms_norm`` /
``silu_mul`` / ``attention`` / ``attention_fused``, ``runtime.linear.FusedInt4`` and
``runtime.stack.NativeStack`` (its ``bind_caches`` and a decode step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from awqkit.errors import KernelInputError
from awqkit.kernels import cpu_avx2, decode_ops, torch_ref
from awqkit.kernels.decode_ops import AttentionShape
from awqkit.nn.qlinear import QuantLinear

if not cpu_avx2.is_available():
    pytest.skip(f"cpu-avx2 unavailable here: {cpu_avx2.unavailable_reason()}", allow_module_level=True)

from conftest import quantize_decoder_linears, random_linear  # noqa: E402

META = torch.device("meta")
F64 = torch.float64


def _raises(fn: Callable[[], Any], *parts: str) -> str:
    """``fn()`` raises KernelInputError whose one-line message contains every part."""
    with pytest.raises(KernelInputError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, ValueError), msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def _ql(in_f: int = 64, out_f: int = 128, group: int = 32, seed: int = 0, bias: bool = True) -> QuantLinear:
    return QuantLinear.from_linear(random_linear(in_f, out_f, bias, seed), 4, group)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(y: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5) -> None:
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() <= rel * max(ref.abs().max().item(), 1e-6)


# ----------------------------------------------------------------------------- cpu_avx2
def test_forward_checks_x_and_the_converted_layer() -> None:
    ql = _ql()
    with torch.no_grad():
        _raises(
            lambda: cpu_avx2.forward(_x(1, 128), ql),
            "cpu_avx2.forward: x has shape (1, 128)",
            "expected (..., 64)",
            "in_features=64",
        )
        _raises(lambda: cpu_avx2.forward(torch.tensor(1.0), ql), "x has shape ()")
        _raises(lambda: cpu_avx2.forward(torch.empty(1, 64, device=META), ql), "x is on meta, expected cpu")
        for x in (_x(1, 64), _x(5, 64), _x(2, 3, 64), _x(4, 128)[:, ::2], _x(2, 64).double()):  # valid, any stride
            _close(cpu_avx2.forward(x, ql).double(), torch_ref.forward(x, ql).double())
        ql.out_features = 64  # a layer changed behind the converted cache's back
        _raises(lambda: cpu_avx2.forward(_x(1, 64), ql), "module has shape (N, K) = (64, 64)", "(128, 64)")


def test_converted_layout_is_checked_once_at_construction() -> None:
    good = cpu_avx2.prepare_module(_ql())
    wq, sp, zq, bias = good.wq, good.sp, good.zq, good.bias
    make = cpu_avx2._Cache
    _raises(
        lambda: make(wq.float(), sp, zq, bias, 32),
        "cpu_avx2._Cache: wq has dtype torch.float32",
        "expected torch.int32",
    )
    _raises(lambda: make(wq[:, :, :4], sp, zq, bias, 32), "wq has shape (2, 64, 4), expected (*, *, 8)")
    _raises(lambda: make(wq.transpose(0, 1).contiguous().transpose(0, 1), sp, zq, bias, 32), "wq is not contiguous")
    _raises(lambda: make(wq, sp, zq, bias, 48), "K is 64, expected a multiple of 48")
    _raises(lambda: make(wq, sp, zq, bias, 0), "group_size is 0, expected an integer >= 1")
    _raises(lambda: make(wq[:0], sp[:0], zq[:0], None, 32), "n_blocks is 0")
    _raises(lambda: make(wq, sp[:, :1], zq, bias, 32), "sp has shape (2, 1, 64), expected (2, 2, 64)")
    _raises(lambda: make(wq, sp, zq.to(torch.int8), bias, 32), "zq has dtype torch.int8, expected torch.uint8")
    _raises(lambda: make(wq, sp, zq, bias[:64], 32), "bias has shape (64,), expected (128,)")
    _raises(lambda: make(wq, sp, zq, torch.empty(128, device=META), 32), "bias is on meta")
    assert (make(wq, sp, zq, None, 32).k, make(wq, sp, zq, None, 32).n) == (64, 128)


def test_f16_linear_checks_x_and_bias() -> None:
    w, b = _x(72, 64).half(), _x(72)
    fn = cpu_avx2.f16_linear
    _raises(lambda: fn(_x(1, 128), w, b), "cpu_avx2.f16_linear: x has shape (1, 128)", "expected (..., 64)")
    _raises(lambda: fn(_x(1, 64), w, _x(73)), "bias has shape (73,), expected (72,)")
    _raises(lambda: fn(_x(1, 64), w, torch.empty(72, device=META)), "bias is on meta")
    _raises(lambda: fn(_x(1, 64), w[0], b), "weight has shape (64,)")
    x = _x(3, 64)
    _close(fn(x, w, b), torch.nn.functional.linear(x, w.float(), b))


# ----------------------------------------------------------------------------- decode ops
def test_rms_norm_and_silu_mul() -> None:
    x, w = _x(3, 1, 40), _x(40)
    rms = decode_ops.rms_norm
    _raises(lambda: rms(x, _x(4), 1e-6), "decode_ops.rms_norm: weight has shape (4,), expected (40,)", "weight shape")
    _raises(lambda: rms(x.double(), w, 1e-6, native_flag=True), "x has dtype torch.float64, expected torch.float32")
    _raises(lambda: rms(x.transpose(0, 2), _x(3), 1e-6, native_flag=True), "x is not contiguous")
    _raises(lambda: rms(x, torch.empty(40, device=META), 1e-6, native_flag=True), "weight is on meta")
    ref = rms(x, w, 1e-6, native_flag=False)
    _close(rms(x, w, 1e-6, native_flag=True), ref)
    xt = x.transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous: the reference, no error
    _close(rms(xt, w, 1e-6), ref)
    _raises(lambda: decode_ops.silu_mul(_x(2, 5)), "decode_ops.silu_mul: gu has shape (2, 5)", "not even")
    _raises(lambda: decode_ops.silu_mul(_x(2, 8).half(), native_flag=True), "gu has dtype torch.float16")
    gu = _x(2, 1, 16)
    _close(decode_ops.silu_mul(gu, native_flag=True), decode_ops.silu_mul(gu, native_flag=False))


B, H, KV, D, MAXLEN, POS = 2, 4, 2, 16, 6, 3
SHAPE = AttentionShape(H, KV, D, 0.3, 0, 1e-6)


def _att(seed: int = 0) -> dict[str, Any]:
    """Valid inputs of attention_fused: qkv [B, (H + 2 KV) D], caches [B, KV, maxlen, D], cos/sin [B, 1, D]."""
    g = torch.Generator().manual_seed(seed)
    cos, sin = torch.rand(B, 1, D, generator=g), torch.rand(B, 1, D, generator=g)
    return dict(
        qkv=torch.randn(B, (H + 2 * KV) * D, generator=g),
        k_cache=torch.randn(B, KV, MAXLEN, D, generator=g),
        v_cache=torch.randn(B, KV, MAXLEN, D, generator=g),
        pos=POS,
        cos=cos,
        sin=sin,
        shape=SHAPE,
        q_norm=torch.rand(D, generator=g) + 0.5,
        k_norm=None,
    )


def _fused(**changes: Any) -> Callable[[], torch.Tensor]:
    return lambda: decode_ops.attention_fused(**{**_att(), **changes})


ATTENTION_CASES = [
    ("qkv width", dict(qkv=_x(B, (H + KV) * D)), "qkv has shape (2, 96), expected (2, 128)"),
    ("qkv dims", dict(qkv=_x(B, 1, (H + 2 * KV) * D)), "qkv has shape (2, 1, 128)"),
    ("qkv dtype", dict(qkv=_x(B, 128).double()), "qkv has dtype torch.float64, expected torch.float32"),
    ("qkv strides", dict(qkv=_x(128, B).t()), "qkv is not contiguous (shape (2, 128), stride (1, 2))"),
    ("qkv device", dict(qkv=torch.empty(B, 128, device=META)), "qkv is on meta, expected cpu"),
    ("kv heads", dict(k_cache=_x(B, H, MAXLEN, D)), "KV caches k_cache (2, 4, 6, 16) / v_cache (2, 2, 6, 16)"),
    (
        "cache lengths",
        dict(v_cache=_x(B, KV, MAXLEN + 1, D)),
        "v_cache (2, 2, 7, 16) do not match [B=2, KV=2, maxlen, D=16]",
    ),
    (
        "cache batch",
        dict(k_cache=_x(1, KV, MAXLEN, D), v_cache=_x(1, KV, MAXLEN, D)),
        "KV caches k_cache (1, 2, 6, 16)",
    ),
    ("cache strides", dict(k_cache=_x(B, KV, D, MAXLEN).transpose(2, 3)), "k_cache is not contiguous"),
    ("cache dtype", dict(v_cache=_x(B, KV, MAXLEN, D).half()), "v_cache has dtype torch.float16"),
    ("pos = maxlen", dict(pos=MAXLEN), "positions 6..6 do not fit the KV cache of 6 positions"),
    ("pos < 0", dict(pos=-1), "positions -1..-1 do not fit the KV cache of 6 positions"),
    ("cos width", dict(cos=_x(B, 1, D // 2)), "cos has shape (2, 1, 8), expected (2, 1, 16) or (2, 16)"),
    ("cos batch", dict(cos=_x(1, 1, D), sin=_x(1, 1, D)), "cos has shape (1, 1, 16)"),
    ("sin vs cos", dict(sin=_x(B, D)), "sin has shape (2, 16), expected (2, 1, 16) (cos's shape)"),
    ("sin device", dict(sin=torch.empty(B, 1, D, device=META)), "sin is on meta"),
    ("q_norm size", dict(q_norm=_x(D + 1)), "q_norm has shape (17,), expected (16,)"),
    ("k_norm dtype", dict(k_norm=_x(D).double()), "k_norm has dtype torch.float64"),
    (
        "head_dim % 8",
        dict(
            shape=AttentionShape(4, 2, 12, 0.3),
            qkv=_x(B, 96),
            k_cache=_x(B, KV, MAXLEN, 12),
            v_cache=_x(B, KV, MAXLEN, 12),
        ),
        "head_dim is 12, expected a multiple of 8",
    ),
]


@pytest.mark.parametrize("changes,part", [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES])
def test_attention_fused_rejects(changes: dict[str, Any], part: str) -> None:
    msg = _raises(_fused(**changes), part)
    assert msg.startswith("decode_ops.attention_fused: ")


def test_attention_fused_valid_inputs_match_the_reference() -> None:
    a, r = _att(), _att()
    qkv = r.pop("qkv").view(B, 1, -1)
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
    ref = decode_ops.attention_reference(
        q, k, v, r["k_cache"], r["v_cache"], POS, r["cos"], r["sin"], SHAPE, r["q_norm"], r["k_norm"]
    )
    out = decode_ops.attention_fused(**a)
    _close(out, ref)
    _close(a["k_cache"], r["k_cache"], 1e-6)
    for cos_shape in ((B, D),):  # [B, D] tables are as good as [B, 1, D]
        b = _att()
        b["cos"], b["sin"] = b["cos"].view(cos_shape), b["sin"].view(cos_shape)
        assert torch.equal(decode_ops.attention_fused(**b), out)


def test_attention_dispatcher_checks_before_choosing_a_path() -> None:
    q, k = _x(1, 1, H * D), _x(1, 1, KV * D)
    kc, cos = _x(1, KV, MAXLEN, D), _x(1, 1, D)
    att = decode_ops.attention
    _raises(lambda: att(q, k, k, kc, _x(1, KV, MAXLEN + 1, D), 0, cos, cos, SHAPE), "decode_ops.attention: KV caches")
    _raises(lambda: att(q, k, k, kc, kc, MAXLEN, cos, cos, SHAPE), "positions 6..6 do not fit")
    _raises(lambda: att(q, k, k, kc, kc, 0, cos, _x(1, 1, D + 8), SHAPE), "sin has shape (1, 1, 24)")
    _raises(lambda: att(_x(1, 1, 24), k, k, kc, kc, 0, cos, cos, SHAPE), "q has shape", "do not match heads=4")
    _raises(lambda: att(q[0], k, k, kc, kc, 0, cos, cos, SHAPE), "q has shape (1, 64)")
    _raises(lambda: att(q, k, k, kc.double(), kc.double(), 0, cos, cos, SHAPE, native_flag=True), "k_cache has dtype")


# ----------------------------------------------------------------------------- FusedInt4
def test_fused_int4_checks_x_and_residual() -> None:
    from awqkit.runtime.linear import FusedInt4, bind

    mods = [_ql(seed=1), _ql(64, 64, seed=2, bias=False)]
    with torch.no_grad():
        before = [m(_x(3, 64)) for m in mods]
    op = bind(mods)
    assert isinstance(op, FusedInt4) and (op.in_features, op.out_features) == (64, 192)
    # the reported bug: [1, 2K] passed the row count (numel // K = 2) and read past x in C
    _raises(lambda: op(_x(1, 128)), "FusedInt4: x has shape (1, 128), expected (..., 64)", "in_features=64")
    _raises(lambda: op(_x(2, 32)), "x has shape (2, 32)")
    _raises(lambda: op(torch.empty(1, 64, device=META)), "x is on meta")
    x, r = _x(3, 64), _x(3, 192, seed=2)
    _raises(lambda: op(x, _x(3, 256)), "FusedInt4: residual has shape (3, 256), expected (3, 192)")
    _raises(lambda: op(x, _x(192 * 3)), "residual has shape (576,), expected (3, 192)")
    _raises(lambda: op(x, r.double()), "residual has dtype torch.float64")
    _raises(lambda: op(x, _x(192, 3).t()), "residual is not contiguous")
    _raises(lambda: op(x, torch.empty(3, 192, device=META)), "residual is on meta")
    y = op(x)
    assert torch.equal(y, torch.cat(before, dim=-1))
    expected = r + y
    assert op(x, r) is r and torch.equal(r, expected)


# ----------------------------------------------------------------------------- NativeStack
@pytest.fixture(scope="module")
def decoder() -> Any:
    T = pytest.importorskip("transformers")
    from awqkit.runtime.decoder import Decoder

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=200,
    )
    model = quantize_decoder_linears(T.LlamaForCausalLM(cfg).eval(), group_size=32)
    dec = Decoder(model)
    assert dec.stack is not None
    dec.start(2, 6)
    return dec


def _step_args(dec: Any, b: int = 2) -> dict[str, Any]:
    return dict(h=_x(b, 1, 128), pos=2, cos=_x(b, 1, 32), sin=_x(b, 1, 32))


STACK_CASES = [
    ("h width", dict(h=_x(2, 1, 129)), "NativeStack: h has shape (2, 1, 129), expected (2, 1, 128)"),
    ("h dims", dict(h=_x(2, 128)), "h has shape (2, 128)"),
    ("h batch", dict(h=_x(1, 1, 128)), "h has shape (1, 1, 128), expected (2, 1, 128)"),
    ("h rows", dict(h=_x(17, 1, 128)), "h has 17 rows, expected at most 16"),
    ("h dtype", dict(h=_x(2, 1, 128).double()), "h has dtype torch.float64"),
    ("h strides", dict(h=_x(128, 1, 2).transpose(0, 2)), "h is not contiguous"),
    ("h device", dict(h=torch.empty(2, 1, 128, device=META)), "h is on meta"),
    ("pos", dict(pos=6), "positions 6..6 do not fit the KV cache of 6 positions"),
    ("cos", dict(cos=_x(2, 1, 16)), "cos has shape (2, 1, 16)"),
    ("sin", dict(sin=_x(1, 1, 32)), "sin has shape (1, 1, 32), expected (2, 1, 32) (cos's shape)"),
]


@pytest.mark.parametrize("changes,part", [c[1:] for c in STACK_CASES], ids=[c[0] for c in STACK_CASES])
def test_native_stack_step_rejects(decoder: Any, changes: dict[str, Any], part: str) -> None:
    _raises(lambda: decoder.stack(**{**_step_args(decoder), **changes}), part)


def test_native_stack_bind_caches_rejects_and_still_decodes(decoder: Any) -> None:
    from awqkit.runtime.decoder import Decoder

    stack, kc, vc = decoder.stack, decoder.k_cache, decoder.v_cache
    bind = stack.bind_caches
    _raises(lambda: bind(kc[:1], vc), "NativeStack.bind_caches: KV caches k_cache (1 tensors) / v_cache (2 tensors)")
    _raises(lambda: bind([kc[0], _x(2, 4, 6, 32)], vc), "KV caches k_cache[1] (2, 4, 6, 32) / v_cache[1] (2, 2, 6, 32)")
    _raises(lambda: bind([kc[0], _x(2, 2, 7, 32)], [vc[0], _x(2, 2, 7, 32)]), "[B=2, KV=2, maxlen=6, D=32]")
    _raises(lambda: bind([kc[0], _x(3, 2, 6, 32)], [vc[0], _x(3, 2, 6, 32)]), "[B=2, KV=2, maxlen=6, D=32]")
    _raises(lambda: bind([kc[0], kc[1].double()], vc), "k_cache[1] has dtype torch.float64")
    _raises(lambda: bind(kc, [vc[0], _x(2, 2, 32, 6).transpose(2, 3)]), "v_cache[1] is not contiguous")
    _raises(lambda: bind([torch.empty(2, 2, 6, 32, device=META), kc[1]], vc), "k_cache[0] is on meta")
    # a bound cache changed in place behind the structs' back
    kc[1].resize_(2, 2, 7, 32)
    _raises(
        lambda: stack(**_step_args(decoder)), "NativeStack: KV caches k_cache[1] (2, 2, 7, 32)", "bind_caches() bound"
    )
    decoder.start(2, 6)  # reallocates (the shapes differ) and binds again
    # the failed calls changed nothing else: the one-call stack still equals the per-op path, bit for bit
    ids = torch.randint(0, 200, (2, 3), generator=torch.Generator().manual_seed(0))
    per_op = Decoder(decoder.model, native_stack=False)
    for dec in (decoder, per_op):
        dec.start(2, 6)
    a, b = [decoder.prefill(ids)], [per_op.prefill(ids)]
    for _ in range(3):
        nxt = a[-1].argmax(-1, keepdim=True)
        a.append(decoder.step(nxt))
        b.append(per_op.step(nxt))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_c_kernel_reads_the_nibble_order_the_packer_writes() -> None:
    """AWQ_ORDER lives in awqkit.quant.packing; the C source keeps its own copy for the compiler: they must agree."""
    import re
    from pathlib import Path

    from awqkit.quant.packing import AWQ_ORDER

    src = (Path(__file__).resolve().parents[2] / "src" / "awqkit" / "kernels" / "csrc" / "awqkit_cpu.c").read_text()
    found = re.findall(r"static const int AWQ_ORDER\[8\] = \{([^}]*)\};", src)
    assert len(found) == 1, "expected one AWQ_ORDER table in awqkit_cpu.c"
    assert tuple(int(v) for v in found[0].split(",")) == AWQ_ORDER
