"""awqkit orchestrate on a tiny Llama: quantize (RTN + one tiny AWQ), evaluate ppl/kl, tables, plots, resuming."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CORPUS, save_tiny_llama

import awqkit.api
import awqkit.eval.runner
from awqkit.commands import orchestrate_cmd
from awqkit.platform.batch import STATE_FILE
from awqkit.platform.campaign_results import bits_per_weight, results_markdown
from awqkit.platform.orchestrate import orchestrate
from awqkit.platform.plan import load_plan
from awqkit.report.model_card import RESULTS_START
from awqkit.spec import resolve_quantization_spec

RUN = "Tiny-1-demo_SFT_NoPeft"
TAGS = ("RTN_w4_g32", "RTN_w3_g32", "AWQ_w4_g32")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("orch_src")
    save_tiny_llama(root / RUN, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    (root / "text.txt").write_text("\n".join(f" {s} " for s in TINY_CORPUS * 4) + "\n")
    return root / RUN


def _write_plan(tmp_path: Path, src: Path, windows: int = 2, backend: str = "torch") -> Path:
    text = f"""
output_dir = "out"
[defaults]
calib = "{src.parent / "calib.txt"}"
n_samples = 4
seq_len = 32
n_grid = 3
search_samples = 2
search_tokens = 64
clip_n_grid = 3
clip_n_tokens = 64
batch_size = 2
[[models]]
path = "{src}"
[[specs]]
method = "rtn"
bits = [4, 3]
group_size = 32
[[specs]]
method = "awq"
bits = 4
group_size = 32
[eval]
tasks = ["ppl", "kl"]
seq_len = 16
windows = {windows}
text = "{src.parent / "text.txt"}"
backend = "{backend}"
"""
    (tmp_path / "plan.toml").write_text(text)
    return tmp_path / "plan.toml"


class Spy:
    """Replaces ``module.name``: records the output / evaluated folder name, raises ``fault`` on call ``fail_at``."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        module: Any,
        name: str,
        fail_at: int | None = None,
        fault: BaseException | None = None,
    ) -> None:
        real = getattr(module, name)
        self.real = real.real if isinstance(real, Spy) else real
        self.seen: list[str] = []
        self.fail_at, self.fault = fail_at, fault
        monkeypatch.setattr(module, name, self)

    def __call__(self, first: Any, *args: Any, **kw: Any) -> Any:
        self.seen.append(Path(args[0] if args else first).name)  # quantize(src, dst, ...) / evaluate_model(path)
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            assert self.fault is not None
            raise self.fault
        kw["progress"] = False
        return self.real(first, *args, **kw)


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return {r["quantization"]: r for r in csv.DictReader(fh)}


def _stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "eval").glob("*.json"))}


def test_orchestrate_resumes_after_failure_and_interruption(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plan = _write_plan(tmp_path, src)
    out = tmp_path / "out"
    folders = [out / f"{RUN}_{t}_headfp16_quantized" for t in TAGS]

    # 1. the 2nd quantization fails: reported, the other cells are quantized and evaluated
    quant = Spy(monkeypatch, awqkit.api, "quantize", fail_at=2, fault=RuntimeError("disk full (simulated)"))
    evals = Spy(monkeypatch, awqkit.eval.runner, "evaluate_model")
    report = orchestrate(plan, progress=False)
    assert quant.seen == [f.name for f in folders]
    assert evals.seen == [RUN, folders[0].name, folders[2].name]  # the float baseline first, never quantized
    assert not report.ok and [o.name for o in report.failed] == [f"{RUN}_{TAGS[1]}_headfp16"] * 2
    rows = _rows(out)
    assert [r["status"] for r in rows.values()] == ["done", "done", "failed", "done"]
    assert list(rows) == ["FP16", *TAGS]
    assert "not quantized: RuntimeError: disk full (simulated)" in rows["RTN_w3_g32"]["error"]
    fp, rtn4, awq4 = rows["FP16"], rows["RTN_w4_g32"], rows["AWQ_w4_g32"]
    assert float(fp["kl"]) == 0.0 and float(fp["ppl_retention"]) == 1.0 and float(fp["bits_per_weight"]) == 16
    assert float(rtn4["kl"]) > 0 and 0 < float(rtn4["ppl_retention"]) and float(rtn4["ppl"]) > 1
    assert float(awq4["bits_per_weight"]) == pytest.approx(4 + 20 / 32)
    # retention is against the FP16 row (lower is better for ppl: baseline / model)
    assert float(rtn4["ppl_retention"]) == pytest.approx(float(fp["ppl"]) / float(rtn4["ppl"]), rel=1e-4)
    md = (out / "results.md").read_text()
    assert "| FP16" in md and "RTN_w3_g32" in md and "not quantized" in md
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 4 and "bits_per_weight" in data
    assert {p.name for p in (out / "plots").iterdir()} == {"ppl_vs_bpw.png", "kl_vs_bpw.png", "retention.png"}
    card = (folders[0] / "README.md").read_text()  # the model card of each evaluated output gets the table
    assert RESULTS_START in card and "ppl" in card and RUN + "_FP16" not in card
    state = json.loads((out / STATE_FILE).read_text())
    assert state["evaluate"][f"{RUN}_FP16"]["status"] == "done"
    assert state["evaluate"][f"{RUN}_{TAGS[1]}_headfp16"]["status"] == "failed"

    # 2. the fault is gone; the run is interrupted while evaluating the new output
    quant = Spy(monkeypatch, awqkit.api, "quantize")
    evals = Spy(monkeypatch, awqkit.eval.runner, "evaluate_model", fail_at=1, fault=KeyboardInterrupt())
    stamps = _stamps(out)
    with pytest.raises(KeyboardInterrupt):
        orchestrate(plan, progress=False)
    assert quant.seen == [folders[1].name] and evals.seen == [folders[1].name]

    # 3. resumed: nothing quantized again, only the missing evaluation runs
    quant = Spy(monkeypatch, awqkit.api, "quantize")
    evals = Spy(monkeypatch, awqkit.eval.runner, "evaluate_model")
    report = orchestrate(plan, progress=False)
    assert report.ok and quant.seen == [] and evals.seen == [folders[1].name]
    assert {k: v for k, v in _stamps(out).items() if k in stamps} == stamps  # finished cells untouched
    rows = _rows(out)
    assert [r["status"] for r in rows.values()] == ["done"] * 4 and all(not r["error"] for r in rows.values())
    assert float(rows["RTN_w3_g32"]["kl"]) > float(rows["RTN_w4_g32"]["kl"])  # 3 bits lose more than 4

    # 4. nothing left to do; without matplotlib the plots are skipped with a warning
    for png in (out / "plots").iterdir():
        png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    quant = Spy(monkeypatch, awqkit.api, "quantize")
    evals = Spy(monkeypatch, awqkit.eval.runner, "evaluate_model")
    with caplog.at_level(logging.WARNING, logger="awqkit.report.plots"):
        report = orchestrate(plan, progress=False)
    assert report.ok and quant.seen == [] and evals.seen == []
    assert "matplotlib is not installed" in caplog.text and not list((out / "plots").iterdir())
    assert [o.status for o in report.evaluate] == ["skipped"] * 4

    # 5. other evaluation settings: every cell is measured again (and nothing quantized)
    plan = _write_plan(tmp_path, src, windows=3)
    evals = Spy(monkeypatch, awqkit.eval.runner, "evaluate_model")
    parser = argparse.ArgumentParser()
    orchestrate_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["orchestrate", str(plan), "--no-progress", "--no-plots"])
    assert args.func(args) == 0
    assert len(evals.seen) == 4 and quant.seen == []
    data = json.loads((out / "eval" / f"{RUN}_FP16.json").read_text())
    assert data["results"]["data"]["text"]["n_windows"] == 3

    # 6. another kernel backend: only the quantized cells are measured again (the float baseline has no
    # quantized layers), also when its stored key is an older one that still listed the backend
    fp_file = out / "eval" / f"{RUN}_FP16.json"
    data["key"]["eval"]["backend"] = "torch"
    fp_file.write_text(json.dumps(data))
    plan = _write_plan(tmp_path, src, windows=3, backend="auto")
    evals = Spy(monkeypatch, awqkit.eval.runner, "evaluate_model")
    report = orchestrate(plan, progress=False, plots=False)
    assert report.ok and sorted(evals.seen) == sorted(f.name for f in folders)


def test_bits_per_weight() -> None:
    spec = resolve_quantization_spec
    assert bits_per_weight(spec("awq", bits=4, group_size=128)) == pytest.approx(4 + 20 / 128)
    assert bits_per_weight(spec("rtn", bits=3, group_size=64)) == pytest.approx(3 + 19 / 64)
    assert bits_per_weight(spec("rtn", bits=3, group_size=64, zero_point=False)) == pytest.approx(3 + 16 / 64)
    assert bits_per_weight(spec("rtn", bits=4, group_size=64, zero_point=False)) == pytest.approx(4 + 20 / 64)
    assert bits_per_weight(spec("rtn", bits=4, group_size=-1)) == 4.0
    assert bits_per_weight(spec("fp")) == 16.0


def test_results_markdown_states_each_task_limit(tmp_path: Path, src: Path) -> None:
    plan_file = _write_plan(tmp_path, src)
    text = plan_file.read_text().replace('tasks = ["ppl", "kl"]', 'tasks = ["ppl", "arc", "squad"]')
    plan_file.write_text(text + "limit = 5\ntask_options = { squad = { limit = 200 } }\n")
    md = results_markdown(load_plan(plan_file), [], ["model", "bits_per_weight"])
    assert "items: arc 5, squad 200" in md
    plan_file.write_text(text + "task_options = { arc = { limit = 7 }, squad = { limit = 7 } }\n")
    assert "limit 7 items per task" in results_markdown(load_plan(plan_file), [], ["model", "bits_per_weight"])


def test_dry_run_and_missing_text(tmp_path: Path, src: Path) -> None:
    plan = _write_plan(tmp_path, src)
    report = orchestrate(plan, dry_run=True)
    assert [o.status for o in report.quantize] == ["planned"] * 3
    assert [o.status for o in report.evaluate] == ["planned"] * 4 and not (tmp_path / "out").exists()
    from awqkit.platform.plan import load_plan

    p = load_plan(plan)
    p = dataclasses.replace(p, eval=dataclasses.replace(p.eval, text=tmp_path / "gone.txt"))  # gone since
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        orchestrate(p)
    assert not (tmp_path / "out").exists()  # checked before anything runs
