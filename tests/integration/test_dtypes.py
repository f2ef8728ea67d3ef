"""Half-precision sources: fp16 and bf16 checkpoints quantize (each layer computed in fp32) and reload.

The same tiny Llama saved in fp32, fp16 and bf16 must give finite searched losses, a loadable
checkpoint, and logits close to the fp32 source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from awqkit.api import quantize
from awqkit.config import CalibConfig, QuantConfig, SearchConfig
from awqkit.io.load import load_quantized


@pytest.fixture(scope="module")
def fp32_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM, Path]:
    root = tmp_path_factory.mktemp("dtypes")
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
    )
    model = LlamaForCausalLM(cfg).eval()
    for dtype in (torch.float16, torch.bfloat16):
        model.to(dtype).save_pretrained(root / str(dtype).split(".")[1])
        tok.save_pretrained(root / str(dtype).split(".")[1])
    model.float()
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    return root, model, root / "calib.txt"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_source_quantizes(fp32_source: tuple, dtype: str) -> None:
    root, model32, calib = fp32_source
    dst = root / f"q-{dtype}"
    rep = quantize(
        root / dtype,
        dst,
        quant=QuantConfig(bits=4, group_size=32),
        calib=CalibConfig(source=str(calib), n_samples=4, seq_len=32),
        search=SearchConfig(batch_size=2, search_samples=2, search_tokens=64, n_grid=5),
        progress=False,
    )
    maps = rep.metadata["awq"]["mappings"]
    assert maps and all(m["loss_awq"] is not None and m["loss_awq"] <= m["loss_rtn"] for m in maps)
    q = load_quantized(dst)
    ids = torch.arange(40).reshape(2, 20) % model32.config.vocab_size
    with torch.no_grad():
        ref, out = model32(ids).logits, q(ids).logits
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.2
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4
