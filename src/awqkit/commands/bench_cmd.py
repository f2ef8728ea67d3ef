"""``awqkit bench MODEL [--baseline MODEL] [--backend torch,cpu-avx2] [--loop transformers,awqkit] [--json OUT] ...``.

Prefill latency, decode tokens/s per batch size, peak RSS (and VRAM on cuda), weight bytes on disk and in
memory, and weight bytes read per decoded token with the implied memory bandwidth, for MODEL (every
``--backend`` listed when it is quantized) and its dense ``--baseline`` (every ``--baseline-dtype``), each
mode in its own subprocess. Methods: :mod:`awqkit.bench.modes`. Speeds on a busy machine are noisy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from awqkit.config import BenchConfig

B = BenchConfig()  # the defaults the options show

_EPILOG = """\
Each mode runs in a fresh Python process (so its peak RSS is its own): --warmup untimed runs, then
--repeats timed runs of prefill (one forward over a --prompt-tokens prompt of seeded random ids) and
decode (--new-tokens greedy steps over the KV cache, forced length); the table shows medians.
decode tok/s = batch x new tokens / decode wall time (prefill excluded). MB read/token: weight bytes
one decode step reads (packed int4 + scales/zeros as the backend stores them, other weights in full,
one embedding row per sequence); GB/s = that x steps/s.
--loop: "transformers" decodes with the model's own forward and DynamicCache (what generate() runs);
"awqkit" with awqkit's lean decode loop over the same weights (static KV cache, fused GEMVs, native
norm/attention; float32 on CPU, Llama-style models; rows marked [awqkit loop]). Ratios compare rows of
the same loop, and each awqkit-loop row also with the transformers-loop baseline.
--llama-cpp GGUF adds llama.cpp (llama-cpp-python, batch 1) on a GGUF file; skipped if not installed.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def cmd_bench(a: argparse.Namespace) -> int:
    """Measure, print the table, write ``--json`` / ``--png``."""
    from awqkit.bench.modes import BenchConfig, build_specs, run_modes
    from awqkit.bench.report import decode_ratio, format_table, plot_png, write_json
    from awqkit.preflight import check_device

    if a.llama_cpp is not None and not Path(a.llama_cpp).is_file():
        raise FileNotFoundError(f"--llama-cpp GGUF file not found: {a.llama_cpp}")
    check_device(a.device)  # before any model is loaded or subprocess started
    settings = BenchConfig(
        prompt_tokens=a.prompt_tokens,
        new_tokens=a.new_tokens,
        batch_sizes=a.batch_sizes,
        repeats=a.repeats,
        warmup=a.warmup,
        threads=a.threads,
    )
    specs = build_specs(a.model, a.baseline, a.backend, a.dtype, a.baseline_dtype, a.device, a.loop)
    results = run_modes(specs, settings, subprocesses=not a.in_process, llama_cpp=a.llama_cpp)
    print(
        f"prompt {settings.prompt_tokens} tokens, {settings.new_tokens} new tokens, "
        f"{settings.repeats} repeats (medians) after {settings.warmup} warm-up, threads {a.threads or 'default'}"
    )
    print(format_table(results))
    ratios = {}
    if a.baseline is not None:
        bases = [s for s in specs if s.path == str(a.baseline) and s.dtype == a.baseline_dtype[0]]
        for spec in (s for s in specs if s.path != str(a.baseline)):
            for base in (b for b in bases if b.loop in (spec.loop, "transformers")):
                for b in settings.batch_sizes:
                    r = decode_ratio(results, spec.label, base.label, b)
                    if r is not None:
                        ratios[f"{spec.label} / {base.label} decode B={b}"] = r
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    if a.json:
        write_json(a.json, results, settings, {"ratios": ratios})
        print(f"wrote {a.json}")
    if a.png:
        plot_png(
            a.png,
            results,
            title=f"{Path(a.model).name}: prompt {settings.prompt_tokens}, {settings.new_tokens} new tokens",
        )
        print(f"wrote {a.png}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="inference speed/memory of a (quantized) model vs its baseline",
        description=__doc__.splitlines()[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="quantized (or dense) checkpoint folder")
    p.add_argument("--baseline", default=None, help="dense Hugging Face folder to compare against")
    p.add_argument(
        "--prompt-tokens", type=_positive, default=B.prompt_tokens, help="prompt length (default %(default)s)"
    )
    p.add_argument("--new-tokens", type=_positive, default=B.new_tokens, help="decoded tokens (default %(default)s)")
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=B.batch_sizes,
        help=f"comma list (default {','.join(map(str, B.batch_sizes))})",
    )
    p.add_argument(
        "--repeats", type=_positive, default=B.repeats, help="timed runs, median reported (default %(default)s)"
    )
    p.add_argument("--warmup", type=int, default=B.warmup, help="untimed runs first (default %(default)s)")
    p.add_argument("--threads", type=_positive, default=None, help="torch / llama.cpp threads (default: torch's)")
    p.add_argument(
        "--backend",
        type=_str_list,
        default=["auto"],
        help="kernel backend(s) of a quantized MODEL, comma list, e.g. torch,cpu-avx2,cpu-int4 (default auto)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="dtype of MODEL's non-quantized weights (or of a dense MODEL) (default %(default)s)",
    )
    p.add_argument(
        "--baseline-dtype",
        type=_str_list,
        default=["float32"],
        help="dtype(s) of the baseline, comma list, e.g. float32,bfloat16 (default float32)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument(
        "--loop",
        type=_str_list,
        default=["transformers", "awqkit"],
        help="decode loop(s), comma list: transformers, awqkit (default transformers,awqkit; see below)",
    )
    p.add_argument("--json", default=None, metavar="OUT", help="write every sample and setting as JSON")
    p.add_argument("--png", default=None, metavar="OUT", help="write a bar chart (needs matplotlib)")
    p.add_argument("--llama-cpp", default=None, metavar="GGUF", help="also run llama.cpp on this GGUF file")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure every mode in this process (faster start; peak RSS is then shared)",
    )
    p.set_defaults(func=cmd_bench)
