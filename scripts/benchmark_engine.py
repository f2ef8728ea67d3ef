"""Benchmark the quantization engine against its peers, side by side, on SmolLM2-135M-Instruct w4 g64 (issue 13 §5).

Runs (``--runs``, any subset, in this order): ``awqkit`` (AWQ through the ``awqkit quantize`` CLI), ``rtn``
(awqkit round-to-nearest), ``llmcompressor`` (llm-compressor 0.14 AWQModifier, duo_scaling=True, then
QuantizationModifier with the W4A16_ASYM preset at group 64), ``llmcompressor-both`` (the same with
duo_scaling="both") and ``autoawq`` (AutoAWQ 0.2.9 GEMM, fp32, with the CPU clone fix). Each quantization runs in
its own process; each peer in its OWN virtual environment under ``--peers-dir`` (built on first use with
``pip install torch==2.13.0`` first, the local CPU wheel, then the peer under a ``torch==2.13.0`` constraint;
reused while its marker file matches), driven by ``scripts/_peer_quantize.py``. awqkit runs the same way, in a venv
with this checkout installed editable and its runtime dependencies only (what ``pip install awqkit`` gives a user;
``--no-awqkit-venv`` runs it with this interpreter instead, whose dev extras cost ~110 MB of peak RSS).

Calibration (../shared/docs/peer-runs.md): SQuAD 2.0 dev contexts, newlines replaced by spaces, joined by blank
lines, the first ``--n-samples`` consecutive 512-token blocks. The peers get these token blocks directly; awqkit
gets a one-sample JSONL file from which its own reader cuts the same blocks (checked token for token; a difference
would be stated in the output).

Measured per run: wall time of the quantization (model load + quantization + save, in the child), the library's
quantization call alone, peak RSS of the child (VmHWM at its end), and, for every output read by awqkit's own
loader through ``awqkit eval --backend torch`` (fp32 reference kernel; AutoAWQ GEMM and compressed-tensors
pack-quantized are read natively): WikiText-2 test perplexity on the first ``--windows`` non-overlapping
2048-token windows, KL(fp32 || quantized) and top-1 agreement with the fp32 model on the same windows.

Every finished step is saved as JSON in ``--work`` (default ~/.cache/awqkit/bench-engine), so an interrupted
benchmark resumes run by run with the same command; ``--from-json`` re-renders the saved results without running.
The table is printed and written into ``--benchmarks`` (default BENCHMARKS.md) unless ``--no-write``.

Usage: python scripts/benchmark_engine.py [--runs awqkit,rtn,llmcompressor,llmcompressor-both,autoawq]
       [--n-samples 32] [--windows 8] [--awqkit-arg=--rank-top-k=0 ...] [--benchmarks FILE] [--from-json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (
    ROOT,
    RunStore,
    add_output_args,
    awqkit_calibration_file,
    awqkit_eval,
    awqkit_quantize,
    machine,
    machine_line,
    met,
    peer_blocks,
    run_logged,
    setup_logging,
    write_section,
)

logger = logging.getLogger("bench.engine")
SECTION = "Engine: awqkit vs llm-compressor vs AutoAWQ on SmolLM2-135M-Instruct (issue 13)"
SEQ_LEN = 512
TORCH = "torch==2.13.0"  # the local CPU build (/opt/wheels); installed first so no peer pulls a CUDA torch

# pip argument lists run in order in a fresh venv; "{c}" is the torch constraint file.
PEERS: dict[str, dict[str, Any]] = {
    # awqkit itself on the same footing as the peers: its own venv with its runtime dependencies only (the dev
    # extras add triton, scipy and accelerate, which transformers then imports: +110 MB of RSS before any work);
    # editable, so the run uses this checkout's source
    "awqkit": {
        "venv": "awqkit-runtime-venv",
        "pip": [[TORCH], ["-c", "{c}", "-e", str(ROOT)]],
        "patch": None,
    },
    "llmcompressor": {
        "venv": "llmcompressor-0.14.0.1-venv",
        "pip": [[TORCH], ["-c", "{c}", "llmcompressor==0.14.0.1"]],
        "patch": None,  # its pin_memory call is skipped by scripts/_peer_quantize.py (a monkeypatch)
    },
    "autoawq": {
        "venv": "autoawq-0.2.9-venv",
        # --no-deps: its requirements list triton (GPU only); the rest by hand, transformers as in peer-runs.md
        "pip": [
            [TORCH],
            ["--no-deps", "autoawq==0.2.9"],
            [
                "-c",
                "{c}",
                "transformers==5.24.0",
                "tokenizers>=0.12.1",
                "typing_extensions>=4.8.0",
                "accelerate",
                "datasets>=2.20",
                "zstandard",
                "huggingface_hub>=0.26.5",
            ],
        ],
        # the CPU alias bug of peer-runs.md: .cpu() of a CPU tensor is the same storage, not a snapshot
        "patch": (
            "awq/quantize/quantizer.py",
            "org_sd = {k: v.cpu() for k, v in module2inspect.state_dict().items()}",
            "org_sd = {k: v.detach().clone() for k, v in module2inspect.state_dict().items()}",
        ),
    },
    "autoround": {
        "venv": "auto-round-0.16.1-venv",
        # its plain requirements (no [cpu] extra: numba/tbb/auto-round-lib only speed up its own CPU inference);
        # transformers pinned as for the other peers
        "pip": [[TORCH], ["-c", "{c}", "auto-round==0.16.1", "transformers==5.24.0"]],
        "patch": None,
    },
    "gptqmodel": {
        "venv": "gptqmodel-7.7.0-venv",
        # --no-deps: its requirements pull torch>=2.14.1 (a CUDA build); the runtime deps by hand (peer-runs.md),
        # without the build-only ninja/maturin
        "pip": [
            [TORCH],
            ["--no-deps", "gptqmodel==7.7.0"],
            [
                "-c",
                "{c}",
                "transformers==5.24.0",
                "accelerate>=1.15.0",
                "safetensors>=0.8.0",
                "numpy>=2.4.6",
                "threadpoolctl>=3.7.0",
                "packaging>=26.3",
                "device-smi>=0.5.7",
                "protobuf>=7.36.2",
                "pillow>=13.0.0",
                "requests>=2.34.2",
                "pypcre>=0.6.4",
                "tokenicer>=0.0.14",
                "logbar>=0.4.15",
                "jinja2>=3.1.6",
                "datasets>=5.1.0",
                "pyarrow>=26.0.0",
                "dill>=0.4.1",
                "torchao>=0.18.0",
                "defuser>=0.0.28",
            ],
        ],
        "patch": None,
    },
}
RUNS: dict[str, dict[str, Any]] = {
    "awqkit": {"tool": "awqkit", "label": "awqkit AWQ (defaults)"},
    "awqkit-exhaustive": {
        "tool": "awqkit",
        "label": "awqkit AWQ, exhaustive search (--rank-top-k 0: before ranking)",
        "args": ["--rank-top-k", "0"],
    },
    "rtn": {"tool": "awqkit", "label": "awqkit RTN"},
    "llmcompressor": {
        "tool": "llmcompressor",
        "duo": True,
        "label": "llm-compressor 0.14.0.1 AWQModifier (duo) + W4A16_ASYM",
    },
    "llmcompressor-both": {
        "tool": "llmcompressor",
        "duo": "both",
        "label": "llm-compressor 0.14.0.1 AWQModifier (duo_scaling=both) + W4A16_ASYM",
    },
    "autoawq": {"tool": "autoawq", "duo": True, "label": "AutoAWQ 0.2.9 GEMM (fp32, CPU clone fix)"},
}


def ensure_peer_venv(tool: str, peers_dir: Path) -> Path:
    """The peer's venv python, building the venv (and patching it) unless its marker matches the spec."""
    spec = PEERS[tool]
    venv = peers_dir / spec["venv"]
    marker, want = venv / "awqkit-bench.json", json.dumps({"pip": spec["pip"], "patch": spec["patch"]})
    py = venv / "bin" / "python"
    if marker.is_file() and marker.read_text() == want and py.exists():
        return py
    if venv.exists():
        logger.info("%s: rebuilding %s (incomplete or another spec)", tool, venv)
        shutil.rmtree(venv)
    logger.info("%s: building its virtual environment in %s (a few minutes)", tool, venv)
    peers_dir.mkdir(parents=True, exist_ok=True)
    log = peers_dir / f"{spec['venv']}-install.log"
    constraint = peers_dir / "torch-constraint.txt"
    constraint.write_text(TORCH + "\n")
    run_logged([sys.executable, "-m", "venv", str(venv)], log)
    for step in spec["pip"]:
        run_logged([str(py), "-m", "pip", "install", *[a.replace("{c}", str(constraint)) for a in step]], log)
    if spec["patch"]:
        rel, old, new = spec["patch"]
        target = next(venv.glob(f"lib/python*/site-packages/{rel}"))
        text = target.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{target}: expected the line {old!r} once to patch; the package changed?")
        target.write_text(text.replace(old, new))
        logger.info("%s: patched %s: %r -> %r", tool, target, old, new)
    check = (
        "import torch, importlib.metadata as m; "
        "assert torch.__version__.startswith('2.13.0+cpu'), torch.__version__; "
        "bad = [d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia-')"
        " and d.metadata['Name'] != 'nvidia-ml-py']; assert not bad, bad"
    )
    run_logged([str(py), "-c", check], log)  # a CPU torch, no CUDA libraries
    marker.write_text(want)
    return py


def quantize_run(
    name: str, a: argparse.Namespace, work: Path, src: Path, calib_file: Path, blocks_file: Path
) -> dict[str, Any]:
    spec, dst, log = RUNS[name], work / "out" / name, work / "logs" / f"{name}.log"
    log.unlink(missing_ok=True)
    if spec["tool"] == "awqkit":
        args = ["--src", str(src), "--dst", str(dst), "--overwrite", "--bits", "4", "--group-size", str(a.group_size)]
        if name.startswith("awqkit"):
            args += [
                "--method",
                "awq",
                "--calib",
                str(calib_file),
                "--n-samples",
                str(a.n_samples),
                "--seq-len",
                str(SEQ_LEN),
                *spec.get("args", []),
                *a.awqkit_arg,
            ]
        else:
            args += ["--method", "rtn"]
        py = ensure_peer_venv("awqkit", Path(a.peers_dir).expanduser()) if a.awqkit_venv else Path(sys.executable)
        r = awqkit_quantize(args, work / "logs" / f"{name}.result.json", log, python=py)
        meta = r.pop("metadata") or {}
        t = meta.get("timings_seconds", {})
        r["quantize_seconds"] = t["total_before_save"] - t.get("load", 0) if "total_before_save" in t else None
        r["versions"] = meta.get("versions", {})
        r["layer_seconds"] = (meta.get("awq") or {}).get("layer_seconds")
        return r
    py = ensure_peer_venv(spec["tool"], Path(a.peers_dir).expanduser())
    if dst.exists():
        shutil.rmtree(dst)
    job = {
        "tool": spec["tool"],
        "src": str(src),
        "dst": str(dst),
        "blocks": str(blocks_file),
        "group_size": a.group_size,
        "duo_scaling": spec["duo"],
        "result": str(work / "logs" / f"{name}.result.json"),
    }
    job_file = work / "logs" / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    run_logged([str(py), str(ROOT / "scripts" / "_peer_quantize.py"), str(job_file)], log)
    return json.loads(Path(job["result"]).read_text())


def render(
    records: dict[str, dict[str, Any]], a: argparse.Namespace, calib_note: str, mach: dict[str, Any], command: str
) -> str:
    from awqkit.report.table import markdown_table

    ev = {k: r["eval"] for k, r in records.items() if r.get("eval")}
    fp_ppl = next((e["ppl_fp"] for e in ev.values()), None)
    rtn_ppl = ev["rtn"]["ppl"] if "rtn" in ev else None
    rows = [{"run": "fp32 (from the PyPI GGUF)", "ppl": fp_ppl, "KL to FP": 0.0, "top-1 agree": 1.0}]
    for name, r in records.items():
        q, e = r.get("quant", {}), ev.get(name, {})
        gap = (rtn_ppl - e["ppl"]) / (rtn_ppl - fp_ppl) if e and rtn_ppl is not None and rtn_ppl != fp_ppl else None
        rows.append(
            {
                "run": RUNS[name]["label"],
                "ppl": e.get("ppl"),
                "KL to FP": e.get("kl"),
                "top-1 agree": e.get("top1"),
                "gap closed": gap,
                "quantize s": q.get("seconds"),
                "library call s": q.get("quantize_seconds"),
                "peak RSS GB": q["peak_rss"] / 1e9 if q.get("peak_rss") else None,
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
            "library call s": ".0f",
            "peak RSS GB": ".2f",
        },
    )
    mine = records.get("awqkit", {}).get("quant")
    llmc = (records.get("llmcompressor") or records.get("llmcompressor-both") or {}).get("quant")
    peers = {n: r["quant"] for n, r in records.items() if RUNS[n]["tool"] != "awqkit" and r.get("quant")}
    lines = []
    t_ratio = mine["seconds"] / llmc["seconds"] if mine and llmc else None
    if t_ratio is not None:
        lines.append(f"- time: awqkit / llm-compressor = {t_ratio:.2f}x (goal <= 0.3x): **{met(t_ratio <= 0.3)}**")
    if mine and peers:
        ratios = {n: mine["peak_rss"] / q["peak_rss"] for n, q in peers.items()}
        lines.append(
            "- peak RSS: awqkit / "
            + ", ".join(f"{n} {v:.2f}x" for n, v in ratios.items())
            + f" (goal <= 0.5x every peer): **{met(max(ratios.values()) <= 0.5)}**"
        )
    if mine:
        lines.append(
            f"- peak RSS: awqkit {mine['peak_rss'] / 1e9:.2f} GB (goal <= 1.0 GB): **{met(mine['peak_rss'] <= 1.0e9)}**"
        )
    if "awqkit" in ev and "awqkit-exhaustive" in ev:
        agree = _same_choices(Path(a.work).expanduser() / "out")
        ex, rk = records["awqkit-exhaustive"]["quant"], records["awqkit"]["quant"]
        ppl_ratio = ev["awqkit"]["ppl"] / ev["awqkit-exhaustive"]["ppl"]
        lines.append(
            f"- ranked vs exhaustive search (issue 13 §1): {agree}; ppl {ev['awqkit']['ppl']:.3f} vs "
            f"{ev['awqkit-exhaustive']['ppl']:.3f} ({ppl_ratio - 1:+.2%}, "
            f"goal <= +0.5 %); time {rk['seconds']:.0f} s vs {ex['seconds']:.0f} s "
            f"({ex['seconds'] / rk['seconds']:.2f}x faster)"
        )
    peer_ppl = {n: ev[n]["ppl"] for n in peers if n in ev}
    if "awqkit" in ev and peer_ppl:
        best = min(peer_ppl, key=peer_ppl.get)
        lines.append(
            f"- ppl: awqkit {ev['awqkit']['ppl']:.3f} vs the best peer ({best}) {peer_ppl[best]:.3f} "
            f"(goal: equal or better): **{met(ev['awqkit']['ppl'] <= peer_ppl[best])}**"
        )
    versions: dict[str, str] = {}
    for name, r in records.items():
        v = r.get("quant", {}).get("versions") or {}
        versions.setdefault(RUNS[name]["tool"], ", ".join(f"{k} {x}" for k, x in v.items()))
    vline = "; ".join(f"{tool}: {v}" for tool, v in versions.items())
    smoke = a.n_samples != 32 or a.windows != 8
    return (
        (
            f"**Smoke settings ({a.n_samples} blocks, {a.windows} window(s)): not the issue's protocol; "
            "the goals below "
            "are computed but mean nothing at these settings.**\n\n"
            if smoke
            else ""
        )
        + f"SmolLM2-135M-Instruct (float32 from the PyPI GGUF), 4-bit asymmetric, group {a.group_size}. Calibration: "
        f"{a.n_samples} x {SEQ_LEN} tokens, the peers' protocol (SQuAD 2.0 dev contexts, newlines replaced by "
        f"spaces, joined by blank lines, the first consecutive {SEQ_LEN}-token blocks); {calib_note}. Evaluation: "
        f"every output read by awqkit's loader with `awqkit eval --backend torch` (fp32 reference kernel): WikiText-2 "
        f"test perplexity on the first {a.windows} non-overlapping 2048-token windows, KL(fp32 || quantized) and "
        'top-1 agreement on the same windows; gap closed = (ppl_RTN - ppl) / (ppl_RTN - ppl_FP). "quantize s": '
        'wall time of model load + quantization + save in the run\'s own process; "library call s": the '
        "quantization call alone (awqkit: its timings from after the load to before the save); peak RSS: VmHWM "
        "of that process. "
        + (
            "awqkit ran in its own virtual environment too, this checkout installed editable with its runtime "
            "dependencies only (no dev extras). "
            if a.awqkit_venv
            else "awqkit ran in the calling interpreter (--no-awqkit-venv: its dev extras loaded). "
        )
        + "Each peer ran in its own virtual environment (torch 2.13.0 CPU); llm-compressor with its unconditional "
        "`IntermediatesCache.pin_memory` skipped (no accelerator), AutoAWQ with its weight snapshot "
        "`v.cpu()` -> `v.detach().clone()` (../shared/docs/peer-runs.md). Both peers skip v_proj -> o_proj "
        "(GQA shapes), as awqkit does by default."
        + (f" awqkit options: `{' '.join(a.awqkit_arg)}`." if a.awqkit_arg else "")
        + f"\n\nMachine: {machine_line(mach)}. Versions: {vline}.\n\nProduced by `{command}`.\n\n{table}\n\n"
        + "Issue 13 goals (ratios from this one run):\n"
        + ("\n".join(lines) or "- (no awqkit run)")
        + "\n"
    )


def _same_choices(out: Path) -> str:
    """How many mappings the ranked and the exhaustive runs gave the same (mode, alpha)."""
    docs = [json.loads((out / n / "awq_results.json").read_text()) for n in ("awqkit", "awqkit-exhaustive")]
    pairs = list(zip(docs[0]["scales"], docs[1]["scales"], strict=True))
    same = sum((x["mode"], x["alpha"]) == (y["mode"], y["alpha"]) for x, y in pairs)
    return f"the same mode and alpha for {same} of {len(pairs)} mappings"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of: " + ", ".join(RUNS))
    ap.add_argument("--n-samples", type=int, default=32, help="calibration blocks of 512 tokens (default 32)")
    ap.add_argument("--windows", type=int, default=8, help="2048-token WikiText-2 windows to evaluate (default 8)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument(
        "--awqkit-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `awqkit quantize` argument for the awqkit run (repeatable), e.g. --awqkit-arg=--rank-top-k=0",
    )
    ap.add_argument("--peers-dir", default="~/.cache/awqkit/peers", help="the peers' venvs (default %(default)s)")
    ap.add_argument(
        "--no-awqkit-venv",
        dest="awqkit_venv",
        action="store_false",
        help="run awqkit with this interpreter (its dev extras loaded) instead of its own runtime-only "
        "venv under --peers-dir, as the peers run",
    )
    add_output_args(ap, "~/.cache/awqkit/bench-engine", SECTION)
    a = ap.parse_args()
    setup_logging(a.verbose)
    names = [n for n in RUNS if n in a.runs.split(",")]
    unknown = set(a.runs.split(",")) - set(RUNS)
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")

    from transformers import AutoTokenizer

    from awqkit.eval.perplexity import default_data_dir
    from awqkit.zoo import fetch_smollm2

    work = Path(a.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    src = fetch_smollm2()
    data = Path(a.data_dir) if a.data_dir else default_data_dir()
    settings = {
        "n_samples": a.n_samples,
        "windows": a.windows,
        "group_size": a.group_size,
        "src": str(src),
        "awqkit_arg": a.awqkit_arg,
    }
    store = RunStore(work, settings)
    tok = AutoTokenizer.from_pretrained(src)
    blocks, _ = peer_blocks(tok, data, a.n_samples, SEQ_LEN)
    blocks_file = work / f"calib-blocks-{a.n_samples}x{SEQ_LEN}.json"
    blocks_file.write_text(json.dumps(blocks))
    calib_file, calib_note = awqkit_calibration_file(
        tok, data, a.n_samples, SEQ_LEN, work / f"calib-squad-{a.n_samples}x{SEQ_LEN}.jsonl"
    )
    logger.info("calibration: %s", calib_note)

    records: dict[str, dict[str, Any]] = {}
    for name in names:
        rec = None if a.rerun else store.get(name)
        if a.from_json:
            if rec is None:
                logger.warning("%s: no saved result for these settings in %s", name, store.dir)
                continue
        elif rec is None or "eval" not in rec:
            if rec is None or not (work / "out" / name).is_dir():
                logger.info("%s: quantizing ...", name)
                rec = store.put(name, {"quant": quantize_run(name, a, work, src, calib_file, blocks_file)})
                q = rec["quant"]
                logger.info("%s: %.0f s, peak RSS %.2f GB", name, q["seconds"], q["peak_rss"] / 1e9)
            logger.info("%s: evaluating on %d window(s) ...", name, a.windows)
            ev = awqkit_eval(
                work / "out" / name,
                src,
                a.windows,
                work / "logs" / f"{name}.eval.json",
                work / "logs" / f"{name}.eval.log",
            )
            rec = store.put(name, {**rec, "eval": ev})
            logger.info("%s: ppl %.3f, KL %.4f, top-1 %.3f", name, ev["ppl"], ev["kl"], ev["top1"])
        records[name] = rec
    if not records:
        raise SystemExit("nothing to report")
    mach = (
        json.loads((work / "machine.json").read_text())
        if a.from_json and (work / "machine.json").is_file()
        else machine()
    )
    (work / "machine.json").write_text(json.dumps(mach))
    command = subprocess.list2cmdline(
        [
            "python",
            "scripts/benchmark_engine.py",
            "--runs",
            ",".join(records),
            "--n-samples",
            str(a.n_samples),
            "--windows",
            str(a.windows),
        ]
        + (["--group-size", str(a.group_size)] if a.group_size != 64 else [])
        + [f"--awqkit-arg={x}" for x in a.awqkit_arg]
    )
    body = render(records, a, calib_note, mach, command) + (f"\n{a.note}\n" if a.note else "")
    print(body)
    if not a.no_write:
        write_section(Path(a.benchmarks), a.section, body)


if __name__ == "__main__":
    main()
