"""awqkit orchestrate on a local Ray instance (2 CPUs): two cells at once, a cell whose worker is killed while
writing is retried and recorded once, and a plan half done by the local executor is finished under Ray with
the same state and results as an all-local run.

The cells' functions are wrapped by functions defined in this module's test bodies (Ray ships them by value):
they log each attempt (cell, worker pid, start and end time) into files, wait at the start until a second cell
has started too (so overlapping intervals prove that two cells ran at once) and, once, kill their own worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CORPUS, save_tiny_llama

import awqkit.api
import awqkit.platform.batch
import awqkit.platform.orchestrate
from awqkit import cli
from awqkit.platform.batch import STATE_FILE, RunState, folder_state
from awqkit.platform.orchestrate import orchestrate

ray = pytest.importorskip("ray")
from awqkit.platform.ray_executor import RayExecutor  # noqa: E402 - needs ray

pytestmark = pytest.mark.slow  # starting Ray and its workers takes half a minute on a 2-core machine

RUN = "Tiny-1-demo_SFT_NoPeft"
W4, W3 = f"{RUN}_RTN_w4_g32_headfp16", f"{RUN}_RTN_w3_g32_headfp16"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray instance for the module (the executor joins it and leaves it running)."""
    address = os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_src")
    save_tiny_llama(root / RUN, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    (root / "text.txt").write_text("\n".join(f" {s} " for s in TINY_CORPUS * 4) + "\n")
    return root / RUN


def _plan(folder: Path, src: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.toml").write_text(f"""
output_dir = "out"
[[models]]
path = "{src}"
[[specs]]
method = "rtn"
bits = [4, 3]
group_size = 32
[eval]
tasks = ["ppl", "kl"]
seq_len = 16
windows = 2
text = "{src.parent / "text.txt"}"
backend = "torch"
""")
    return folder / "plan.toml"


def _logged(real: Callable[..., Any], log: Path, kill: str | None = None) -> Callable[..., Any]:
    """``real`` (a cell function: ``(plan, cell, **kw)``) logging each attempt into ``log``; see the module
    docstring. ``kill``: the first attempt of the cell of that name dies after writing its layers, before its
    output is put in place (its staged folder is left behind, as SIGKILL leaves it)."""

    def cell_fn(plan: Any, cell: Any, **kw: Any) -> Any:
        import os
        import time
        import uuid

        import awqkit.api

        entry = {"cell": cell.name, "pid": os.getpid(), "start": time.time()}
        (log / f"start-{uuid.uuid4().hex}.json").write_text(json.dumps(entry))
        deadline = time.time() + 60
        while len({json.loads(p.read_text())["cell"] for p in log.glob("start-*.json")}) < 2:
            if time.time() > deadline:
                break
            time.sleep(0.05)
        if cell.name == kill and not (log / "killed.json").exists():

            def die(*args: Any, **kwargs: Any) -> None:
                (log / "killed.json").write_text(json.dumps({**entry, "end": time.time()}))
                os._exit(1)

            awqkit.api.commit = die  # type: ignore[assignment]  # this worker process only, and it dies
        value = real(plan, cell, **kw)
        (log / f"end-{uuid.uuid4().hex}.json").write_text(json.dumps({**entry, "end": time.time()}))
        return value

    return cell_fn


def _wrap(monkeypatch: pytest.MonkeyPatch, log: Path, kill: str | None = None) -> None:
    log.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(awqkit.platform.batch, "quantize_one", _logged(awqkit.platform.batch.quantize_one, log, kill))
    real_eval = awqkit.platform.orchestrate.evaluate_cell
    monkeypatch.setattr(awqkit.platform.orchestrate, "evaluate_cell", _logged(real_eval, log / "eval"))
    (log / "eval").mkdir(exist_ok=True)


def _entries(log: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in log.glob(f"{kind}-*.json")]


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]


def _count_records(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    records: list[tuple[str, str]] = []
    real = RunState.record

    def counted(self: RunState, section: str, name: str, **entry: Any) -> None:
        records.append((section, name))
        real(self, section, name, **entry)

    monkeypatch.setattr(RunState, "record", counted)
    return records


def test_a_local_instance_too_small_for_a_cell_is_an_error(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The executor starts its own local Ray (first in the module: before ``local_ray``), finds that no cell fits
    and stops it again, before anything is made."""
    if ray.is_initialized():
        pytest.skip("needs a process without Ray started")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plan = _plan(tmp_path, src)
    assert cli.main(["batch", str(plan), "--executor", "ray", "--cpus-per-cell", "4096"]) == 2
    err = capsys.readouterr().err
    assert "error: a cell needs --cpus-per-cell 4096, but the Ray cluster has" in err and "lower --cpus-per-cell" in err
    assert not ray.is_initialized()  # it started Ray, so it shut it down
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no cell ran; the lock is gone


def test_two_cells_at_once_and_a_killed_cell_retried_once(
    local_ray: None, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "log"
    _wrap(monkeypatch, log, kill=W3)
    records = _count_records(monkeypatch)
    report = orchestrate(_plan(tmp_path, src), progress=False, plots=False, executor=RayExecutor(max_retries=2))
    assert report.ok, report.summary()
    assert [o.status for o in report.quantize + report.evaluate] == ["done"] * 5
    assert ray.is_initialized()  # the executor joined this Ray: it leaves it running

    # quantize: both cells started before either ended (the killed attempt ends when it dies)
    killed = json.loads((log / "killed.json").read_text())
    ends = {e["cell"]: e for e in _entries(log, "end")}
    assert killed["cell"] == W3 and _overlap(ends[W4], killed)
    # the killed cell ran again in another worker and finished once; the other cell ran once
    starts = _entries(log, "start")
    assert sorted(e["cell"] for e in starts) == [W3, W3, W4]
    assert ends[W3]["pid"] != killed["pid"] and len(_entries(log, "end")) == 2
    # evaluate: 3 cells on 2 CPUs, two of them at once
    evals = _entries(log / "eval", "end")
    assert len(evals) == 3 and any(_overlap(a, b) for a in evals for b in evals)

    # recorded once each; the killed attempt's staged folder was taken over or removed: one complete output each
    out = tmp_path / "out"
    cells = [f"{RUN}_FP16", W4, W3]
    assert sorted(records) == sorted([("quantize", W4), ("quantize", W3)] + [("evaluate", c) for c in cells])
    assert all(folder_state(out / f"{n}_quantized")[0] == "complete" for n in (W4, W3))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [STATE_FILE, "eval", "results.csv", "results.md", "results.json", f"{W4}_quantized", f"{W3}_quantized"]
    )
    state = json.loads((out / STATE_FILE).read_text())
    assert {e["status"] for s in ("quantize", "evaluate") for e in state[s].values()} == {"done"}


def _normal(value: Any, out: Path) -> Any:
    """``value`` with ``out`` in its strings replaced, what differs from run to run dropped (times, and the hash
    of a folder's quantization_metadata.json, which records its timings): to compare two runs."""
    volatile = ("finished", "updated", "plan", "quantization_metadata_sha256")
    if isinstance(value, dict):
        keep = {k: v for k, v in value.items() if "seconds" not in k and k not in volatile}
        return {k: _normal(v, out) for k, v in keep.items()}
    if isinstance(value, list):
        return [_normal(v, out) for v in value]
    return value.replace(str(out), "OUT") if isinstance(value, str) else value


def _close(got: Any, want: Any) -> bool:
    """Equal, numbers to 1e-4 (the workers may sum in another order than this process)."""
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_close(got[k], want[k]) for k in got)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(got, float) and isinstance(want, float):
        return got == pytest.approx(want, rel=1e-4)
    return bool(got == want)


def _tree(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_a_plan_half_done_locally_is_finished_under_ray(
    local_ray: None, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the local run is stopped while quantizing the 2nd cell: the 1st is quantized, nothing evaluated
    real_quantize = awqkit.api.quantize

    def stop_at_w3(source: Any, dst: Any, **kw: Any) -> Any:
        if Path(dst).name == f"{W3}_quantized":
            raise KeyboardInterrupt
        return real_quantize(source, dst, **kw)

    with monkeypatch.context() as m:
        m.setattr(awqkit.api, "quantize", stop_at_w3)
        with pytest.raises(KeyboardInterrupt):
            orchestrate(_plan(tmp_path / "a", src), progress=False, plots=False)
    a = tmp_path / "a" / "out"
    made = (a / f"{W4}_quantized" / "quantization_metadata.json").stat().st_mtime_ns
    assert json.loads((a / STATE_FILE).read_text())["quantize"].keys() == {W4}

    log = tmp_path / "log"
    _wrap(monkeypatch, log)
    report = orchestrate(_plan(tmp_path / "a", src), progress=False, plots=False, executor=RayExecutor())
    assert report.ok and [o.status for o in report.quantize] == ["skipped", "done"]
    assert [e["cell"] for e in _entries(log, "start")] == [W3]  # only the missing cell was made
    assert len(_entries(log / "eval", "start")) == 3
    assert (a / f"{W4}_quantized" / "quantization_metadata.json").stat().st_mtime_ns == made

    monkeypatch.undo()  # the same plan, all local, elsewhere: the same files, state and results
    report = orchestrate(_plan(tmp_path / "b", src), progress=False, plots=False)
    b = tmp_path / "b" / "out"
    assert report.ok and _tree(a) == _tree(b)
    state_a, state_b = (_normal(json.loads((o / STATE_FILE).read_text()), o) for o in (a, b))
    assert state_a == state_b
    for cell in (a / "eval").iterdir():
        got, want = (_normal(json.loads((o / "eval" / cell.name).read_text()), o) for o in (a, b))
        assert got["key"] == want["key"] and _close(got["results"]["tasks"], want["results"]["tasks"])
    assert (a / "results.csv").read_text().splitlines()[0] == (b / "results.csv").read_text().splitlines()[0]
