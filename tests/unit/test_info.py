"""``awqkit info``: describe quantized and float folders; the training-metadata link; files before the name."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_tokenizer, save_tiny_llama

from awqkit.api import quantize
from awqkit.files import sha256_file, sha256_named_files
from awqkit.io.source import SourceInfo, _weight_files
from awqkit.naming import make_run_name, quantized_folder_name
from awqkit.platform.info import describe_folder, training_link
from awqkit.spec import resolve_quantization_spec, spec_metadata

RUN = make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", None)
TRAINING = {
    "base_model": "Qwen/Qwen3-0.6B",
    "dataset": "openmath",
    "method": "SFT",
    "epochs": 2,
    "hyperparameters": {"lr": 2e-5, "batch_size": 8},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float Llama with training metadata, and its RTN 4-bit g32 quantization (with the link)."""
    root = tmp_path_factory.mktemp("info")
    src = save_tiny_llama(root / RUN)
    (src / "training_metadata.json").write_text(json.dumps(TRAINING, indent=2))
    spec = resolve_quantization_spec("rtn", group_size=32)
    dst = root / quantized_folder_name(make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", spec))
    report = quantize(src, dst, method="rtn", quant=spec.to_quant_config(), progress=False)
    # What quantize() will do once it takes a spec (see the report to the lead): carry training_metadata.json
    # over and link it. Done here by hand so the reader side is tested independently.
    meta_path = dst / "quantization_metadata.json"
    meta = json.loads(meta_path.read_text())
    if "training" not in meta:
        info = SourceInfo(
            src=str(src), kind="folder", folder=src, weights_sha256=report.metadata["source_model"]["weights_sha256"]
        )
        meta["training"] = training_link(info)
        meta.update(spec_metadata(spec))
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    if not (dst / "training_metadata.json").exists():
        shutil.copy2(src / "training_metadata.json", dst / "training_metadata.json")
    return {"root": root, "src": src, "dst": dst}


def test_training_link(folders: dict[str, Path]) -> None:
    src = folders["src"]
    link = training_link(src)
    assert link is not None and link["file"] == "training_metadata.json"
    assert link["source_path"] == str(src.resolve()) and link["run_name"] == RUN
    assert link["source_weights_sha256"] == sha256_named_files(_weight_files(src))
    import hashlib

    assert link["sha256"] == hashlib.sha256((src / "training_metadata.json").read_bytes()).hexdigest()
    # the SourceInfo form reuses the hash already computed by load_source
    info = SourceInfo(src=str(src), kind="folder", folder=src, weights_sha256="abc")
    assert training_link(info)["source_weights_sha256"] == "abc"
    assert training_link(SourceInfo(src="org/model", kind="hub", folder=None)) is None
    assert training_link(folders["root"]) is None  # no training_metadata.json there


def test_info_on_quantized_folder(folders: dict[str, Path]) -> None:
    info = describe_folder(folders["dst"], verify=True)
    assert (info.detected["method"], info.detected["bits"], info.detected["group_size"]) == ("rtn", 4, 32)
    assert info.spec == resolve_quantization_spec("rtn", group_size=32)
    assert info.spec_source == "quantization_metadata.json" and info.not_applied == []
    assert info.calibration is None
    assert info.sizes["weights_bytes"] > 0 and 0 < info.sizes["ratio_to_source"] < 0.5
    assert info.training_metadata == TRAINING
    assert info.training_link["source_path"] == str(folders["src"].resolve())
    assert info.checks == {"training_metadata_file": "matches the link", "source_weights": "matches the link"}
    assert info.run_name["quant_tag"] == "RTN_w4_g32_headfp16" and info.run_name["quantized"] is True
    text = info.format()
    assert "method:       rtn, 4-bit weights, group size 32" in text
    assert "spec:         rtn w4 g32, lm_head fp16, format gemm" in text
    assert "not applied:  nothing" in text and "calibration:  none (data-free method)" in text
    assert f"training:     linked to {folders['src'].resolve()}" in text
    assert "epochs: 2" in text and "base_model=Qwen3-0.6B, dataset=openmath" in text


def test_info_detects_changed_source_and_copy(folders: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / folders["dst"].name
    shutil.copytree(folders["dst"], dst)
    meta = json.loads((dst / "quantization_metadata.json").read_text())
    meta["training"]["source_weights_sha256"] = "0" * 64
    (dst / "quantization_metadata.json").write_text(json.dumps(meta))
    (dst / "training_metadata.json").write_text("{}")
    checks = describe_folder(dst, verify=True).checks
    assert checks["training_metadata_file"] == "differs from the linked sha256"
    assert checks["source_weights"].startswith("differs from the linked sha256")


def test_info_on_float_folder(folders: dict[str, Path]) -> None:
    info = describe_folder(folders["src"])
    assert info.detected["method"] == "fp" and info.spec.method.value == "none"
    assert info.training_metadata == TRAINING and info.training_link is None
    assert info.run_name["quant_tag"] is None and info.run_name["quantized"] is False
    text = info.format()
    assert "method:       fp (not quantized" in text and "hyperparameters:" in text


def test_info_shows_unapplied_parts(tmp_path: Path) -> None:
    folder = tmp_path / "plain-name"
    folder.mkdir()
    spec = resolve_quantization_spec("awq", activations_bits=8, kv_cache_bits=8)
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    (folder / "quantization_metadata.json").write_text(
        json.dumps(
            {
                "method": "awq",
                "bits": 4,
                "group_size": 128,
                **spec_metadata(spec),
                "calibration": {
                    "source": "calibration_openmath_128samples.txt",
                    "sha256": "ab" * 32,
                    "n_samples": 128,
                    "seq_len": 512,
                    "seed": 13,
                },
            }
        )
    )
    info = describe_folder(folder)
    assert info.spec == spec and info.not_applied == ["activations_bits=8", "kv_cache_bits=8"]
    assert info.run_name is None and "not a run name" in info.run_name_error
    text = info.format()
    assert "not applied:  activations_bits=8, kv_cache_bits=8" in text
    assert "calibration:  calibration_openmath_128samples.txt (128 blocks x 512 tokens, seed 13" in text
    assert "run name:     the folder name is not a run name" in text


def _calibration_set(tmp_path: Path) -> Path:
    """A calibration file from ``awqkit calib build``: 40 training rows, 8 prompts drawn."""
    from awqkit.platform.calib_build import build_calibration_set

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"what is {i} + {i}?"}) + "\n" for i in range(40)))
    res = build_calibration_set(
        data, make_tiny_tokenizer(), dataset_name="openmath", out_dir=tmp_path, n_blocks=1, seq_len=8
    )
    assert res.path.name == "calibration_openmath_40samples.txt" and res.n_samples == 8
    return res.path


def test_info_shows_the_calibration_sets_samples_and_training_rows(tmp_path: Path) -> None:
    cal = _calibration_set(tmp_path)
    folder = tmp_path / "plain-name"
    folder.mkdir()
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    calibration = {"source": str(cal), "sha256": sha256_file(cal), "n_samples": 4, "seq_len": 8, "seed": 13}
    meta = {"method": "awq", "bits": 4, "group_size": 128, "calibration": calibration}
    (folder / "quantization_metadata.json").write_text(json.dumps(meta))
    info = describe_folder(folder)
    cs = info.calibration_set
    assert cs is not None and (cs["n_samples"], cs["train_rows"], cs["same_file"]) == (8, 40, True)
    assert info.to_dict()["calibration_set"] == cs
    line = "calib set:    8 prompts drawn from 40 training rows (calibration_openmath_40samples.meta.json)"
    assert line + "\n" in info.format() + "\n"
    cal.write_text(cal.read_text() + '{"text": "one more"}\n')  # the file changed since quantization
    assert "the file there now differs from the one used" in describe_folder(folder).format()
    cal.with_suffix(".meta.json").unlink()  # no meta file: no line
    assert describe_folder(folder).calibration_set is None and "calib set:" not in describe_folder(folder).format()


def test_info_on_a_calibration_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from awqkit.commands import info_cmd

    cal = _calibration_set(tmp_path)
    parser = argparse.ArgumentParser(prog="awqkit")
    info_cmd.register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["info", str(cal)])
    assert a.func(a) == 0
    out = capsys.readouterr().out
    assert f"calibration:  {cal}" in out and "samples:      8 prompts drawn from 40 training rows with seed 42" in out
    a = parser.parse_args(["info", str(cal), "--json"])
    assert a.func(a) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["n_samples"], data["train_rows"], data["dataset_name"]) == (8, 40, "openmath")
    cal.with_suffix(".meta.json").unlink()  # a file without a meta file is still not a model folder
    a = parser.parse_args(["info", str(cal)])
    with pytest.raises(NotADirectoryError, match="is a file; pass the checkpoint folder"):
        a.func(a)


def test_name_is_only_a_fallback(tmp_path: Path) -> None:
    name = quantized_folder_name(make_run_name("Meta-Llama-3.1-8B-Instruct", "gsm8k", "SFT", "LoRA", "AWQ_w3_g64"))
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    info = describe_folder(folder)
    assert info.spec == resolve_quantization_spec("awq", bits=3, group_size=64)
    assert info.spec_source == "folder name" and info.detected["source"] == "folder name"
    # files win over the name: metadata says RTN 4-bit g32, the name says AWQ 3-bit g64
    (folder / "quantization_metadata.json").write_text(json.dumps({"method": "rtn", "bits": 4, "group_size": 32}))
    info = describe_folder(folder)
    assert info.spec == resolve_quantization_spec("rtn", group_size=32)
    assert (info.detected["method"], info.detected["bits"]) == ("rtn", 4)


def test_info_cli(folders: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from awqkit.commands import info_cmd

    parser = argparse.ArgumentParser(prog="awqkit")
    info_cmd.register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["info", str(folders["dst"])])
    assert a.func(a) == 0
    assert "rtn, 4-bit weights, group size 32" in capsys.readouterr().out
    a = parser.parse_args(["info", str(folders["dst"]), "--json"])
    assert a.func(a) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["spec"]["method"] == "rtn" and data["spec"]["group_size"] == 32 and data["not_applied"] == []
    with pytest.raises(FileNotFoundError):
        describe_folder(folders["root"] / "missing")


_QUANTIZE_TAKES_SPEC = "spec" in __import__("inspect").signature(quantize).parameters


@pytest.mark.skipif(not _QUANTIZE_TAKES_SPEC, reason="awqkit.api.quantize does not take spec= yet")
def test_quantize_with_spec_writes_spec_and_training_link(
    folders: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = resolve_quantization_spec("rtn", group_size=32, activations_bits=8)
    dst = tmp_path / quantized_folder_name(make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", spec))
    with caplog.at_level("WARNING"):
        report = quantize(folders["src"], dst, spec=spec, progress=False)
    assert "activations_bits=8" in caplog.text and "NOT applied" in caplog.text
    meta = report.metadata
    assert meta["spec"] == spec.to_dict() and meta["not_applied"] == ["activations_bits=8"]
    assert meta["training"] == training_link(folders["src"])
    assert (dst / "training_metadata.json").read_bytes() == (folders["src"] / "training_metadata.json").read_bytes()
    info = describe_folder(dst, verify=True)
    assert info.spec == spec and info.checks["source_weights"] == "matches the link"
    with pytest.raises(ValueError, match="disagrees"):
        quantize(folders["src"], tmp_path / "x", method="awq", spec=spec)
