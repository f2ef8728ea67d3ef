"""The jobs of ``awqkit batch`` / ``awqkit orchestrate`` and the local executor, which runs them one after another
in this process (the Ray executor, :mod:`awqkit.platform.ray_executor`, runs the same jobs as Ray tasks; the
choice between them is :mod:`awqkit.platform.executors`).

The campaign code (:func:`awqkit.platform.batch.quantize_cells`, :mod:`awqkit.platform.orchestrate`) decides
which cells to run from what is on disk, hands them to an executor as :class:`Job` objects and records each
:class:`JobResult` in the state file and the cell files itself, in this process. So the state, the per-cell
results and resuming are the same whatever ran the cells: a plan half done by one executor is finished by the
other without redoing finished cells. An executor only runs a job's function (the same function for both,
:func:`run_job`) and reports, as each finishes, its return value or its error.

An executor is a context manager: entering starts what it needs (Ray: joins a cluster or starts a local
instance), leaving stops what it started.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One cell to run: ``fn(*args, **kwargs)`` in whichever process the executor picks.

    ``index`` is the caller's (its cell's position); ``label`` names the cell in logs (``[2/6] <name>``) and
    ``describe`` says what runs (logged when the job starts or is submitted). ``num_gpus``: what the cell
    needs besides CPUs (1 for a CUDA plan device); its CPUs are the executor's ``cpus_per_cell``."""

    index: int
    label: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    describe: str = ""
    num_gpus: float = 0.0


@dataclass(frozen=True)
class JobResult:
    """What a job gave: its return ``value``, or ``error`` (``"Type: message"``) with the ``trace`` text;
    ``seconds`` is the time the function ran (in the worker, for Ray)."""

    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    trace: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def error_text(exc: BaseException) -> str:
    """``"Type: message"``, the form the state file and the reports give an error in."""
    return f"{type(exc).__name__}: {exc}"


def run_job(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    reraise: tuple[type[BaseException], ...] = (),
) -> JobResult:
    """Run one job and time it; an ``Exception`` becomes the result's ``error`` (one failed cell must not stop
    the campaign). ``reraise``: exception types that propagate instead (Ray retries those); anything that is not
    an ``Exception`` (``KeyboardInterrupt``) always propagates."""

    t0 = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    except reraise:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded as the cell's failure
        return JobResult(None, error_text(exc), time.perf_counter() - t0, traceback.format_exc())
    return JobResult(value, None, time.perf_counter() - t0)


def in_plan_order(
    results: Iterable[tuple[Job, JobResult]], jobs: Iterable[Job], later: dict[int, Callable[[], None]]
) -> Iterator[tuple[Job, JobResult]]:
    """``results`` as they come; between them, ``later[i]`` (writing down cell ``i``, which needed no job: found
    complete, refused) is called once every job of a cell before ``i`` has finished. So with the local executor
    the state file gets its entries in plan order, as the loop it replaces wrote them."""

    waiting = {j.index for j in jobs}

    def flush() -> None:
        bound = min(waiting, default=None)
        for i in sorted(k for k in later if bound is None or k < bound):
            later.pop(i)()

    flush()
    for job, res in results:
        waiting.discard(job.index)
        yield job, res
        flush()


def gpus_for(device: str) -> float:
    """The GPUs a cell on ``device`` (a plan's ``device``) needs: 1 for CUDA, else 0."""
    return 1.0 if device.split(":")[0] == "cuda" else 0.0


class Executor(Protocol):
    """Runs jobs; see the module docstring."""

    name: str
    #: whether the cells may draw progress bars (one at a time on this terminal)
    interactive: bool

    def __enter__(self) -> Executor: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        """Run ``jobs``; yield each with its result as it finishes (any order). ``KeyboardInterrupt`` stops
        the jobs still running and propagates."""
        ...

    def cell_device(self, device: str) -> str:
        """The plan's ``device`` as a cell sees it where this executor runs it."""
        ...


class LocalExecutor:
    """Today's loop: each job in turn, in this process (a job starts when the caller asks for the next result)."""

    name = "local"
    interactive = True

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        for job in jobs:
            if job.describe:
                logger.info("%s: %s", job.label, job.describe)
            yield job, run_job(job.fn, job.args, job.kwargs)

    def cell_device(self, device: str) -> str:
        return device


__all__ = [
    "Executor",
    "Job",
    "JobResult",
    "LocalExecutor",
    "error_text",
    "gpus_for",
    "in_plan_order",
    "run_job",
]
