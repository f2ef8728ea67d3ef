"""Helpers shared by scripts/benchmark_engine.py and scripts/benchmark_growth.py.

* Child processes: every measured quantization runs in its own process (its wall time and peak RSS are its own);
  its output goes to a log file, and a failure raises with the log's tail.
* :func:`awqkit_quantize` runs the ``awqkit quantize`` command line in a child and reads ``VmHWM`` there at the
  end; :func:`awqkit_eval` runs ``awqkit eval --backend torch`` (the fp32 reference kernel) and returns
  ppl / KL / top-1 against the float baseline.
* :func:`peer_blocks` builds the peers' calibration protocol (../shared/docs/peer-runs.md) and
  :func:`awqkit_calibration_file` a calibration file from which awqkit cuts exactly those blocks.
* :class:`RunStore`: one JSON file per finished run in a work folder, so an interrupted benchmark resumes run by run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench")

# Run awqkit's CLI in this child and record the quantization's own wall time and peak RSS (VmHWM: ru_maxrss
# would carry the parent's RSS over at fork).
_QUANTIZE_CHILD = r"""
import json, sys, time
from awqkit.cli import main
from awqkit.bench.modes import process_peak_rss_bytes
t = time.perf_counter()
rc = main(sys.argv[2:])
out = {"rc": rc, "seconds": time.perf_counter() - t, "peak_rss": process_peak_rss_bytes()}
open(sys.argv[1], "w").write(json.dumps(out))
sys.exit(rc)
"""


def add_output_args(ap: Any, work: str, section: str) -> None:
    """The arguments every benchmark script shares: where it keeps its runs, which data, and what it writes."""
    ap.add_argument("--work", default=work, help="outputs and per-run JSON (default %(default)s)")
    ap.add_argument("--data-dir", default=None, help="data folder (default: $AWQKIT_DATA or ../shared/data)")
    ap.add_argument("--from-json", action="store_true", help="only re-render the saved results of these settings")
    ap.add_argument("--rerun", action="store_true", help="ignore saved results and run everything again")
    ap.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to update")
    ap.add_argument("--section", default=section, help="section title (default: %(default)s)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--note", default="", help="a sentence appended to the section (e.g. what was not run)")
    ap.add_argument("-v", "--verbose", action="store_true")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_logged(cmd: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run ``cmd`` with stdout and stderr appended to ``log``; raise with the log's tail if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.debug("running %s (log %s)", " ".join(cmd), log)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False).returncode
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")


def awqkit_quantize(cli_args: list[str], result: Path, log: Path, python: Path | None = None) -> dict[str, Any]:
    """``awqkit quantize CLI_ARGS`` in a child process (``python``, default this interpreter): ``{"seconds",
    "peak_rss", "rc"}`` plus the output's ``quantization_metadata.json`` as ``"metadata"`` (timings, per-layer
    seconds)."""
    result.unlink(missing_ok=True)
    run_logged([str(python or sys.executable), "-c", _QUANTIZE_CHILD, str(result), "quantize", *cli_args], log)
    out = json.loads(result.read_text())
    dst = Path(cli_args[cli_args.index("--dst") + 1])
    meta_file = dst / "quantization_metadata.json"
    out["metadata"] = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    return out


def awqkit_eval(model: Path, baseline: Path, windows: int, out_json: Path, log: Path) -> dict[str, float]:
    """``awqkit eval MODEL --baseline BASELINE --tasks ppl,kl --backend torch`` on the first ``windows``
    2048-token WikiText-2 windows; returns ppl, ppl_fp (the baseline's), kl and top1."""
    run_logged(
        [
            sys.executable,
            "-m",
            "awqkit.cli",
            "eval",
            str(model),
            "--baseline",
            str(baseline),
            "--tasks",
            "ppl,kl",
            "--windows",
            str(windows),
            "--seq-len",
            "2048",
            "--backend",
            "torch",
            "--json",
            str(out_json),
            "--no-progress",
        ],
        log,
    )
    res = json.loads(out_json.read_text())
    kernels = res["model"].get("kernels", {}).get("layers", {})
    return {
        "ppl": res["tasks"]["ppl"]["model"]["ppl"],
        "ppl_fp": res["tasks"]["ppl"]["baseline"]["ppl"],
        "kl": res["tasks"]["kl"]["model"]["kl"],
        "top1": res["tasks"]["kl"]["model"]["top1_agreement"],
        "detected": res["model"]["detection"],
        "kernels": kernels,
    }


# ------------------------------------------------------------------------------------------ calibration
def squad_contexts(data_dir: Path) -> list[str]:
    """The SQuAD 2.0 dev contexts in file order, newlines replaced by spaces (peer-runs.md)."""
    doc = json.loads((data_dir / "squad-v2" / "dev-v2.0.json").read_text(encoding="utf-8"))
    return [p["context"].replace("\n", " ") for a in doc["data"] for p in a["paragraphs"]]


def peer_blocks(tokenizer: Any, data_dir: Path, n: int, seq_len: int) -> tuple[list[list[int]], str]:
    """The peers' calibration: contexts joined by blank lines, tokenized as one text (no special tokens), the first
    ``n`` consecutive ``seq_len``-token blocks. Returns ``(blocks, joined text)``."""
    text = "\n\n".join(squad_contexts(data_dir))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * seq_len:
        raise SystemExit(f"the SQuAD contexts hold {len(ids)} tokens, fewer than {n} x {seq_len}")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)], text


def awqkit_calibration_file(tokenizer: Any, data_dir: Path, n: int, seq_len: int, out: Path) -> tuple[Path, str]:
    """A JSONL calibration file from which awqkit cuts exactly :func:`peer_blocks`, and a sentence saying so.

    awqkit's ``build_blocks`` shuffles samples, joins them with EOS and draws ``n`` of the blocks at random when
    there are more. One ``{"text": ...}`` sample (read back unchanged, tokenized without special tokens) holding
    the joined contexts cut just after the first ``n * seq_len`` tokens yields exactly ``n`` blocks in order, the
    peers' blocks; this is checked with awqkit's own reader, and any difference is reported instead.
    """
    from awqkit.calib import load_calibration
    from awqkit.config import CalibConfig

    blocks, text = peer_blocks(tokenizer, data_dir, n, seq_len)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    cut = len(text)
    if len(enc["input_ids"]) > n * seq_len:  # the first whitespace after token n*seq_len: a whole last word
        ws = re.search(r"\s", text[enc["offset_mapping"][n * seq_len][1] :])
        cut = enc["offset_mapping"][n * seq_len][1] + ws.start() if ws else len(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"text": text[:cut]}) + "\n", encoding="utf-8")
    got = load_calibration(str(out), tokenizer, CalibConfig(source=str(out), n_samples=n, seq_len=seq_len))
    if got.tolist() == blocks:
        return out, (
            f"awqkit is given the same {n} x {seq_len} blocks (one JSONL text sample, the joined contexts "
            f"cut at the first word end after {n * seq_len} tokens; checked token for token with awqkit's "
            "calibration reader)"
        )
    same = sum(a == b for a, b in zip(got.tolist(), blocks, strict=False))
    return out, (
        f"awqkit's calibration reader cut {got.shape[0]} blocks from the same text, {same} of them equal to "
        f"the peers' {n} blocks: the calibration differs"
    )


# ----------------------------------------------------------------------------------------- bookkeeping
class RunStore:
    """``work/runs/NAME.json`` per finished step; a stored record counts only if its ``settings`` match."""

    def __init__(self, work: Path, settings: dict[str, Any]) -> None:
        self.dir = work / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings

    def get(self, name: str) -> dict[str, Any] | None:
        path = self.dir / f"{name}.json"
        if not path.is_file():
            return None
        rec = json.loads(path.read_text())
        if rec.get("settings") != self.settings:
            logger.info("%s: stored result has other settings; running it again", name)
            return None
        return rec

    def put(self, name: str, rec: dict[str, Any]) -> dict[str, Any]:
        rec = {**rec, "settings": self.settings}
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        os.replace(tmp, self.dir / f"{name}.json")
        return rec


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS, date: the line a benchmark table carries."""
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    mem = next(
        (
            int(ln.split()[1]) * 1024
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal:")
        ),
        0,
    )
    import torch

    return {
        "cpu": cpu,
        # the vector ISA torch dispatches to: machines sold under one model name differ (AVX2 or AVX-512), and
        # so do their times and the float rounding of their GEMMs
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
    }


def machine_line(m: dict[str, Any]) -> str:
    isa = f" ({m['isa']})" if m.get("isa") else ""
    return f"{m['cpu']}{isa}, {m['cores']} cores, {m['memory_gib']} GiB RAM, no GPU; {m['date']}"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "not met")


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of the markdown file ``path``."""
    from awqkit.report.table import write_benchmarks_section

    write_benchmarks_section(path, title, body)
    logger.info("wrote section %r of %s", title, path)
