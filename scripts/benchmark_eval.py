"""Issue 3's evaluation table: SmolLM2-135M-Instruct fp / RTN w4 g64 / AWQ w4 g64 on every awqkit task.

Runs ``awqkit orchestrate`` on a plan this script writes into ``--work`` (default
``~/.cache/awqkit/bench-eval``; reruns resume: finished quantizations and evaluations are skipped):

* model: the float32 SmolLM2-135M-Instruct folder from ``scripts/fetch_smollm2.py`` (cached);
* specs: rtn and awq, 4-bit, group 64, AWQ calibrated on 128 x 512 tokens of SQuAD 2.0 dev contexts
  (seed 13, the calibration of ``scripts/benchmark_awq.py``), default search settings;
* tasks: ppl and kl (KL(fp || quantized), top-1 agreement) on the first 16 2048-token WikiText-2 test
  windows, ARC-Challenge (every item, log-likelihood), SQuAD 2.0 and GSM8K (the first ``--items`` of each,
  greedy generation with the chat template).

Then it writes the table (one row per metric, a column per model, retention against fp) to the
``Evaluation`` section of BENCHMARKS.md. Usage::

    python scripts/benchmark_eval.py [--items 200] [--work DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTION = "Evaluation: fp vs RTN vs AWQ on SmolLM2-135M-Instruct (w4 g64, issue 3)"
#: (column in results.json rows, label, higher is better)
METRICS = [
    ("ppl", "WikiText-2 ppl", False),
    ("kl", "KL(fp ‖ model)", False),
    ("kl_top1_agreement", "top-1 agreement", True),
    ("arc_acc", "ARC-Challenge acc", True),
    ("arc_acc_norm", "ARC-Challenge acc_norm", True),
    ("squad_em", "SQuAD 2.0 EM", True),
    ("squad_f1", "SQuAD 2.0 F1", True),
    ("gsm8k_em", "GSM8K EM", True),
]


def write_plan(work: Path, src: Path, calib: Path, items: int, windows: int) -> Path:
    gen = f"{{ limit = {items}, batch_size = 16 }}"  # generation: 16 prompts per batch
    plan = f"""output_dir = {json.dumps(str(work / "runs"))}

[defaults]
calib = {json.dumps(str(calib))}
n_samples = 128
seq_len = 512
seed = 13

[[models]]
path = {json.dumps(str(src))}
base_model = "SmolLM2-135M-Instruct"
dataset = "none"
method = "Instruct"
peft = "NoPeft"

[[specs]]
method = ["rtn", "awq"]
bits = 4
group_size = 64

[eval]
tasks = ["ppl", "kl", "arc", "squad", "gsm8k"]
windows = {windows}
seq_len = 2048
batch_size = 1
backend = "auto"
task_options = {{ arc = {{ batch_size = 8 }}, squad = {gen}, gsm8k = {gen} }}
"""
    path = work / "plan.toml"
    path.write_text(plan)
    return path


def _fmt(v: object, col: str) -> str:
    if not isinstance(v, (int, float)):
        return "—"
    return f"{v:.3f}" if col == "ppl" else f"{v:.4f}"


def table(rows: list[dict]) -> str:
    names = {"fp": "fp32", "rtn": "RTN w4 g64", "awq": "AWQ w4 g64"}
    by_method = {r["method"]: r for r in rows}
    order = [m for m in ("fp", "rtn", "awq") if m in by_method]
    head = ["metric"] + [names[m] for m in order] + [f"{names[m]} retention" for m in order if m != "fp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for col, label, _ in METRICS:
        vals = [_fmt(by_method[m].get(col), col) for m in order]
        ret = [_fmt(by_method[m].get(f"{col}_retention"), "r") for m in order if m != "fp"]
        lines.append("| " + " | ".join([label, *vals, *ret]) + " |")
    return "\n".join(lines)


def item_counts(work: Path) -> dict[str, int]:
    """Items (tasks) and predicted tokens (ppl) actually scored, read from the fp cell's result file."""
    for f in sorted((work / "runs" / "eval").glob("*FP16*.json")):
        res = (json.loads(f.read_text()).get("results") or {}).get("tasks") or {}
        return {t: v["model"].get("n_tokens", v["model"].get("n")) for t, v in res.items()}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200, help="SQuAD and GSM8K items (ARC: all)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "awqkit" / "bench-eval"))
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from benchmark_awq import squad_contexts_file

    from awqkit.eval.perplexity import default_data_dir
    from awqkit.platform.orchestrate import orchestrate
    from awqkit.report.table import write_benchmarks_section
    from awqkit.zoo import fetch_smollm2

    work = Path(a.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calibration_squad-v2-contexts.txt"
    if not calib.exists():
        squad_contexts_file(default_data_dir(), calib)
    plan = write_plan(work, fetch_smollm2(), calib, a.items, a.windows)
    t0 = time.perf_counter()
    report = orchestrate(plan, progress=True)
    wall = time.perf_counter() - t0
    rows = json.loads((work / "runs" / "results.json").read_text())["rows"]
    counts = item_counts(work)
    body = (
        "SmolLM2-135M-Instruct (float32 from the PyPI GGUF); RTN and AWQ at 4 bits, group 64, asymmetric; AWQ "
        "calibrated on 128 x 512 tokens of SQuAD 2.0 dev contexts (seed 13), default search settings. "
        f"ppl / KL / top-1 on the first {a.windows} non-overlapping 2048-token windows of the WikiText-2 test "
        "text (KL(P_fp ‖ P_model) per predicted token); ARC-Challenge: every test item, log-likelihood of each "
        "option, acc and length-normalised acc_norm as lm-eval; SQuAD 2.0 (official EM/F1, unanswerable "
        "questions included) and GSM8K (final-number exact match), greedy generation with the chat template "
        f"on the first {a.items} items. Items scored: "
        + ", ".join(f"{t} {n}" for t, n in counts.items() if t not in ("ppl", "kl"))
        + ". "
        "Retention: model / fp (fp / model for ppl; 1.0 = the float model). Quantized models run the `auto` "
        "backend, all in fp32 on the checkpoint's exact values: forward passes of more than 16 rows (ppl, KL, "
        "ARC, generation prefill) the `torch` reference kernel, decode steps awqkit's `cpu-avx2` GEMV (equal "
        "to the reference up to summation order). Machine: this project's 2-core CPU "
        f"({torch.get_num_threads()} threads); whole run {wall / 60:.0f} min including what was not cached.\n\n"
        f"Produced by `python scripts/benchmark_eval.py --items {a.items} --windows {a.windows}` (an "
        "`awqkit orchestrate` plan; the full results with CSV/JSON and plots are in its output folder).\n\n"
        f"{table(rows)}\n"
    )
    print(report.summary())
    print(body)
    if not a.no_write:
        write_benchmarks_section(ROOT / "BENCHMARKS.md", SECTION, body)


if __name__ == "__main__":
    main()
