"""PNG plots of ``awqkit orchestrate`` results (needs matplotlib: ``pip install 'awqkit[plot]'``).

* ``ppl_vs_bpw.png``: perplexity against bits per weight, one line per (model, method), the float
  baseline as a star at 16;
* ``kl_vs_bpw.png``: KL(P_fp || P_quantized) against bits per weight (quantized cells; log scale when
  every value is positive);
* ``retention.png``: bars of every retention column (accuracy metrics and ppl; 1.0 = the float baseline)
  per cell.

A plot without data is not written. Without matplotlib nothing is written and a warning is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_METHOD_COLORS = {
    "fp": "black",
    "rtn": "tab:blue",
    "awq": "tab:orange",
    "gptq": "tab:green",
    "adaround": "tab:purple",
    "awq-gptq": "tab:red",
    "awq-refine": "tab:brown",
}
_MODEL_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_MODEL_LINES = ("-", "--", ":", "-.")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _by_series(rows: list[dict[str, Any]], col: str, quantized_only: bool) -> dict[tuple[str, str], list[tuple]]:
    series: dict[tuple[str, str], list[tuple]] = {}
    for r in rows:
        if not isinstance(r.get(col), (int, float)) or (quantized_only and r["method"] == "fp"):
            continue
        series.setdefault((r["model"], r["method"]), []).append((r["bits_per_weight"], r[col], r["quantization"]))
    return {k: sorted(v) for k, v in series.items()}


def _line_plot(
    plt: Any, rows: list[dict[str, Any]], col: str, ylabel: str, title: str, path: Path, quantized_only: bool
) -> Path | None:
    series = _by_series(rows, col, quantized_only)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    models = list(dict.fromkeys(m for m, _ in series))
    for (model, method), pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        label = f"{model} {method}" if len(models) > 1 else method
        k = models.index(model)
        color = _METHOD_COLORS.get(method)
        if method == "fp":
            ax.scatter(xs, ys, marker="*", s=160, color=color, label=label, zorder=3)
        else:
            ax.plot(
                xs,
                ys,
                marker=_MODEL_MARKERS[k % len(_MODEL_MARKERS)],
                color=color,
                linestyle=_MODEL_LINES[k % len(_MODEL_LINES)],
                label=label,
            )
            for x, y, tag in pts:
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    values = [p[1] for pts in series.values() for p in pts]
    if quantized_only and values and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized linears)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


def _save_figure(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write ``path`` (creating its folder) and close ``fig``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _retention_plot(plt: Any, rows: list[dict[str, Any]], path: Path) -> Path | None:
    cols = [
        c
        for c in dict.fromkeys(k for r in rows for k in r if k.endswith("_retention"))
        if any(isinstance(r.get(c), (int, float)) for r in rows if r["method"] != "fp")
    ]
    cells = [r for r in rows if r["method"] != "fp" and any(isinstance(r.get(c), (int, float)) for c in cols)]
    if not cols or not cells:
        return None
    several = len({r["model"] for r in cells}) > 1
    labels = [f"{r['model']}\n{r['quantization']}" if several else r["quantization"] for r in cells]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cells) * max(1, len(cols)) / 2 + 2), 4.8))
    width = 0.8 / len(cols)
    for i, col in enumerate(cols):
        xs = [k + (i - (len(cols) - 1) / 2) * width for k in range(len(cells))]
        vals = [r.get(col) if isinstance(r.get(col), (int, float)) else 0.0 for r in cells]
        bars = ax.bar(xs, vals, width, label=col.removesuffix("_retention"))
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cells)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("retention (1.0 = float baseline)")
    ax.set_title("retention vs the float baseline")
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


def plot_results(rows: list[dict[str, Any]], tasks: tuple[str, ...], out_dir: str | Path) -> list[Path]:
    """Write the plots of the module docstring into ``out_dir``; returns the files written."""
    plt = _pyplot()
    if plt is None:
        logger.warning("matplotlib is not installed: skipping the plots (pip install 'awqkit[plot]')")
        return []
    out = Path(out_dir)
    done = [r for r in rows if r.get("status") == "done"]
    made = [
        _line_plot(plt, done, "ppl", "perplexity", "perplexity vs bits per weight", out / "ppl_vs_bpw.png", False)
        if "ppl" in tasks
        else None,
        _line_plot(
            plt,
            done,
            "kl",
            "KL(P_fp || P_quantized) per token",
            "KL divergence vs bits per weight",
            out / "kl_vs_bpw.png",
            True,
        )
        if "kl" in tasks
        else None,
        _retention_plot(plt, done, out / "retention.png"),
    ]
    return [p for p in made if p is not None]


__all__ = ["plot_results"]
