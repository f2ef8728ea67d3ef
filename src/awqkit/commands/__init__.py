"""Subcommands of the ``awqkit`` command line that live in their own modules (each has ``register(subparsers)``)."""

from __future__ import annotations

import argparse


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``awqkit batch`` and ``awqkit orchestrate`` share: the plan and how to run it."""
    p.add_argument("plan", help="plan file (.toml, or .yaml/.yml with PyYAML)")
    p.add_argument(
        "--output-dir", default=None, help="override the plan's output_dir (relative to the working directory)"
    )
    p.add_argument("--dry-run", action="store_true", help="validate the plan and list what would be done")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
