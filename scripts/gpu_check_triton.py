"""Check and time the ``triton`` W4A16 backend on a CUDA GPU, in one go (no hub, no data).

Sections, in this order (each guarded: an error is recorded and the script goes on; exit status 1 if any check FAILs):

1. ``correctness``: ``triton_w4a16.w4a16_matmul`` (autotuned configs, as ``auto`` would run it) on CUDA
   in fp16 (and bf16 for two shapes) against an fp32 reference ``x.float() @ W + b``, ``W`` dequantized
   from the same packed tensors by awqkit's torch code, for several shapes, group sizes 32/64/128/-1,
   symmetric and asymmetric, with and without bias. Prints max abs error, max relative error (max abs
   error over max |ref|) and the worst ratio to the bound ``2 u (|x| @ |W| + |y|) + 2 (K+2) 2^-24 (|x| @ |W|
   + |b|)`` (``u`` the unit roundoff of the activation dtype: the kernel rounds each weight and the output
   once, and accumulates in fp32); PASS when every element is within the bound. The torch reference
   backend (cuBLAS fp16 with the dequantized weight) is printed beside it for scale. Also checks that
   ``QuantLinear(backend="auto")`` resolves to ``triton`` on CUDA.
2. ``timings``: the linears of a 7B model (K x N = 4096x4096, 4096x11008, 11008x4096; group 128; batch
   M = 1 and 16): the triton kernel (autotuned once per shape, before timing) against fp16
   ``torch.matmul(x, W)`` with the dequantized weight ``W [K, N]``. Each timed call reads a cold copy
   of its weight (copies cycled, together 4x the L2; see ``Timer``). Two columns each: ``graph`` (one
   call per copy captured in a CUDA graph, replayed ``--reps`` (>= 50) times; median per-call device
   time, what a decode loop under CUDA graphs pays) and ``eager`` (median of plain Python calls between
   CUDA events: also pays host launch cost where it exceeds the GPU work; the triton path is two
   launches plus Python checks when it splits K).
   Also prints effective GB/s (bytes of the packed weight, scales, zeros, x and y over the graph time).
3. ``unpack``: the three unpack modes x (GEMV split-K, 16-row split-K, 64-row) configs, same check.
4. ``variants`` (if time is left): each 7B cell's tuned block shape with unpack ``shift3d``/``join`` and
   ``magic`` off/on (int -> float by mantissa OR instead of a convert instruction).

Output: the tables on stdout; JSON (everything, including the tuned configs) to ``--out``, default
``$OUT/triton_gpu.json`` when ``OUT`` is set, else ``triton_gpu.json``. Meant to finish in well under
4 minutes on an H100 (Triton compiles ~40 kernel variants on first use; sections stop early once
``--budget-s`` is spent).

``--dry-run``: runs every section on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``) with
tiny shapes and 3 timing reps (host clock, since there are no CUDA events), to check that the script
executes; its numbers mean nothing.

Usage: PYTHONPATH=src python3 scripts/gpu_check_triton.py [--out PATH] [--reps 100] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

if "--dry-run" in sys.argv:  # before triton is imported anywhere (the kernels would not need it, but be plain)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["AWQKIT_TRITON_AUTOTUNE"] = "0"

try:
    import awqkit  # noqa: F401
except ImportError:  # run from a checkout without installing: use ../src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from awqkit import kernels  # noqa: E402
from awqkit.kernels import torch_ref  # noqa: E402
from awqkit.kernels import triton_w4a16 as tw  # noqa: E402
from awqkit.nn.qlinear import QuantLinear  # noqa: E402
from awqkit.quant.packing import pack_gemm  # noqa: E402

U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: U32}
FAILS: list[str] = []


# --------------------------------------------------------------------------- problem construction
def make_packed(K: int, N: int, group_size: int, zero_point: bool, device: str, seed: int):
    """Random 4-bit weights packed by awqkit: ``(qweight, qzeros, scales fp16)``; ``W`` has std ~ 1/sqrt(K)."""
    g = K if group_size == -1 else group_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int32)
    if zero_point:
        zeros = torch.randint(0, 16, (N, K // g), generator=gen, dtype=torch.int32)
    else:
        zeros = torch.full((N, K // g), 8, dtype=torch.int32)
    scales = (0.5 + torch.rand(N, K // g, generator=gen)) / (6.0 * K**0.5)
    qweight, qzeros, sc = pack_gemm(q.to(device), zeros.to(device), scales.to(device))
    return qweight, qzeros, sc


def dequant_t(qweight, qzeros, scales) -> torch.Tensor:
    """fp32 ``W [K, N]`` through awqkit's torch reference code (independent of the kernel)."""
    return torch_ref.dequantize_gemm_t(qweight, qzeros, scales)


def check(y: torch.Tensor, x: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """Errors of ``y`` against the fp32 reference, and the worst ratio to the rounding bound."""
    x32 = x.float()
    ref = x32 @ w32
    babs = 0.0
    if bias is not None:
        ref = ref + bias.float()
        babs = bias.float().abs()
    mag = x32.abs() @ w32.abs()
    u = UNIT_ROUNDOFF[y.dtype]
    tol = 2 * u * (mag + ref.abs()) + 2 * (x.shape[1] + 2) * U32 * (mag + babs) + 1e-6
    err = (y.float() - ref).abs()
    finite = bool(torch.isfinite(y).all())
    return {
        "max_abs": float(err.max()) if err.numel() else 0.0,
        "max_rel": float(err.max() / ref.abs().max().clamp_min(1e-30)) if err.numel() else 0.0,
        "norm_rel": float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)),
        "worst_err_over_bound": float((err / tol).max()) if err.numel() else 0.0,
        "pass": finite and bool((err <= tol).all()),
    }


# --------------------------------------------------------------------------- timing
class Timer:
    """Per-call time (us, median over ``reps`` samples) of calls that each read a *cold* weight copy.

    ``time(make_call, n_copies)``: ``make_call(i)`` returns a no-argument call using weight copy ``i``;
    the copies together exceed the L2 several times, and the calls cycle through them, so every call
    streams its weight from HBM as in a real forward pass (no flush kernel: zeroing a flush buffer
    leaves dirty L2 lines whose write-back slows the timed reads). ``graph``: one CUDA graph holding
    one call per copy, replayed ``reps`` times between CUDA events, time / n_copies (device time; host
    cost hidden). ``eager``: plain calls with CUDA events around each (host launch cost shows where it
    exceeds the GPU time of the call before). Under ``--dry-run``: the host clock for both."""

    def __init__(self, device: str, reps: int, warmup: int) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, make_call, n_copies: int) -> dict:
        calls = [make_call(i) for i in range(n_copies)]
        for i in range(max(self.warmup, n_copies)):
            calls[i % n_copies]()
        if self.device != "cuda":
            samples = []
            for r in range(self.reps):
                t0 = time.perf_counter()
                calls[r % n_copies]()
                samples.append((time.perf_counter() - t0) * 1e6)
            t = statistics.median(samples)
            return {"graph": t, "eager": t}
        torch.cuda.synchronize()
        res = {}
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            graph.replay()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
            for s, e in zip(starts, ends, strict=True):
                s.record()
                graph.replay()
                e.record()
            torch.cuda.synchronize()
            res["graph"] = statistics.median(
                s.elapsed_time(e) * 1e3 / n_copies for s, e in zip(starts, ends, strict=True)
            )
            del graph
        except Exception as exc:
            res["graph_error"] = repr(exc)
            res["graph"] = float("nan")
        reps = max(self.reps, 2 * n_copies)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r, (s, e) in enumerate(zip(starts, ends, strict=True)):
            s.record()
            calls[r % n_copies]()
            e.record()
        torch.cuda.synchronize()
        res["eager"] = statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True))
        return res


def n_copies_for(nbytes: int, device: str) -> int:
    """Enough copies of an ``nbytes`` weight to exceed the L2 about four times (at least 2)."""
    if device != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 * 2**20) or 64 * 2**20
    return max(2, -(-4 * l2 // nbytes))


# --------------------------------------------------------------------------- sections
def section_correctness(a, dev: str, act: torch.dtype, out: dict) -> None:
    if a.dry_run:
        cases = [
            (256, 64, 32, 1, True, True, act),
            (256, 72, 64, 3, False, False, act),
            (384, 48, 128, 17, True, True, act),
            (128, 32, -1, 2, False, True, act),
        ]
    else:
        cases = [
            (4096, 4096, 128, 1, True, False, act),
            (4096, 11008, 128, 16, True, True, act),
            (11008, 4096, 128, 5, False, False, act),
            (1024, 768, 64, 33, True, True, act),
            (512, 1000, 32, 128, False, True, act),
            (2048, 2048, -1, 3, True, False, act),
            (4096, 4096, 128, 256, True, True, act),
            (4096, 4096, 128, 1, True, True, torch.bfloat16),
            (4096, 11008, 64, 16, False, False, torch.bfloat16),
        ]
    rows = []
    print("\n## correctness (fp32 reference; bound: see the script docstring)\n")
    print("| K | N | g | M | zp | bias | dtype | triton max abs | max rel | err/bound | torch-ref err/bound | |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for K, N, g, M, zp, has_bias, dt in cases:
        rec = {"K": K, "N": N, "group_size": g, "M": M, "zero_point": zp, "bias": has_bias, "dtype": str(dt)}
        try:
            qweight, qzeros, scales = make_packed(K, N, g, zp, dev, seed=K + N + M)
            gen = torch.Generator(device="cpu").manual_seed(M)
            x = torch.randn(M, K, generator=gen).to(device=dev, dtype=dt)
            bias = torch.randn(N, generator=gen).to(device=dev, dtype=torch.float16) if has_bias else None
            y = tw.w4a16_matmul(x, qweight, qzeros, scales, g, bias)
            w32 = dequant_t(qweight, qzeros, scales)
            r = check(y, x, w32, bias)
            ql = QuantLinear(K, N, 4, g, bias=has_bias, device=dev)
            ql.qweight.copy_(qweight)
            ql.qzeros.copy_(qzeros)
            ql.scales.copy_(scales)
            if has_bias:
                ql.bias.copy_(bias)
            with torch.no_grad():
                r_ref = check(torch_ref.forward(x, ql), x, w32, bias)
                chosen = kernels.resolve_backend("auto", x, ql).name
                y_auto = ql(x)
            rec.update(triton=r, torch_ref=r_ref, auto_backend=chosen, auto_equals_direct=bool(torch.equal(y_auto, y)))
            ok = r["pass"] and (chosen == "triton" or a.dry_run)
            if not ok:
                FAILS.append(f"correctness {rec}")
            print(
                f"| {K} | {N} | {g} | {M} | {zp} | {has_bias} | {str(dt)[6:]} | {r['max_abs']:.3g} | "
                f"{r['max_rel']:.3g} | {r['worst_err_over_bound']:.3g} | {r_ref['worst_err_over_bound']:.3g} | "
                f"{'PASS' if ok else 'FAIL'}{'' if chosen == 'triton' else f' (auto -> {chosen})'} |",
                flush=True,
            )
        except Exception as exc:
            rec["error"] = repr(exc)
            FAILS.append(f"correctness {K}x{N} g{g} M{M}: {exc!r}")
            print(f"| {K} | {N} | {g} | {M} | {zp} | {has_bias} | {str(dt)[6:]} | ERROR {exc!r} |", flush=True)
            traceback.print_exc()
        rows.append(rec)
    out["correctness"] = rows


def section_unpack(a, dev: str, act: torch.dtype, out: dict) -> None:
    K, N, g = (256, 80, 64) if a.dry_run else (4096, 4096, 128)
    configs = [
        (tw.Config(1, 128, 64, split_k=4, group_m=1), 1),  # GEMV + split-K reduce
        (tw.Config(16, 64, 64, split_k=4), 3),  # 16-row tl.dot + split-K
        (tw.Config(64, 128, 64, num_warps=4, num_stages=3), 70),
    ]  # 64-row tiles, bias in the epilogue
    qweight, qzeros, scales = make_packed(K, N, g, True, dev, seed=5)
    w32 = dequant_t(qweight, qzeros, scales)
    bias = torch.randn(N, device=dev).half()
    rows = []
    print("\n## unpack modes x configs (fp32 reference)\n")
    for mode in tw.UNPACK_MODES:
        for base, M in configs:
            cfg = replace(base, unpack=mode)
            rec = {"unpack": mode, "config": repr(cfg), "M": M}
            try:
                x = torch.randn(M, K, device=dev).to(act)
                r = check(tw.w4a16_matmul(x, qweight, qzeros, scales, g, bias, config=cfg), x, w32, bias)
                rec.update(r)
                if not r["pass"]:
                    FAILS.append(f"unpack {rec}")
                print(
                    f"- {mode:8s} M={M:<3d} {cfg}: max abs {r['max_abs']:.3g}, err/bound "
                    f"{r['worst_err_over_bound']:.3g} {'PASS' if r['pass'] else 'FAIL'}",
                    flush=True,
                )
            except Exception as exc:
                rec["error"] = repr(exc)
                FAILS.append(f"unpack {mode} {cfg}: {exc!r}")
                print(f"- {mode:8s} {cfg}: ERROR {exc!r}", flush=True)
            rows.append(rec)
    out["unpack"] = rows


def tuned_config(x: torch.Tensor, N: int, K: int, g: int, has_bias: bool = False):
    """The config the autotuner cached for this call (its key: device, dtypes, M bucket, N, K, g, bias)."""
    want = (x.dtype, torch.float16, tw._m_bucket(x.shape[0]), N, K, g, has_bias)
    hits = [c for k, c in tw.tuned_configs().items() if k[1:] == want]
    return hits[-1] if hits else None


def _bytes(M: int, K: int, N: int, g: int, act_bytes: int) -> int:
    return K * N // 2 + (K // g) * N * 2 + (K // g) * N // 2 + M * K * act_bytes + M * N * act_bytes


def section_timings(a, dev: str, act: torch.dtype, out: dict, t_start: float) -> None:
    shapes = [(256, 256), (256, 704), (704, 256)] if a.dry_run else [(4096, 4096), (4096, 11008), (11008, 4096)]
    g = 64 if a.dry_run else 128
    timer = Timer(dev, a.reps, a.warmup)
    rows = []
    for K, N in shapes:
        qweight, qzeros, scales = make_packed(K, N, g, True, dev, seed=K * 7 + N)
        w16 = dequant_t(qweight, qzeros, scales).to(act).contiguous()  # [K, N]: x @ W
        packed_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
        nq, nw = n_copies_for(packed_bytes, dev), n_copies_for(w16.numel() * w16.element_size(), dev)
        q_copies = [(qweight, qzeros, scales)] + [
            (qweight.clone(), qzeros.clone(), scales.clone()) for _ in range(nq - 1)
        ]
        w_copies = [w16] + [w16.clone() for _ in range(nw - 1)]
        for M in (1, 16):
            rec = {"K": K, "N": N, "group_size": g, "M": M, "dtype": str(act)}
            if time.perf_counter() - t_start > a.budget_s:
                rec["skipped"] = "time budget spent"
                rows.append(rec)
                continue
            try:
                x = torch.randn(M, K, device=dev).to(act)
                t0 = time.perf_counter()
                y = tw.w4a16_matmul(x, qweight, qzeros, scales, g)  # autotunes on first use
                rec["first_call_s"] = round(time.perf_counter() - t0, 2)
                cfg = tuned_config(x, N, K, g)
                rec["config"] = repr(cfg) if cfg is not None else "heuristic/interpreter"
                err = check(y, x, dequant_t(qweight, qzeros, scales), None)
                rec["check"] = err
                if not err["pass"]:
                    FAILS.append(f"timing-shape check {K}x{N} M{M}")
                t_tr = timer(lambda i, qc=q_copies, x=x: lambda c=qc[i]: tw.w4a16_matmul(x, c[0], c[1], c[2], g), nq)
                t_mm = timer(lambda i, wc=w_copies, x=x: lambda w=wc[i]: torch.matmul(x, w), nw)
                rec["copies"] = {"triton": nq, "fp16": nw}
                rec["triton_us"], rec["triton_eager_us"] = t_tr["graph"], t_tr["eager"]
                rec["fp16_matmul_us"], rec["fp16_matmul_eager_us"] = t_mm["graph"], t_mm["eager"]
                rec["speedup"] = rec["fp16_matmul_us"] / rec["triton_us"]
                rec["speedup_eager"] = rec["fp16_matmul_eager_us"] / rec["triton_eager_us"]
                rec["triton_GBps"] = _bytes(M, K, N, g, x.element_size()) / (rec["triton_us"] * 1e3)
                rec["fp16_GBps"] = (K * N + M * K + M * N) * x.element_size() / (rec["fp16_matmul_us"] * 1e3)
            except Exception as exc:
                rec["error"] = repr(exc)
                FAILS.append(f"timing {K}x{N} M{M}: {exc!r}")
                traceback.print_exc()
            rows.append(rec)
            print(
                f"  timed {K}x{N} M={M} ({rec.get('config')}): {rec.get('triton_us', float('nan')):.1f} us triton, "
                f"{rec.get('fp16_matmul_us', float('nan')):.1f} us fp16 ({rec.get('error', 'ok')})",
                flush=True,
            )
        del w16, w_copies, q_copies
        torch.cuda.empty_cache() if dev == "cuda" else None
    out["timings"] = rows


def section_variants(a, dev: str, act: torch.dtype, out: dict, t_start: float) -> None:
    """The tuned block shape of each 7B cell with unpack in {shift3d, join} x magic in {False, True}."""
    shapes = [(256, 704)] if a.dry_run else [(4096, 4096), (4096, 11008), (11008, 4096)]
    g = 64 if a.dry_run else 128
    timer = Timer(dev, max(25, a.reps // 2) if not a.dry_run else a.reps, a.warmup)
    rows = []
    for K, N in shapes:
        qweight, qzeros, scales = make_packed(K, N, g, True, dev, seed=11)
        w32 = dequant_t(qweight, qzeros, scales)
        nq = n_copies_for(qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2, dev)
        q_copies = [(qweight, qzeros, scales)] + [
            (qweight.clone(), qzeros.clone(), scales.clone()) for _ in range(nq - 1)
        ]
        for M in (1, 16):
            x = torch.randn(M, K, device=dev).to(act)
            base = tuned_config(x, N, K, g) or tw.interpreter_config(M, N, K, g)
            for mode in ("shift3d", "join"):
                for magic in (False, True):
                    if time.perf_counter() - t_start > a.budget_s:
                        rows.append({"K": K, "N": N, "M": M, "unpack": mode, "magic": magic, "skipped": "budget"})
                        continue
                    cfg = replace(base, unpack=mode, magic=magic)
                    rec = {"K": K, "N": N, "M": M, "unpack": mode, "magic": magic, "config": repr(cfg)}
                    try:
                        r = check(tw.w4a16_matmul(x, qweight, qzeros, scales, g, config=cfg), x, w32, None)
                        rec["pass"] = r["pass"]
                        if not r["pass"]:
                            FAILS.append(f"variant {rec}")
                        t = timer(
                            lambda i, c=cfg, qc=q_copies, x=x: (
                                lambda q=qc[i]: tw.w4a16_matmul(x, q[0], q[1], q[2], g, config=c)
                            ),
                            nq,
                        )
                        rec["us"], rec["eager_us"] = t["graph"], t["eager"]
                    except Exception as exc:
                        rec["error"] = repr(exc)
                        FAILS.append(f"variant {mode} magic={magic} {K}x{N} M{M}: {exc!r}")
                    rows.append(rec)
    out["variants"] = rows


def print_tables(out: dict) -> None:
    print("\n## W4A16 triton vs fp16 torch.matmul (median us per call, each call on a cold weight copy)\n")
    print(
        "graph = per-call device time in a CUDA graph; eager = a plain call (adds host launch cost where "
        "it exceeds the GPU work)\n"
    )
    print(
        "| K x N | M | fp16 matmul | triton w4a16 | speed-up | eager fp16 | eager triton | eager speed-up "
        "| triton GB/s | fp16 GB/s | config |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out.get("timings", []):
        if "triton_us" not in r:
            print(f"| {r['K']}x{r['N']} | {r['M']} | {r.get('error') or r.get('skipped')} |||||||||")
            continue
        print(
            f"| {r['K']}x{r['N']} | {r['M']} | {r['fp16_matmul_us']:.1f} | {r['triton_us']:.1f} | "
            f"{r['speedup']:.2f}x | {r['fp16_matmul_eager_us']:.1f} | {r['triton_eager_us']:.1f} | "
            f"{r['speedup_eager']:.2f}x | {r['triton_GBps']:.0f} | {r['fp16_GBps']:.0f} | {r['config']} |"
        )
    if out.get("variants"):
        print("\n## variants of the tuned block shape (graph us / eager us)\n")
        print("| K x N | M | unpack | magic | graph us | eager us | check | config |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out["variants"]:
            if "us" not in r:
                print(
                    f"| {r['K']}x{r['N']} | {r['M']} | {r['unpack']} | {r['magic']} | "
                    f"{r.get('error') or r.get('skipped')} | | | |"
                )
                continue
            print(
                f"| {r['K']}x{r['N']} | {r['M']} | {r['unpack']} | {r['magic']} | {r['us']:.1f} | "
                f"{r['eager_us']:.1f} | {'PASS' if r.get('pass') else 'FAIL'} | {r['config']} |"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = str(Path(os.environ["OUT"]) / "triton_gpu.json") if os.environ.get("OUT") else "triton_gpu.json"
    ap.add_argument("--out", default=default_out, help=f"JSON output (default {default_out})")
    ap.add_argument("--reps", type=int, default=100, help="timed calls per cell (median; >= 50 on GPU)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip remaining timings after this")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument(
        "--sections",
        default="correctness,timings,unpack,variants",
        help="comma-separated subset of correctness,timings,unpack,variants",
    )
    ap.add_argument("--wide", action="store_true", help="AWQKIT_TRITON_AUTOTUNE=wide: explore more configs")
    a = ap.parse_args()
    if a.wide and not a.dry_run:
        os.environ["AWQKIT_TRITON_AUTOTUNE"] = "wide"
    t_start = time.perf_counter()
    if a.dry_run:
        dev, act = "cpu", torch.float16
        a.reps, a.warmup = 3, 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        dev, act = "cuda", torch.float16
        a.reps = max(a.reps, 50)
    import triton

    out: dict = {
        "env": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (Triton interpreter)",
            "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else None,
            "dry_run": a.dry_run,
            "reps": a.reps,
            "warmup": a.warmup,
            "sections": a.sections,
            "autotune": os.environ.get("AWQKIT_TRITON_AUTOTUNE", "1"),
        }
    }
    print(json.dumps(out["env"]))
    print(f"backends available: {kernels.list_backends(only_available=True)}")
    for name, fn in (
        ("correctness", lambda: section_correctness(a, dev, act, out)),
        ("timings", lambda: section_timings(a, dev, act, out, t_start)),
        ("unpack", lambda: section_unpack(a, dev, act, out)),
        ("variants", lambda: section_variants(a, dev, act, out, t_start)),
    ):
        if name not in a.sections.split(","):
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # keep going: the other sections still say something
            FAILS.append(f"section {name}: {exc!r}")
            out[f"{name}_error"] = repr(exc)
            traceback.print_exc()
        out.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"[{name}: {out['section_s'][name]} s]", flush=True)
    out["tuned_configs"] = {repr(k): repr(v) for k, v in tw.tuned_configs().items()}
    out["fails"] = FAILS
    out["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print_tables(out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"\n{'PASS' if not FAILS else 'FAIL'}: {len(FAILS)} failure(s); {out['elapsed_s']} s; JSON -> {a.out}")
    for f in FAILS:
        print(f"  FAIL {f}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
