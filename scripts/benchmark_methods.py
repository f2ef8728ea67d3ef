"""Beyond AWQ on one harness (issue 15): every awqkit method and two outside references, side by side, on
SmolLM2-135M-Instruct, in one run on one machine.

Runs (``--runs``, any subset, in this order):

* ``rtn``, ``awq``, ``gptq``, ``adaround``, ``awq-gptq``: ``awqkit quantize --method M`` with its
  defaults, except GPTQ's dampening 0.1 and activation order (``--gptq-damp 0.1 --gptq-act-order``, the best
  GPTQ setting measured on this model, BENCHMARKS "Beyond AWQ ... first measurements") and AdaRound's
  ``--rounding-iters 200``;
* ``awq-refine-i<N>`` for each ``--iters-table`` entry ``N`` (``N:R``: ``awq-refine-i<N>-n<R>``, with
  ``--refine-norms R``): ``--method awq-refine --refine-iters N``, the time/quality
  trade-off of the block refinement (its default, 50 steps a layer, is one of them);
* ``autoround``: intel/auto-round 0.16.1, its default recipe (SignRound, 200 iterations a block), exported in its
  AutoAWQ format, run in its own virtual environment (``scripts/_peer_quantize.py``);
* ``gptqmodel``: GPTQModel 7.7.0's GPTQ (damp 0.05, no activation order, as peer-runs.md), evaluated through its
  own dequantization written as a float folder.

Calibration: the engine benchmark's protocol (../shared/docs/peer-runs.md): the first ``--n-samples`` 512-token
blocks of the SQuAD 2.0 dev contexts, given to the peers as token blocks and to awqkit as a file its reader cuts
into the same blocks (checked). Each quantization runs in its own process (wall time and peak RSS its own).

Evaluation (awqkit's own loader, fp32 reference kernel): WikiText-2 test perplexity on the first ``--windows``
2048-token windows, KL(fp || quantized) and top-1 agreement on the same windows, and, with ``--tasks``,
ARC-Challenge (log-likelihood, ``--arc-limit`` items) and GSM8K (greedy generation, ``--gsm8k-limit`` items).
"Gap closed" is (ppl_RTN - ppl) / (ppl_RTN - ppl_fp). Every finished step is kept as JSON in ``--work``, so an
interrupted benchmark resumes run by run; ``--from-json`` re-renders.

Usage: python scripts/benchmark_methods.py [--runs rtn,awq,awq-refine-i50,autoround] [--bits 4] [--group-size 64]
       [--iters-table 25,50,100,200] [--tasks arc,gsm8k] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from awqkit.config import SearchConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    ROOT,
    RunStore,
    add_output_args,
    awqkit_calibration_file,
    awqkit_eval,
    awqkit_quantize,
    machine,
    machine_line,
    peer_blocks,
    run_logged,
    setup_logging,
    write_section,
)

logger = logging.getLogger("bench.methods")
SECTION = "Beyond AWQ: every method on one harness (issue 15)"
SEQ_LEN = 512
DEFAULT_REFINE_ITERS = SearchConfig().refine_iters  # the default's row is named in the table
GPTQ_ARGS = ["--gptq-damp", "0.1", "--gptq-act-order"]
METHODS: dict[str, dict[str, Any]] = {
    "rtn": {"label": "awqkit RTN", "args": ["--method", "rtn"]},
    "awq": {"label": "awqkit AWQ", "args": ["--method", "awq"]},
    "gptq": {"label": "awqkit GPTQ (damp 0.1, act-order)", "args": ["--method", "gptq", *GPTQ_ARGS]},
    "adaround": {"label": "awqkit AdaRound (200 steps)", "args": ["--method", "adaround", "--rounding-iters", "200"]},
    "awq-gptq": {"label": "awqkit AWQ + GPTQ (damp 0.1, act-order)", "args": ["--method", "awq-gptq", *GPTQ_ARGS]},
}
PEER_RUNS: dict[str, dict[str, Any]] = {
    "autoround": {"label": "auto-round 0.16.1, default recipe (200 iters), AutoAWQ export", "job": {}},
    "gptqmodel": {"label": "GPTQModel 7.7.0 GPTQ (damp 0.05, no act-order)", "job": {}},
}


REFINE_RUN = re.compile(r"awq-refine-i(\d+)(?:-n([0-9.]+))?")


def run_names(iters_table: list[str]) -> list[str]:
    refine = [f"awq-refine-i{e.replace(':', '-n')}" for e in iters_table]
    return [*METHODS, *refine, *PEER_RUNS]


def quantize(name: str, a: argparse.Namespace, work: Path, src: Path, calib: Path, blocks: Path) -> dict[str, Any]:
    dst, log = work / "out" / name, work / "logs" / f"{name}.log"
    log.unlink(missing_ok=True)
    if name in PEER_RUNS:
        from benchmark_engine import ensure_peer_venv

        py = ensure_peer_venv(name, Path(a.peers_dir).expanduser())
        if dst.exists():
            shutil.rmtree(dst)
        job = {
            "tool": name,
            "src": str(src),
            "dst": str(dst),
            "blocks": str(blocks),
            "bits": a.bits,
            "group_size": a.group_size,
            "result": str(work / "logs" / f"{name}.result.json"),
            **PEER_RUNS[name]["job"],
        }
        job_file = work / "logs" / f"{name}.job.json"
        job_file.write_text(json.dumps(job))
        # in the work folder: GPTQModel writes a logs/ folder into its working directory
        run_logged([str(py), str(ROOT / "scripts" / "_peer_quantize.py"), str(job_file)], log, cwd=work)
        return json.loads(Path(job["result"]).read_text())
    if m := REFINE_RUN.fullmatch(name):
        method_args = ["--method", "awq-refine", "--refine-iters", m[1]]
        method_args += ["--refine-norms", m[2]] if m[2] else []
    else:
        method_args = METHODS[name]["args"]
    args = ["--src", str(src), "--dst", str(dst), "--overwrite", "--bits", str(a.bits)]
    args += ["--group-size", str(a.group_size), *method_args]
    if name != "rtn":
        args += ["--calib", str(calib), "--n-samples", str(a.n_samples), "--seq-len", str(SEQ_LEN)]
    r = awqkit_quantize(args, work / "logs" / f"{name}.result.json", log)
    meta = r.pop("metadata") or {}
    r["layer_seconds"] = (meta.get("awq") or {}).get("layer_seconds")
    r["versions"] = meta.get("versions", {})
    return r


def evaluated_folder(name: str, work: Path) -> Path:
    """What awqkit evaluates: the output, or for GPTQModel its dequantized float folder."""
    out = work / "out" / name
    return out.with_name(out.name + "-dequantized") if name == "gptqmodel" else out


def task_eval(model: Path, a: argparse.Namespace, out_json: Path, log: Path) -> dict[str, float]:
    """ARC-Challenge and GSM8K accuracies of ``model`` (awqkit eval, fp32 reference kernel for quantized folders)."""
    tasks = a.tasks.split(",")
    limit = {"arc": a.arc_limit, "gsm8k": a.gsm8k_limit}
    out: dict[str, float] = {}
    for task in tasks:
        path = out_json.with_name(f"{out_json.stem}.{task}.json")
        cmd = [sys.executable, "-m", "awqkit.cli", "eval", str(model), "--tasks", task, "--limit", str(limit[task])]
        run_logged([*cmd, "--backend", "torch", "--json", str(path), "--no-progress"], log)
        res = json.loads(path.read_text())["tasks"][task]["model"]
        out.update({f"{task}_{k}": v for k, v in res.items() if isinstance(v, (int, float))})
    return out


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render(records: dict[str, dict[str, Any]], a: argparse.Namespace, calib_note: str, mach: dict[str, Any]) -> str:
    fp = records.get("fp", {}).get("eval", {})
    ppl_fp = fp.get("ppl") or next((r["eval"]["ppl_fp"] for r in records.values() if "eval" in r), None)
    ppl_rtn = records.get("rtn", {}).get("eval", {}).get("ppl")
    t_awq = records.get("awq", {}).get("quant", {}).get("seconds")
    lines = [
        f"SmolLM2-135M-Instruct, {a.bits}-bit asymmetric, group {a.group_size}; calibration {a.n_samples} x "
        f"{SEQ_LEN} tokens of SQuAD 2.0 dev contexts ({calib_note}); WikiText-2 test ppl, KL(fp ‖ model) and top-1 "
        f"agreement on the first {a.windows} 2048-token windows; ARC-Challenge (first {a.arc_limit} items) and GSM8K "
        f"(first {a.gsm8k_limit} items, greedy) with awqkit's tasks. Machine: {machine_line(mach)}. "
        "Time: the whole quantize command (load, calibration, search, write) in its own process.",
        "",
        "| method | ppl | gap closed | KL | top-1 | ARC acc | GSM8K EM | time s | × AWQ time | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rec in records.items():
        ev, q, t = rec.get("eval", {}), rec.get("quant", {}), rec.get("tasks", {})
        gap = None
        if ev.get("ppl") is not None and ppl_rtn is not None and ppl_fp is not None and name != "fp":
            gap = 100 * (ppl_rtn - ev["ppl"]) / (ppl_rtn - ppl_fp)
        secs = q.get("seconds")
        label = rec.get("label", name)
        lines.append(
            f"| {label} | {_fmt(ev.get('ppl'), '.3f')} | {_fmt(gap, '.1f')}{'' if gap is None else ' %'} | "
            f"{_fmt(ev.get('kl'), '.4f')} | {_fmt(ev.get('top1'), '.3f')} | {_fmt(t.get('arc_acc'), '.3f')} | "
            f"{_fmt(t.get('gsm8k_em'), '.3f')} | {_fmt(secs, '.0f')} | "
            f"{_fmt(secs / t_awq if secs and t_awq else None, '.2f')} | "
            f"{_fmt(q['peak_rss'] / 1e9 if q.get('peak_rss') else None, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=None, help="comma-separated (default: all): fp is always evaluated")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32, help="calibration blocks of 512 tokens (default 32)")
    ap.add_argument("--windows", type=int, default=8, help="2048-token WikiText-2 windows (default 8)")
    ap.add_argument(
        "--iters-table", default="25,50,100,200", help="awq-refine runs at these --refine-iters (N:R: --refine-norms R)"
    )
    ap.add_argument("--tasks", default="", help="arc,gsm8k (default: none: ppl/KL only)")
    ap.add_argument("--arc-limit", type=int, default=1172, help="ARC-Challenge items (default all 1172)")
    ap.add_argument("--gsm8k-limit", type=int, default=200, help="GSM8K items (default 200)")
    ap.add_argument("--peers-dir", default="~/.cache/awqkit/peers", help="the peers' venvs (default %(default)s)")
    add_output_args(ap, "~/.cache/awqkit/bench-methods", SECTION)
    a = ap.parse_args()
    setup_logging(a.verbose)
    iters = [e for e in a.iters_table.split(",") if e]
    if bad := [e for e in iters if not re.fullmatch(r"\d+(:[0-9.]+)?", e)]:
        ap.error(f"--iters-table entries are N or N:R (steps, norm range), got {bad}")
    known = run_names(iters)
    names = known if a.runs is None else [n for n in known if n in a.runs.split(",")]
    unknown = set(a.runs.split(",") if a.runs else []) - set(known)
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}; choose from {known}")

    from transformers import AutoTokenizer

    from awqkit.eval.perplexity import default_data_dir
    from awqkit.zoo import fetch_smollm2

    work = Path(a.work).expanduser() / f"w{a.bits}g{a.group_size}"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    src = fetch_smollm2()
    data = Path(a.data_dir) if a.data_dir else default_data_dir()
    settings = {"n_samples": a.n_samples, "windows": a.windows, "bits": a.bits, "group_size": a.group_size}
    store = RunStore(work, settings)
    tok = AutoTokenizer.from_pretrained(src)
    blocks, _ = peer_blocks(tok, data, a.n_samples, SEQ_LEN)
    blocks_file = work / f"calib-blocks-{a.n_samples}x{SEQ_LEN}.json"
    blocks_file.write_text(json.dumps(blocks))
    calib_file, calib_note = awqkit_calibration_file(
        tok, data, a.n_samples, SEQ_LEN, work / f"calib-squad-{a.n_samples}x{SEQ_LEN}.jsonl"
    )
    tasks = [t for t in a.tasks.split(",") if t]
    records: dict[str, dict[str, Any]] = {}
    for name in ["fp", *names]:
        rec = (None if a.rerun else store.get(name)) or {}
        label = "fp32" if name == "fp" else METHODS.get(name, PEER_RUNS.get(name, {})).get("label")
        if m := REFINE_RUN.fullmatch(name):
            default = " (the default)" if m[1] == str(DEFAULT_REFINE_ITERS) and m[2] is None else ""
            norms = f", norms learned within {m[2]}" if m[2] else ""
            label = f"awqkit AWQ + block refinement, {m[1]} steps a layer{norms}{default}"
        rec["label"] = label
        if a.from_json:
            if rec.get("quant") or name == "fp":
                records[name] = rec
            continue
        if name != "fp" and "quant" not in rec:
            logger.info("%s: quantizing ...", name)
            rec = store.put(name, {**rec, "quant": quantize(name, a, work, src, calib_file, blocks_file)})
            logger.info("%s: %.0f s, peak RSS %.2f GB", name, rec["quant"]["seconds"], rec["quant"]["peak_rss"] / 1e9)
        model = src if name == "fp" else evaluated_folder(name, work)
        if "eval" not in rec and name != "fp":
            logs = work / "logs"
            ev = awqkit_eval(model, src, a.windows, logs / f"{name}.eval.json", logs / f"{name}.eval.log")
            rec = store.put(name, {**rec, "eval": ev})
            logger.info("%s: ppl %.3f, KL %.4f, top-1 %.3f", name, ev["ppl"], ev["kl"], ev["top1"])
        have = rec.get("tasks", {})
        if tasks and not all(any(k.startswith(t + "_") for k in have) for t in tasks):
            logger.info("%s: tasks %s ...", name, ",".join(tasks))
            t = task_eval(model, a, work / "logs" / f"{name}.tasks.json", work / "logs" / f"{name}.tasks.log")
            rec = store.put(name, {**rec, "tasks": t})
        records[name] = rec
    if "fp" in records and "eval" not in records["fp"]:
        ppl_fp = next((r["eval"]["ppl_fp"] for r in records.values() if "eval" in r), None)
        records["fp"]["eval"] = {"ppl": ppl_fp, "kl": 0.0, "top1": 1.0}
    body = render(records, a, calib_note, machine())
    if a.note:
        body += "\n" + a.note + "\n"
    print(body)
    if not a.no_write:
        write_section(Path(a.benchmarks), f"{a.section}, w{a.bits} g{a.group_size}", body)


if __name__ == "__main__":
    main()
