"""The llama.cpp reference for :mod:`awqkit.bench.modes`: a GGUF file run through ``llama-cpp-python``.

Optional: ``llama-cpp-python`` has no prebuilt Linux wheel on PyPI, so ``pip install llama-cpp-python``
compiles llama.cpp (cmake and a C++ compiler needed). Without it :func:`unavailable_reason` says why
and the benchmark skips this row.

Measured like the PyTorch modes (same seeded prompt ids, same lengths, greedy, forced length), batch 1
only: ``Llama.eval(prompt)`` is the prefill (wall time), then ``new_tokens`` calls of ``Llama.eval([t])``
each feeding the argmax of the last logits are the decode phase. Bytes per step are the GGUF tensor
bytes (as stored, e.g. Q4_1 blocks), the token embedding counted as one row when the file has a separate
``output.weight`` and in full when it is tied (it is then the LM head).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from awqkit.bench.measure import make_prompt, summarize
from awqkit.bench.resources import current_rss_bytes, process_peak_rss_bytes

logger = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """None when ``llama_cpp`` imports, else why not (with the install hint)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library (OSError)
        return (
            f"llama-cpp-python is not installed or does not load ({type(exc).__name__}: {exc}); "
            "`pip install llama-cpp-python` builds it from source (needs cmake and a C++ compiler)"
        )
    return None


def gguf_tensor_bytes(path: str | Path, batch: int = 1) -> tuple[int, int]:
    """``(all tensor bytes, estimated weight bytes read per decode step of batch sequences)``."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    per_step = total
    emb = tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in tensors:
        rows = int(emb.shape[-1])  # GGUF shapes are [n_embd, n_vocab]
        per_step = total - int(emb.n_bytes) + batch * int(emb.n_bytes) // rows
    return total, per_step


def _greedy(llm: Any, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    import numpy as np

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return t1 - t0, time.perf_counter() - t1


def measure_gguf(path: str | Path, settings: Any, label: str = "llama.cpp") -> dict[str, Any]:
    """Load ``path`` with llama-cpp-python and time it at batch 1 (``settings``: a ``BenchConfig``)."""
    import llama_cpp

    threads = settings.threads or 2
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=settings.prompt_tokens + settings.new_tokens + 16,
        n_batch=max(512, settings.prompt_tokens),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_bytes()
    prompt = make_prompt(llm.n_vocab(), 1, settings.prompt_tokens, settings.seed)[0].tolist()
    for _ in range(settings.warmup):
        _greedy(llm, prompt, settings.new_tokens)
    prefill, decode = [], []
    for _ in range(settings.repeats):
        p, d = _greedy(llm, prompt, settings.new_tokens)
        prefill.append(p)
        decode.append(settings.new_tokens / d)
    total, per_step = gguf_tensor_bytes(path, 1)
    tok_s = statistics.median(decode)
    return {
        "label": label,
        "path": str(path),
        "quantized": True,
        "dtype": "gguf",
        "backend": "llama.cpp",
        "device": "cpu",
        "engine": f"llama.cpp (llama-cpp-python {getattr(llama_cpp, '__version__', '?')})",
        "threads": threads,
        "load_s": load_s,
        "disk_bytes": Path(path).stat().st_size,
        "memory_bytes": total,
        "bytes_per_token": per_step,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": process_peak_rss_bytes(),
        "peak_vram_bytes": None,
        "batches": {
            "1": {
                "prefill_s": summarize(prefill),
                "decode_tok_s": summarize(decode),
                "weight_bytes_per_step": per_step,
                "bandwidth_gb_s": per_step * tok_s / 1e9,
            }
        },
    }
