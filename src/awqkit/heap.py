"""The C heap during a long layer loop: glibc's allocator settings and trimming (Linux; a no-op elsewhere).

Each decoder layer allocates and frees hundreds of MB of tensors whose sizes change from mapping to mapping (search
copies of the weights, candidates' activations, token samples). glibc serves a request from its heap unless it is
at least ``M_MMAP_THRESHOLD`` bytes; that threshold starts at 128 KiB and rises to 32 MiB as large blocks are freed,
so after a few layers every tensor under 32 MiB lives in the heap, where freed space fragments: on SmolLM2-135M
(w4 g64, 32 x 512 calibration tokens) peak RSS grew by ~8 MB a layer, from 1.00 GB at layer 15 to 1.10 GB at the
end, even with ``malloc_trim`` after every layer. Fixing the threshold at 4 MiB (:func:`bound_heap`) gives
every tensor of 4 MiB and more its own mapping, returned to the system when it is freed: the same run peaks at
0.81 GB and stays flat, for +4.6 % CPU time (page faults: 118 s of system time against 24 s). A 256 KiB threshold
kept the memory too but spent 381 s in the kernel. Measurements: BENCHMARKS.md ("Engine"). torch exposes neither
control on CPU, hence ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # the mallopt parameter number in glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 4 << 20


def _glibc() -> Any:
    """glibc as a ctypes library, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None


_LIBC = _glibc()


def bound_heap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations of ``threshold`` bytes and more from their own mappings (glibc ``mallopt``).

    Process-wide and kept afterwards (glibc cannot return to its dynamic threshold). Not applied when the
    environment sets ``MALLOC_MMAP_THRESHOLD_`` (glibc's own variable: the user's choice wins) or off glibc.
    Returns whether it was applied.
    """
    if _LIBC is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if threshold < 0:
        raise ValueError(f"bound_heap: threshold={threshold} must be >= 0 bytes")
    ok = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    if ok:
        logger.debug("glibc: allocations of %d bytes and more are mapped and returned when freed", threshold)
    return ok


def release_free_memory() -> None:
    """Collect Python garbage and give the heap's free pages back to the system (``malloc_trim(0)``)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


__all__ = ["MMAP_THRESHOLD_BYTES", "bound_heap", "release_free_memory"]
