"""``awqkit info PATH [--json] [--verify]``: what a model folder is.

Method, bits, group size (the same detection ``load_quantized`` and ``awqkit eval`` use, and whether they
load the folder), the quantization spec (and what of it was not applied), calibration, sizes,
and where it came from (source model, training metadata and its link, the run name), read from
``config.json``, ``quantization_metadata.json`` and ``training_metadata.json``, the folder name last.
See :mod:`awqkit.platform.info`.

``awqkit info CALIBRATION_FILE`` (a file from ``awqkit calib build``, with its ``.meta.json`` beside it) prints
the prompts drawn and the training set's rows (the number in its name) instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def cmd_info(a: argparse.Namespace) -> int:
    """Print the description of ``a.path`` (text, or JSON with ``--json``): a model folder, or a calibration file
    with a ``.meta.json`` beside it."""
    from awqkit.platform.calib_build import read_calibration_meta
    from awqkit.platform.info import describe_folder, format_calibration_file

    if Path(a.path).expanduser().is_file():
        cal = read_calibration_meta(a.path)
        if cal is not None:
            print(json.dumps(cal, indent=2) if a.json else format_calibration_file(cal))
            return 0
    info = describe_folder(a.path, verify=a.verify)
    print(json.dumps(info.to_dict(), indent=2, default=str) if a.json else info.format())
    return 0


def register(subparsers: Any) -> None:
    """Add the ``info`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "info",
        help="describe a model folder: method, bits, spec, calibration, origin",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("path", help="model folder (quantized or float), or a calibration file from awqkit calib build")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash the linked source weights and compare them with the link (slow for big models)",
    )
    p.set_defaults(func=cmd_info)


__all__ = ["cmd_info", "register"]
