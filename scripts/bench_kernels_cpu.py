"""Time one linear call on CPU: fp32 ``nn.Linear`` vs the ``torch`` reference backend vs ``cpu-int4``.

Shapes are SmolLM2-135M's linears, ``(K, N) = (in, out)``: attention q/o (576, 576), k/v (576, 192),
MLP gate/up (576, 1536), down (1536, 576); 4-bit, group 64; batch (tokens) 1 and 8. Each cell is the
median over ``--repeats`` samples of the mean of ``--inner`` back-to-back calls, after ``--warmup`` calls
(so a scheduler time slice stolen by another process spoils one sample, not the median). Timings on a
shared machine are noisy; compare columns within one run.

Columns: ``linear`` fp32 nn.Linear; ``torch`` QuantLinear with backend="torch" (unpack + dequantize +
matmul per call); ``cpu-int4`` QuantLinear with backend="cpu-int4" (default bf16 compute, weights
converted once before timing); with ``--fp32-exact`` also ``int4-fp32`` (cpu-int4 in its fp32 compute
mode, the scalar kernel).

Usage: python scripts/bench_kernels_cpu.py [--threads 2] [--repeats 25] [--inner 5] [--fp32-exact]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from awqkit.kernels import cpu_int4
from awqkit.nn.qlinear import QuantLinear

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
BATCHES = [1, 8]
GROUP_SIZE = 64


def median_us(fn: Callable[[], object], warmup: int, repeats: int, inner: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--fp32-exact", action="store_true", help="also time cpu-int4 with fp32 compute (slow)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not cpu_int4.is_available():
        raise SystemExit("cpu-int4 is not available in this torch build")
    cols = ["linear", "torch", "cpu-int4"] + (["int4-fp32"] if a.fp32_exact else [])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, group {GROUP_SIZE}; median us per call "
        f"({a.repeats} samples x {a.inner} calls, {a.warmup} warm-up)"
    )
    print(f"{'K':>5} {'N':>5} {'M':>3} " + " ".join(f"{c:>10}" for c in cols) + f" {'torch/int4':>10} {'int4/lin':>9}")
    torch.manual_seed(0)
    for k, n in SHAPES:
        lin = nn.Linear(k, n, bias=False)
        ql = QuantLinear.from_linear(lin, 4, GROUP_SIZE)
        for m in BATCHES:
            x = torch.randn(m, k)
            res = {}
            with torch.inference_mode():
                res["linear"] = median_us(lambda lin=lin, x=x: lin(x), a.warmup, a.repeats, a.inner)
                ql.backend = "torch"
                res["torch"] = median_us(lambda ql=ql, x=x: ql(x), a.warmup, a.repeats, a.inner)
                ql.backend = "cpu-int4"
                cpu_int4.prepare_module(ql, torch.bfloat16)
                res["cpu-int4"] = median_us(lambda ql=ql, x=x: ql(x), a.warmup, a.repeats, a.inner)
                if a.fp32_exact:
                    cpu_int4.prepare_module(ql, torch.float32)
                    res["int4-fp32"] = median_us(lambda ql=ql, x=x: ql(x), a.warmup, a.repeats, a.inner)
                    cpu_int4.prepare_module(ql, torch.bfloat16)
            print(
                f"{k:>5} {n:>5} {m:>3} "
                + " ".join(f"{res[c]:>10.1f}" for c in cols)
                + f" {res['torch'] / res['cpu-int4']:>9.1f}x {res['cpu-int4'] / res['linear']:>8.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
