"""``awqkit orchestrate PLAN``: quantize what is missing, evaluate everything, tabulate and plot it.

The plan is the one of ``awqkit batch`` (:mod:`awqkit.platform.plan`); its ``[eval]`` table sets the tasks.

1. **Quantize**: exactly as ``awqkit batch`` (:func:`awqkit.platform.batch.quantize_cells`: complete
   outputs are skipped, stale ones redone, interrupted writes finished or rolled back, a failure recorded
   and the rest go on).
2. **Evaluate** every *evaluation cell*: for each model, first its float baseline (the source folder
   itself, named ``<run name>_FP16``; evaluated, never quantized, whether or not the plan lists a ``fp``
   spec), then each quantized output. The baseline runs every task but ``kl``; a quantized folder runs
   ``ppl`` + ``kl`` against the source model in one pass (:func:`awqkit.eval.runner.evaluate_model` with
   ``baseline``) and the other tasks on its own. Retention is computed against the baseline cell.
   Each cell's results are stored in ``<output_dir>/eval/<cell>.json`` with the *key* they were measured
   under (model and baseline folders, the ``[eval]`` settings, the sha256 of the ppl/kl text and of the
   quantized folder's ``quantization_metadata.json``); a rerun skips a cell whose file holds the same key
   and re-evaluates it when any of those changed. A quantized folder gets its model card's results table
   updated (:func:`awqkit.report.model_card.update_model_card_results`, baseline values from the float
   cell). A cell that fails (or whose quantization failed) is recorded and the rest go on.
3. **Report** (:mod:`awqkit.platform.campaign_results`, derived from the state file and the cell files):
   ``results.csv``, ``results.md``, ``results.json`` in ``output_dir``, and PNG plots in
   ``output_dir/plots`` (:mod:`awqkit.report.plots`; skipped with a warning when matplotlib is missing,
   ``pip install 'awqkit[plot]'``).

The cells of steps 1 and 2 run on an executor (:mod:`awqkit.platform.executors`): one after another here
(``local``), or several at once as Ray tasks (``ray``); the results are recorded here the same way for both.
Within step 2 a quantized folder's model card is updated once its model's float cell has finished.

The output folder holds the state file ``awqkit_state.json`` (``"quantize"`` and ``"evaluate"`` entries,
see :mod:`awqkit.platform.batch`), written atomically after each cell, and is locked while a run works in it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awqkit.eval import runner
from awqkit.eval.runner import TASKS, _text_file, metric_rows
from awqkit.files import write_json_atomic
from awqkit.naming import quantized_folder_name
from awqkit.platform.batch import (
    STATE_FILE,
    CellOutcome,
    RunState,
    expected_settings,
    folder_state,
    quantize_cells,
    recover_destinations,
    run_lock,
)
from awqkit.platform.campaign_results import load_cell, write_results
from awqkit.platform.executors import Executor, Job, LocalExecutor, as_executor, gpus_for, in_plan_order
from awqkit.platform.plan import Plan, PlanModel, load_plan
from awqkit.report.model_card import update_model_card_results
from awqkit.spec import QuantizationSpec, resolve_quantization_spec

logger = logging.getLogger(__name__)

EVAL_DIR = "eval"
_WINDOW_TASKS = ("ppl", "kl")


@dataclass(frozen=True)
class EvalCell:
    """One folder to evaluate: a model's float baseline (``quantized=False``) or one of its outputs."""

    model: PlanModel
    spec: QuantizationSpec
    name: str
    path: Path
    quantized: bool

    def result_file(self, output_dir: Path) -> Path:
        return output_dir / EVAL_DIR / f"{self.name}.json"


def eval_cells(plan: Plan) -> list[EvalCell]:
    """Per model: the float baseline, then every quantized output, in plan order."""
    fp = next((s for s in plan.specs if not s.method.quantizes), None) or resolve_quantization_spec("none")
    cells: list[EvalCell] = []
    for m in plan.models:
        cells.append(EvalCell(m, fp, m.cell_name(fp), m.path, False))
        for s in plan.quantize_specs:
            name = m.cell_name(s)
            cells.append(EvalCell(m, s, name, plan.output_dir / quantized_folder_name(name), True))
    return cells


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _text_sha(plan: Plan) -> str | None:
    """sha256 of the ppl/kl text (FileNotFoundError when a window task has no text to read)."""
    if not any(t in plan.eval.tasks for t in _WINDOW_TASKS):
        return None

    return _sha256(_text_file(plan.eval.text, plan.eval.data_dir))


def eval_key(plan: Plan, cell: EvalCell, text_sha: str | None) -> dict[str, Any]:
    """What a cell's results depend on; a stored result with another key is measured again.

    The kernel ``backend`` only applies to quantized layers, so a float cell's key leaves it out (changing
    the backend re-evaluates the quantized cells only)."""
    settings = plan.eval.to_dict()
    if not cell.quantized:
        settings.pop("backend", None)
    return {
        "model": str(cell.path),
        "baseline": str(cell.model.path) if cell.quantized else None,
        "eval": settings,
        "text_sha256": text_sha,
        "quantization_metadata_sha256": _sha256(cell.path / "quantization_metadata.json") if cell.quantized else None,
    }


def _same_key(stored: Any, key: dict[str, Any], cell: EvalCell) -> bool:
    """``stored == key``; for a float cell also when ``stored`` is an older key that still listed a backend."""
    if stored == key:
        return True
    if cell.quantized or not isinstance(stored, dict) or not isinstance(stored.get("eval"), dict):
        return False
    old = {**stored, "eval": {k: v for k, v in stored["eval"].items() if k != "backend"}}
    return old == key


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several :func:`evaluate_model` results of the same model."""

    out = copy.deepcopy(parts[0])
    for extra in parts[1:]:
        out["tasks"].update(extra["tasks"])
        out["data"].update(extra.get("data") or {})
        for k, v in (extra.get("wall_seconds") or {}).items():
            out["wall_seconds"][k] = round(out["wall_seconds"].get(k, 0.0) + v, 3)
    out["tasks"] = {t: out["tasks"][t] for t in TASKS if t in out["tasks"]}
    out["settings"]["tasks"] = list(out["tasks"])
    out["metrics"] = metric_rows(out)
    return out


def with_fp_baseline(results: dict[str, Any], fp_results: dict[str, Any] | None) -> dict[str, Any]:
    """``results`` with the float cell's values as baseline of every task measured without one."""

    out = copy.deepcopy(results)
    if not fp_results:
        return out
    injected = False
    for task, entry in out["tasks"].items():
        fp_entry = (fp_results.get("tasks") or {}).get(task)
        if "baseline" not in entry and isinstance(fp_entry, dict) and "model" in fp_entry:
            entry["baseline"] = fp_entry["model"]
            injected = True
    if injected and out.get("baseline") is None:
        out["baseline"] = fp_results.get("model")
    out["metrics"] = metric_rows(out)
    return out


def evaluate_cell(plan: Plan, cell: EvalCell, *, progress: bool = True) -> dict[str, Any] | None:
    """Run the cell's tasks (see the module docstring); None when there is nothing to run (fp with only kl)."""

    ev = plan.eval
    common: dict[str, Any] = {
        "limit": ev.limit,
        "text": ev.text,
        "data_dir": ev.data_dir,
        "seq_len": ev.seq_len,
        "windows": ev.windows,
        "batch_size": ev.batch_size,
        "backend": ev.backend,
        "device": plan.device,
        "trust_remote_code": plan.trust_remote_code,
        "task_options": ev.task_options or None,
        "progress": progress,
    }
    if cell.quantized and "kl" in ev.tasks:
        with_base = [t for t in ev.tasks if t in _WINDOW_TASKS]
    else:
        with_base = []
    alone = [t for t in ev.tasks if t not in with_base and (cell.quantized or t != "kl")]
    parts = []
    if with_base:
        parts.append(runner.evaluate_model(cell.path, baseline=cell.model.path, tasks=with_base, **common))
    if alone:
        parts.append(runner.evaluate_model(cell.path, tasks=alone, **common))
    return _merge(parts) if parts else None


@dataclass
class OrchestrateReport:
    """The outcome of :func:`orchestrate`: quantization and evaluation outcomes, result rows, files written."""

    plan: Plan
    quantize: list[CellOutcome] = field(default_factory=list)
    evaluate: list[CellOutcome] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.quantize + self.evaluate if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        def count(outs: list[CellOutcome], status: str) -> int:
            return sum(o.status == status for o in outs)

        lines = [
            f"quantize: {count(self.quantize, 'done')} made, {count(self.quantize, 'skipped')} already "
            f"complete, {count(self.quantize, 'failed')} failed",
            f"evaluate: {count(self.evaluate, 'done')} evaluated, {count(self.evaluate, 'skipped')} already "
            f"evaluated, {count(self.evaluate, 'failed')} failed",
        ]
        planned = count(self.quantize, "planned") + count(self.evaluate, "planned")
        if planned:
            lines.append(
                f"dry run: {count(self.quantize, 'planned')} to quantize, {count(self.evaluate, 'planned')} to evaluate"
            )
        lines += [f"  FAILED   {o.name}: {o.error}" for o in self.failed]
        lines += [f"wrote {p}" for p in self.files]
        if self.failed:
            lines.append("run the same plan again once the cause is fixed: finished cells are not redone")
        return "\n".join(lines)


def _evaluate_all(
    plan: Plan,
    state: RunState | None,
    text_sha: str | None,
    *,
    progress: bool,
    dry_run: bool,
    executor: Executor | None = None,
) -> list[CellOutcome]:
    """Evaluate every cell that has no current result on ``executor``; outcomes in plan order."""

    ex = executor if executor is not None else LocalExecutor()
    cells = eval_cells(plan)
    run_plan = dataclasses.replace(plan, device=ex.cell_device(plan.device))
    outcomes: dict[int, CellOutcome] = {}
    fp_results: dict[str, dict[str, Any] | None] = {}  # per model: the float cell's results, once known
    cards: dict[str, list[tuple[EvalCell, dict[str, Any]]]] = {}  # quantized results waiting for those
    jobs: list[Job] = []
    keys: dict[int, dict[str, Any]] = {}  # what each cell to evaluate is measured under
    later: dict[int, Callable[[], None]] = {}

    def record(i: int, status: str, error: str | None = None, seconds: float | None = None) -> None:
        """The cell's outcome; its state entry when it was evaluated (or found evaluated) or failed."""
        cell = cells[i]
        outcomes[i] = CellOutcome(cell.name, cell.path, status, seconds, error)
        prev = state.get("evaluate", cell.name) if state is not None else None
        if state is None or status == "planned" or (status == "skipped" and (prev or {}).get("status") == "done"):
            return
        path = str(cell.result_file(plan.output_dir)) if status != "failed" else None
        entry = {"status": "done" if status == "skipped" else status, "error": error, "seconds": seconds}
        write = functools.partial(state.record, "evaluate", cell.name, **entry, path=path, model=str(cell.path))
        if i in keys:
            write()
        else:
            later[i] = write  # needed no job: written in plan order among the results

    def update_cards(run: str) -> None:
        """Write the results table into the model cards of ``run``'s new outputs (float values as baseline)."""
        for cell, results in cards.pop(run, []):
            try:
                update_model_card_results(cell.path, with_fp_baseline(results, fp_results.get(run)))
            except (OSError, ValueError) as exc:
                logger.warning("%s: model card not updated: %s", cell.name, exc)

    for i, cell in enumerate(cells):
        where = f"[eval {i + 1}/{len(cells)}] {cell.name}"
        key = eval_key(plan, cell, text_sha)
        stored = load_cell(cell.result_file(plan.output_dir))
        if cell.quantized:
            # quantize_cells has just checked the files' hashes: their sizes suffice here
            qstatus, why = folder_state(cell.path, expected_settings(plan, cell.model, cell.spec), hashes=False)
            if qstatus != "complete":
                prev = state.get("quantize", cell.name) if state is not None else None
                reason = (prev or {}).get("error") or why or "its quantized folder does not exist"
                if dry_run:
                    record(i, "planned")
                    continue
                logger.error("%s: not evaluated: not quantized (%s)", where, reason)
                record(i, "failed", f"not quantized: {reason}")
                continue
        if stored is not None and _same_key(stored.get("key"), key, cell):
            logger.info("%s: already evaluated; skipped", where)
            if not cell.quantized:
                fp_results[cell.model.run_name] = stored.get("results")
            record(i, "skipped")
            continue
        if dry_run:
            record(i, "planned")
            continue
        if stored is not None:
            logger.info("%s: stored results were measured under other settings; evaluating again", where)
        describe = f"evaluating {cell.path} ({', '.join(plan.eval.tasks)})"
        kwargs = {"progress": progress and ex.interactive}
        jobs.append(Job(i, where, evaluate_cell, (run_plan, cell), kwargs, describe, gpus_for(plan.device)))
        keys[i] = key
    try:
        for job, res in in_plan_order(ex.run(jobs), jobs, later):
            cell, run = cells[job.index], cells[job.index].model.run_name
            secs = round(res.seconds, 3)
            if not res.ok:
                trace = f"\n{res.trace}" if res.trace else ""
                logger.error("%s: evaluation failed after %.1f s: %s%s", job.label, res.seconds, res.error, trace)
                if not cell.quantized:
                    fp_results[run] = None
                    update_cards(run)
                record(job.index, "failed", res.error, secs)
                continue
            results = res.value
            data = {"cell": cell.name, "key": keys[job.index], "evaluated_seconds": secs, "results": results}
            write_json_atomic(cell.result_file(plan.output_dir), data)
            if not cell.quantized:
                fp_results[run] = results
                update_cards(run)
            elif results is not None:
                cards.setdefault(run, []).append((cell, results))
                if run in fp_results:
                    update_cards(run)
            record(job.index, "done", None, secs)
    finally:  # outputs whose float cell never finished get their table without a baseline
        for run in list(cards):
            update_cards(run)
    return [outcomes[i] for i in sorted(outcomes)]


def orchestrate(
    plan: Plan | str | Path,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
    dry_run: bool = False,
    executor: Executor | str | None = None,
) -> OrchestrateReport:
    """Quantize, evaluate and report everything ``plan`` asks for; see the module docstring.

    ``output_dir`` overrides a plan file's. ``plots=False`` skips the PNGs. ``dry_run``: report what
    would be quantized and evaluated; change nothing. ``executor`` runs the cells
    (:mod:`awqkit.platform.executors`: ``"local"``, the default, or ``"ray"``, or an executor object).

    Raises:
        PlanError / FileNotFoundError: the plan, or the ppl/kl text is missing (checked before anything runs).
        FileExistsError: another run holds the output folder.
    """

    if not isinstance(plan, Plan):
        plan = load_plan(plan, output_dir=output_dir)
    elif output_dir is not None:
        raise ValueError("output_dir overrides a plan file's output_dir; for a Plan object set plan.output_dir")
    ex = as_executor(executor)
    text_sha = _text_sha(plan)
    report = OrchestrateReport(plan)
    if dry_run:
        report.quantize = quantize_cells(plan, None, progress=progress, dry_run=True)
        report.evaluate = _evaluate_all(plan, None, text_sha, progress=progress, dry_run=True)
        return report
    with run_lock(plan.output_dir), ex:
        recover_destinations(plan.cells())
        state = RunState(plan.output_dir / STATE_FILE, plan.source)
        report.quantize = quantize_cells(plan, state, progress=progress, executor=ex)
        report.evaluate = _evaluate_all(plan, state, text_sha, progress=progress, dry_run=False, executor=ex)
        report.rows, report.files = write_results(plan, state.data, eval_cells(plan), plots=plots)
    logger.info("%s", "; ".join(report.summary().splitlines()[:2]))
    return report


__all__ = [
    "EvalCell",
    "OrchestrateReport",
    "eval_cells",
    "eval_key",
    "evaluate_cell",
    "orchestrate",
    "with_fp_baseline",
]
