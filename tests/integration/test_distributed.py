"""Data-parallel AWQ under ``torchrun`` (issue 13 §4): two CPU processes with the gloo backend, each holding half
of the calibration batches, write the checkpoint a single process writes.

What is equal, and why: every rank gathers the token samples in global batch order and all-reduces the float64
sums (mean |x|, Gram matrices, squared errors), so the ranks choose the same scales and clips as a single process;
only the order of the float64 additions differs, far below what changes a chosen grid point or a rounded weight.
The tests assert the strongest form: the same choices and byte-identical weight files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CORPUS, save_tiny_llama
from safetensors.torch import load_file

import awqkit.calib.stats
from awqkit.api import quantize
from awqkit.config import CalibConfig, QuantConfig, SearchConfig
from awqkit.parallel import SINGLE, DataParallel

pytest.importorskip("torch.distributed")

QCFG = QuantConfig(bits=4, group_size=32)
# 8 blocks in batches of 2: 4 batches, the first 2 searched (one per rank); 16-token chunks of the MLP's token
# sample (TOKEN_CHUNK patched below) so both ranks score a share of it
SCFG = SearchConfig(batch_size=2, search_samples=4, search_tokens=64, n_grid=5)
CHUNK = 16

_RANK_SCRIPT = r"""
import json, sys
import awqkit.calib.stats
awqkit.calib.stats.TOKEN_CHUNK = int(sys.argv[3])
import torch.distributed as dist
from awqkit.api import quantize
from awqkit.config import CalibConfig, QuantConfig, SearchConfig
dist.init_process_group("gloo")
kw = json.loads(sys.argv[2])
report = quantize(kw["src"], kw["dst"], method="awq", quant=QuantConfig(**kw["quant"]),
                  calib=CalibConfig(**kw["calib"]), search=SearchConfig(**kw["search"]), progress=False)
r = report.results
out = {"rank": dist.get_rank(), "modes": [(e.mode, e.alpha) for e in r.scales],
       "clips": [e.mean_ratio for e in r.clips], "meta": report.metadata.get("data_parallel")}
open(sys.argv[1] + f".{dist.get_rank()}", "w").write(json.dumps(out))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_llama(root / "src", num_hidden_layers=2)
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 12) + "\n")
    return root


def _calib(root: Path) -> CalibConfig:
    return CalibConfig(source=str(root / "calib.txt"), n_samples=8, seq_len=32)


def _torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb) and wa
    differ = [
        k
        for k in wa
        if not (wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape and bool((wa[k] == wb[k]).all()))
    ]
    assert not differ, f"tensors differ between the single-process and the 2-rank output: {differ}"


@pytest.mark.slow  # subprocesses; CI runs it once with `pytest -m slow`
def test_two_ranks_write_the_single_process_checkpoint(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(awqkit.calib.stats, "TOKEN_CHUNK", CHUNK)
    single = quantize(
        root / "src", tmp_path / "single", method="awq", quant=QCFG, calib=_calib(root), search=SCFG, progress=False
    )
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    kw = {
        "src": str(root / "src"),
        "dst": str(tmp_path / "dp"),
        "quant": {"bits": 4, "group_size": 32},
        "calib": {"source": str(root / "calib.txt"), "n_samples": 8, "seq_len": 32},
        "search": {"batch_size": 2, "search_samples": 4, "search_tokens": 64, "n_grid": 5},
    }
    _torchrun([str(script), str(tmp_path / "out"), json.dumps(kw), str(CHUNK)], tmp_path)
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    want = [[e.mode, e.alpha] for e in single.results.scales]
    assert want and all(r["modes"] == want for r in ranks)  # every rank chose what the single process chose
    clips = [e.mean_ratio for e in single.results.clips]
    assert all(r["clips"] == pytest.approx(clips, abs=1e-12) for r in ranks)
    assert ranks[0]["meta"] == {"world_size": 2, "transport": "gloo"}
    _same_weights(single.path, tmp_path / "dp")
    assert not list(tmp_path.glob(".dp*")), "a staged folder was left behind"


@pytest.mark.slow  # subprocesses; CI runs it once with `pytest -m slow`
def test_torchrun_cli_gram_clip_equals_single_process(root: Path, tmp_path: Path) -> None:
    """The CLI under torchrun, with the clip search on every token's Gram blocks (all-reduced)."""
    args = [
        "--src",
        str(root / "src"),
        "--calib",
        str(root / "calib.txt"),
        "--n-samples",
        "8",
        "--seq-len",
        "32",
        "--group-size",
        "32",
        "--batch-size",
        "2",
        "--search-samples",
        "4",
        "--search-tokens",
        "64",
        "--n-grid",
        "5",
        "--clip-n-tokens",
        "0",
    ]
    from awqkit.cli import main

    assert main(["quantize", "--dst", str(tmp_path / "single"), *args]) == 0
    proc = _torchrun(["-m", "awqkit.cli", "quantize", "--dst", str(tmp_path / "dp"), *args], tmp_path)
    assert "2 data-parallel ranks" in proc.stdout and proc.stdout.count("wrote ") == 1  # rank 0 prints
    _same_weights(tmp_path / "single", tmp_path / "dp")


def test_single_process_parallel_is_a_no_op() -> None:
    assert not SINGLE.active and SINGLE.batches(3) == [0, 1, 2] and SINGLE.sum_floats([1.5]) == [1.5]
    dp = DataParallel(rank=1, world=2, transport="gloo")
    assert dp.batches(5) == [1, 3] and dp.owns(3) and not dp.owns(4) and not dp.is_writer


def test_too_few_batches_for_the_ranks_is_refused(root: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from awqkit.pipeline import run_awq

    model = AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 16))
    with pytest.raises(ValueError, match="fewer than the 4 data-parallel ranks"):
        run_awq(model, ids, QCFG, SCFG, set(), progress=False, parallel=DataParallel(rank=3, world=4))
