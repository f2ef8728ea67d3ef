"""Catalogued faults of ``awqkit calib build``, ``awqkit batch`` and ``awqkit orchestrate``: one-line errors (exit
2) or failed cells (exit 1) matching docs/errors.md, and nothing outside their outputs changed."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from cli_harness import one_line_error, run, tree_hash
from conftest import save_tiny_llama
from errors_catalogue import assert_error


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("calib_plan") / "Tiny-1-demo_SFT_NoPeft")


def _rows(path: Path, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n" for i in range(n))
    )
    return path


def test_calib_build_on_three_rows_writes_nothing(model: Path, tmp_path: Path) -> None:
    data = _rows(tmp_path / "train.jsonl", 3)
    before = tree_hash(data)
    result = run("calib", "build", "--dataset", data, "--model", model, "--out", tmp_path / "out")
    assert result.rc == 2
    assert_error("CALIB-BUILD-TOO-FEW", one_line_error(result, "calib"))
    assert not (tmp_path / "out").exists() and tree_hash(data) == before


def test_calib_build_never_replaces_a_file_without_overwrite(model: Path, tmp_path: Path) -> None:
    data = _rows(tmp_path / "train.jsonl", 40)
    args = ["calib", "build", "--dataset", data, "--model", model, "--out", tmp_path / "out", "--seq-len", "16"]
    assert run(*args).rc == 0
    written = sorted((tmp_path / "out").iterdir())
    # named after the 40 training rows (8 prompts drawn)
    assert [p.name for p in written] == ["calibration_train_40samples.meta.json", "calibration_train_40samples.txt"]
    before = tree_hash(tmp_path / "out")
    result = run(*args, "--seed", "7")
    assert result.rc == 2
    assert_error("CALIB-BUILD-EXISTS", one_line_error(result, "calib"))
    assert tree_hash(tmp_path / "out") == before
    assert run(*args, "--seed", "7", "--overwrite").rc == 0
    assert tree_hash(tmp_path / "out") != before


@pytest.mark.parametrize(
    "error_id,extra",
    [
        ("CALIB-BUILD-COLUMN", ["--column", "prompt"]),
        ("CALIB-BUILD-DATASET", ["--dataset", "missing.jsonl"]),
    ],
)
def test_calib_build_input_errors(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error_id: str, extra: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _rows(tmp_path / "train.jsonl", 40)
    result = run("calib", "build", "--dataset", data, "--model", model, "--out", tmp_path / "out", *extra)
    assert result.rc == 2
    assert_error(error_id, one_line_error(result, "calib"))
    assert not (tmp_path / "out").exists()


def _plan(tmp_path: Path, model: Path, extra: str = "") -> Path:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'output_dir = "out"\n{extra}\n[[models]]\npath = "{model}"\n[[specs]]\nmethod = "rtn"\n'
        "bits = 4\ngroup_size = 32\n"
    )
    return plan


@pytest.mark.parametrize(
    "error_id,text",
    [
        ("PLAN-INVALID", 'ouput_dir = "typo"'),
        ("PLAN-INVALID", 'device = "cuda:7"'),
        ("PLAN-FORMAT", "[[models]\n"),
    ],
)
@pytest.mark.parametrize("command", ["batch", "orchestrate"])
def test_bad_plans(model: Path, tmp_path: Path, error_id: str, text: str, command: str) -> None:
    plan = _plan(tmp_path, model, text)
    result = run(command, plan)
    assert result.rc == 2
    assert_error(error_id, one_line_error(result, command))
    assert not (tmp_path / "out").exists()


def test_locked_output_and_foreign_folder(model: Path, tmp_path: Path) -> None:
    plan = _plan(tmp_path, model)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".awqkit.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    result = run("batch", plan)
    assert result.rc == 2
    assert_error("PLAN-LOCKED", one_line_error(result, "batch"))
    lock.unlink()
    foreign = out / "Tiny-1-demo_SFT_NoPeft_RTN_w4_g32_headfp16_quantized"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"someone else's")
    before = tree_hash(foreign)
    result = run("batch", plan)
    assert result.rc == 1  # a failed cell, the rest of the plan went on
    assert_error("BATCH-FOREIGN", result.out)
    assert tree_hash(foreign) == before
