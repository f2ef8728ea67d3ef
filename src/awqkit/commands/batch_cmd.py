"""``awqkit batch PLAN [--output-dir DIR] [--dry-run] [--executor ray]``: quantize every (model, spec) pair of a plan.

One after another (or several at once as Ray tasks with ``--executor ray``), skipping outputs that exist and
are complete, going on past a failed model and listing the failures at the end (exit status 1 when any failed,
2 for a bad plan). The plan format (TOML, or YAML with PyYAML) is shared with ``awqkit orchestrate``:
:mod:`awqkit.platform.plan`; what "complete", the state file and the lock mean: :mod:`awqkit.platform.batch`.
"""

from __future__ import annotations

import argparse
from typing import Any

from awqkit.commands import add_plan_arguments, plan_executor

_EPILOG = """\
plan (TOML; YAML with the same keys):
  output_dir = "runs"
  [defaults]                       # calibration and AWQ search settings
  calib = "calibration_{dataset}_128samples.txt"
  n_samples = 128
  [[models]]
  path = "models/Qwen3-0.6B-openmath_SFT_NoPeft"    # or: scan = "models/"
  [[specs]]
  method = "awq"
  bits = 4
  group_size = [64, 128]          # lists make every combination
outputs: <output_dir>/<base>-<dataset>_<method>_<peft>_<AWQ_w4_g128_headfp16>_quantized
Run the same plan again after a failure or an interruption: only missing outputs are made.
"""


def cmd_batch(a: argparse.Namespace) -> int:
    """Run the batch and print its summary; 1 when a cell failed."""
    from awqkit.platform.batch import run_batch

    report = run_batch(
        a.plan, output_dir=a.output_dir, progress=a.progress, dry_run=a.dry_run, executor=plan_executor(a)
    )
    print(report.summary())
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    """Add the ``batch`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "batch",
        help="quantize many models with one or more specs from a plan file (resumable)",
        description=__doc__.splitlines()[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_plan_arguments(p)
    p.set_defaults(func=cmd_batch)


__all__ = ["cmd_batch", "register"]
