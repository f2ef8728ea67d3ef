"""A ``.gguf`` source: the output holds the tokenizer and chat template transformers builds from the GGUF's
metadata (the GGUF's folder has no tokenizer files), so ``AutoTokenizer`` and generation work on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

from awqkit.api import quantize
from awqkit.config import QuantConfig
from awqkit.io.load import load_quantized

gguf = pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 symbols its BPE vocabularies start with."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + n) for n in range(len(extra))]


def write_tiny_gguf(path: Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2, ff: int = 128) -> None:
    """A float32 Llama GGUF with a byte-level BPE tokenizer, two control tokens and a chat template."""
    rng = np.random.default_rng(0)
    tokens = [*_byte_symbols(), "Ġt", "Ġa", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 2) + [gguf.TokenType.CONTROL] * 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_rope_dimension_count(hidden // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "Ġ a", "h e", "Ġt he"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(TEMPLATE)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    kv_dim = kv * hidden // heads
    for i in range(layers):
        for name, shape in {
            "attn_q": (hidden, hidden),
            "attn_k": (kv_dim, hidden),
            "attn_v": (kv_dim, hidden),
            "attn_output": (hidden, hidden),
            "ffn_gate": (ff, hidden),
            "ffn_up": (ff, hidden),
            "ffn_down": (hidden, ff),
        }.items():
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_source_writes_its_tokenizer_and_chat_template(tmp_path: Path) -> None:
    src = tmp_path / "gguf" / "tiny.gguf"
    src.parent.mkdir()
    write_tiny_gguf(src)
    (src.parent / "tokenizer_config.json").write_text("{}")  # a stray file in the GGUF's folder is not copied
    out = quantize(src, tmp_path / "out", method="rtn", quant=QuantConfig(bits=4, group_size=32), progress=False).path
    reference = T.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tok = T.AutoTokenizer.from_pretrained(out)
    text = "the cat ate the hat"
    assert tok(text).input_ids == reference(text).input_ids
    assert tok.chat_template == TEMPLATE
    chat = [{"role": "user", "content": "hi there"}]
    assert tok.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)
    assert tok.eos_token == "<|im_end|>"
    model = load_quantized(out, backend="torch")
    ids = torch.tensor([tok(text).input_ids])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
