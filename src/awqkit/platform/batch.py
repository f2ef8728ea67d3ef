"""``awqkit batch PLAN``: quantize every (model, spec) pair of a plan, resumably.

The plan format is :mod:`awqkit.platform.plan` (shared with ``awqkit orchestrate``). Each pair (a *cell*)
is written to ``<output_dir>/<run name>_quantized`` with :func:`awqkit.api.quantize`.

* **Complete means complete** (:func:`folder_state`): a cell's folder is complete when it holds
  ``quantization_metadata.json`` and a ``quantization_config``, its weight files have the sizes and sha256
  recorded at the end of their write (:func:`awqkit.io.save.verify_files`), and its recorded settings
  equal the plan's for that cell (:func:`settings_mismatch`: the spec, which includes the method; for
  methods that calibrate, the calibration settings, the calibration file's sha256 and the search
  settings). A complete folder is skipped. An awqkit folder that is not complete (damaged, stale, made
  under other settings) is *redone*, replacing it, with a warning that says why. A folder under the final
  name that awqkit did not write (no ``quantization_metadata.json``) is reported as a failed cell and
  left alone (move it away to have the output made).
* **Interrupted runs**: before anything else each cell's destination is recovered
  (:func:`awqkit.io.destination.recover`): an interrupted replacement is finished or rolled back, staged
  folders of killed runs are removed.
* **Failures**: an exception while quantizing one cell is logged (with its traceback), recorded and the
  batch goes on; the report lists it at the end. ``KeyboardInterrupt`` stops the batch (what was finished
  stays finished). Rerunning the same plan redoes only the missing, stale and failed cells.
* **Where cells run** (:mod:`awqkit.platform.executors`): one after another in this process (``local``), or
  as Ray tasks, several at once (``ray``, :mod:`awqkit.platform.ray_executor`). Either way this process decides
  what to run from the folders and writes the state, so a run started by one executor is finished by the other.
* **State** (:data:`STATE_FILE` in ``output_dir``; rewritten atomically after every cell)::

      {"format_version": 1, "plan": "<plan file>", "updated": "<UTC time>",
       "quantize": {"<run name>": {"status": "done" | "failed", "error": null | "<Type: message>",
                                   "seconds": 12.3, "path": "<folder>", "model": "<source folder>",
                                   "spec": {...}, "reused": false, "finished": "<UTC time>"}},
       "evaluate": {...}}           # written by awqkit orchestrate

  The state is a record, not the source of truth: completeness is always read from the folders, so a
  lost or corrupt state file only loses history (a corrupt one is moved aside with a warning).
* **Lock**: ``.awqkit.lock`` in ``output_dir`` keeps two runs off the same folder (one would delete the
  other's temporary folders). A lock left by a process that no longer runs on this host is removed with
  a warning; otherwise the run stops with an error naming the holder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awqkit import api
from awqkit.config import SearchConfig, to_dict
from awqkit.files import sha256_file
from awqkit.io.destination import recover
from awqkit.io.detect import is_quantized_folder
from awqkit.io.save import verify_files
from awqkit.naming import quant_tag
from awqkit.platform.executors import Executor, Job, LocalExecutor, as_executor, gpus_for, in_plan_order
from awqkit.platform.plan import Cell, Plan, PlanModel, load_plan
from awqkit.platform.run_state import LOCK_FILE, STATE_FILE, RunState, run_lock
from awqkit.spec import QuantizationSpec, unalias_spec_keys

logger = logging.getLogger(__name__)


def expected_settings(plan: Plan, model: PlanModel, spec: QuantizationSpec) -> dict[str, Any]:
    """What the ``quantization_metadata.json`` of ``model`` quantized under ``spec`` must record for the cell to
    be current (see :func:`settings_mismatch`): the spec, and for methods that calibrate the calibration and
    search settings (``calib_config`` without the source path, the source file's sha256, ``search_config``)."""

    out: dict[str, Any] = {"spec": spec.to_dict()}
    if spec.method.calibrates:
        calib = to_dict(model.calib)
        source = calib.pop("source")
        out["calib_config"] = calib
        out["calibration_sha256"] = (
            None if source == "self" else (sha256_file(source) if Path(source).is_file() else f"missing file {source}")
        )
        out["search_config"] = to_dict(spec.method.search_config(plan.search))
    return out


def settings_mismatch(meta: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """The first recorded setting of ``meta`` that differs from ``expected`` (:func:`expected_settings`), or
    None when all agree."""
    spec = meta.get("spec")  # a folder written before a spec key's rename records the old name
    recorded: dict[str, Any] = {"spec": unalias_spec_keys(spec) if isinstance(spec, dict) else spec}
    if "calib_config" in expected:
        calib = meta.get("calib_config")
        recorded["calib_config"] = (
            {k: v for k, v in calib.items() if k != "source"} if isinstance(calib, dict) else None
        )
        raw_calibration = meta.get("calibration")
        calibration: dict[str, Any] = raw_calibration if isinstance(raw_calibration, dict) else {}
        recorded["calibration_sha256"] = calibration.get("sha256")
        search = meta.get("search_config")
        # a setting added after the folder was written is recorded at its default, which it then had
        recorded["search_config"] = {**to_dict(SearchConfig()), **search} if isinstance(search, dict) else search
    for key, want in expected.items():
        have = recorded.get(key)
        if have != want:
            if isinstance(have, dict) and isinstance(want, dict):
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                return f"its {key} differs from the plan's in {diff}"
            return f"its {key} is {have!r}, the plan asks for {want!r}"
    return None


def folder_state(
    folder: Path, expected: dict[str, Any] | None = None, *, hashes: bool = True
) -> tuple[str, str | None]:
    """``(status, why)`` of an output folder: ``missing``, ``complete``, ``stale`` (awqkit's, but damaged or
    made under other settings than ``expected``: redo it) or ``foreign`` (not awqkit's: never touched).

    ``hashes=False`` checks the weight files' sizes only (cheaper for large models)."""

    if not folder.exists() and not folder.is_symlink():
        return "missing", None
    if not folder.is_dir() or folder.is_symlink():
        return "foreign", f"{folder} exists and is not a folder"
    meta_file = folder / "quantization_metadata.json"
    if not meta_file.is_file():
        return "foreign", f"{folder} exists but is not an awqkit output (no quantization_metadata.json)"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        return "stale", f"{folder}: its quantization_metadata.json is unreadable"
    if not (folder / "config.json").is_file() or not is_quantized_folder(folder):
        return "stale", f"{folder}: its config.json has no quantization_config"
    damage = verify_files(folder, meta, hashes=hashes)
    if damage is not None:
        return "stale", f"{folder}: {damage}"
    if expected is not None:
        mismatch = settings_mismatch(meta, expected)
        if mismatch is not None:
            return "stale", f"{folder} was made under other settings: {mismatch}"
    return "complete", None


def recover_destinations(cells: list[Cell]) -> list[str]:
    """:func:`awqkit.io.destination.recover` for every cell's folder; returns what was done."""

    done: list[str] = []
    for cell in cells:
        done.extend(recover(cell.folder))
    return done


# ------------------------------------------------------------------------------------------- running
@dataclass
class CellOutcome:
    """What happened to one cell: ``status`` is done (made now), skipped (already complete), failed, or
    planned (``dry_run``)."""

    name: str
    folder: Path
    status: str
    seconds: float | None = None
    error: str | None = None

    def line(self) -> str:
        if self.status == "failed":
            return f"  FAILED   {self.folder.name}: {self.error}"
        if self.status == "done":
            return f"  done     {self.folder.name} ({self.seconds:.1f} s)"
        if self.status == "skipped":
            return f"  skipped  {self.folder.name} (complete)"
        return f"  planned  {self.folder.name}"


@dataclass
class BatchReport:
    """The outcome of :func:`run_batch`: one :class:`CellOutcome` per cell, in plan order."""

    plan: Plan
    outcomes: list[CellOutcome] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # what was finished or removed of interrupted runs

    def _with(self, status: str) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[CellOutcome]:
        return self._with("done")

    @property
    def skipped(self) -> list[CellOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[CellOutcome]:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        head = (
            f"batch: {len(self.done)} quantized, {len(self.skipped)} already complete, {len(self.failed)} "
            f"failed ({len(self.outcomes)} cells; output {self.plan.output_dir})"
        )
        planned = self._with("planned")
        if planned:
            head += f"; dry run: {len(planned)} to quantize"
        lines = [head, *(o.line() for o in self.outcomes)]
        if self.failed:
            lines.append(
                f"{len(self.failed)} failed; fix the cause and run the same plan again to make them "
                "(complete outputs are not redone)"
            )
        return "\n".join(lines)


def quantize_one(plan: Plan, cell: Cell, *, overwrite: bool, progress: bool) -> None:
    """Quantize one cell (what an executor runs, in this process or a worker): :func:`awqkit.api.quantize`,
    which first finishes or rolls back what a killed run left for the cell's folder, or continues from it."""
    api.quantize(
        cell.model.path,
        cell.folder,
        spec=cell.spec,
        calib=cell.model.calib,
        search=plan.search,
        device=plan.device,
        trust_remote_code=plan.trust_remote_code,
        progress=progress,
        overwrite=overwrite,
        base_model=cell.model.base_model_id,
    )


def quantize_cells(
    plan: Plan,
    state: RunState | None,
    *,
    progress: bool = True,
    dry_run: bool = False,
    executor: Executor | None = None,
) -> list[CellOutcome]:
    """Quantize every cell of ``plan`` that is not complete (caller holds the lock) on ``executor`` (default:
    one after another here); outcomes in plan order. See the module docstring."""

    ex = executor if executor is not None else LocalExecutor()
    cells = plan.cells()
    for spec in plan.specs:
        if not spec.method.quantizes:
            logger.info("spec %s is the float model: nothing to quantize (the source folder is used)", quant_tag(spec))
    run_plan = dataclasses.replace(plan, device=ex.cell_device(plan.device))
    outcomes: dict[int, CellOutcome] = {}
    jobs: list[Job] = []
    later: dict[int, Callable[[], None]] = {}  # state entries of cells that need no job, written in plan order

    def record(i: int, status: str, seconds: float | None = None, error: str | None = None, **extra: Any) -> None:
        """The cell's outcome; its state entry when it was made, found complete (``reused``) or failed."""
        cell = cells[i]
        outcomes[i] = CellOutcome(cell.name, cell.folder, status, seconds, error)
        if state is None or status == "planned":
            return
        secs = None if seconds is None else round(seconds, 3)
        common = {"path": str(cell.folder), "model": str(cell.model.path), "spec": cell.spec.to_dict()}
        saved = "done" if status == "skipped" else status
        write = functools.partial(
            state.record, "quantize", cell.name, status=saved, error=error, seconds=secs, **extra, **common
        )
        if any(j.index == i for j in jobs):
            write()
        else:
            later[i] = write

    for i, cell in enumerate(cells):
        where = f"[{i + 1}/{len(cells)}] {cell.folder.name}"
        status, why = folder_state(cell.folder, expected_settings(plan, cell.model, cell.spec))
        if status == "complete":
            logger.info("%s: complete; skipped", where)
            prev = state.get("quantize", cell.name) if state is not None else None
            if prev is not None and prev.get("status") == "done":
                outcomes[i] = CellOutcome(cell.name, cell.folder, "skipped")  # recorded already
            else:
                record(i, "skipped", reused=True)
            continue
        if status == "foreign":
            msg = f"{why}; awqkit does not replace it: move it away to have the output made"
            logger.error("%s: %s", where, msg)
            record(i, "failed", error=msg, reused=False)
            continue
        if status == "stale":
            logger.warning("%s: %s; it is made again", where, why)
        if dry_run:
            record(i, "planned")
            continue
        kwargs = {"overwrite": status == "stale", "progress": progress and ex.interactive}
        describe = f"quantizing {cell.model.path} with {cell.spec.describe()}"
        jobs.append(Job(i, where, quantize_one, (run_plan, cell), kwargs, describe, gpus_for(plan.device)))
    for job, res in in_plan_order(ex.run(jobs), jobs, later):
        if res.ok:
            record(job.index, "done", res.seconds, reused=False)
            continue
        trace = f"\n{res.trace}" if res.trace else ""
        logger.error("%s: failed after %.1f s: %s%s", job.label, res.seconds, res.error, trace)
        record(job.index, "failed", res.seconds, res.error, reused=False)
    return [outcomes[i] for i in sorted(outcomes)]


def run_batch(
    plan: Plan | str | Path,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    dry_run: bool = False,
    executor: Executor | str | None = None,
) -> BatchReport:
    """Quantize what ``plan`` (a :class:`~awqkit.platform.plan.Plan` or a plan file) asks for; see the module docstring.

    ``output_dir`` overrides the plan's (only with a plan file). ``dry_run``: report what would be done,
    change nothing (no lock, no clean-up, no state). ``executor`` runs the cells
    (:mod:`awqkit.platform.executors`: ``"local"``, the default, or ``"ray"``, or an executor object).

    Raises:
        PlanError / FileNotFoundError: the plan file. FileExistsError: another run holds the output folder.
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan, output_dir=output_dir)
    elif output_dir is not None:
        raise ValueError("output_dir overrides a plan file's output_dir; for a Plan object set plan.output_dir")
    ex = as_executor(executor)
    report = BatchReport(plan)
    if dry_run:
        report.outcomes = quantize_cells(plan, None, progress=progress, dry_run=True)
        return report
    with run_lock(plan.output_dir), ex:
        report.recovered = recover_destinations(plan.cells())
        state = RunState(plan.output_dir / STATE_FILE, plan.source)
        report.outcomes = quantize_cells(plan, state, progress=progress, executor=ex)
    logger.info("%s", report.summary().splitlines()[0])
    return report


__all__ = [
    "BatchReport",
    "CellOutcome",
    "LOCK_FILE",
    "RunState",
    "STATE_FILE",
    "expected_settings",
    "folder_state",
    "quantize_cells",
    "quantize_one",
    "recover_destinations",
    "run_batch",
    "run_lock",
    "settings_mismatch",
]
