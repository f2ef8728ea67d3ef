"""Tests for awqkit.io.detect.detect_quantization_method on hand-written checkpoint folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from awqkit.io.detect import QuantizationInfo, detect_quantization_method

AWQ_QC = {
    "quant_method": "awq",
    "bits": 4,
    "group_size": 128,
    "zero_point": True,
    "version": "gemm",
    "modules_to_not_convert": ["lm_head"],
}
CT_QC = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "weights": {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
        }
    },
    "ignore": ["lm_head"],
    "quantization_status": "compressed",
}


def _folder(root: Path, name: str, files: dict[str, object]) -> Path:
    folder = root / name
    folder.mkdir()
    for fname, content in files.items():
        (folder / fname).write_text(json.dumps(content))
    return folder


def _config(qc: dict | None = None, dtype: str = "float16") -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": dtype}
    if qc is not None:
        cfg["quantization_config"] = qc
    return cfg


def test_awqkit_folder_metadata_method_overrides_config(tmp_path):
    folder = _folder(
        tmp_path,
        "out",
        {
            "config.json": _config(AWQ_QC),
            "quantization_metadata.json": {"method": "RTN", "bits": 4, "group_size": 128, "format_version": 1},
        },
    )
    info = detect_quantization_method(folder)
    assert isinstance(info, QuantizationInfo)
    assert info.to_dict() == {
        "method": "rtn",
        "bits": 4,
        "group_size": 128,
        "source": "quantization_metadata.json+config.json",
        "format": "awq",
    }


def test_autoawq_config_only(tmp_path):
    folder = _folder(tmp_path, "autoawq", {"config.json": _config(AWQ_QC)})
    info = detect_quantization_method(str(folder))
    assert (info.method, info.bits, info.group_size, info.source) == ("awq", 4, 128, "config.json")


def test_autoawq_legacy_keys(tmp_path):
    qc = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}
    info = detect_quantization_method(_folder(tmp_path, "legacy", {"config.json": _config(qc)}))
    assert (info.method, info.bits, info.group_size) == ("awq", 4, 64)


def test_compressed_tensors_reads_config_groups(tmp_path):
    folder = _folder(tmp_path, "ct", {"config.json": _config(CT_QC)})
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source) == ("compressed-tensors", 3, 64, "config.json")
    assert info.format == "compressed-tensors"


def test_compressed_tensors_channel_strategy_is_minus_one(tmp_path):
    qc = json.loads(json.dumps(CT_QC))
    qc["config_groups"]["group_0"]["weights"].update({"strategy": "channel", "group_size": None, "num_bits": 8})
    info = detect_quantization_method(_folder(tmp_path, "ct_channel", {"config.json": _config(qc)}))
    assert (info.bits, info.group_size) == (8, -1)


def test_compressed_tensors_with_awqkit_metadata(tmp_path):
    folder = _folder(
        tmp_path,
        "ct_awq",
        {
            "config.json": _config(CT_QC),
            "quantization_metadata.json": {"method": "awq", "bits": 3, "group_size": 64},
        },
    )
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size) == ("awq", 3, 64)
    assert info.source == "quantization_metadata.json+config.json"
    assert info.format == "compressed-tensors"


def test_gptq_config(tmp_path):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    info = detect_quantization_method(_folder(tmp_path, "gptq", {"config.json": _config(qc)}))
    assert (info.method, info.bits, info.group_size, info.source) == ("gptq", 4, 128, "config.json")


def test_metadata_only(tmp_path):
    folder = _folder(
        tmp_path,
        "meta",
        {"config.json": _config(), "quantization_metadata.json": {"method": "awq", "bits": 3, "group_size": 32}},
    )
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source) == ("awq", 3, 32, "quantization_metadata.json")


def test_quantization_config_json_only(tmp_path):
    folder = _folder(
        tmp_path,
        "side",
        {
            "config.json": _config(),
            "quantization_config.json": {"quant_method": "GPTQ", "bits": 2, "group_size": 32},
        },
    )
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source) == ("gptq", 2, 32, "quantization_config.json")


def test_autogptq_quantize_config_without_method(tmp_path):
    folder = _folder(
        tmp_path,
        "autogptq",
        {"config.json": _config(), "quantize_config.json": {"bits": 4, "group_size": 128, "desc_act": True}},
    )
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source) == ("gptq", 4, 128, "quantize_config.json")


def test_gptq_keys_win_over_a_version_key_and_config_without_method(tmp_path):
    side = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "version": 1}
    folder = _folder(tmp_path, "gptq_version", {"config.json": _config(), "quantize_config.json": side})
    assert detect_quantization_method(folder).method == "gptq"
    autoawq = {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}
    folder = _folder(tmp_path, "autoawq_side", {"config.json": _config(), "quant_config.json": autoawq})
    assert (detect_quantization_method(folder).method, detect_quantization_method(folder).format) == ("awq", "awq")
    bare = _folder(tmp_path, "bare", {"config.json": _config({"bits": 4, "group_size": 128})})
    assert (detect_quantization_method(bare).method, detect_quantization_method(bare).format) == ("unknown", "unknown")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen3-0.6B-openmath_SFT_NoPeft_AWQ_w4_g128_headfp16_quantized", ("awq", 4, 128)),
        ("Qwen3-0.6B-openmath_SFT_NoPeft_RTN_w3_g64", ("rtn", 3, 64)),
        ("llama-gptq-w8-g32", ("gptq", 8, 32)),
        ("model_awq_W4A16_G128", ("awq", 4, 128)),
    ],
)
def test_folder_name_only(tmp_path, name, expected):
    folder = _folder(tmp_path, name, {"config.json": _config()})
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source) == (*expected, "folder name")


def test_plain_fp_folder(tmp_path):
    info = detect_quantization_method(_folder(tmp_path, "Qwen3-0.6B", {"config.json": _config(dtype="bfloat16")}))
    assert info.to_dict() == {"method": "fp", "bits": 16, "group_size": None, "source": "none", "format": None}


def test_empty_folder_is_fp_with_unknown_bits(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.source) == ("fp", None, "none")


def test_precedence_config_beats_side_file_and_name(tmp_path):
    folder = _folder(
        tmp_path,
        "x_RTN_w3_g64",
        {
            "config.json": _config(AWQ_QC),
            "quantization_config.json": {"quant_method": "gptq", "bits": 2, "group_size": 32},
        },
    )
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source) == ("awq", 4, 128, "config.json")


def test_precedence_metadata_refines_side_file_and_beats_name(tmp_path):
    folder = _folder(
        tmp_path,
        "x_GPTQ_w3_g64",
        {
            "quantization_metadata.json": {"method": "rtn", "bits": 4, "group_size": 128},
            "quantization_config.json": {"quant_method": "awq", "bits": 4, "group_size": 32},
        },
    )
    info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source, info.format) == (
        "rtn",
        4,
        32,
        "quantization_metadata.json+quantization_config.json",
        "awq",
    )
    meta_only = _folder(
        tmp_path, "y_GPTQ_w3_g64", {"quantization_metadata.json": {"method": "rtn", "bits": 4, "group_size": 128}}
    )
    info = detect_quantization_method(meta_only)
    assert (info.method, info.bits, info.source, info.format) == ("rtn", 4, "quantization_metadata.json", None)


def test_stale_metadata_never_renames_a_gptq_storage_config(tmp_path, caplog):
    """A GPTQ side file (awqkit never writes GPTQ) wins over an awqkit metadata file: the weights are stored as
    GPTQ, so detection (and info, and the loader) must say gptq, not the metadata's method."""
    folder = _folder(
        tmp_path,
        "x_RTN_w4_g128",
        {
            "quantization_metadata.json": {"method": "rtn", "bits": 4, "group_size": 128},
            "quantization_config.json": {"quant_method": "gptq", "bits": 2, "group_size": 32},
        },
    )
    with caplog.at_level("WARNING"):
        info = detect_quantization_method(folder)
    assert (info.method, info.bits, info.group_size, info.source, info.format) == (
        "gptq",
        2,
        32,
        "quantization_config.json",
        "gptq",
    )
    assert "ignoring the stale quantization_metadata.json" in caplog.text


def test_precedence_side_file_beats_name(tmp_path):
    folder = _folder(
        tmp_path,
        "x_RTN_w3_g64",
        {
            "config.json": _config(),
            "quantization_config.json": {"quant_method": "awq", "bits": 4, "group_size": 128},
        },
    )
    assert detect_quantization_method(folder).source == "quantization_config.json"


def test_config_bits_win_over_conflicting_metadata(tmp_path, caplog):
    folder = _folder(
        tmp_path,
        "conflict",
        {"config.json": _config(AWQ_QC), "quantization_metadata.json": {"method": "awq", "bits": 3, "group_size": 128}},
    )
    with caplog.at_level("WARNING"):
        info = detect_quantization_method(folder)
    assert info.bits == 4
    assert "bits=3" in caplog.text


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_quantization_method(tmp_path / "nope")


def test_file_path_raises_not_a_directory(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(NotADirectoryError, match="checkpoint folder"):
        detect_quantization_method(f)


def test_broken_config_json_names_the_file(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        detect_quantization_method(folder)


def test_real_awqkit_save_is_detected(tmp_path):
    """A folder written by build_quantization_config's AWQ layout plus awqkit metadata (as save_quantized does)."""
    from awqkit.config import QuantConfig
    from awqkit.io.save import build_quantization_config

    for bits, method in ((4, "rtn"), (3, "awq")):
        qc = build_quantization_config(QuantConfig(bits=bits, group_size=64), ["lm_head"])
        folder = _folder(
            tmp_path,
            f"saved{bits}",
            {
                "config.json": _config(qc),
                "quantization_metadata.json": {"method": method, "bits": bits, "group_size": 64},
            },
        )
        info = detect_quantization_method(folder)
        assert (info.method, info.bits, info.group_size) == (method, bits, 64)
