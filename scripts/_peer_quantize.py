"""Quantize a model with a peer AWQ tool; runs INSIDE that tool's own virtual environment.

Started by ``scripts/benchmark_engine.py`` as ``<peer-venv>/bin/python scripts/_peer_quantize.py JOB.json``; it
imports only the peer library (never awqkit, which is not installed there). ``JOB.json`` holds::

    {"tool": "llmcompressor" | "autoawq", "src": fp32 HF folder, "dst": output folder,
     "blocks": path of a JSON list of token-id lists (the calibration blocks, used as given),
     "group_size": 64, "duo_scaling": true | false | "both", "result": path of the JSON result to write}

The result holds ``seconds`` (model load + quantization + save, the span awqkit's own time covers),
``quantize_seconds`` (the library's quantization call alone), ``peak_rss`` (VmHWM of this process at the
end, bytes) and the library versions.

CPU-only adjustments (../shared/docs/peer-runs.md):

* llm-compressor 0.14 pins the cached activations' memory unconditionally
  (``IntermediatesCache.pin_memory``, called by ``AWQModifier._apply_smoothing``), which raises
  "Cannot access accelerator device when none is available" without a GPU; it is replaced here by a no-op
  when ``torch.accelerator.is_available()`` is false (pinning only speeds up host-to-device copies).
* AutoAWQ 0.2.9 snapshots weights with ``v.cpu()``, an alias on CPU; the benchmark patches the installed
  file to ``v.detach().clone()`` when it builds the venv, and this driver refuses to run unpatched.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """VmHWM of this process (bytes): its own peak, not the parent's carried-over ``ru_maxrss``."""
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def run_llmcompressor(job: dict, blocks: list[list[int]]) -> dict:
    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import preset_name_to_scheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines import cache as lc_cache

    if not torch.accelerator.is_available():  # CPU: skip the unconditional pin_memory (see the docstring)
        lc_cache.IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(job["src"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(job["src"])
    ds = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]})
    scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])  # the preset, at the benchmark's group size
    scheme.weights.group_size = job["group_size"]
    recipe = [
        AWQModifier(duo_scaling=job["duo_scaling"]),
        QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]
    t1 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=len(blocks[0]),
        num_calibration_samples=len(blocks),
        shuffle_calibration_samples=False,
    )
    t2 = time.perf_counter()
    model.save_pretrained(job["dst"], save_compressed=True)
    tok.save_pretrained(job["dst"])
    return {
        "seconds": time.perf_counter() - t0,
        "quantize_seconds": t2 - t1,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed-tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


def run_autoawq(job: dict, blocks: list[list[int]]) -> dict:
    import awq
    import awq.quantize.quantizer as aq
    import transformers
    from awq import AutoAWQForCausalLM

    if "v.cpu() for k, v in module2inspect.state_dict()" in Path(aq.__file__).read_text():
        raise SystemExit(f"{aq.__file__} is not patched (the CPU alias bug of peer-runs.md); rebuild the venv")
    t0 = time.perf_counter()
    model = AutoAWQForCausalLM.from_pretrained(job["src"], torch_dtype=torch.float32, device_map="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(job["src"])
    quant_config = {"zero_point": True, "q_group_size": job["group_size"], "w_bit": 4, "version": "GEMM"}
    t1 = time.perf_counter()
    model.quantize(
        tok,
        quant_config=quant_config,
        calib_data=blocks,
        duo_scaling=bool(job["duo_scaling"]),
        max_calib_samples=len(blocks),
        max_calib_seq_len=len(blocks[0]),
    )
    t2 = time.perf_counter()
    model.save_quantized(job["dst"])
    tok.save_pretrained(job["dst"])
    return {
        "seconds": time.perf_counter() - t0,
        "quantize_seconds": t2 - t1,
        "versions": {"autoawq": awq.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    blocks = json.loads(Path(job["blocks"]).read_text())
    runner = {"llmcompressor": run_llmcompressor, "autoawq": run_autoawq}[job["tool"]]
    out = runner(job, blocks)
    out["peak_rss"] = peak_rss_bytes()
    out["threads"] = torch.get_num_threads()
    Path(job["result"]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
