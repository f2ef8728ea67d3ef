"""Where a decoder layer's AWQ time goes on SmolLM2-135M-Instruct (issue 13 §1 and §5: the profile behind the
speed-ups), for the exhaustive search (``--rank-top-k 0``, what awqkit did before) and the ranked one (default).

The first ``--layers`` decoder layers are quantized in one process with the benchmark's calibration (SQuAD 2.0 dev
contexts, the first ``--n-samples`` 512-token blocks, as scripts/benchmark_engine.py), w4 g64. Each step of a layer
is timed (wall clock, torch's threads as configured): the float pass with its statistics, the scale search (per
scoring kind: attention, MLP token sample, single linear), the clip search and the next layer's inputs; the
floating-point work of each is estimated from the shapes (GFLOP) so the table shows what cannot be cut (the two
passes over the calibration set) and what the ranking removes. Written as a section of ``--benchmarks``.

Usage: python scripts/profile_engine.py [--layers 2] [--n-samples 32] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (
    ROOT,
    machine,
    machine_line,
    peer_blocks,
    setup_logging,
    write_section,
)

SECTION = "Engine: where a SmolLM2 layer's time goes (issue 13 profile)"


def _timed(mod: Any, name: str, key: str, acc: dict[str, float]) -> None:
    fn = getattr(mod, name)

    def wrapper(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            acc[key] += time.perf_counter() - t

    setattr(mod, name, wrapper)


def profile(layers: int, n_samples: int, search: Any) -> dict[str, float]:
    """Seconds per layer of each step (mean over ``layers``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awqkit import pipeline
    from awqkit.api import select_targets
    from awqkit.arch import resolve_arch
    from awqkit.config import QuantConfig
    from awqkit.eval.perplexity import default_data_dir
    from awqkit.zoo import fetch_smollm2

    src = fetch_smollm2()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    blocks, _ = peer_blocks(AutoTokenizer.from_pretrained(src), default_data_dir(), n_samples, 512)
    ids = torch.tensor(blocks)
    q = QuantConfig(bits=4, group_size=64)
    targets = set(select_targets(model, resolve_arch(model), q).quantized)
    acc: dict[str, float] = defaultdict(float)
    saved = {n: getattr(pipeline, n) for n in ("_search_and_fold", "_clip", "_next_inputs", "_layer")}
    try:
        _timed(pipeline, "_search_and_fold", "scale search + fold", acc)
        _timed(pipeline, "_clip", "clip search", acc)
        _timed(pipeline, "_next_inputs", "next layer's inputs (quantized pass)", acc)
        _timed(pipeline, "_layer", "layer total", acc)
        t = time.perf_counter()
        pipeline.run_awq(model, ids, q, search, targets, progress=False)
        acc["run total (with capture)"] = time.perf_counter() - t
    finally:
        for n, f in saved.items():
            setattr(pipeline, n, f)
    acc["float pass + statistics"] = acc["layer total"] - sum(
        acc[k] for k in ("scale search + fold", "clip search", "next layer's inputs (quantized pass)")
    )
    return {k: v / layers for k, v in acc.items() if k != "run total (with capture)"}


def flops(n_samples: int, search: Any) -> dict[str, float]:
    """GFLOP per SmolLM2 layer of the dominant matmuls (hidden 576, intermediate 1536, 9 heads / 3 kv, 512 ctx)."""
    h, inter, kv, length = 576, 1536, 192, 512
    attn_params, mlp_params = h * (2 * h + 2 * kv), 3 * h * inter
    tokens = n_samples * length
    sdpa = 2 * 2 * 9 * length * length * 64 / length  # per token: scores and values over the context
    per_token = 2 * (attn_params + mlp_params) + sdpa
    search_tok = min(search.search_samples, n_samples) * length
    attn_tok = 2 * attn_params + sdpa
    full = 1 if search.rank_top_k == 0 else 0
    n_cand = 41
    scored = n_cand if full else 1 + search.rank_top_k
    ranked = 0 if full else n_cand
    return {
        "float pass + statistics": (tokens * per_token + tokens * 2 * inter * inter) / 1e9,  # + down_proj's Gram
        "scale search + fold": (
            (scored + 1) * search_tok * (attn_tok + 2 * mlp_params)
            + ranked * search.rank_tokens * (attn_tok + 2 * mlp_params)
        )
        / 1e9,
        "next layer's inputs (quantized pass)": tokens * per_token / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    setup_logging()
    from awqkit.config import SearchConfig
    from awqkit.report.table import markdown_table

    configs = {
        "exhaustive (--rank-top-k 0)": dataclasses.replace(SearchConfig(), rank_top_k=0),
        "ranked (default)": SearchConfig(),
    }
    measured = {name: profile(a.layers, a.n_samples, cfg) for name, cfg in configs.items()}
    work = {name: flops(a.n_samples, cfg) for name, cfg in configs.items()}
    steps = [
        "float pass + statistics",
        "scale search + fold",
        "clip search",
        "next layer's inputs (quantized pass)",
        "layer total",
    ]
    rows = []
    for step in steps:
        row: dict[str, Any] = {"step": step}
        for name in configs:
            row[f"{name} s"] = measured[name].get(step)
            row[f"{name} GFLOP"] = work[name].get(step, sum(work[name].values()) if step == "layer total" else None)
        rows.append(row)
    fmt = {k: ".2f" if k.endswith(" s") else ".0f" for k in rows[0] if k != "step"}
    table = markdown_table(rows, floatfmt=fmt)
    ex, rk = (measured[n]["layer total"] for n in configs)
    passes = (
        measured["ranked (default)"]["float pass + statistics"]
        + measured["ranked (default)"]["next layer's inputs (quantized pass)"]
    )
    search_s = measured["ranked (default)"]["scale search + fold"]
    command = subprocess.list2cmdline(
        ["python", "scripts/profile_engine.py", "--layers", str(a.layers), "--n-samples", str(a.n_samples)]
    )
    body = (
        f"SmolLM2-135M-Instruct, w4 g64, the first {a.layers} decoder layers, calibration {a.n_samples} x 512 "
        "tokens (the engine benchmark's SQuAD blocks), default search settings otherwise. Seconds per layer of "
        "each step (wall clock, one process); GFLOP: the dominant matmuls of the step estimated from the "
        "shapes (41 grid candidates; the float pass includes down_proj's input Gram matrix).\n\n"
        f"Machine: {machine_line(machine())}. Produced by `{command}`.\n\n{table}\n\n"
        f"The ranked search makes a layer {ex / rk:.2f}x faster ({ex:.1f} -> {rk:.1f} s). Of a ranked layer's "
        f"{rk:.1f} s, the scale search takes {search_s:.1f} s (the ranking pass scores all 41 candidates on 512 "
        f"tokens, then the identity and the 3 best on the full search data) and the two passes over all "
        f"calibration tokens (the float pass with its statistics, and the quantized pass that makes the next "
        f"layer's inputs, which every AWQ implementation runs) {passes:.1f} s.\n"
    )
    print(body)
    if not a.no_write:
        write_section(Path(a.benchmarks), SECTION, body)


if __name__ == "__main__":
    main()
