"""GPU check of the quantization engine (issue 13, section 4): correctness against the CPU, then time per layer.

Run on a machine with a CUDA GPU (the device tool's H200) from the repository root, without installing:

    PYTHONPATH=src python3 scripts/gpu_check_quantize.py --out $OUT/gpu_quantize.json

Nothing is downloaded: the models are random-weight Llamas written to a temporary folder (bf16 safetensors,
read layer by layer as any source), with a tokenizer trained here on a few sentences (as the tests build theirs),
and the calibration text is synthetic (random weights make its content irrelevant).

1. **Correctness**: a 2-layer tiny Llama quantized with AWQ on ``cpu`` and on ``cuda`` (TF32 off, so both compute
   in true fp32): the chosen scale mode/alpha of every mapping, the clip statistics and the packed tensors are
   compared; the script reports how many mappings differ and the largest relative difference of the packed
   scales (exact agreement is not expected: the GPU's fp32 kernels sum in another order).
2. **Speed**: seconds per decoder layer on ``cuda`` (the engine's per-layer timings) for a SmolLM2-135M-shaped
   model (hidden 576, 4 layers, 32 x 512 calibration tokens) and a Llama-3-8B-shaped one (hidden 4096, 2
   layers), with the peak GPU memory.

Prints a table and writes everything as JSON (``--out``) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "quantization maps float weights to small integers with scales and zero points"
).split()


def tokenizer(folder: Path) -> Any:
    """A byte-level BPE tokenizer trained on synthetic text (no hub access), saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def make_model(root: Path, shape: str) -> Path:
    """A random-weight bf16 Llama of ``shape`` saved to ``root/shape``: its shapes come from a model built on the
    meta device, each tensor is drawn and written without ever building the model for real."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / shape
    tok = tokenizer(folder)
    cfg = LlamaConfig(
        **SHAPES[shape],
        vocab_size=len(tok),
        max_position_embeddings=4096,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.ones(p.shape)).to(torch.bfloat16)
        for name, p in skeleton.state_dict().items()
    }
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    return folder


def calibration(root: Path, n_words: int = 200_000) -> Path:
    rng = random.Random(0)
    path = root / "calib.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(n_words // 60)))
    return path


def quantize(src: Path, dst: Path, calib: Path, device: str, n_samples: int, seq_len: int) -> dict[str, Any]:
    from awqkit.api import quantize as run
    from awqkit.config import CalibConfig, QuantConfig, SearchConfig

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rep = run(
        src,
        dst,
        method="awq",
        quant=QuantConfig(bits=4, group_size=64 if "tiny" not in src.name else 32),
        calib=CalibConfig(source=str(calib), n_samples=n_samples, seq_len=seq_len),
        search=SearchConfig(),
        device=device,
        overwrite=True,
        progress=False,
    )
    out = {
        "seconds": time.perf_counter() - t0,
        "layer_seconds": rep.metadata["awq"]["layer_seconds"],
        "mappings": [(m["mode"], m["alpha"], m["loss_awq"]) for m in rep.metadata["awq"]["mappings"]],
    }
    if device.startswith("cuda"):
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def compare(cpu: Path, gpu: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    a, b = load_file(str(cpu / "model.safetensors")), load_file(str(gpu / "model.safetensors"))
    scales = [k for k in a if k.endswith(".scales")]
    rel = max(float(((a[k].float() - b[k].float()).abs() / a[k].float().abs().clamp(min=1e-8)).max()) for k in scales)
    same = sum(torch.equal(a[k], b[k]) for k in a)
    return {"tensors": len(a), "bit_identical": same, "max_rel_scale_diff": rel}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b", help="shapes to time (default %(default)s)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib = calibration(root)
        tiny = make_model(root, "tiny")
        cpu = quantize(tiny, root / "q-cpu", calib, "cpu", 8, 64)
        gpu = quantize(tiny, root / "q-gpu", calib, "cuda", 8, 64)
        results["correctness"] = {
            "mappings": len(cpu["mappings"]),
            "same_choice": sum(x[:2] == y[:2] for x, y in zip(cpu["mappings"], gpu["mappings"], strict=True)),
            **compare(root / "q-cpu", root / "q-gpu"),
        }
        for shape in a.shapes.split(","):
            src = make_model(root, shape)
            r = quantize(src, root / f"q-{shape}", calib, "cuda", 32, 512)
            results[shape] = {
                "layer_seconds": r["layer_seconds"],
                "seconds": r["seconds"],
                "peak_gpu_gib": r["peak_gpu_bytes"] / 2**30,
            }
    c = results["correctness"]
    print(f"{results['device']}, torch {results['torch']}")
    print(
        f"correctness (tiny, cpu vs cuda): {c['same_choice']}/{c['mappings']} mappings choose the same scales; "
        f"{c['bit_identical']}/{c['tensors']} tensors bit-identical; max relative scale difference "
        f"{c['max_rel_scale_diff']:.2e}"
    )
    print("| shape | s / layer (median) | total s | peak GPU GiB |\n|---|---|---|---|")
    for shape in a.shapes.split(","):
        r = results[shape]
        med = sorted(r["layer_seconds"])[len(r["layer_seconds"]) // 2]
        print(f"| {shape} | {med:.2f} | {r['seconds']:.1f} | {r['peak_gpu_gib']:.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
