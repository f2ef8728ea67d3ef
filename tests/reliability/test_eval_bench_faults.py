"""Faults of ``awqkit eval`` / ``awqkit bench`` caught before any model is loaded: the device and the window
length against the model's positions (one line, exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_harness import one_line_error, run, tree_hash
from conftest import save_tiny_llama
from errors_catalogue import assert_error


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("eval_faults") / "tiny", max_position_embeddings=64)


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_missing_device(model: Path, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = tree_hash(model)
    result = run(command, model, "--device", "cuda", "--json", tmp_path / "out.json")
    assert result.rc == 2
    assert_error("DEVICE-UNAVAILABLE", one_line_error(result, command))
    assert tree_hash(model) == before and not (tmp_path / "out.json").exists()


def test_windows_longer_than_the_model(model: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 200)
    result = run("eval", model, "--text", text, "--seq-len", "128", "--windows", "1")
    assert result.rc == 2
    assert_error("SEQ-LEN", one_line_error(result, "eval"))
    assert "64 positions" in result.err
