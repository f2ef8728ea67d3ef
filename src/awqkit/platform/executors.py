"""Where the cells of ``awqkit batch`` / ``awqkit orchestrate`` run: one after another in this process
(``local``, :class:`awqkit.platform.jobs.LocalExecutor`), or as Ray tasks on a local instance or a cluster
(``ray``, :mod:`awqkit.platform.ray_executor`, which imports Ray only when it starts). The jobs, their results
and the protocol an executor follows are :mod:`awqkit.platform.jobs`.
"""

from __future__ import annotations

from awqkit.errors import InputError
from awqkit.platform.jobs import (
    Executor,
    Job,
    JobResult,
    LocalExecutor,
    error_text,
    gpus_for,
    in_plan_order,
    run_job,
)
from awqkit.platform.ray_executor import RayExecutor

EXECUTORS = ("local", "ray")


def make_executor(name: str = "local", *, address: str | None = None, cpus_per_cell: float = 1) -> Executor:
    """The executor called ``name`` (:data:`EXECUTORS`). For ``ray``: ``address`` of a cluster to join
    (default: ``RAY_ADDRESS``, else a local instance is started) and the CPUs each cell declares.

    Raises:
        InputError: an unknown name. MissingDependencyError: ``ray`` without Ray installed.
    """
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address, cpus_per_cell=cpus_per_cell)
    raise InputError(f"executor {name!r} is not known; choose one of {list(EXECUTORS)}")


def as_executor(executor: Executor | str | None) -> Executor:
    """``executor`` itself, or the one a name gives (:func:`make_executor` with its defaults)."""
    if executor is None:
        return LocalExecutor()
    return make_executor(executor) if isinstance(executor, str) else executor


__all__ = [
    "EXECUTORS",
    "Executor",
    "Job",
    "JobResult",
    "LocalExecutor",
    "as_executor",
    "error_text",
    "gpus_for",
    "in_plan_order",
    "make_executor",
    "run_job",
]
