"""awqkit batch: a cell is complete only when its files are intact and it was made under the plan's settings;
otherwise it is made again, with a notice (issue 12, "complete means complete")."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import TINY_CORPUS, save_tiny_llama

import awqkit.api
from awqkit.platform.batch import folder_state, run_batch

RUN = "Tiny-1-demo_SFT_NoPeft"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("complete_src")
    save_tiny_llama(root / RUN, max_position_embeddings=256)
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    return root / RUN


def _plan(tmp_path: Path, src: Path, n_samples: int = 4, n_grid: int = 4) -> Path:
    (tmp_path / "plan.toml").write_text(f"""
output_dir = "out"
[defaults]
calib = "{src.parent / "calib.txt"}"
n_samples = {n_samples}
seq_len = 32
n_grid = {n_grid}
[[models]]
path = "{src}"
[[specs]]
method = ["rtn", "awq"]
bits = 4
group_size = 32
""")
    return tmp_path / "plan.toml"


class Calls:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real, self.names = awqkit.api.quantize, []
        monkeypatch.setattr(awqkit.api, "quantize", self)

    def __call__(self, src: object, dst: object, **kw: object) -> object:
        self.names.append(Path(str(dst)).name.split("_")[-5])  # "RTN" or "AWQ"
        kw["progress"] = False
        return self.real(src, dst, **kw)


def test_damaged_or_stale_outputs_are_made_again(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plan = _plan(tmp_path, src)
    rtn, awq = (tmp_path / "out" / f"{RUN}_{m}_w4_g32_headfp16_quantized" for m in ("RTN", "AWQ"))
    calls = Calls(monkeypatch)
    assert run_batch(plan, progress=False).ok and calls.names == ["RTN", "AWQ"]
    weights = rtn / "model.safetensors"
    good = weights.read_bytes()

    def rerun(expected: list[str], why: str) -> None:
        calls.names.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="awqkit.platform.batch"):
            report = run_batch(plan, progress=False)
        assert report.ok and calls.names == expected, (why, calls.names)
        if expected:
            assert any(why in r.getMessage() and "made again" in r.getMessage() for r in caplog.records), [
                r.getMessage() for r in caplog.records
            ]
        assert folder_state(rtn)[0] == folder_state(awq)[0] == "complete"

    rerun([], "")  # nothing changed: both skipped
    weights.write_bytes(good[: len(good) // 2])  # truncated
    rerun(["RTN"], "bytes")
    assert weights.read_bytes() == good  # the same output again (deterministic)
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(flipped))
    rerun(["RTN"], "sha256 differs")
    weights.unlink()
    rerun(["RTN"], "is missing")
    meta_file = rtn / "quantization_metadata.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]  # written by an awqkit that did not record its files
    meta_file.write_text(json.dumps(meta))
    rerun(["RTN"], "records no weight files")

    _plan(tmp_path, src, n_samples=3)  # calibration settings changed: only the calibrated cell is stale
    rerun(["AWQ"], "calib_config differs from the plan's in ['n_samples']")
    _plan(tmp_path, src, n_samples=3, n_grid=5)
    rerun(["AWQ"], "search_config differs from the plan's in ['n_grid']")
    (src.parent / "calib.txt").write_text("\n".join(reversed(TINY_CORPUS * 6)) + "\n")
    rerun(["AWQ"], "calibration_sha256")
    rerun([], "")
    meta = json.loads(meta_file.read_text())  # written before the spec's "backend" became "format"
    meta["spec"]["backend"] = meta["spec"].pop("format")
    meta_file.write_text(json.dumps(meta))
    rerun([], "")


def test_a_folder_awqkit_did_not_write_is_never_replaced(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path, src)
    rtn = tmp_path / "out" / f"{RUN}_RTN_w4_g32_headfp16_quantized"
    rtn.mkdir(parents=True)
    (rtn / "config.json").write_text('{"quantization_config": {"quant_method": "awq"}}')
    calls = Calls(monkeypatch)
    report = run_batch(plan, progress=False)
    assert calls.names == ["AWQ"] and [o.status for o in report.outcomes] == ["failed", "done"]
    assert "not an awqkit output" in report.failed[0].error
    assert sorted(p.name for p in rtn.iterdir()) == ["config.json"]
