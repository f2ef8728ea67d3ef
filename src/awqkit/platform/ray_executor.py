"""``--executor ray``: each cell of ``awqkit batch`` / ``awqkit orchestrate`` is a Ray task.

* **Cluster**: ``address`` (``--ray-address``), else the ``RAY_ADDRESS`` environment variable, names a cluster
  to join (``"auto"``: the one started on this machine with ``ray start``); without either a local instance is
  started with every CPU of the machine. A Ray this process already joined (``ray.init`` called before) is used
  as it is. Only a Ray the executor started is shut down when it is done.
* **Needs**: every task declares ``num_cpus=cpus_per_cell`` (``--cpus-per-cell``; Ray sets the task's
  ``OMP_NUM_THREADS``, so torch uses that many threads) and ``num_gpus=1`` when the plan's device is CUDA (the
  cell then runs on the GPU Ray gives it: ``cuda:N`` becomes ``cuda``). A local instance too small for one
  cell is an error up front; a joined cluster only gets a warning (it may be autoscaling).
* **Files**: the tasks read the models and write the outputs where the plan says; the state file and the
  per-cell result files are written by this process only. On a cluster of several machines the plan's
  folders must be on a file system every node mounts at the same path, and awqkit installed on every node.
* **Failures**: an exception in a cell is that cell's failure, as with the local executor (the rest go on; a
  rerun redoes it). A worker that dies (killed, out of memory, node lost) is retried up to ``max_retries``
  times, as are :data:`RETRYABLE` exceptions (memory that another cell may have held); a cell killed while
  writing leaves a staged folder that the retry continues from or removes (:func:`awqkit.io.destination.recover`),
  so an output appears once, complete. (A staged folder left by a worker killed on *another* machine stays:
  whether its process is gone cannot be told from here.) ``KeyboardInterrupt`` cancels the tasks still queued
  or running.
* **Logs**: the workers log through ``logging`` at this process's ``awqkit`` level (Ray forwards their output);
  progress bars are off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import torch

from awqkit.calib.rows import MissingDependencyError
from awqkit.errors import InputError
from awqkit.platform.jobs import Job, JobResult, error_text, run_job

logger = logging.getLogger(__name__)

#: exceptions a retry may not meet again (the memory another cell on the machine held): Ray retries them
RETRYABLE: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError)
INSTALL = "pip install 'awqkit[ray]'"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            f"--executor ray needs the 'ray' package, which is not installed: {INSTALL}"
        ) from None
    return ray


def _in_worker(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], log_level: int) -> JobResult:
    """The Ray task: the job under :func:`~awqkit.platform.executors.run_job`, logging as the driver does."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("awqkit").setLevel(log_level)
    return run_job(fn, args, kwargs, reraise=RETRYABLE)


class RayExecutor:
    """Runs each job as a Ray task; see the module docstring."""

    name = "ray"
    interactive = False

    def __init__(
        self,
        *,
        address: str | None = None,
        cpus_per_cell: float = 1,
        max_retries: int = 3,
        num_cpus: int | None = None,
    ) -> None:
        """``num_cpus``: the CPUs of a local instance (default: all). Raises MissingDependencyError without Ray."""
        self._ray = _import_ray()
        if not cpus_per_cell > 0:
            raise InputError(f"--cpus-per-cell must be positive (got {cpus_per_cell})")
        if max_retries < 0:
            raise InputError(f"max_retries must be >= 0 (got {max_retries})")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_cell = cpus_per_cell
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self._started = False  # this executor started the Ray instance (so it shuts it down)
        self._ready = False
        self._task: Any = None

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Join the cluster, start a local instance, or use the Ray this process already joined."""
        if self._ready:
            return
        ray = self._ray
        if ray.is_initialized():
            logger.info("running the cells on the Ray instance this process already joined")
        elif self.address:
            logger.info("joining the Ray cluster at %s", self.address)
            ray.init(address=self.address)
        else:
            logger.info("starting a local Ray instance")
            ray.init(num_cpus=self.num_cpus)
            self._started = True
        self._ready = True
        cpus = ray.cluster_resources().get("CPU", 0)
        if self.cpus_per_cell > cpus:
            self._short(f"--cpus-per-cell {self.cpus_per_cell:g}, but the Ray cluster has {cpus:g} CPUs")

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._started:
            logger.info("stopping the local Ray instance")
            self._ray.shutdown()
        self._started = self._ready = False
        self._task = None

    def _short(self, what: str) -> None:
        """A cell needs more than the cluster has: an error on a local instance, a warning on a joined cluster."""
        if self._started:
            self.close()
            raise InputError(f"a cell needs {what}; lower --cpus-per-cell or join a larger cluster (--ray-address)")
        logger.warning("a cell needs %s: its tasks wait until the cluster has room (if it is autoscaling)", what)

    # ------------------------------------------------------------------ running
    def cell_device(self, device: str) -> str:
        """``cuda:N`` -> ``cuda``: a task sees only the GPU Ray gave it."""
        return device.split(":")[0] if device.startswith("cuda") else device

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        """Submit every job at once; yield each as it finishes. Leaving early (an exception, ``KeyboardInterrupt``)
        cancels the tasks still queued or running."""
        ray = self._ray
        todo = list(jobs)
        if not todo:
            return
        self.start()
        gpus = max(j.num_gpus for j in todo)
        if gpus > ray.cluster_resources().get("GPU", 0):
            self._short(f"{gpus:g} GPU(s), but the Ray cluster has {ray.cluster_resources().get('GPU', 0):g}")
        if self._task is None:
            self._task = ray.remote(_in_worker)
        level = logging.getLogger("awqkit").getEffectiveLevel()
        pending: dict[Any, tuple[Job, float]] = {}
        try:
            for job in todo:
                ref = self._task.options(
                    num_cpus=self.cpus_per_cell,
                    num_gpus=job.num_gpus,
                    max_retries=self.max_retries,
                    retry_exceptions=list(RETRYABLE),
                    name=job.label,
                ).remote(job.fn, job.args, job.kwargs, level)
                pending[ref] = (job, time.perf_counter())
                logger.info("%s: %s (submitted to Ray)", job.label, job.describe or "queued")
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout: Ctrl-C gets through
                for ref in done:
                    job, t0 = pending.pop(ref)
                    yield job, self._result(ref, t0)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _result(self, ref: Any, t0: float) -> JobResult:
        """The task's :class:`JobResult`, or one made of the error Ray raised once the retries were spent."""
        ray = self._ray
        try:
            result: JobResult = ray.get(ref)
            return result
        except ray.exceptions.RayTaskError as exc:  # a RETRYABLE exception, every try
            cause = exc.cause
            text = error_text(cause) if cause is not None else str(exc).splitlines()[0]
            return JobResult(None, text, time.perf_counter() - t0, str(exc))
        except ray.exceptions.RayError as exc:  # the worker died on every try, the node was lost, cancelled
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return JobResult(None, f"{type(exc).__name__}: {first}", time.perf_counter() - t0, str(exc))


__all__ = ["INSTALL", "RETRYABLE", "RayExecutor"]
