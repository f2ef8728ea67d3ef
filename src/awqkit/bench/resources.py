"""Resource measurements for benchmarks: memory (RSS), disk size, parameter size and wall time."""

from __future__ import annotations

import logging
import os
import resource
import stat
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from torch import nn

logger = logging.getLogger(__name__)

try:  # psutil is optional (dev extra); /proc/self/statm is the fallback on Linux.
    import psutil as _psutil
except ImportError:  # pragma: no cover - depends on the environment
    _psutil = None

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``getrusage`` ``ru_maxrss``).

    Linux reports ``ru_maxrss`` in KiB, macOS in bytes. Linux computes it from approximate per-CPU RSS
    counters, so it can trail the exact current RSS by a few hundred KiB: the result is at least that.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024
    try:
        return max(peak, current_rss_bytes())
    except RuntimeError:
        return peak


def current_rss_bytes() -> int:
    """Current resident set size of this process, in bytes (psutil, else ``/proc/self/statm``).

    Raises:
        RuntimeError: if neither psutil nor ``/proc/self/statm`` is available.
    """
    if _psutil is not None:
        return int(_psutil.Process().memory_info().rss)
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            fields = fh.read().split()
    except OSError as err:
        raise RuntimeError("cannot read the RSS: install psutil or run on Linux") from err
    return int(fields[1]) * _PAGE_SIZE


class PeakRSSTracker:
    """Context manager sampling the RSS in a background thread; see :func:`track_peak_rss`.

    Attributes:
        start: RSS in bytes when the block was entered.
        peak: highest RSS in bytes sampled so far (including on entry and exit).
        interval: seconds between samples.
    """

    def __init__(self, interval: float = 0.05) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta(self) -> int:
        """Peak RSS above the RSS on entry, in bytes."""
        return self.peak - self.start

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if rss > self.peak:
            self.peak = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSSTracker:
        self.start = current_rss_bytes()
        self.peak = self.start
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="awqkit-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()


def track_peak_rss(interval: float = 0.05) -> PeakRSSTracker:
    """Track the peak RSS of a block by sampling every ``interval`` seconds (default 50 ms).

    Example::

        with track_peak_rss() as mem:
            run()
        print(mem.peak, mem.delta)

    Short spikes between samples can be missed; :func:`peak_rss_bytes` gives the process-wide peak.
    """
    return PeakRSSTracker(interval)


def folder_size_bytes(path: Path | str) -> int:
    """Total size in bytes of the regular files under ``path`` (recursively; a file gives its size).

    Symlinks to files count with their target's size (as in a Hugging Face cache snapshot);
    symlinked folders are not descended into.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(p):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:  # dangling symlink
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def fp16_size_bytes(model: nn.Module) -> int:
    """Size in bytes of ``model``'s parameters stored as fp16: unique parameter elements x 2.

    Parameters sharing memory (tied embeddings, even as distinct ``Parameter`` objects) are counted
    once, keyed by device and ``data_ptr``; buffers are not counted.
    """
    seen: set[tuple[str, int]] = set()
    n_elements = 0
    for param in model.parameters(recurse=True):
        ptr = param.data_ptr()
        key = (str(param.device), ptr if ptr != 0 else id(param))  # meta tensors report 0
        if key in seen:
            continue
        seen.add(key)
        n_elements += param.numel()
    return 2 * n_elements


class Timer:
    """Wall-clock timer (``time.perf_counter``) as a context manager.

    ``seconds`` is the elapsed time: running while inside the block, fixed after it ends.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._end: float | None = None

    @property
    def seconds(self) -> float:
        """Elapsed seconds (0.0 before the block is entered)."""
        if self._start is None:
            return 0.0
        end = self._end if self._end is not None else time.perf_counter()
        return end - self._start

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self._end = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end = time.perf_counter()


def process_peak_rss_bytes() -> int:
    """Peak RSS of this process image: ``VmHWM`` of ``/proc/self/status`` where it exists, else
    :func:`~awqkit.bench.resources.peak_rss_bytes`. Not ``ru_maxrss`` alone: Linux carries a child's
    ``ru_maxrss`` over from its parent's RSS at ``fork`` (and across ``exec``), so a subprocess started by a
    parent holding a model would report the parent's memory; ``VmHWM`` starts afresh with the new image."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            hwm = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")), None)
    except OSError:
        hwm = None
    if hwm is None:
        return peak_rss_bytes()
    return max(hwm, current_rss_bytes())
