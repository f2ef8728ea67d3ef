"""Every ``KERNEL-*`` entry of docs/errors.md: one wrong input to a native-kernel entry point raises
KernelInputError with the catalogued message (the full per-argument matrix is tests/kernels/test_native_boundary.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from errors_catalogue import assert_error

from awqkit.errors import KernelInputError
from awqkit.kernels import cpu_avx2, decode_ops
from awqkit.kernels.decode_ops import AttentionShape

if not cpu_avx2.is_available():
    pytest.skip(f"cpu-avx2 unavailable here: {cpu_avx2.unavailable_reason()}", allow_module_level=True)

from conftest import quantize_decoder_linears, random_linear  # noqa: E402

B, H, KV, D, MAXLEN = 1, 4, 2, 16, 5


def _fused_attention(**changes: Any) -> Callable[[], Any]:
    """attention_fused on valid inputs (qkv [B, (H + 2 KV) D], caches [B, KV, maxlen, D]) with ``changes``."""
    args: dict[str, Any] = dict(
        qkv=torch.zeros(B, (H + 2 * KV) * D),
        k_cache=torch.zeros(B, KV, MAXLEN, D),
        v_cache=torch.zeros(B, KV, MAXLEN, D),
        pos=0,
        cos=torch.ones(B, 1, D),
        sin=torch.zeros(B, 1, D),
        shape=AttentionShape(H, KV, D, 0.25),
    )
    return lambda: decode_ops.attention_fused(**{**args, **changes})


def _fused_linear_wide_x() -> Any:
    """The reported bug: FusedInt4 with x [1, 2K] (the C call would read past x)."""
    from awqkit.nn.qlinear import QuantLinear
    from awqkit.runtime.linear import bind

    op = bind([QuantLinear.from_linear(random_linear(64, 64), 4, 32)])
    return op(torch.zeros(1, 128))


def _forward_on_meta() -> Any:
    from awqkit.nn.qlinear import QuantLinear

    return cpu_avx2.forward(torch.empty(1, 64, device="meta"), QuantLinear.from_linear(random_linear(64, 64), 4, 32))


def _stack_with_17_rows() -> Any:
    transformers = pytest.importorskip("transformers")
    from awqkit.runtime.decoder import Decoder

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=64,
    )  # every width % 64 == 0
    dec = Decoder(quantize_decoder_linears(transformers.LlamaForCausalLM(cfg).eval(), group_size=32))
    assert dec.stack is not None
    dec.start(17, 4)
    return dec.stack(torch.zeros(17, 1, 64), 0, torch.ones(17, 1, 32), torch.zeros(17, 1, 32))


CASES: list[tuple[str, Callable[[], Any]]] = [
    ("KERNEL-SHAPE", _fused_linear_wide_x),
    ("KERNEL-DTYPE", _fused_attention(qkv=torch.zeros(B, (H + 2 * KV) * D, dtype=torch.float64))),
    ("KERNEL-CONTIGUOUS", _fused_attention(k_cache=torch.zeros(B, KV, D, MAXLEN).transpose(2, 3))),
    ("KERNEL-DEVICE", _forward_on_meta),
    ("KERNEL-ROWS", _stack_with_17_rows),
    (
        "KERNEL-SIZE",
        _fused_attention(
            shape=AttentionShape(H, KV, 12, 0.25),
            qkv=torch.zeros(B, 96),
            k_cache=torch.zeros(B, KV, MAXLEN, 12),
            v_cache=torch.zeros(B, KV, MAXLEN, 12),
        ),
    ),
    ("KERNEL-KV-CACHE", _fused_attention(v_cache=torch.zeros(B, KV, MAXLEN + 1, D))),
    ("KERNEL-POSITION", _fused_attention(pos=MAXLEN)),
]


@pytest.mark.parametrize("error_id,call", CASES, ids=[c[0] for c in CASES])
def test_native_boundary_errors_match_the_catalogue(error_id: str, call: Callable[[], Any]) -> None:
    with pytest.raises(KernelInputError) as excinfo:
        call()
    assert_error(error_id, str(excinfo.value))
    assert "\n" not in str(excinfo.value)
