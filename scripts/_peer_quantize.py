"""Quantize a model with a peer tool; runs INSIDE that tool's own virtual environment.

Started by ``scripts/benchmark_engine.py`` as ``<peer-venv>/bin/python scripts/_peer_quantize.py JOB.json``; it
imports only the peer library (never awqkit, which is not installed there). ``JOB.json`` holds::

    {"tool": "llmcompressor" | "autoawq" | "autoround" | "gptqmodel", "src": fp32 HF folder, "dst": output folder,
     "blocks": path of a JSON list of token-id lists (the calibration blocks, used as given),
     "group_size": 64, "duo_scaling": true | false | "both", "result": path of the JSON result to write}

and optionally ``"bits"`` (auto-round, GPTQModel; default 4), ``"iters"`` (auto-round's SignRound steps per
block; absent or null: its default, 200; e.g. 50 for a light run), ``"amp"`` (auto-round; default false: tune in
fp32, see below) and ``"torch_compile"`` (auto-round; absent or null: its default, on for Linux when iters >= 10).

The result holds ``seconds`` (model load + quantization + save, the span awqkit's own time covers),
``quantize_seconds`` (the library's quantization call alone), ``peak_rss`` (VmHWM of this process at the
end, bytes) and the library versions.

What each tool runs:

* auto-round 0.16.1: ``AutoRound`` with its default recipe (SignRound, scheme W4A16, ``iters`` steps per block,
  its default lr and batch size 8, or fewer blocks), asymmetric at the job's group size, calibrated on exactly the
  blocks (``nsamples`` = their number, ``seqlen`` = their length), exported with ``format="auto_awq"`` (AutoAWQ
  GEMM, which awqkit reads). ``quantize_seconds`` times its ``quantize()`` inside ``quantize_and_save``, which also
  packs and writes; the export lands in a subfolder named after the model and scheme, moved to ``dst``.
* GPTQModel 7.7.0: GPTQ with ``QuantizeConfig(bits, group_size, sym=False, desc_act=False, damp_percent=0.05)``
  (its other defaults: ``act_group_aware`` on, batch size 1, RTN fallback), the blocks in their order
  (``calibration_sort=None``), saved in its GPTQ format; awqkit cannot read that format, so ``dst + "-dequantized"``
  is also written: the fp32 source model with each linear weight replaced by GPTQModel's own dequantization of
  the saved checkpoint (see :func:`dequantize_gptq`), with config and tokenizer, for evaluation as a float model.
  ``seconds`` and ``peak_rss`` do not include writing that folder.

CPU-only adjustments (../shared/docs/peer-runs.md):

* llm-compressor 0.14 pins the cached activations' memory unconditionally
  (``IntermediatesCache.pin_memory``, called by ``AWQModifier._apply_smoothing``), which raises
  "Cannot access accelerator device when none is available" without a GPU; it is replaced here by a no-op
  when ``torch.accelerator.is_available()`` is false (pinning only speeds up host-to-device copies).
* AutoAWQ 0.2.9 snapshots weights with ``v.cpu()``, an alias on CPU; the benchmark patches the installed
  file to ``v.detach().clone()`` when it builds the venv, and this driver refuses to run unpatched.
* auto-round turns on bf16 autocast (``amp``) wherever the CPU reports AVX512-BF16, casting the model to bf16
  for tuning; this driver passes ``amp=False`` unless the job says ``"amp": true``, so it tunes in fp32 like the
  other peers. Its torch.compile (inductor, needs a C++ compiler) is left at its default and works on CPU.
* GPTQModel is installed ``--no-deps`` (its requirements pull torch >= 2.14.1, a CUDA build) and reads
  ``GPTQMODEL_CPU_WORKERS`` at import: set here to the CPU count unless already set. Its torch kernel loads
  a GPTQ checkpoint in fp16/bf16 only, so the dequantization reads it in fp16 and computes in fp32.
"""

from __future__ import annotations

import json
import shutil
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


def run_autoround(job: dict, blocks: list[list[int]]) -> dict:
    import auto_round
    import transformers
    from auto_round import AutoRound

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(job["src"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(job["src"])
    ids = torch.tensor(blocks, dtype=torch.long)
    bs = min(8, len(blocks))  # its default batch size
    # the blocks as its "dataloader": an iterable of input_ids batches, read in order, none dropped
    data = list(torch.split(ids, bs))
    kwargs = {"iters": job["iters"]} if job.get("iters") is not None else {}  # None: its default (200)
    ar = AutoRound(
        model,
        tokenizer=tok,
        scheme="W4A16",
        bits=job.get("bits", 4),
        group_size=job["group_size"],
        sym=False,
        dataset=data,
        nsamples=len(blocks),
        seqlen=ids.shape[1],
        batch_size=bs,
        device_map="cpu",
        enable_torch_compile=job.get("torch_compile"),
        amp=bool(job.get("amp", False)),
        **kwargs,
    )
    spans = []
    quantize = ar.quantize  # time its quantization alone: quantize_and_save also packs and writes

    def timed_quantize():
        t = time.perf_counter()
        out = quantize()
        spans.append(time.perf_counter() - t)
        return out

    ar.quantize = timed_quantize
    export = Path(job["dst"] + ".export")  # it writes into a subfolder named after the model and scheme
    shutil.rmtree(export, ignore_errors=True)
    ar.quantize_and_save(str(export), format="auto_awq")
    (folder,) = export.iterdir()
    folder.rename(job["dst"])
    shutil.rmtree(export)
    tok.save_pretrained(job["dst"])
    return {
        "seconds": time.perf_counter() - t0,
        "quantize_seconds": spans[0],
        "versions": {
            "auto-round": auto_round.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


def run_gptqmodel(job: dict, blocks: list[list[int]]) -> dict:
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))  # read when gptqmodel is imported
    import gptqmodel
    import transformers
    from gptqmodel import GPTQModel, QuantizeConfig

    t0 = time.perf_counter()
    qcfg = QuantizeConfig(
        bits=job.get("bits", 4), group_size=job["group_size"], sym=False, desc_act=False, damp_percent=0.05
    )
    model = GPTQModel.load(job["src"], qcfg, device="cpu", dtype=torch.float32)
    t1 = time.perf_counter()
    model.quantize(blocks, calibration_sort=None)  # the blocks as given, in order (its default sorts by length)
    t2 = time.perf_counter()
    model.save(job["dst"])
    seconds, peak = time.perf_counter() - t0, peak_rss_bytes()  # before the extra dequantized copy
    del model
    dequantize_gptq(job["src"], job["dst"], job["dst"] + "-dequantized")
    return {
        "seconds": seconds,
        "peak_rss": peak,
        "quantize_seconds": t2 - t1,
        "versions": {
            "gptqmodel": gptqmodel.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


@torch.no_grad()
def dequantize_gptq(src: str, qdir: str, dst: str) -> None:
    """Write ``dst``: the fp32 model of ``src`` with every linear weight replaced by GPTQModel's own
    dequantization of the packed checkpoint in ``qdir`` (``TorchLinear.dequantize_weight``, in fp32), for a
    reader of plain HF checkpoints. Checked on the first quantized layer: at least 95 % of the dequantized weights
    within one quantization step of the float weights (not all: GPTQ's error feedback moves some further) and a
    median under half a step, and the module's own forward equal to ``x @ W_deq.T`` (to fp16 rounding)."""
    import transformers
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    # its torch kernel takes fp16/bf16 only; the scales are fp16 in the checkpoint anyway
    qmodel = GPTQModel.load(qdir, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    fp = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fp_modules = dict(fp.named_modules())
    checked = False
    n = 0
    for name, m in qmodel.model.named_modules():
        if not isinstance(m, TorchLinear):
            continue
        if not checked:
            x = torch.randn(4, m.in_features)
            y = m(x.half()).float()  # its own forward, fp16
        m.scales.data = m.scales.data.float()  # exact in fp32, so the dequantized product is computed in fp32
        w = m.dequantize_weight().T.float().contiguous()  # [out, in]
        target = fp_modules[name]
        if not checked:  # one layer: the unpacking is right
            step = m.scales.T[:, m.g_idx.long()]  # [out, in]: the quantization step of each weight
            d = ((w - target.weight.detach()).abs() / step).flatten()
            within, median = (d <= 1.0).float().mean().item(), d.median().item()
            # GPTQ's error feedback moves a few weights further than one step (measured: up to ~4.5 steps on
            # ~1-2 % of them); a wrong unpacking (layout, order, zero points) would put most of them steps away
            if within < 0.95 or median > 0.5:
                raise SystemExit(
                    f"{name}: only {within:.1%} of the dequantized weights lie within one step of the float weights"
                    f" (median {median:.2f} steps): the unpacking is wrong"
                )
            rel = ((y - x @ w.T).norm() / y.norm()).item()
            if rel > 1e-2:
                raise SystemExit(f"{name}: its forward differs from x @ W_deq.T by {rel:.2e} (relative)")
            print(
                f"dequantize check on {name}: {within:.2%} of |W_deq - W| within one step (median {median:.3f},"
                f" max {d.max().item():.2f} steps); its own forward vs x @ W_deq.T: {rel:.1e} (relative)"
            )
            checked = True
        target.weight.data = w
        n += 1
    if not checked:
        raise SystemExit(f"{qdir}: no TorchLinear module found after loading it with its torch kernel")
    fp.save_pretrained(dst)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    print(f"{dst}: {n} dequantized linear layers")


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    blocks = json.loads(Path(job["blocks"]).read_text())
    runner = {
        "llmcompressor": run_llmcompressor,
        "autoawq": run_autoawq,
        "autoround": run_autoround,
        "gptqmodel": run_gptqmodel,
    }[job["tool"]]
    out = runner(job, blocks)
    out.setdefault("peak_rss", peak_rss_bytes())
    out["threads"] = torch.get_num_threads()
    Path(job["result"]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
