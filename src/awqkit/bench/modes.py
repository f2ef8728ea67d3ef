"""Inference speed and memory of one model "mode": prefill latency, decode tokens/s, RSS, weight bytes.

A *mode* (:class:`ModeSpec`) is a checkpoint plus how it is run: a dense Hugging Face folder in fp32 or
bf16, or a quantized folder (:func:`awqkit.io.load.load_quantized`) with a kernel backend (``torch``,
``cpu-avx2``, ``cpu-int4``, ``auto``) and a dtype for its non-quantized weights. :func:`run_modes` measures each mode in
its own subprocess (``python -m awqkit.bench.modes SPEC OUT``), so each peak RSS belongs to that mode alone.

What is timed (:func:`measure_model`), for each batch size ``B``, ``repeats`` times after ``warmup``
untimed runs, reporting the median of the samples:

* **prefill**: one forward pass over a ``[B, prompt_tokens]`` prompt with ``use_cache=True`` and
  ``logits_to_keep=1`` (as ``generate`` does), wall time. The prompt is random token ids (seeded), the
  same ids for every mode, so the work does not depend on a tokenizer.
* **decode**: a manual greedy loop over the KV cache: ``new_tokens`` forward passes of one token per
  sequence, each feeding the argmax of the previous logits. No EOS check, so the length is forced.
  ``tokens/s = B * new_tokens / decode wall time``; the prefill is not included. A manual loop rather than
  ``model.generate`` so the two phases are timed separately and nothing else (logits processors,
  stopping criteria, streamer hooks) is in the measured time.

Two decode *loops* (``ModeSpec.loop``): ``transformers`` calls the model's own forward with its
``DynamicCache`` (what ``model.generate`` runs); ``awqkit`` runs :class:`awqkit.runtime.decoder.Decoder`, awqkit's
lean loop over the same modules and weights (static KV cache, fused sibling GEMVs and native norm/attention
ops; float32 on CPU, Llama-style architectures). Prefill is timed the same way in both (one pass over the
prompt, last logits), decode as ``new_tokens`` single-token steps.

Bytes read per decode step (:func:`weight_bytes_per_step`) is an estimate of the *weight* bytes one
decode step must read from memory: for each quantized linear the tensors its backend actually reads
(``cpu-avx2``: its re-blocked int4 words + fp16 scales + uint8 zeros; ``cpu-int4``: its converted uint8
weight + bf16 scales-and-zeros cache; ``torch``: the packed buffers
``qweight``/``qzeros``/``scales``/``bias``; the fp32 weight the torch backend dequantizes into on every call
is a temporary and not counted), every other parameter and float buffer in full (norms, float linears, the LM
head, also when it is kept in fp16 buffers), except
the input embedding, of which only the ``B`` rows looked up are read (a tied embedding is the LM head too
and counts once, in full). KV-cache reads and activations are not counted. The implied bandwidth is
``bytes_per_step * steps/s`` (``steps/s = tokens/s / B``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from awqkit.bench import llamacpp as bench_llamacpp
from awqkit.bench.measure import make_prompt, summarize
from awqkit.bench.resources import current_rss_bytes, process_peak_rss_bytes
from awqkit.bench.specs import DTYPES, LOOPS, ModeSpec, build_specs, is_quantized_folder
from awqkit.calib.selfgen import _cache_kwarg, _output_cache  # `cache` (transformers >= 5.2x) or past_key_values
from awqkit.config import BenchConfig
from awqkit.io.load import load_quantized
from awqkit.kernels import cpu_avx2, cpu_int4
from awqkit.nn import hf
from awqkit.nn.qlinear import QuantLinear
from awqkit.runtime.decoder import Decoder

if TYPE_CHECKING:
    from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def disk_weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ``*.gguf``) of a folder, or of one file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"no such model folder or file: {path}")
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _kernel_cache_tensors(module: QuantLinear) -> list[Tensor] | None:
    """The converted tensors a fast CPU backend reads for this QuantLinear (cpu-avx2 first, as ``auto``
    prefers it), or None when the module runs from its packed buffers."""

    backend = getattr(module, "backend", None)
    if backend in ("auto", cpu_avx2.NAME) and (c := cpu_avx2._fresh_cache(module)) is not None:
        return [t for t in (c.wq, c.sp, c.zq, c.bias) if t is not None]
    if backend in ("auto", cpu_int4.NAME) and (c4 := cpu_int4._fresh_cache(module)) is not None:
        return [t for t in (c4.packed, c4.scales_and_zeros, c4.bias) if t is not None]
    return None


def _quant_read_tensors(module: QuantLinear) -> list[Tensor]:
    """The tensors a QuantLinear's backend reads per call (see the module docstring)."""
    cached = _kernel_cache_tensors(module)
    if cached is not None:
        return cached
    return [b for n, b in module.named_buffers(recurse=False) if b is not None and n != "weight_shape"]


def _key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr() or id(t))


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared storages once) plus the fast backends' caches."""

    seen: dict[tuple[str, int], int] = {}
    cached = [t for m in model.modules() if isinstance(m, QuantLinear) for t in (_kernel_cache_tensors(m) or [])]
    for t in (*model.parameters(), *model.buffers(), *cached):
        seen[_key(t)] = max(seen.get(_key(t), 0), t.untyped_storage().nbytes())
    return sum(seen.values())


def weight_bytes_per_step(model: nn.Module, batch: int = 1) -> int:
    """Estimated weight bytes one decode step of ``batch`` sequences reads (see the module docstring)."""

    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(t.nbytes for t in _quant_read_tensors(m))
    emb_in, emb_out = hf.input_embeddings(model), hf.output_embeddings(model)
    tied = emb_out is not None and hf.weight(emb_out).data_ptr() == hf.weight(emb_in).data_ptr()
    dense_buffers = [
        b
        for m in model.modules()
        if not isinstance(m, QuantLinear)  # e.g. fp16-storage heads
        for n, b in m.named_buffers(recurse=False)
        if b.is_floating_point() and n not in m._non_persistent_buffers_set
    ]  # not rotary tables
    for p in (*model.parameters(), *dense_buffers):
        if _key(p) in seen:
            continue
        seen.add(_key(p))
        if p is emb_in.weight and not tied:
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.nbytes
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model: nn.Module, ids: Tensor, new_tokens: int) -> tuple[float, float, Tensor]:
    """``(prefill seconds, decode seconds, generated ids [B, new_tokens + 1])``: greedy, forced length."""

    device, kw = ids.device, _cache_kwarg(model)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        cache, tokens = _output_cache(out), [nxt]
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{kw: cache})
            cache, nxt = _output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(tokens, dim=1)


def time_decoder(decoder: Any, ids: Tensor, new_tokens: int) -> tuple[float, float, Tensor]:
    """:func:`time_generation` for awqkit's :class:`~awqkit.runtime.decoder.Decoder` (same phases, same ids)."""
    b, t = ids.shape
    decoder.start(b, t + new_tokens + 1)
    t0 = time.perf_counter()
    nxt = decoder.prefill(ids).argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(new_tokens):
        nxt = decoder.step(nxt).argmax(-1, keepdim=True)
        tokens.append(nxt)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(tokens, dim=1)


def measure_model(
    model: nn.Module, settings: BenchConfig, device: str | torch.device = "cpu", loop: str = "transformers"
) -> dict[str, Any]:
    """Prefill/decode timings (medians of ``repeats``) per batch size, bytes per step and bandwidth."""
    device = torch.device(device)
    run: Callable[[nn.Module, Tensor, int], tuple[float, float, Tensor]] = time_generation
    if loop == "awqkit":
        decoder = Decoder(model)

        def run_decoder(_model: nn.Module, ids: Tensor, new_tokens: int) -> tuple[float, float, Tensor]:
            return time_decoder(decoder, ids, new_tokens)

        run = run_decoder

    vocab = hf.weight(hf.input_embeddings(model)).shape[0]
    out: dict[str, Any] = {}
    for batch in settings.batch_sizes:
        ids = make_prompt(vocab, batch, settings.prompt_tokens, settings.seed).to(device)
        for _ in range(settings.warmup):
            run(model, ids, settings.new_tokens)
        prefill, decode = [], []
        for _ in range(settings.repeats):
            p, d, _ = run(model, ids, settings.new_tokens)
            prefill.append(p)
            decode.append(batch * settings.new_tokens / d)
        per_step = weight_bytes_per_step(model, batch)
        tok_s = statistics.median(decode)
        out[str(batch)] = {
            "prefill_s": summarize(prefill),
            "decode_tok_s": summarize(decode),
            "weight_bytes_per_step": per_step,
            "bandwidth_gb_s": per_step * tok_s / batch / 1e9,
        }
    return out


def load_mode(spec: ModeSpec) -> nn.Module:
    """The model of ``spec`` in eval mode on ``spec.device``."""
    dtype = DTYPES[spec.dtype]
    if spec.quantized:
        return load_quantized(spec.path, device=spec.device, dtype=dtype, backend=spec.backend or "auto")
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
    return model.to(spec.device).eval()


def measure_mode(spec: ModeSpec, settings: BenchConfig) -> dict[str, Any]:
    """Load ``spec`` in this process and measure it; peak RSS is this process's (run it in a fresh one)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = load_mode(spec)
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_bytes()
    batches = measure_model(model, settings, device, spec.loop)
    return {
        **dataclasses.asdict(spec),
        "engine": "awqkit" if spec.quantized else "transformers",
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "disk_bytes": disk_weight_bytes(spec.path),
        "memory_bytes": weight_memory_bytes(model),
        "bytes_per_token": batches[str(settings.batch_sizes[0])]["weight_bytes_per_step"],
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": process_peak_rss_bytes(),
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "batches": batches,
    }


def run_in_subprocess(
    spec: ModeSpec | dict[str, Any], settings: BenchConfig, timeout: float | None = None, kind: str = "mode"
) -> dict[str, Any]:
    """Run :func:`measure_mode` (``kind="mode"``) or the llama.cpp measurement (``kind="llama-cpp"``) in a
    fresh Python process and return its result dict."""
    payload: dict[str, Any] = {
        "kind": kind,
        "spec": spec if isinstance(spec, dict) else dataclasses.asdict(spec),
        "settings": dataclasses.asdict(settings),
    }
    with tempfile.TemporaryDirectory(prefix="awqkit-bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(payload))
        cmd = [sys.executable, "-m", "awqkit.bench.modes", str(spec_file), str(out_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not out_file.is_file():
            label = payload["spec"].get("label", "?")
            raise RuntimeError(f"benchmark of {label!r} failed (exit {proc.returncode}): {proc.stderr.strip()[-3000:]}")
        return json.loads(out_file.read_text())


def run_modes(
    specs: list[ModeSpec], settings: BenchConfig, *, subprocesses: bool = True, llama_cpp: str | Path | None = None
) -> list[dict[str, Any]]:
    """Measure every mode (each in its own subprocess unless ``subprocesses=False``), then llama.cpp on
    the GGUF file ``llama_cpp`` if given and installed (else a ``{"skipped": reason}`` row)."""
    results = []
    for spec in specs:
        logger.info("benchmarking %s (%s)", spec.label, spec.path)
        results.append(run_in_subprocess(spec, settings) if subprocesses else measure_mode(spec, settings))
    if llama_cpp is not None:
        reason = bench_llamacpp.unavailable_reason()
        gguf = {"label": "llama.cpp Q4_1", "path": str(llama_cpp)}
        if reason is not None:
            logger.warning("skipping llama.cpp: %s", reason)
            results.append({**gguf, "engine": "llama.cpp", "skipped": reason})
        else:
            logger.info("benchmarking llama.cpp on %s", llama_cpp)
            results.append(
                run_in_subprocess(gguf, settings, kind="llama-cpp")
                if subprocesses
                else bench_llamacpp.measure_gguf(llama_cpp, settings, label=gguf["label"])
            )
    return results


def _worker(spec_file: str, out_file: str) -> None:
    payload = json.loads(Path(spec_file).read_text())
    s = payload["settings"]
    settings = BenchConfig(**{**s, "batch_sizes": tuple(s["batch_sizes"])})
    if payload["kind"] == "llama-cpp":
        result = bench_llamacpp.measure_gguf(payload["spec"]["path"], settings, label=payload["spec"]["label"])
    else:
        result = measure_mode(ModeSpec(**payload["spec"]), settings)
    bad = [k for k, v in _numbers(result) if not math.isfinite(v)]
    if bad:
        logger.warning("non-finite measurements: %s", bad)
    Path(out_file).write_text(json.dumps(result))


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in _numbers(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), float(obj))] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


__all__ = [
    "DTYPES",
    "LOOPS",
    "BenchConfig",
    "ModeSpec",
    "build_specs",
    "is_quantized_folder",
    "measure_mode",
    "measure_model",
    "run_modes",
    "time_decoder",
    "time_generation",
]


if __name__ == "__main__":  # the subprocess entry of run_in_subprocess
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _worker(sys.argv[1], sys.argv[2])
