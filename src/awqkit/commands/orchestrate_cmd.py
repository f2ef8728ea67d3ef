"""``awqkit orchestrate PLAN [--output-dir DIR] [--no-plots] [--dry-run]``: quantize, evaluate, tabulate.

Quantizes what the plan asks for and is missing (as ``awqkit batch``), evaluates every model's float
baseline and every output on the plan's ``[eval]`` tasks, and writes ``results.csv``, ``results.md``,
``results.json`` and PNG plots (matplotlib: ``pip install 'awqkit[plot]'``) into the output folder. Rerunning
skips finished cells; a failed cell is reported (exit status 1) and the rest go on. ``--executor ray`` runs
the cells as Ray tasks (:mod:`awqkit.platform.ray_executor`), with the same state and results. See
:mod:`awqkit.platform.orchestrate` and, for the plan format, :mod:`awqkit.platform.plan`.
"""

from __future__ import annotations

import argparse
from typing import Any

from awqkit.commands import add_plan_arguments, plan_executor

_EPILOG = """\
plan: as for `awqkit batch`, plus
  [[specs]]
  method = "rtn"                   # also: "fp" (the float model; always evaluated as the baseline)
  bits = [3, 4]
  group_size = 128
  [eval]
  tasks = ["ppl", "kl", "arc"]     # ppl, kl, arc, squad, gsm8k
  limit = 200                      # items per arc/squad/gsm8k
  windows = 16                     # ppl/kl windows of seq_len tokens, or "all"
  seq_len = 2048
  text = "wiki.test.raw"           # default: WikiText-2 test in the data folder
outputs in output_dir: results.csv/.md/.json, plots/{ppl_vs_bpw,kl_vs_bpw,retention}.png, eval/<cell>.json,
awqkit_state.json. Retention is against each model's FP16 row.
"""


def cmd_orchestrate(a: argparse.Namespace) -> int:
    """Run the orchestration, print the results table and the summary; 1 when a cell failed."""
    from awqkit.platform.orchestrate import orchestrate

    report = orchestrate(
        a.plan,
        output_dir=a.output_dir,
        progress=a.progress,
        plots=a.plots,
        dry_run=a.dry_run,
        executor=plan_executor(a),
    )
    md = report.plan.output_dir / "results.md"
    if not a.dry_run and md.is_file():
        print(md.read_text(encoding="utf-8"))
    print(report.summary())
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    """Add the ``orchestrate`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "orchestrate",
        help="quantize what a plan is missing, evaluate everything, write tables and plots",
        description=__doc__.splitlines()[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_plan_arguments(p)
    p.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write PNG plots (needs matplotlib; skipped with a warning without it)",
    )
    p.set_defaults(func=cmd_orchestrate)


__all__ = ["cmd_orchestrate", "register"]
