"""Presenting :mod:`awqkit.bench.modes` results: markdown table, JSON file, PNG bar chart, speed ratios."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

from awqkit.report.table import markdown_table

logger = logging.getLogger(__name__)

MB = 1e6


def _batches(results: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in results:
        seen.extend(b for b in r.get("batches", {}) if b not in seen)
    return sorted(seen, key=int)


def table_rows(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``(rows, columns)`` for :func:`awqkit.report.table.markdown_table`: one row per result."""
    batches = _batches(results)
    vram = any(r.get("peak_vram_bytes") for r in results)
    columns = [
        "mode",
        *[f"prefill ms B={b}" for b in batches],
        *[f"decode tok/s B={b}" for b in batches],
        "weights disk MB",
        "weights mem MB",
        "peak RSS MB",
        *(["peak VRAM MB"] if vram else []),
        "MB read/token",
        "GB/s B=1",
    ]
    rows = []
    for r in results:
        row: dict[str, Any] = {"mode": r["label"]}
        if "skipped" in r:
            row["mode"] = f"{r['label']} (skipped)"
            rows.append(row)
            continue
        for b, m in r["batches"].items():
            row[f"prefill ms B={b}"] = m["prefill_s"]["median"] * 1e3
            row[f"decode tok/s B={b}"] = m["decode_tok_s"]["median"]
        row["weights disk MB"] = r["disk_bytes"] / MB
        row["weights mem MB"] = r["memory_bytes"] / MB
        row["peak RSS MB"] = r["peak_rss_bytes"] / MB
        if vram:
            row["peak VRAM MB"] = (r.get("peak_vram_bytes") or 0) / MB or None
        row["MB read/token"] = r["bytes_per_token"] / MB
        row["GB/s B=1"] = r["batches"].get("1", {}).get("bandwidth_gb_s")
        rows.append(row)
    return rows, columns


def format_table(results: list[dict[str, Any]]) -> str:

    rows, columns = table_rows(results)
    fmt = {c: ".1f" for c in columns if c != "mode"}
    fmt["GB/s B=1"] = ".2f"
    return markdown_table(rows, columns, floatfmt=fmt)


def decode_ratio(results: list[dict[str, Any]], num: str, den: str, batch: int = 1) -> float | None:
    """Median decode tokens/s of the result labelled ``num`` over that of ``den`` (None if either is absent)."""
    by = {r["label"]: r for r in results if "skipped" not in r}
    try:
        a = by[num]["batches"][str(batch)]["decode_tok_s"]["median"]
        b = by[den]["batches"][str(batch)]["decode_tok_s"]["median"]
    except KeyError:
        return None
    return a / b if b > 0 else None


def environment() -> dict[str, Any]:
    """Versions and CPU facts to store beside the numbers."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(
    path: str | Path, results: list[dict[str, Any]], settings: Any, extra: dict[str, Any] | None = None
) -> None:
    import dataclasses

    doc = {"settings": dataclasses.asdict(settings), "environment": environment(), "results": results, **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def plot_png(path: str | Path, results: list[dict[str, Any]], title: str = "") -> None:
    """Bar charts of decode tokens/s per batch size and of prefill latency at batch 1 (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--png needs matplotlib: pip install 'awqkit[plot]' (or matplotlib)") from exc
    measured = [r for r in results if "skipped" not in r]
    batches = _batches(measured)
    labels = [r["label"] for r in measured]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(batches))
    for i, b in enumerate(batches):
        vals = [r["batches"].get(b, {}).get("decode_tok_s", {}).get("median", 0.0) for r in measured]
        xs = [k + (i - (len(batches) - 1) / 2) * width for k in range(len(measured))]
        bars = axes[0].bar(xs, vals, width, label=f"batch {b}")
        axes[0].bar_label(bars, fmt="%.0f", fontsize=7)
    axes[0].set_ylabel("decode tokens/s (median)")
    axes[0].legend()
    pre = [r["batches"].get("1", r["batches"][next(iter(r["batches"]))])["prefill_s"]["median"] * 1e3 for r in measured]
    bars = axes[1].bar(range(len(measured)), pre, 0.6, color="tab:gray")
    axes[1].bar_label(bars, fmt="%.0f", fontsize=7)
    axes[1].set_ylabel("prefill latency, ms (median, batch 1)")
    for ax in axes:
        ax.set_xticks(range(len(measured)), labels, rotation=20, ha="right", fontsize=8)
    fig.suptitle(title or "awqkit bench")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
