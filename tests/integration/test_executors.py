"""Executors of awqkit batch / orchestrate without Ray: the local loop, cells finishing out of plan order (what a
parallel executor does) recorded as the local loop records them, and ``--executor ray`` without Ray installed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from conftest import TINY_CORPUS, save_tiny_llama

import awqkit.platform.orchestrate
from awqkit import cli
from awqkit.platform.batch import STATE_FILE, RunState, folder_state
from awqkit.platform.executors import (
    Job,
    JobResult,
    LocalExecutor,
    gpus_for,
    in_plan_order,
    make_executor,
    run_job,
)
from awqkit.platform.orchestrate import orchestrate

RUN = "Tiny-1-demo_SFT_NoPeft"


def _fail(msg: str) -> None:
    raise RuntimeError(msg)


def _interrupt() -> None:
    raise KeyboardInterrupt


def _out_of_memory() -> None:
    raise MemoryError("simulated")


def test_local_executor_runs_jobs_in_order_and_records_errors() -> None:
    jobs = [Job(0, "a", len, (["x", "y"],)), Job(1, "b", _fail, ("boom",)), Job(2, "c", max, (1, 3))]
    got = list(LocalExecutor().run(jobs))
    assert [j.label for j, _ in got] == ["a", "b", "c"]
    assert got[0][1].value == 2 and got[2][1].value == 3 and got[0][1].ok
    bad = got[1][1]
    assert not bad.ok and bad.error == "RuntimeError: boom" and "Traceback" in (bad.trace or "")
    with pytest.raises(KeyboardInterrupt):  # stops the campaign, as the loop it replaces did
        run_job(_interrupt, (), {})
    with pytest.raises(MemoryError):
        run_job(_out_of_memory, (), {}, reraise=(MemoryError,))
    assert gpus_for("cuda:1") == gpus_for("cuda") == 1.0 and gpus_for("cpu") == 0.0


def test_in_plan_order_writes_jobless_cells_between_the_results() -> None:
    events: list[str] = []
    jobs = [Job(1, "j1", len), Job(3, "j3", len)]
    later = {i: (lambda i=i: events.append(f"later {i}")) for i in (0, 2, 4)}
    results = ((j, JobResult(0)) for j in reversed(jobs))  # cell 3 finishes before cell 1
    for job, _ in in_plan_order(results, jobs, later):
        events.append(f"job {job.index}")
    assert events == ["later 0", "job 3", "job 1", "later 2", "later 4"]
    assert not later


class Reversed:
    """An executor that finishes every job before yielding them, last first (the worst order for the caller)."""

    name = "reversed"
    interactive = False

    def __enter__(self) -> Reversed:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, JobResult]]:
        done = [(j, run_job(j.fn, j.args, j.kwargs)) for j in jobs]
        yield from reversed(done)

    def cell_device(self, device: str) -> str:
        return device


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exec_src")
    save_tiny_llama(root / RUN, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    (root / "text.txt").write_text("\n".join(f" {s} " for s in TINY_CORPUS * 4) + "\n")
    return root / RUN


def _plan(tmp_path: Path, src: Path) -> Path:
    (tmp_path / "plan.toml").write_text(f"""
output_dir = "out"
[[models]]
path = "{src}"
[[specs]]
method = "rtn"
bits = [4, 3]
group_size = 32
[eval]
tasks = ["ppl"]
seq_len = 16
windows = 1
text = "{src.parent / "text.txt"}"
backend = "torch"
""")
    return tmp_path / "plan.toml"


def test_cells_finishing_out_of_order_are_recorded_once_with_the_float_baseline(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records: list[tuple[str, str]] = []
    real_record = RunState.record

    def counted(self: RunState, section: str, name: str, **entry: Any) -> None:
        records.append((section, name))
        real_record(self, section, name, **entry)

    cards: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(RunState, "record", counted)
    monkeypatch.setattr(
        awqkit.platform.orchestrate, "update_model_card_results", lambda path, res: cards.__setitem__(path.name, res)
    )
    report = orchestrate(_plan(tmp_path, src), progress=False, plots=False, executor=Reversed())
    assert report.ok and [o.status for o in report.quantize + report.evaluate] == ["done"] * 5
    names = [f"{RUN}_RTN_w4_g32_headfp16", f"{RUN}_RTN_w3_g32_headfp16"]
    assert [o.name for o in report.evaluate] == [f"{RUN}_FP16", *names]  # plan order, whatever finished first
    assert sorted(records) == sorted(
        [("quantize", n) for n in names] + [("evaluate", n) for n in [f"{RUN}_FP16", *names]]
    )
    out = tmp_path / "out"
    assert all(folder_state(out / f"{n}_quantized")[0] == "complete" for n in names)
    # the quantized cells finished before the float one: their cards waited for its values as the baseline
    fp_ppl = json.loads((out / "eval" / f"{RUN}_FP16.json").read_text())["results"]["tasks"]["ppl"]["model"]
    assert sorted(cards) == sorted(f"{n}_quantized" for n in names)
    assert all(c["tasks"]["ppl"]["baseline"] == fp_ppl for c in cards.values())
    state = json.loads((out / STATE_FILE).read_text())
    assert {e["status"] for s in ("quantize", "evaluate") for e in state[s].values()} == {"done"}

    records.clear()  # a rerun on the local executor finds everything finished
    report = orchestrate(_plan(tmp_path, src), progress=False, plots=False, executor="local")
    assert report.ok and records == [] and {o.status for o in report.quantize + report.evaluate} == {"skipped"}


def test_ray_without_ray_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(
        ImportError, match=r"needs the 'ray' package, which is not installed: pip install 'awqkit\[ray\]'"
    ):
        make_executor("ray")
    for command in ("batch", "orchestrate"):
        assert cli.main([command, str(tmp_path / "plan.toml"), "--executor", "ray"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"awqkit {command}: error: --executor ray needs the 'ray' package, which is not installed: "
            "pip install 'awqkit[ray]'"
        ]
    assert cli.main(["batch", str(tmp_path / "plan.toml"), "--ray-address", "auto"]) == 2
    assert "apply to --executor ray only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="executor 'dask' is not known"):
        make_executor("dask")
