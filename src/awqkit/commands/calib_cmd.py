"""``awqkit calib build --dataset FILE --model MODEL [--dataset-name NAME] [--out DIR] ...``.

Samples training rows, renders them with the model's chat template (generation prompt added) and writes
``calibration_<dataset>_<train_rows>samples.txt`` for ``awqkit quantize --calib``, named by the platform's
convention after the rows of the training data set read (``len(df)``), not the prompts drawn (GSM8K's 1319-row
test set sampled at 128 gives ``calibration_gsm8k_1319samples.txt``); the ``.meta.json`` beside it records both
(``n_samples``, ``train_rows``), and ``awqkit info FILE`` shows them. Methods and the file format:
:mod:`awqkit.platform.calib_build`. Errors are ``ValueError``, which the ``awqkit`` entry point turns into
exit status 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from awqkit.config import CalibConfig, defaults

_EPILOG = """\
sample size: min(--max-samples, max(--min-samples, int(--fraction x rows))) rows (defaults 128, 8, 0.15;
e.g. 10 rows -> 8, 100 -> 15, 2000 -> 128), drawn with --seed (default 42), kept in dataset order.
Each row becomes [system (--system-prompt, optional), user (--column, default question)] rendered by the
model's chat template with the generation prompt added, as training rendered it.
Output: calibration_<dataset>_<train_rows>samples.txt, numbered by the training set's rows (not the
prompts drawn: 1319 rows sampled at 128 -> calibration_gsm8k_1319samples.txt); one JSON object
{"text": ...} per line (prompts keep their newlines), read back by `awqkit quantize --calib FILE`; plus
FILE.meta.json describing how it was built (n_samples drawn, train_rows; `awqkit info FILE` shows both).
Parquet needs pyarrow; a folder written by datasets' save_to_disk needs datasets.
"""


def _kwarg(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_calib_build(a: argparse.Namespace) -> int:
    """Build the calibration set and print its summary."""
    from awqkit.platform.calib_build import build_calibration_set

    result = build_calibration_set(
        a.dataset,
        a.model,
        dataset_name=a.dataset_name,
        out_dir=a.out,
        column=a.column,
        system_prompt=a.system_prompt,
        seed=a.seed,
        fraction=a.fraction,
        min_samples=a.min_samples,
        max_samples=a.max_samples,
        split=a.split,
        n_blocks=a.n_samples,
        seq_len=a.seq_len,
        chat_template_kwargs=dict(a.template_kwarg) or None,
        trust_remote_code=a.trust_remote_code,
        overwrite=a.overwrite,
    )
    print(result.summary())
    return 0


def register(subparsers: Any) -> None:
    """Add the ``calib`` command (with its ``build`` subcommand) to ``subparsers``."""
    c = defaults(CalibConfig)
    p = subparsers.add_parser(
        "calib",
        help="calibration sets: build one from training data",
        description="Calibration sets for awqkit quantize --calib.",
    )
    sub = p.add_subparsers(dest="calib_command", required=True)
    b = sub.add_parser(
        "build",
        help="sample training rows, render them with the chat template, write the set",
        description=__doc__.splitlines()[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument(
        "--dataset", required=True, help="CSV/TSV, JSONL/JSON, Parquet file, or a folder from datasets' save_to_disk"
    )
    b.add_argument("--model", required=True, help="model folder or hub id whose tokenizer/chat template renders rows")
    b.add_argument("--dataset-name", default=None, help="name in the output file (default: the dataset's name)")
    b.add_argument("--out", default=".", help="output folder (default: the current folder)")
    b.add_argument("--column", default="question", help="column holding the user turn (default %(default)s)")
    b.add_argument("--system-prompt", default=None, help="system turn, as training used it (default: none)")
    b.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    b.add_argument("--seed", type=int, default=42, help="sampling seed (default %(default)s)")
    b.add_argument("--fraction", type=float, default=0.15, help="fraction of rows to sample (default %(default)s)")
    b.add_argument("--min-samples", type=int, default=8, help="lower bound on the sample size (default %(default)s)")
    b.add_argument("--max-samples", type=int, default=128, help="upper bound on the sample size (default %(default)s)")
    b.add_argument(
        "--n-samples",
        type=int,
        default=c["n_samples"],
        help="calibration blocks quantize will ask for, to warn when the set is short (default %(default)s)",
    )
    b.add_argument("--seq-len", type=int, default=c["seq_len"], help="tokens per block (default %(default)s)")
    b.add_argument(
        "--template-kwarg",
        type=_kwarg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra chat-template variable training used, e.g. enable_thinking=false (JSON values)",
    )
    b.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code (off by default)")
    b.add_argument("--overwrite", action="store_true", help="replace a calibration file of the same name")
    b.set_defaults(func=cmd_calib_build)


__all__ = ["cmd_calib_build", "register"]
