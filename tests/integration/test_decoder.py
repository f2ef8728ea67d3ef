"""awqkit.runtime.decoder: awqkit's decode loop gives the transformers forward's logits and greedy tokens.

Each model is compared with its own transformers forward (same modules, same weights): the prompt's last
logits and every incremental step's logits within fp32 summation noise (max abs error <= 1e-4 of the
logits' largest magnitude), and the same greedy tokens. q/k projections are scaled up so attention is
peaked (with the default init it is nearly uniform and would hide position errors); prompts are longer
than the sliding windows so windowed layers differ from full ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import quantize_decoder_linears, set_backend, tiny_fp16_llama  # noqa: E402

from awqkit.kernels import native  # noqa: E402
from awqkit.runtime.decoder import Decoder, supported  # noqa: E402

T = pytest.importorskip("transformers")

REL = 1e-4
PROMPT, STEPS, WINDOW = 14, 6, 5


def _tiny(arch: str, seed: int = 0, wide: bool = False) -> torch.nn.Module:
    """2 layers, 4 heads / 2 KV heads; ``wide``: every linear width a multiple of 64 (what cpu-avx2 takes)."""
    common = dict(
        hidden_size=128 if wide else 64,
        intermediate_size=192 if wide else 96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32 if wide else 16,
        vocab_size=200,
    )
    cfg = {
        "llama": lambda: T.LlamaConfig(**common),
        "mistral": lambda: T.MistralConfig(**common, sliding_window=WINDOW),
        "qwen2": lambda: T.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen3": lambda: T.Qwen3Config(**common),
        "gemma3": lambda: T.Gemma3TextConfig(**common),
    }[arch]()
    cls = {
        "llama": T.LlamaForCausalLM,
        "mistral": T.MistralForCausalLM,
        "qwen2": T.Qwen2ForCausalLM,
        "qwen3": T.Qwen3ForCausalLM,
        "gemma3": T.Gemma3ForCausalLM,
    }[arch]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    _sharpen(model)
    return model


def _sharpen(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6)
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)


def _hf_steps(model, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-step last-position logits of the transformers forward, greedy, and the tokens."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = [out.logits[:, -1].float()]
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [nxt]
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            logits.append(out.logits[:, -1].float())
            toks.append(nxt)
    return logits, torch.cat(toks, 1)


def _decoder_steps(dec: Decoder, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    dec.start(ids.shape[0], ids.shape[1] + steps + 1)
    logits = [dec.prefill(ids)]
    nxt = logits[0].argmax(-1, keepdim=True)
    toks = [nxt]
    for _ in range(steps):
        logits.append(dec.step(nxt))
        nxt = logits[-1].argmax(-1, keepdim=True)
        toks.append(nxt)
    return logits, torch.cat(toks, 1)


def _assert_same(model, dec: Decoder, ids: torch.Tensor, steps: int = STEPS) -> None:
    ref_logits, ref_toks = _hf_steps(model, ids, steps)
    logits, toks = _decoder_steps(dec, ids, steps)
    for i, (a, b) in enumerate(zip(logits, ref_logits, strict=True)):
        err = (a - b).abs().max().item()
        assert err <= REL * b.abs().max().item(), f"step {i}: max abs logits error {err}"
    assert torch.equal(toks, ref_toks)


def _ids(vocab: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("native_ops", [None, False])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_models_match_transformers(arch, native_ops):
    if native_ops is None and native.library() is None:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    model = _tiny(arch)
    _assert_same(model, Decoder(model, native_ops=native_ops), _ids(200))


def test_sliding_window_is_exercised():
    """Guard for the comparisons above: the windowed models' outputs depend on the window here."""
    model, ids = _tiny("mistral"), _ids(200)
    wide = _tiny("mistral")
    wide.config.sliding_window = None
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, wide(ids).logits, atol=1e-3)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_quantized_model_matches_transformers(backend):
    model = quantize_decoder_linears(tiny_fp16_llama(128, 256, 160), group_size=32)
    _sharpen(model)
    set_backend(model, backend)
    dec = Decoder(model)
    kinds = {op.kind for lay in dec.layers for op in (lay.qkv, lay.o, lay.gate_up, lay.down)}
    fused = backend == "auto" and native.library() is not None
    assert kinds == ({"cpu-avx2 fused"} if fused else {"modules"})
    assert (dec.stack is not None) == fused
    _assert_same(model, dec, _ids(160, batch=3))
    # the fused GEMVs re-point the modules' own caches: the transformers forward still gives the same
    _assert_same(model, Decoder(model), _ids(160, batch=1))


@pytest.mark.skipif(native.library() is None, reason="native kernels unavailable")
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_one_call_stack_equals_the_per_op_path_bit_for_bit(arch):
    """The native stack calls the same kernels in the same order: identical logits at every step, batches
    of 1 and 4 (q/k norms for Qwen3, a sliding window shorter than the prompt for Mistral)."""
    model = quantize_decoder_linears(_tiny(arch, wide=True), group_size=32)
    one, per_op = Decoder(model), Decoder(model, native_stack=False)
    assert one.stack is not None and per_op.stack is None
    for batch in (1, 4):
        a, ta = _decoder_steps(one, _ids(200, batch), STEPS)
        b, tb = _decoder_steps(per_op, _ids(200, batch), STEPS)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and torch.equal(ta, tb)
    _assert_same(model, one, _ids(200, 2))


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = _tiny("llama")
    dec = Decoder(model)
    ids = _ids(200)
    full = dec.generate(ids, 8)
    _, ref = _hf_steps(model, ids, 7)
    assert torch.equal(full, ref)
    eos = int(full[0, 2])
    cut = dec.generate(ids, 8, eos_token_id=eos)
    row0 = cut[0].tolist()
    assert row0[:3] == full[0, :3].tolist() and set(row0[3:]) <= {eos}
    if eos not in full[1].tolist():
        assert cut.shape[1] == 8


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="does not run gemma3"):
        Decoder(_tiny("gemma3"))
    with pytest.raises(ValueError, match="float32"):
        Decoder(_tiny("llama").to(torch.bfloat16))
    dec = Decoder(_tiny("llama"))
    with pytest.raises(ValueError, match="call start"):
        dec.step(torch.zeros(1, 1, dtype=torch.long))
    dec.start(1, 4)
    with pytest.raises(ValueError, match="exceed the cache"):
        dec.prefill(torch.zeros(1, 5, dtype=torch.long))
    assert "LlamaForCausalLM" in supported() and "Gemma3ForCausalLM" not in supported()
