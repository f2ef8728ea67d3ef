"""``awqkit eval --bench``: speed and memory of the model (and its baseline) as rows of the eval table.

Runs :func:`awqkit.bench.modes.run_modes` (each mode in its own process) for the
baseline as a float32 dense model and for the model with the eval's kernel ``backend``, and reduces each
to a few metrics (medians, see :mod:`awqkit.bench.modes` for how they are taken):

* ``prefill_ms``: one forward over the prompt (``prompt_tokens``) at the first batch size; lower is better;
* ``decode_tok_s_b{B}``: greedy decode tokens/s at batch ``B``, for every batch size; higher is better;
* ``peak_rss_mb``: the measuring process's peak resident memory; lower is better;
* ``weights_disk_mb`` / ``weights_memory_mb``: weight bytes on disk and held in memory; lower is better.

Retention follows the runner's rule (model / baseline for higher-is-better metrics, baseline / model
for lower-is-better ones), so a speed-up shows as a retention above 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from awqkit.bench.modes import BenchConfig, build_specs, run_modes


def bench_metric_spec(settings: BenchConfig) -> list[tuple[str, bool]]:
    """``[(metric, higher_is_better)]`` of the bench rows for ``settings``' batch sizes."""
    return (
        [("prefill_ms", False)]
        + [(f"decode_tok_s_b{b}", True) for b in settings.batch_sizes]
        + [("peak_rss_mb", False), ("weights_disk_mb", False), ("weights_memory_mb", False)]
    )


def _metrics(result: dict[str, Any], settings: BenchConfig) -> dict[str, Any]:
    batches = result["batches"]
    first = str(settings.batch_sizes[0])
    out: dict[str, Any] = {"prefill_ms": batches[first]["prefill_s"]["median"] * 1e3}
    for b in settings.batch_sizes:
        out[f"decode_tok_s_b{b}"] = batches[str(b)]["decode_tok_s"]["median"]
    out.update(
        peak_rss_mb=result["peak_rss_bytes"] / 1e6,
        weights_disk_mb=result["disk_bytes"] / 1e6,
        weights_memory_mb=result["memory_bytes"] / 1e6,
        label=result["label"],
        backend=result.get("backend"),
        threads=result.get("threads"),
    )
    return out


def run_bench(
    model: str | Path, baseline: str | Path | None, *, backend: str, device: str, settings: BenchConfig
) -> dict[str, Any]:
    """The ``tasks["bench"]`` entry: ``{"model": metrics, "baseline": metrics | absent, "settings",
    "metric_spec", "modes": raw results}``."""
    specs = build_specs(
        str(model), str(baseline) if baseline is not None else None, [backend], "float32", ["float32"], device
    )
    results = run_modes(specs, settings)
    entry: dict[str, Any] = {
        "model": _metrics(results[-1], settings),
        "settings": dataclasses.asdict(settings),
        "metric_spec": bench_metric_spec(settings),
        "modes": results,
    }
    if baseline is not None:
        entry["baseline"] = _metrics(results[0], settings)
    return entry
