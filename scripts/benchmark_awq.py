"""Benchmark: FP vs RTN vs AWQ on SmolLM2-135M-Instruct (w4, group 64), written to BENCHMARKS.md.

Calibration: ``--n-samples`` x 512 tokens from the SQuAD 2.0 dev contexts in ../shared/data (never the
WikiText-2 test text). Evaluation: WikiText-2 test perplexity on the first ``--windows`` non-overlapping
2048-token windows of ``"\\n\\n".join(rows)``, and KL / top-1 agreement against the float model on the same
windows. Each quantization runs in its own process so its wall time and peak RSS are its own.

Usage: python scripts/benchmark_awq.py [--n-samples 128] [--windows 16] [--runs rtn,awq,awq-float]
       [--search search_samples=8 --search search_tokens=4096] [--section TITLE]

``--search KEY=VALUE`` (SearchConfig fields, JSON values) applies to every AWQ run; ``--section`` picks the
BENCHMARKS.md section (an ablation goes to its own section instead of replacing the main table).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTION = "AWQ vs RTN on SmolLM2-135M-Instruct (w4 g64)"

RUNS = {
    "rtn": {"method": "rtn"},
    "awq": {"method": "awq"},
    "awq-float": {"method": "awq", "search": {"propagate": "float"}},
    "awq-x": {"method": "awq", "search": {"scale_mode": "x"}},
    "awq-noclip": {"method": "awq", "search": {"clip": False}},
    # clip search with a second pass that moves each end of the range alone (asymmetric ranges)
    "awq-clipind": {"method": "awq", "search": {"clip_independent": True}},
    # ... plus v -> o scaling under grouped-query attention (scales tied per kv head)
    "awq-clipind-gqa": {"method": "awq", "search": {"clip_independent": True, "gqa_v_o": True}},
}

CHILD = r"""
import json, sys, time
from awqkit.api import quantize
from awqkit.bench.modes import process_peak_rss_bytes
from awqkit.config import QuantConfig, CalibConfig, SearchConfig
a = json.loads(sys.argv[1])
t = time.perf_counter()
rep = quantize(a["src"], a["dst"], method=a["method"], quant=QuantConfig(**a["quant"]),
               calib=CalibConfig(**a["calib"]), search=SearchConfig(**a["search"]), overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss": process_peak_rss_bytes()}))  # VmHWM: ru_maxrss would carry the parent's RSS over
"""


def squad_contexts_file(data_dir: Path, out: Path) -> Path:
    """Unique SQuAD 2.0 dev contexts, newlines replaced by spaces, one per line."""
    doc = json.loads((data_dir / "squad-v2" / "dev-v2.0.json").read_text())
    ctx = dict.fromkeys(p["context"].replace("\n", " ").strip() for a in doc["data"] for p in a["paragraphs"])
    out.write_text("\n".join(c for c in ctx if c) + "\n")
    return out


def run_child(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"quantization failed for {args['dst']}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--runs", default="rtn,awq,awq-float")
    ap.add_argument("--work", default=None, help="output folder (default: a temporary folder)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    ap.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SearchConfig override for every AWQ run (JSON value), e.g. search_samples=8",
    )
    ap.add_argument("--section", default=SECTION, help="BENCHMARKS.md section title (default: %(default)s)")
    a = ap.parse_args()
    common: dict = {}
    for item in a.search:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--search {item!r}: expected KEY=VALUE, e.g. search_samples=8")
        try:
            common[key] = json.loads(value)
        except json.JSONDecodeError:
            common[key] = value
    logging.basicConfig(level=logging.WARNING)

    import torch

    from awqkit.bench.resources import folder_size_bytes, fp16_size_bytes
    from awqkit.eval.perplexity import default_data_dir, kl_divergence, load_wikitext_test, make_windows
    from awqkit.io.load import load_quantized
    from awqkit.io.source import load_source
    from awqkit.report.table import markdown_table, write_benchmarks_section
    from awqkit.zoo import fetch_smollm2

    torch.manual_seed(0)
    src = fetch_smollm2()
    data = default_data_dir()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="awqkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    calib_file = squad_contexts_file(data, work / "calibration_squad-v2-contexts.txt")

    results = {}
    for name in a.runs.split(","):
        spec = RUNS[name]
        dst = work / f"smollm2-{name}-w4g{a.group_size}"
        child = {
            "src": str(src),
            "dst": str(dst),
            "method": spec["method"],
            "quant": {"bits": 4, "group_size": a.group_size},
            "calib": {"source": str(calib_file), "n_samples": a.n_samples, "seq_len": 512, "seed": 13},
            "search": {**common, **spec.get("search", {})} if spec["method"] == "awq" else {},
        }
        print(f"quantizing {name} ...", flush=True)
        results[name] = {"dst": dst, **run_child(child)}

    base, tok, _ = load_source(src, hash_files=False)
    base = base.float()
    windows = make_windows(tok, load_wikitext_test(data / "wikitext-2-raw" / "wiki.test.raw"), 2048, a.windows)
    fp_size = fp16_size_bytes(base)
    rows, fp_ppl = [], None
    for r in results.values():
        q = load_quantized(r["dst"], backend="torch")  # the fp32 reference kernel: ppl of the checkpoint itself
        m = kl_divergence(q, base, windows)
        fp_ppl = m["ppl_baseline"]
        r.update(ppl=m["ppl_model"], kl=m["kl"], top1=m["top1_agreement"])
        del q
    rtn_ppl = results["rtn"]["ppl"] if "rtn" in results else None
    rows.append(
        {
            "model": "fp32 (from GGUF)",
            "ppl": fp_ppl,
            "KL to FP": 0.0,
            "top-1 agree": 1.0,
            "gap closed": None,
            "quantize s": None,
            "peak RSS GB": None,
            "size MB": fp_size / 1e6,
        }
    )
    for name, r in results.items():
        gap = (rtn_ppl - r["ppl"]) / (rtn_ppl - fp_ppl) if rtn_ppl is not None else None
        rows.append(
            {
                "model": f"{name} w4 g{a.group_size}",
                "ppl": r["ppl"],
                "KL to FP": r["kl"],
                "top-1 agree": r["top1"],
                "gap closed": gap,
                "quantize s": r["seconds"],
                "peak RSS GB": r["peak_rss"] / 1e9,
                "size MB": folder_size_bytes(r["dst"]) / 1e6,
            }
        )
    table = markdown_table(
        rows,
        floatfmt={
            "ppl": ".3f",
            "KL to FP": ".4f",
            "top-1 agree": ".3f",
            "gap closed": ".1%",
            "quantize s": ".0f",
            "peak RSS GB": ".2f",
            "size MB": ".1f",
        },
    )
    body = (
        f"SmolLM2-135M-Instruct (float32 from the PyPI GGUF), 4-bit asymmetric, group {a.group_size}; calibration "
        f"{a.n_samples} x 512 tokens of SQuAD 2.0 dev contexts (seed 13); WikiText-2 test perplexity on the first "
        f"{a.windows} non-overlapping 2048-token windows; KL(FP || quantized) and top-1 agreement on the same "
        f'windows; "gap closed" = (ppl_RTN − ppl) / (ppl_RTN − ppl_FP). Quantization wall time and peak RSS '
        f"of each run in its own process on this machine ({torch.get_num_threads()} threads). Size: the output "
        f"folder; the FP row gives the fp16 weights' size. `awq` = defaults (scale mode both, clip on, next layer "
        f"fed the quantized outputs); `awq-float` = the same with the float outputs propagated; `awq-clipind` "
        f"adds the clip search's independent-ends pass; `awq-clipind-gqa` also scales v_proj -> o_proj under "
        f"grouped-query attention."
        + (
            f" Search overrides for every AWQ run: {', '.join(f'{k}={v}' for k, v in common.items())}."
            if common
            else ""
        )
        + "\n\nProduced by `python scripts/benchmark_awq.py --n-samples "
        f"{a.n_samples} --windows {a.windows} --runs {a.runs}"
        + "".join(f" --search {x}" for x in a.search)
        + (f" --section '{a.section}'" if a.section != SECTION else "")
        + f"`.\n\n{table}\n"
    )
    print(body)
    if not a.no_write:
        write_benchmarks_section(ROOT / "BENCHMARKS.md", a.section, body)


if __name__ == "__main__":
    main()
