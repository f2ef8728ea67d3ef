"""The results of ``awqkit orchestrate``: one row per evaluation cell, as CSV, Markdown, JSON (and PNG plots).

Rows are derived from the state file (status, error) and the per-cell result files (metrics) only, so they
can be rebuilt at any time. Columns:

* ``model`` (the run name without quant tag), ``cell`` (with it), ``quantization`` (the quant tag, ``FP16``
  for the float baseline), ``method`` (``fp``, ``rtn``, ``awq``), ``bits``, ``group_size``,
  ``bits_per_weight``, ``status`` (done / failed / pending), ``error``, ``path``;
* per metric of the plan's tasks (:data:`awqkit.eval.runner.METRICS`): ``ppl``, ``kl``,
  ``kl_top1_agreement``, ``arc_acc``, ``arc_acc_norm``, ``squad_em``, ``squad_f1``, ``gsm8k_em``, and for each
  but the kl ones ``<metric>_retention``: model / baseline for higher-is-better metrics, baseline / model
  for ppl, against the model's float baseline row (1.0 = as good as the baseline, below is worse). The
  baseline row holds kl 0 and top-1 agreement 1 (by definition) and retention 1.

**Bits per weight** (:func:`bits_per_weight`) is the storage of a quantized linear per weight:
``bits + (16 + z) / group_size`` with one fp16 scale per group and a zero point of ``z = bits`` bits per
group when one is stored (asymmetric, and always in the 4-bit GEMM layout), ``z = 0`` otherwise; e.g.
4-bit g128 asymmetric: 4 + 20/128 = 4.156. Per-channel (``group_size = -1``) is counted as ``bits`` (one
scale per row of thousands of weights). Embeddings and the LM head (kept fp16) are not counted. The float
baseline is plotted at 16 (32 when the plan lists ``method = "fp"`` with ``bits = 32``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from awqkit.eval.runner import METRICS
from awqkit.files import write_atomic, write_json_atomic
from awqkit.naming import quant_tag
from awqkit.report.plots import plot_results
from awqkit.report.table import markdown_table
from awqkit.spec import QuantizationSpec

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("model", "cell", "quantization", "method", "bits", "group_size", "bits_per_weight", "status")
TAIL_COLUMNS = ("error", "path")
BPW_FORMULA = (
    "bits + (16 + z) / group_size: an fp16 scale per group and a z = bits zero point per group when "
    "stored (asymmetric, or the 4-bit GEMM layout), else z = 0; per-channel counts as bits; the float "
    "baseline is 16; embeddings and LM head not counted"
)


def load_cell(file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def bits_per_weight(spec: QuantizationSpec) -> float:
    """Stored bits per weight of a quantized linear under ``spec`` (formula in the module docstring)."""
    if not spec.method.quantizes:
        return float(spec.weights_bits)
    bits, group = spec.weights_bits, spec.group_size
    if group is None or group == -1:
        return float(bits)
    zero = bits if (spec.extras.get("zero_point", True) or spec.written_format == "gemm") else 0
    return bits + (16 + zero) / group


def metric_columns(tasks: tuple[str, ...]) -> list[tuple[str, str, str, bool]]:
    """``(column, task, metric, higher_is_better)`` for the plan's tasks."""

    return [
        (metric if metric == task else f"{task}_{metric}", task, metric, higher)
        for task in tasks
        for metric, higher in METRICS[task]
    ]


def _retention(value: Any, base: Any, higher: bool) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
        return None
    num, den = (value, base) if higher else (base, value)
    return None if den == 0 else num / den


def build_rows(plan: Any, state: dict[str, Any], cells: list[Any]) -> list[dict[str, Any]]:
    """One row per evaluation cell (``cells`` from :func:`awqkit.platform.orchestrate.eval_cells`)."""

    cols = metric_columns(plan.eval.tasks)
    rows: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, Any]] = {}
    for cell in cells:
        spec = cell.spec
        row: dict[str, Any] = {
            "model": cell.model.run_name,
            "cell": cell.name,
            "quantization": quant_tag(spec, head=False),
            "method": spec.method.value if spec.method.quantizes else "fp",
            "bits": spec.weights_bits,
            "group_size": spec.group_size,
            "bits_per_weight": round(bits_per_weight(spec), 4),
            "status": "pending",
        }
        entry = (state.get("evaluate") or {}).get(cell.name)
        values: dict[str, Any] = {}
        if entry is not None:
            row["status"] = entry.get("status", "pending")
            row["error"] = entry.get("error")
            stored = load_cell(cell.result_file(plan.output_dir)) if row["status"] == "done" else None
            results = (stored or {}).get("results") or {}
            for col, task, metric, _ in cols:
                values[col] = ((results.get("tasks") or {}).get(task) or {}).get("model", {}).get(metric)
        if not cell.quantized and row["status"] == "done":
            for col, task, metric, _ in cols:
                if task == "kl":
                    values[col] = 0.0 if metric == "kl" else 1.0
            baselines[cell.model.run_name] = values
        base = baselines.get(cell.model.run_name, {})
        for col, task, _, higher in cols:
            row[col] = values.get(col)
            if task != "kl":
                row[f"{col}_retention"] = _retention(values.get(col), base.get(col), higher)
        row["error"] = row.get("error")
        row["path"] = str(cell.path)
        rows.append(row)
    return rows


def columns(tasks: tuple[str, ...]) -> list[str]:
    out = list(BASE_COLUMNS)
    for col, task, _, _ in metric_columns(tasks):
        out.append(col)
        if task != "kl":
            out.append(f"{col}_retention")
    return out + list(TAIL_COLUMNS)


def write_csv(path: Path, rows: list[dict[str, Any]], cols: list[str]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in cols})
    write_atomic(path, buf.getvalue())


def results_markdown(plan: Any, rows: list[dict[str, Any]], cols: list[str]) -> str:
    """The Markdown report: the table (no paths), the settings and the legend."""

    shown = [c for c in cols if c not in ("cell", "path", "error", "method", "bits", "group_size")]
    if any(r.get("error") for r in rows):
        shown.append("error")
    table_rows = [{**r, "error": (str(r["error"])[:120] if r.get("error") else None)} for r in rows]
    fmt = {c: ".4f" for c in shown if c.endswith("_retention")}
    fmt["bits_per_weight"] = ".3f"
    ev = plan.eval
    text = Path(ev.text).name if ev.text else "WikiText-2 test"
    settings = [f"tasks: {', '.join(ev.tasks)}"]
    if any(t in ev.tasks for t in ("ppl", "kl")):
        settings.append(f"{ev.windows or 'all'} windows x {ev.seq_len} tokens of `{text}`")
    item_tasks = [t for t in ev.tasks if t not in ("ppl", "kl")]
    if item_tasks:  # a task's own limit (task_options) wins over the shared one
        limits = {t: (ev.task_options.get(t) or {}).get("limit", ev.limit) for t in item_tasks}
        if len(set(limits.values())) == 1:
            settings.append(f"limit {next(iter(limits.values())) or 'all'} items per task")
        else:
            settings.append("items: " + ", ".join(f"{t} {lim or 'all'}" for t, lim in limits.items()))
    settings += [f"backend {ev.backend}", f"device {plan.device}"]
    lines = [
        "## awqkit orchestrate",
        "",
        f"- plan: `{plan.source}`; output: `{plan.output_dir}`",
        f"- {'; '.join(settings)}",
        "",
        markdown_table(table_rows, shown, fmt),
        "",
        "retention: model / baseline for higher-is-better metrics, baseline / model for ppl, against the "
        "model's FP16 row (1.0 = baseline; below is worse). kl: KL(P_fp || P_quantized) per token. "
        f"bits_per_weight: {BPW_FORMULA}.",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    plan: Any, state: dict[str, Any], cells: list[Any], *, plots: bool = True
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write ``results.csv``, ``results.md``, ``results.json`` (and the plots) into ``plan.output_dir``."""

    rows = build_rows(plan, state, cells)
    cols = columns(plan.eval.tasks)
    out = plan.output_dir
    write_csv(out / "results.csv", rows, cols)
    md = out / "results.md"
    write_atomic(md, results_markdown(plan, rows, cols))
    write_json_atomic(
        out / "results.json", {"plan": plan.to_dict(), "bits_per_weight": BPW_FORMULA, "columns": cols, "rows": rows}
    )
    files = [out / "results.csv", md, out / "results.json"]
    if plots:
        files += plot_results(rows, plan.eval.tasks, out / "plots")
    return rows, files


__all__ = [
    "BPW_FORMULA",
    "bits_per_weight",
    "build_rows",
    "columns",
    "metric_columns",
    "results_markdown",
    "write_results",
]
