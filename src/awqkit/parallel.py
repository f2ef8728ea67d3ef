"""Data-parallel AWQ over ``torch.distributed`` ranks (launched by ``torchrun``).

Every rank runs the same layer loop on its share of the calibration batches: global batch ``b`` belongs to
rank ``b % world`` (round robin, so the search batches, the first ones, are spread too). What a choice depends
on is then made equal on every rank:

* sums over tokens (per-channel mean |x| counts, Gram matrices and their diagonal blocks) are all-reduced;
* token samples (the clip search's, and the merged sample position-wise modules are scored on) are gathered
  and put in global batch order, so every rank holds exactly the sample a single process would;
* the scoring losses (sums of squared errors and element counts) are all-reduced.

Every rank therefore computes the same losses and chooses the same scales and clips; only the order of the
float64 sums differs from a single process (see ``tests/integration/test_distributed.py`` for what is equal).
Rank 0 writes the output; the other ranks read the source and compute, and write nothing.

:class:`DataParallel` with ``world == 1`` (:data:`SINGLE`) makes every operation a no-op: the single-process
path is the same code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataParallel:
    """This process's rank among ``world`` data-parallel ranks (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1
    # torch.distributed's collective library ("backend" in torch's words; awqkit keeps that word for kernels):
    # "gloo" (CPU tensors) or "nccl" (CUDA tensors) when world > 1
    transport: str = "none"

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """The rank that writes the output (rank 0)."""
        return self.rank == 0

    def owns(self, batch: int) -> bool:
        """Whether global calibration batch ``batch`` is processed here."""
        return batch % self.world == self.rank

    def batches(self, n_batches: int) -> list[int]:
        """The global indices of this rank's batches among ``n_batches``."""
        return [b for b in range(n_batches) if self.owns(b)]

    def _comm_device(self) -> torch.device:
        if self.transport == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (a new tensor on ``t``'s device; ``t`` itself when single)."""
        if not self.active:
            return t
        import torch.distributed as dist

        buf = t.detach().to(self._comm_device()).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (float64)."""
        if not self.active:
            return list(values)
        return self.all_reduce(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (tensors should be on CPU)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_in_batch_order(self, batches: list[int], items: list[Any]) -> tuple[list[int], list[Any]]:
        """Every rank's ``items`` (item ``j`` from global batch ``batches[j]``) merged and sorted by batch (stable
        within a batch): the lists a single process would have built, as ``(batches, items)``."""
        if not self.active:
            return batches, items
        merged = sorted(
            (pair for part in self.gather(list(zip(batches, items, strict=True))) for pair in part), key=lambda p: p[0]
        )
        return [b for b, _ in merged], [x for _, x in merged]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


SINGLE = DataParallel()


def current() -> DataParallel:
    """The data-parallel group of this process: the default ``torch.distributed`` group when one is initialised
    (world > 1), else :data:`SINGLE`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return DataParallel(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (or another launcher setting its environment) started this process in a group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str | torch.device) -> DataParallel:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...): NCCL when
    ``device`` is a CUDA device, else gloo. Returns :data:`SINGLE` when not launched in a group."""
    import torch.distributed as dist

    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        dev = torch.device(device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return current()


def rank_device(device: str) -> str:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank); anything else is
    returned unchanged."""
    if launched_by_torchrun() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


__all__ = ["SINGLE", "DataParallel", "current", "init_from_env", "launched_by_torchrun", "rank_device"]
