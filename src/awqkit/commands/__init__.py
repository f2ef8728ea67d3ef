"""Subcommands of the ``awqkit`` command line that live in their own modules (each has ``register(subparsers)``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from awqkit.platform.executors import Executor


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``awqkit batch`` and ``awqkit orchestrate`` share: the plan and how to run it."""
    p.add_argument("plan", help="plan file (.toml, or .yaml/.yml with PyYAML)")
    p.add_argument(
        "--output-dir", default=None, help="override the plan's output_dir (relative to the working directory)"
    )
    p.add_argument("--dry-run", action="store_true", help="validate the plan and list what would be done")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    run = p.add_argument_group("where the cells run")
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: one cell after another in this process (default); ray: each cell a Ray task, several at once "
        "(pip install 'awqkit[ray]')",
    )
    run.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray instance is started)",
    )
    run.add_argument(
        "--cpus-per-cell",
        type=float,
        default=1,
        metavar="N",
        help="CPUs each cell declares to Ray (its torch threads); default 1. A CUDA plan device adds one GPU",
    )


def plan_executor(a: argparse.Namespace) -> Executor:
    """The executor the plan arguments ask for (:func:`awqkit.platform.executors.make_executor`)."""
    from awqkit.platform.executors import make_executor

    if a.executor == "local" and (a.ray_address is not None or a.cpus_per_cell != 1):
        raise ValueError("--ray-address and --cpus-per-cell apply to --executor ray only")
    return make_executor(a.executor, address=a.ray_address, cpus_per_cell=a.cpus_per_cell)
