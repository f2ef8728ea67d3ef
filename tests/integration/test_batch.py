"""awqkit batch: a plan of RTN specs on a tiny Llama; interruption, failures, reruns, stale temporaries, the lock."""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CORPUS, save_tiny_llama

import awqkit.api
from awqkit.commands import batch_cmd
from awqkit.platform.batch import LOCK_FILE, STATE_FILE, folder_state, run_batch, run_lock

RUN = "Tiny-1-demo_SFT_NoPeft"
TAGS = ("RTN_w4_g32_headfp16", "RTN_w3_g32_headfp16", "RTN_w8_g64_headfp16")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch_src")
    save_tiny_llama(root / RUN, max_position_embeddings=256)
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    return root / RUN


def _plan(tmp_path: Path, src: Path) -> Path:
    text = f"""
output_dir = "out"
[defaults]
calib = "{src.parent / "calib.txt"}"
n_samples = 4
seq_len = 32
[[models]]
path = "{src}"
[[specs]]
method = "rtn"
bits = [4, 3]
group_size = 32
[[specs]]
method = "rtn"
bits = 8
group_size = 64
[[specs]]
method = "fp"
[eval]
tasks = ["ppl"]
"""
    (tmp_path / "plan.toml").write_text(text)
    return tmp_path / "plan.toml"


def _folders(tmp_path: Path) -> list[Path]:
    return [tmp_path / "out" / f"{RUN}_{tag}_quantized" for tag in TAGS]


class Calls:
    """Wraps awqkit.api.quantize: counts calls per output name, raises ``fault`` on call number ``fail_at``."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None, fault: BaseException | None = None
    ) -> None:
        self.real = awqkit.api.quantize
        self.names: list[str] = []
        self.fail_at, self.fault = fail_at, fault
        monkeypatch.setattr(awqkit.api, "quantize", self)

    def __call__(self, src: Any, dst: Any, **kw: Any) -> Any:
        self.names.append(Path(dst).name)
        if self.fail_at is not None and len(self.names) == self.fail_at:
            assert self.fault is not None
            raise self.fault
        kw["progress"] = False
        return self.real(src, dst, **kw)


def _stamp(folder: Path) -> tuple[int, int]:
    meta = folder / "quantization_metadata.json"
    return meta.stat().st_ino, meta.stat().st_mtime_ns


def test_interrupted_batch_rerun_makes_each_output_once(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, src)
    first, second, third = _folders(tmp_path)
    calls = Calls(monkeypatch, fail_at=2, fault=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):  # the user stops the batch during the 2nd model
        run_batch(plan, progress=False)
    assert calls.names == [first.name, second.name]
    assert folder_state(first)[0] == "complete" and not second.exists() and not third.exists()
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released on the way out
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    assert state["quantize"][f"{RUN}_{TAGS[0]}"]["status"] == "done"
    stamp = _stamp(first)
    # a killed save leaves a hidden temporary sibling; the rerun removes it
    stale = tmp_path / "out" / f".{second.name}.tmp-dead1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    calls = Calls(monkeypatch)
    report = run_batch(plan, progress=False)
    assert calls.names == [second.name, third.name]  # only the missing ones
    assert [o.status for o in report.outcomes] == ["skipped", "done", "done"] and report.ok
    assert any(str(stale) in line for line in report.recovered) and not stale.exists()
    assert all(folder_state(f)[0] == "complete" for f in (first, second, third))
    assert _stamp(first) == stamp  # never rewritten
    meta = json.loads((third / "quantization_metadata.json").read_text())
    assert (meta["method"], meta["bits"], meta["group_size"]) == ("rtn", 8, 64)

    calls = Calls(monkeypatch)
    report = run_batch(plan, progress=False)
    assert calls.names == [] and [o.status for o in report.outcomes] == ["skipped"] * 3
    # each output exactly once, nothing else left in the output folder
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [STATE_FILE, first.name, second.name, third.name]
    )


def test_failed_model_is_reported_and_the_rest_go_on(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    plan = _plan(tmp_path, src)
    first, second, third = _folders(tmp_path)
    parser = argparse.ArgumentParser()
    batch_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", str(plan), "--no-progress"])

    calls = Calls(monkeypatch, fail_at=2, fault=RuntimeError("out of memory (simulated)"))
    assert args.func(args) == 1  # a failed cell: exit status 1
    out = capsys.readouterr().out
    assert "1 failed" in out and f"FAILED   {second.name}: RuntimeError: out of memory (simulated)" in out
    assert calls.names == [first.name, second.name, third.name]
    assert first.is_dir() and third.is_dir() and not second.exists()
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    entry = state["quantize"][f"{RUN}_{TAGS[1]}"]
    assert entry["status"] == "failed" and entry["error"] == "RuntimeError: out of memory (simulated)"
    assert state["quantize"][f"{RUN}_{TAGS[2]}"]["status"] == "done"
    assert state["quantize"][f"{RUN}_{TAGS[2]}"]["seconds"] > 0
    stamps = [_stamp(first), _stamp(third)]

    calls = Calls(monkeypatch)  # the cause is fixed: the rerun makes the missing output only
    assert args.func(args) == 0
    assert calls.names == [second.name]
    assert [_stamp(first), _stamp(third)] == stamps
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    assert {e["status"] for e in state["quantize"].values()} == {"done"}


def test_dry_run_incomplete_folder_and_lock(tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(tmp_path, src)
    first, second, third = _folders(tmp_path)
    calls = Calls(monkeypatch)
    report = run_batch(plan, dry_run=True)
    assert calls.names == [] and [o.status for o in report.outcomes] == ["planned"] * 3
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    # a folder under an output's name that awqkit did not write is reported, never overwritten
    second.mkdir(parents=True)
    (second / "notes.txt").write_text("mine")
    # another live run holds the folder: refused
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(FileExistsError, match="is in use by process"):
        run_batch(plan, progress=False)
    # a lock left by a process that is gone is removed; an unreadable state file is moved aside
    (tmp_path / "out" / STATE_FILE).write_text("{not json")
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    report = run_batch(plan, progress=False)
    assert [o.status for o in report.outcomes] == ["done", "failed", "done"]
    assert "is not an awqkit output" in report.failed[0].error and (second / "notes.txt").read_text() == "mine"
    assert "move it away" in report.summary()
    assert len(list((tmp_path / "out").glob(f"{STATE_FILE}.corrupt-*"))) == 1
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    assert [e["status"] for e in state["quantize"].values()] == ["done", "failed", "done"]
    with run_lock(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_FILE).is_file()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
