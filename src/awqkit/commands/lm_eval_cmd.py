"""``awqkit lm-eval MODEL --tasks arc_challenge,hellaswag [--limit N] [--num-fewshot K] [--json OUT]``.

Runs lm-evaluation-harness on a float or quantized folder through :mod:`awqkit.eval.lm_eval_adapter`
(awqkit's loader and kernels) and prints lm-eval's results table. Needs the optional extra
``pip install "awqkit[lm-eval]"``; lm-eval downloads each task's data set on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

_EPILOG = """\
Any lm-eval task name or glob works (`lm-eval ls tasks` lists them). --include-path adds a folder of
task YAMLs of your own (e.g. over local JSONL files); with --no-default-tasks only those are indexed,
which skips the few seconds lm-eval spends indexing its built-in tasks.
--backend applies to quantized folders: on x86 CPUs 'auto' runs the fp32 cpu-avx2 kernel where a layer
fits it, else the bf16 cpu-int4 kernel, else the fp32 torch reference; 'torch' forces the fp32 reference.
The JSON records which ran (config.awqkit). The same adapter is lm-eval's model "awqkit" once
awqkit.eval.lm_eval_adapter is imported: lm_eval.simple_evaluate(model="awqkit",
model_args="pretrained=PATH,backend=torch", ...).
"""


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value if value < 1 else int(value) if value.is_integer() else value


def _batch_size(text: str) -> int | str:
    if text.startswith("auto"):
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text}")
    return value


def cmd_lm_eval(a: argparse.Namespace) -> int:
    """Run lm-eval on ``a.model``, print its results table, write ``--json``."""
    from awqkit.eval.lm_eval_adapter import run_lm_eval

    try:
        results = run_lm_eval(
            a.model,
            a.tasks,
            limit=a.limit,
            num_fewshot=a.num_fewshot,
            backend=a.backend,
            batch_size=a.batch_size,
            device=a.device,
            output=a.json,
            include_path=a.include_path,
            include_defaults=a.default_tasks,
            trust_remote_code=a.trust_remote_code,
        )
    except ImportError as exc:
        print(f"awqkit lm-eval: error: {exc}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    load = results.get("config", {}).get("awqkit") or {}
    if load:
        print(
            f"model: {load['path']} ({load['detection']['method']}; {load['loaded_as']}); "
            f"kernels: {json.dumps(load['kernels']['layers']) if load['kernels']['layers'] else 'none (float)'}"
        )
    if a.json:
        print(f"wrote {a.json}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``lm-eval`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks on a float or quantized folder (optional extra)",
        description=__doc__.splitlines()[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder: float, or quantized (awqkit, AutoAWQ GEMM, compressed-tensors)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_challenge,hellaswag")
    p.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="items per task, or a fraction of each task when below 1 (default: all)",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument(
        "--backend",
        default="auto",
        help="kernel backend for quantized folders: auto, torch (fp32 reference), cpu-avx2, cpu-int4 "
        "(default %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=_batch_size, default=1, help="requests per forward pass, or auto (default %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="device (default %(default)s)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra lm-eval task YAMLs")
    p.add_argument(
        "--default-tasks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="index lm-eval's built-in tasks (default on; off needs --include-path)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--json", default=None, metavar="OUT", help="write lm-eval's full results as JSON to OUT")
    p.set_defaults(func=cmd_lm_eval)


__all__ = ["cmd_lm_eval", "register"]
