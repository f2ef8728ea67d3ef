"""awqkit.heap: with glibc's mmap threshold fixed, a freed large tensor leaves the process at once; with glibc's
dynamic threshold (the default) the same tensor stays in the heap after it is freed (what grew SmolLM2's peak RSS
layer after layer). Each case runs in a fresh interpreter so the process-wide setting does not leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from awqkit import heap

CHILD = r"""
import json, sys, torch
from awqkit import heap
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
applied = heap.bound_heap() if sys.argv[1] == "bound" else False
keep = []
for _ in range(3):  # the first free of a mapped block raises glibc's dynamic threshold to its size
    big = torch.ones(4 << 20)  # 16 MiB, touched
    keep.append(torch.ones(1000))  # small live blocks above it in the heap
    del big
before = rss()
big = torch.ones(4 << 20)
keep.append(torch.ones(1000))
del big
print(json.dumps({"applied": applied, "grew": rss() - before}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env={**clean, **env}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap._LIBC is None or not os.path.exists("/proc/self/status"), reason="glibc on Linux only")
def test_bounded_heap_returns_freed_tensors_and_the_default_keeps_them() -> None:
    bounded, default = _run("bound"), _run("default")
    assert bounded["applied"] is True
    assert bounded["grew"] < 4 << 20, bounded  # the 16 MiB tensor went back to the system when freed
    assert default["grew"] > 12 << 20, default  # glibc's default kept it: the test is not vacuous
    # the user's own glibc setting wins: bound_heap leaves the allocator alone
    assert _run("bound", MALLOC_MMAP_THRESHOLD_="1048576")["applied"] is False


def test_bound_heap_rejects_a_negative_threshold() -> None:
    if heap._LIBC is None:
        pytest.skip("glibc only")
    saved = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    try:
        with pytest.raises(ValueError, match="must be >= 0"):
            heap.bound_heap(-1)
    finally:
        if saved is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
