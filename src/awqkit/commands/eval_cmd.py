"""``awqkit eval MODEL [--baseline MODEL] --tasks ppl,kl,arc,squad,gsm8k [--limit N] [--json OUT]``.

Prints the Markdown report of :func:`awqkit.eval.runner.results_markdown` and writes the full results
as JSON (``--json``, strict JSON: NaN / Inf become ``null``) and the report as a file (``--markdown``).
When MODEL is an awqkit output, its model card gets the results table and ``model-index``
(:func:`awqkit.report.model_card.record_eval_results`; ``--no-card`` leaves it alone).
Errors are :class:`~awqkit.errors.AwqkitError` / ``ValueError`` / ``FileNotFoundError``, which the ``awqkit``
entry point turns into one line and exit status 2. When a metric came out NaN or Inf the report and the
files are still written, then one line ``awqkit eval: error: <metrics> came out NaN/Inf for <model>; ...``
goes to stderr and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from awqkit.config import BenchConfig, EvalConfig

E, B = EvalConfig(), BenchConfig()  # the defaults the options show

_EPILOG = """\
tasks: ppl (perplexity on --text, default WikiText-2 test), kl (KL(baseline || model) and top-1
agreement on the same windows; needs --baseline), arc, squad, gsm8k (--limit items each).
--text FILE is scored as it is (UTF-8, every line and space unchanged); the default WikiText-2 test
is read the GPTQ/AWQ way (its non-empty lines joined with a blank line).
ppl/kl windows: the first --windows consecutive non-overlapping windows of --seq-len tokens
(stride = window length), deterministic. With --baseline every metric gets model/baseline and a
retention column (model/baseline, or baseline/model for ppl where lower is better; 1.0 = baseline).
--backend applies to quantized folders: on x86 CPUs 'auto' runs awqkit's fp32 cpu-avx2 kernel where a
layer fits it, else the bf16 cpu-int4 kernel, else the fp32 torch reference; 'torch' forces the fp32
reference. The JSON records which ran.
--bench adds speed and memory rows (as `awqkit bench`: prompt 128 tokens, 64 decoded tokens at batch 1
and 8, medians of --bench-repeats; the model with --backend, the baseline float32 dense, each in its
own process): prefill ms, decode tok/s, peak RSS, weight MB on disk and in memory.
Model card: when MODEL is a folder awqkit wrote (it holds quantization_metadata.json), the results
replace the table and the model-index of its README.md (the same results give the same bytes); other
folders are never written to, nor is any card when a metric came out NaN/Inf (--no-card: never).
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _windows(text: str) -> int | None:
    return None if text.lower() == "all" else _positive(text)


def _bench_settings(a: argparse.Namespace) -> Any:
    if not a.bench:
        return None
    from awqkit.bench.modes import BenchConfig

    return BenchConfig(repeats=a.bench_repeats)


def cmd_eval(a: argparse.Namespace) -> int:
    """Run the evaluation, print the Markdown report, write ``--json`` / ``--markdown``."""
    from awqkit.eval.runner import evaluate_model, nonfinite_metrics, parse_tasks, results_json, results_markdown

    tasks = a.tasks if a.tasks is not None else ("ppl,kl" if a.baseline else "ppl")
    parse_tasks(tasks)  # fail on bad names before anything is loaded
    results = evaluate_model(
        a.model,
        baseline=a.baseline,
        tasks=tasks,
        limit=a.limit,
        text=a.text,
        data_dir=a.data_dir,
        seq_len=a.seq_len,
        windows=a.windows,
        batch_size=a.batch_size,
        backend=a.backend,
        device=a.device,
        trust_remote_code=a.trust_remote_code,
        progress=a.progress,
        bench=_bench_settings(a),
    )
    report = results_markdown(results)
    print(report, end="")
    for out, content in ((a.json, results_json(results)), (a.markdown, report)):
        if out:
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    bad = nonfinite_metrics(results)
    if a.card and not bad:
        from awqkit.report.model_card import record_eval_results

        card = record_eval_results(a.model, results)
        if card is not None:
            print(f"updated {card}")
    if bad:
        print(f"awqkit eval: error: {_nonfinite_line(bad, a.model, a.baseline)}", file=sys.stderr)
        return 1
    return 0


def _nonfinite_line(bad: list[str], model: str, baseline: str | None) -> str:
    """The message of the one error line for the non-finite metrics ``bad`` (docs/errors.md: EVAL-NONFINITE)."""
    mine = [b for b in bad if not b.endswith(" (baseline)")]
    theirs = [b.removesuffix(" (baseline)") for b in bad if b.endswith(" (baseline)")]
    parts = [f"{', '.join(mine)} came out NaN/Inf for {model}"] if mine else []
    if theirs:
        parts.append(f"{', '.join(theirs)} came out NaN/Inf for the baseline {baseline}")
    return (
        " and ".join(parts) + "; the model's forward pass overflowed or its weights are damaged: check the "
        "folder with `awqkit info`, re-run with --backend torch (the fp32 reference) to rule out a kernel, and "
        "re-quantize from a finite float model (the report and --json were still written, NaN as null)"
    )


def register(subparsers: Any) -> None:
    """Add the ``eval`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a float or quantized folder (ppl, kl, arc, squad, gsm8k), optionally vs a baseline",
        description=__doc__.splitlines()[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder: float, or quantized (awqkit, AutoAWQ GEMM, compressed-tensors)")
    p.add_argument("--baseline", default=None, help="baseline folder (usually the float source model)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated: ppl,kl,arc,squad,gsm8k or all (default: ppl, or ppl,kl with --baseline)",
    )
    p.add_argument("--limit", type=_positive, default=E.limit, help="items per arc/squad/gsm8k task (default: all)")
    p.add_argument(
        "--text",
        default=None,
        help="UTF-8 text file for ppl/kl, scored as it is (default: WikiText-2 test in the data folder)",
    )
    p.add_argument("--data-dir", default=None, help="data folder (default: $AWQKIT_DATA or ../shared/data)")
    p.add_argument("--seq-len", type=int, default=E.seq_len, help="tokens per ppl/kl window (default %(default)s)")
    p.add_argument("--windows", type=_windows, default=E.windows, help="ppl/kl windows, or 'all' (default %(default)s)")
    p.add_argument(
        "--batch-size", type=_positive, default=E.batch_size, help="windows per forward pass (default %(default)s)"
    )
    p.add_argument(
        "--backend",
        default=E.backend,
        help="kernel backend for quantized folders: auto (CPU: cpu-avx2, then bf16 cpu-int4, where "
        "a layer fits), torch (fp32 reference), cpu-avx2, cpu-int4 (default %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="device for both models (default %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full results as JSON to OUT")
    p.add_argument("--markdown", default=None, metavar="OUT", help="write the Markdown report to OUT")
    p.add_argument(
        "--card",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the results into MODEL's model card when awqkit wrote MODEL (default %(default)s)",
    )
    p.add_argument("--bench", action="store_true", help="add speed and memory rows (see below)")
    p.add_argument(
        "--bench-repeats", type=_positive, default=B.repeats, help="timed runs for --bench (default %(default)s)"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(func=cmd_eval)


__all__ = ["cmd_eval", "register"]
