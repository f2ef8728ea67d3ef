"""``awqkit eval``: evaluate a model folder (float or quantized) and compare it with a baseline.

Tasks (:data:`TASKS`):

* ``ppl``: perplexity on a text. By default WikiText-2 test from the data folder, read as
  :func:`~awqkit.eval.perplexity.load_wikitext_test` reads it (non-empty lines joined by a blank line, the
  GPTQ / AWQ protocol); a user's ``text`` file is read as it is (:func:`~awqkit.eval.perplexity.load_text_file`:
  UTF-8, every line and space unchanged, so passing the WikiText file itself as ``text`` scores its raw text,
  not the joined one). The text is tokenized once with the model's tokenizer and cut into the first
  ``windows`` consecutive, non-overlapping windows of ``seq_len`` tokens (stride = window length;
  ``windows=None`` takes every complete window). Each window is scored on its own; no randomness anywhere,
  so runs are repeatable. ``results["data"]["text"]["read_as"]`` records which reading ran (``"wikitext"``
  or ``"as is"``).
* ``kl``: mean ``KL(P_baseline || P_model)`` of the next-token distributions over the same windows,
  plus top-1 agreement (:func:`~awqkit.eval.perplexity.kl_divergence`). Needs a baseline. With both
  ``ppl`` and ``kl`` the perplexities come from the KL pass (same windows, same arithmetic, so the same
  numbers) instead of a second pass over both models; ``ppl`` then reports ``computed_in: "kl"``.
* ``arc``, ``squad``, ``gsm8k``: :mod:`awqkit.eval.tasks` with ``limit`` items each, each model with its
  own tokenizer.

Retention (with a baseline): for every metric ``ratio = model / baseline``; ``retention`` is that ratio
for higher-is-better metrics and ``baseline / model`` for lower-is-better ones (ppl), so 1.0 means "as
good as the baseline" and less means worse in every row. KL has no retention (the baseline's KL to
itself is 0 by definition; its top-1 agreement with itself is 1). A ratio with a zero denominator is
``None``.

Loading and kernel backends: :mod:`awqkit.eval.runner_load` (``backend="auto"`` on x86 CPUs runs the fp32
``cpu-avx2`` kernel, else the bf16 ``cpu-int4`` kernel, where a layer fits; ``"torch"`` the fp32 reference; the
results record which ran).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from awqkit import __version__, kernels
from awqkit.bench.eval_rows import run_bench
from awqkit.config import EvalConfig
from awqkit.errors import InputError
from awqkit.eval.perplexity import (
    WIKITEXT_TEST_RELPATH,
    kl_divergence,
    load_text_file,
    load_wikitext_test,
    make_windows,
    perplexity,
    text_file_path,
)
from awqkit.eval.runner_load import LoadedModel, check_folder, load_for_eval, same_vocabulary
from awqkit.eval.tasks import evaluate_arc, evaluate_gsm8k, evaluate_squad
from awqkit.eval.tasks._common import check_positive, resolve_data_file
from awqkit.files import sha256_file
from awqkit.preflight import check_device, check_seq_len
from awqkit.report.table import metrics_table

logger = logging.getLogger(__name__)

#: Valid task names, in the order results are reported.
TASKS = ("ppl", "kl", "arc", "squad", "gsm8k")
#: ``task -> [(metric, higher_is_better)]`` shown in the table and used for retention.
METRICS: dict[str, list[tuple[str, bool]]] = {
    "ppl": [("ppl", False)],
    "kl": [("kl", False), ("top1_agreement", True)],
    "arc": [("acc", True), ("acc_norm", True)],
    "squad": [("em", True), ("f1", True)],
    "gsm8k": [("em", True)],
}
_WINDOW_TASKS = ("ppl", "kl")


def parse_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """Task names from ``"ppl,kl"`` or a sequence (``"all"`` = every task), deduplicated, in :data:`TASKS` order.

    Raises:
        InputError (a ValueError): empty, or an unknown name (the message lists the valid ones).
    """
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [str(t).strip().lower() for t in items if str(t).strip()]
    if "all" in names:
        names = list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        what = f"unknown task(s) {unknown}" if unknown else "no task given"
        raise InputError(f"{what}; valid tasks: {', '.join(TASKS)} (comma-separated, or 'all')")
    return tuple(t for t in TASKS if t in names)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _versions() -> dict[str, str]:
    import transformers

    return {
        "awqkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _text_file(text: str | Path | None, data_dir: str | Path | None) -> Path:
    """The ppl / kl text file: the user's ``text`` file, else WikiText-2 test in ``data_dir``.

    Raises:
        FileNotFoundError: the file is missing (``perplexity text file not found ...``).
        InputError: ``text`` is a folder (a text file is expected; a data folder goes to ``data_dir``).
    """
    if text is None:
        return resolve_data_file(data_dir, str(WIKITEXT_TEST_RELPATH), "perplexity text")
    return text_file_path(text)


class _WindowText(NamedTuple):
    """The ppl / kl text: its file, its content as scored and how it was read (``"as is"`` / ``"wikitext"``)."""

    path: Path
    content: str
    read_as: str


def _read_text(text: str | Path | None, data_dir: str | Path | None) -> _WindowText:
    """The ppl / kl text: a user's ``text`` file as it is (:func:`load_text_file`), else the WikiText-2 test in
    ``data_dir`` joined the WikiText way (:func:`load_wikitext_test`).

    Raises:
        FileNotFoundError / InputError: missing file, folder, non-UTF-8 or empty file (one line each).
    """
    path = _text_file(text, data_dir)
    if text is not None:
        return _WindowText(path, load_text_file(path), "as is")
    return _WindowText(path, load_wikitext_test(path), "wikitext")


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _window_tasks(
    names: Sequence[str], m: LoadedModel, b: LoadedModel | None, ids: torch.Tensor, opts: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if "kl" in names:
        assert b is not None
        r, secs = _timed(kl_divergence, m.model, b.model, ids, **opts)
        keys = ("kl", "kl_sum", "top1_agreement", "n_tokens", "n_windows")
        out["kl"] = {
            "model": {k: r[k] for k in keys},
            "baseline": {"kl": 0.0, "top1_agreement": 1.0},
            "seconds": secs,
            "direction": "KL(P_baseline || P_model), mean per predicted token",
        }
        if "ppl" in names:
            common = {"n_tokens": r["n_tokens"], "n_windows": r["n_windows"], "seq_len": int(ids.shape[1])}
            out["ppl"] = {
                "model": {"ppl": r["ppl_model"], "nll_sum": r["nll_sum_model"], **common},
                "baseline": {"ppl": r["ppl_baseline"], "nll_sum": r["nll_sum_baseline"], **common},
                "seconds": 0.0,
                "computed_in": "kl",
            }
    if "ppl" in names and "ppl" not in out:
        out["ppl"] = _per_model(lambda lm: perplexity(lm.model, ids, **opts), m, b)
    return out


def _per_model(fn: Any, m: LoadedModel, b: LoadedModel | None) -> dict[str, Any]:
    """``{"model": fn(m), "baseline": fn(b), "seconds": total, "seconds_by_model": {...}}`` (no baseline: no key)."""
    entry: dict[str, Any] = {}
    secs: dict[str, float] = {}
    for role, lm in (("model", m), ("baseline", b)):
        if lm is not None:
            entry[role], secs[role] = _timed(fn, lm)
    entry["seconds"] = sum(secs.values())
    entry["seconds_by_model"] = secs
    return entry


def _run_task(
    name: str, lm: LoadedModel, limit: int | None, data_dir: str | Path | None, options: dict[str, Any], progress: bool
) -> dict[str, Any]:

    # the three take (model, tokenizer, *, path, limit, progress, **their own options)
    tasks: dict[str, Callable[..., dict[str, Any]]] = {
        "arc": evaluate_arc,
        "squad": evaluate_squad,
        "gsm8k": evaluate_gsm8k,
    }
    fn = tasks[name]
    options = dict(options)
    limit = options.pop("limit", limit)  # a task's own limit wins over the shared one
    return fn(lm.model, lm.tokenizer, path=data_dir, limit=limit, progress=progress, **options)


def evaluate_model(
    model_path: str | Path,
    *,
    baseline: str | Path | None = None,
    tasks: str | Iterable[str] = EvalConfig.tasks,
    limit: int | None = EvalConfig.limit,
    text: str | Path | None = None,
    data_dir: str | Path | None = None,
    seq_len: int = EvalConfig.seq_len,
    windows: int | None = EvalConfig.windows,
    batch_size: int = EvalConfig.batch_size,
    backend: str = EvalConfig.backend,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    task_options: dict[str, dict[str, Any]] | None = None,
    bench: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the folder ``model_path`` (and ``baseline``) on ``tasks``; see the module docstring.

    Args:
        tasks: names from :data:`TASKS` (a sequence or ``"ppl,kl"``; ``"all"``).
        limit: items per downstream task (arc / squad / gsm8k); ppl and kl use ``windows``.
        text: a text file for ppl / kl, scored as it is (UTF-8, unchanged); default: WikiText-2 test
            (``<data_dir>/wikitext-2-raw/wiki.test.raw``) with WikiText's joining of non-empty lines.
        data_dir: data folder for the default text and the task files (default: ``default_data_dir()``).
        seq_len, windows: window length in tokens and number of windows (``None``: all complete ones).
        batch_size: windows per forward pass for ppl / kl.
        backend: kernel backend for quantized folders (``"auto"``, ``"torch"``, ``"cpu-avx2"``, ``"cpu-int4"``).
        task_options: extra keyword arguments per downstream task, e.g. ``{"gsm8k": {"num_fewshot": 5}}``;
            a task's ``limit`` there replaces ``limit`` for that task (``{"squad": {"limit": 200}}`` with
            ``limit=None``: every ARC item, 200 SQuAD items).
        bench: an :class:`~awqkit.bench.modes.BenchConfig` to add speed and memory rows
            (:mod:`awqkit.bench.eval_rows`: prefill, decode tokens/s, peak RSS, weight bytes; the model
            with ``backend``, the baseline float32 dense, each measured in its own process), or None.
    Returns:
        a JSON-ready dict: ``versions``, ``settings``, ``model`` / ``baseline`` (path, detection, loader,
        kernels), ``data`` (file paths and sha256), ``tasks`` (per-task metrics and wall seconds),
        ``metrics`` (one row per metric with ratio and retention) and ``wall_seconds``. A metric that came
        out NaN / Inf is returned as it is (no error here): :func:`nonfinite_metrics` lists them, and
        :func:`results_json` writes them as ``null`` (``awqkit eval`` then exits 1).
    Raises:
        InputError (a ValueError) / FileNotFoundError: bad task names, ``kl`` without a baseline, bad sizes,
            missing folders or data files (all checked before any model is loaded).
        CheckpointError / NonFiniteError: a model folder awqkit cannot load (:mod:`awqkit.eval.runner_load`).
    """
    names = parse_tasks(tasks)
    window_text = _check_request(
        model_path, baseline, names, limit, text, data_dir, seq_len, windows, batch_size, backend, device, task_options
    )
    t_start = time.perf_counter()
    wall: dict[str, float] = {}
    m = load_for_eval(model_path, backend=backend, device=device, trust_remote_code=trust_remote_code)
    wall["load_model"] = m.load_seconds
    b = None
    if baseline is not None:
        b = load_for_eval(
            baseline, backend=backend, device=device, trust_remote_code=trust_remote_code, what="baseline"
        )
        wall["load_baseline"] = b.load_seconds
    results: dict[str, Any] = {
        "awqkit_version": _versions()["awqkit"],
        "versions": _versions(),
        "settings": {
            "tasks": list(names),
            "limit": limit,
            "seq_len": seq_len,
            "windows": windows,
            "stride": seq_len,
            "batch_size": batch_size,
            "backend": backend,
            "device": str(device),
            "text": str(window_text.path) if window_text else None,
            "data_dir": str(data_dir) if data_dir is not None else None,
            "task_options": task_options or {},
        },
        "model": m.describe(),
        "baseline": b.describe() if b is not None else None,
        "data": {},
        "tasks": {},
    }
    if b is not None and not same_vocabulary(m.tokenizer, b.tokenizer):
        if "kl" in names:
            raise InputError(
                f"{m.path} and {b.path} have different vocabularies; KL needs the same tokenizer: "
                "compare a model with the float model it was quantized from"
            )
        logger.warning("model and baseline tokenizers differ; ppl windows use the model's tokenizer for both")

    ran: dict[str, dict[str, Any]] = {}
    if window_text is not None:
        opts = {"batch_size": batch_size, "device": device, "progress": progress}
        ran.update(_run_windows(names, m, b, window_text, seq_len, windows, opts, results, wall))
    for name in (t for t in names if t not in _WINDOW_TASKS):
        options = dict((task_options or {}).get(name, {}))
        entry = _per_model(lambda lm: _run_task(name, lm, limit, data_dir, options, progress), m, b)  # noqa: B023
        results["data"][name] = {"path": entry["model"].get("path"), "sha256": entry["model"].get("sha256")}
        ran[name] = entry
    results["tasks"] = {t: ran[t] for t in names}
    if bench is not None:
        del m, b  # free both models before the measuring processes start
        t0 = time.perf_counter()
        results["tasks"]["bench"] = run_bench(model_path, baseline, backend=backend, device=str(device), settings=bench)
        results["tasks"]["bench"]["seconds"] = wall["bench"] = time.perf_counter() - t0
        results["settings"]["bench"] = results["tasks"]["bench"]["settings"]
    results["metrics"] = metric_rows(results)
    wall.update({t: ran[t]["seconds"] for t in names})
    wall["total"] = time.perf_counter() - t_start
    results["wall_seconds"] = {k: round(v, 3) for k, v in wall.items()}
    return results


def _check_request(
    model_path: str | Path,
    baseline: str | Path | None,
    names: tuple[str, ...],
    limit: int | None,
    text: str | Path | None,
    data_dir: str | Path | None,
    seq_len: int,
    windows: int | None,
    batch_size: int,
    backend: str,
    device: str | torch.device,
    task_options: dict[str, dict[str, Any]] | None,
) -> _WindowText | None:
    """Every check :func:`evaluate_model` makes before loading anything; returns the ppl/kl text, read (None when
    no task reads windows). Raises InputError / FileNotFoundError naming the problem."""
    if "kl" in names and baseline is None:
        raise InputError("task 'kl' compares against a baseline model; pass --baseline MODEL (baseline=...)")
    for label, value in (("limit", limit), ("windows", windows), ("batch_size", batch_size)):
        check_positive(label, value)
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    unknown_opts = [k for k in (task_options or {}) if k not in ("arc", "squad", "gsm8k")]
    if unknown_opts:
        raise InputError(f"task_options names {unknown_opts}; only arc, squad and gsm8k take options")
    for task, opts in (task_options or {}).items():
        check_positive(f"task_options[{task!r}]['limit']", opts.get("limit"))
    if backend != "auto":
        try:
            kernels.get_backend(backend)  # unknown / unavailable: the message lists the available ones
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"--backend: {exc}") from None
    check_device(device)
    check_folder(model_path, "model")
    if baseline is not None:
        check_folder(baseline, "baseline")
    if not any(t in names for t in _WINDOW_TASKS):
        return None
    window_text = _read_text(text, data_dir)
    for folder in (model_path, baseline):
        try:
            cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")) if folder else None
        except (OSError, ValueError):
            cfg = None  # the loader names what is wrong with it
        if isinstance(cfg, dict):
            check_seq_len(seq_len, cfg, str(folder))
    return window_text


def _run_windows(
    names: tuple[str, ...],
    m: LoadedModel,
    b: LoadedModel | None,
    text: _WindowText,
    seq_len: int,
    windows: int | None,
    opts: dict[str, Any],
    results: dict[str, Any],
    wall: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """ppl and kl on the text's windows (tokenized once, with the model's tokenizer); records the text in
    ``results["data"]`` and the tokenizing time in ``wall``."""
    t0 = time.perf_counter()
    ids = make_windows(m.tokenizer, text.content, seq_len, windows)
    wall["tokenize"] = time.perf_counter() - t0
    max_pos = getattr(getattr(m.model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        logger.warning("seq_len=%d exceeds the model's max_position_embeddings=%d", seq_len, max_pos)
    results["data"]["text"] = {
        "path": str(text.path),
        "sha256": sha256_file(text.path),
        "read_as": text.read_as,
        "n_windows": int(ids.shape[0]),
        "seq_len": seq_len,
    }
    return _window_tasks([t for t in names if t in _WINDOW_TASKS], m, b, ids, opts)


def metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric): ``task, metric, higher_is_better, model, baseline, ratio, retention, n``."""
    rows = []
    has_baseline = results.get("baseline") is not None
    for task, entry in results.get("tasks", {}).items():
        for metric, higher in METRICS.get(task) or [tuple(x) for x in entry.get("metric_spec", [])]:
            mv = entry.get("model", {}).get(metric)
            bv = entry.get("baseline", {}).get(metric) if has_baseline else None
            ratio = _ratio(mv, bv) if metric != "kl" else None
            retention = None if ratio is None else ratio if higher else _ratio(bv, mv)
            n = entry.get("model", {}).get("n_tokens", entry.get("model", {}).get("n"))
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "higher_is_better": higher,
                    "model": mv,
                    "baseline": bv,
                    "ratio": ratio,
                    "retention": retention,
                    "n": n,
                }
            )
    return rows


def nonfinite_metrics(results: dict[str, Any]) -> list[str]:
    """The metrics of ``results`` whose value is NaN or Inf, as ``"ppl"``, ``"kl"``, ``"arc/acc"``, with
    ``" (baseline)"`` for the baseline's; empty when every metric is finite (``awqkit eval`` then exits 0)."""
    bad: list[str] = []
    for row in results.get("metrics") or metric_rows(results):
        label = row["metric"] if row["metric"] == row["task"] else f"{row['task']}/{row['metric']}"
        for role in ("model", "baseline"):
            value = row.get(role)
            if isinstance(value, float) and not math.isfinite(value):
                bad.append(label if role == "model" else f"{label} (baseline)")
    return bad


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def results_json(results: dict[str, Any]) -> str:
    """``results`` as strict JSON text (indented, newline-terminated): NaN / Inf numbers become ``null`` (plain
    ``json.dumps`` would write the invalid tokens ``NaN`` / ``Infinity``), and when any metric was non-finite
    a top-level ``"nonfinite_metrics"`` lists them (:func:`nonfinite_metrics`)."""
    data = _finite_or_none(results)
    bad = nonfinite_metrics(results)
    if bad:
        data["nonfinite_metrics"] = bad
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def results_table(results: dict[str, Any]) -> str:
    """The metrics table alone (Markdown); with a baseline, ratio and retention columns and a legend."""
    rows = results.get("metrics") or metric_rows(results)
    if not rows:
        raise ValueError("results hold no metrics to tabulate")
    return metrics_table(rows, baseline=results.get("baseline") is not None)


def _describe_line(label: str, info: dict[str, Any]) -> str:
    d = info["detection"]
    bits = f"{d['bits']}-bit" if d.get("bits") else "bits unknown"
    group = f", group size {d['group_size']}" if d.get("group_size") is not None else ""
    kernels = info.get("kernels") or {}
    layers = ", ".join(f"{k}: {v}" for k, v in (kernels.get("layers") or {}).items())
    run = f"; backend {kernels['backend']} ran {layers} layers" if layers else ""
    source = "no quantization config found" if d["source"] == "none" else f"detected from {d['source']}"
    return f"- {label}: `{info['path']}`: {d['method']} ({bits}{group}; {source}){run}"


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown report: the models (detection, kernels), the settings, and the metrics table."""
    s = results["settings"]
    lines = ["## awqkit eval", "", _describe_line("model", results["model"])]
    if results.get("baseline"):
        lines.append(_describe_line("baseline", results["baseline"]))
    lines.append(
        f"- tasks: {', '.join(s['tasks'])}; limit {s['limit']}; windows {s['windows']} x {s['seq_len']} "
        f"tokens (stride {s['stride']}); device {s['device']}; awqkit {results['awqkit_version']}"
    )
    shared = {t for t, e in results.get("tasks", {}).items() if e.get("computed_in")}
    secs = ", ".join(
        f"{k} in the {results['tasks'][k]['computed_in']} pass" if k in shared else f"{k} {v:.2f} s"
        for k, v in results.get("wall_seconds", {}).items()
    )
    lines += [f"- wall time: {secs}", "", results_table(results)]
    return "\n".join(lines) + "\n"


__all__ = [
    "METRICS",
    "TASKS",
    "evaluate_model",
    "metric_rows",
    "nonfinite_metrics",
    "parse_tasks",
    "results_json",
    "results_markdown",
    "results_table",
]
