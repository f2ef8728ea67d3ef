"""Shared test fixtures: a tiny byte-level BPE tokenizer built in code (no hub access)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Quantization maps float weights to small integers with a scale and a zero point.",
    "user assistant system question answer instruction output prompt response",
    "0 1 2 3 4 5 6 7 8 9 hello world, hello again!",
]
#: A minimal chat template: "<|role|>\ncontent</s>\n" per turn, "<|assistant|>\n" as generation prompt.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE, vocab_size: int = 320) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<pad>`` (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture
def tiny_tokenizer() -> Any:
    """Fresh tiny tokenizer with a chat template (safe to mutate in a test)."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_tokenizer_no_template() -> Any:
    """Fresh tiny tokenizer without a chat template."""
    return make_tiny_tokenizer(chat_template=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request: pytest.FixtureRequest) -> Any:
    """Tiny models: one thread is much faster on this 2-core machine (small matmuls pay threading costs).

    Module-scoped and autouse, so it is set before any module-scoped model fixture runs; the real-model
    tests (marked slow) keep every thread.
    """
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_linear(in_f: int, out_f: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    """An ``nn.Linear`` with N(0, 1) weights (and bias): wide enough ranges that quantization is not trivial."""
    import torch

    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def clipped_linear_case(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w [32, 128], Gram h of correlated inputs, w clipped to 0.8x its per-group [min, max], group 32)``: a
    rounding method's case where the grid comes from the clipped weight and the target is the unclipped one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(1024, 128, generator=g) @ torch.randn(128, 128, generator=g)
    lo, hi = w.reshape(32, 4, 32).amin(-1) * 0.8, w.reshape(32, 4, 32).amax(-1) * 0.8
    clipped = torch.clamp(w.reshape(32, 4, 32), lo.unsqueeze(-1), hi.unsqueeze(-1)).reshape(32, 128)
    return w, x.T @ x, clipped


def save_tiny_llama(folder: Path, **config: Any) -> Path:
    """Save a seeded 2-layer Llama (hidden 64, GQA 4/2 heads, the tiny tokenizer's vocabulary) and the tiny
    tokenizer into ``folder``, as a float Hugging Face source folder; ``config`` overrides LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tok),
            **config,
        }
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_fp16_llama(hidden: int, intermediate: int, vocab: int, tie: bool = True, seed: int = 0) -> Any:
    """A seeded 2-layer Llama (4 heads, 2 KV heads) in eval mode whose fp32 weights are exactly fp16 values."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def quantize_decoder_linears(model: Any, group_size: int, zero_point: bool = True) -> Any:
    """RTN-quantize every linear of the decoder layers to 4-bit QuantLinear modules (the LM head stays float)."""
    from awqkit.nn.replace import replace_linears

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    replace_linears(model, names, 4, group_size, zero_point)
    return model


def set_backend(model: Any, backend: str) -> None:
    """Point every QuantLinear of ``model`` at kernel backend ``backend``."""
    from awqkit.nn.qlinear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend


def greedy(model: Any, ids: torch.Tensor, n: int = 12) -> list[int]:
    """The ``n`` greedily generated token ids after ``ids`` (forced length)."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()
