"""Run names: make/parse round trip, quant tags, the characters each part may hold, agreement with detect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from awqkit.io.detect import detect_quantization_method
from awqkit.naming import (
    RunNameError,
    base_model_name,
    make_run_name,
    parse_quant_tag,
    parse_run_name,
    quant_tag,
    quantized_folder_name,
)
from awqkit.spec import resolve_quantization_spec

BASES = ["Qwen3-0.6B", "Meta-Llama-3.1-8B-Instruct", "SmolLM2-135M-Instruct", "gpt2", "Mistral-7B-v0.3"]
TAGS = ["AWQ_w4_g128_headfp16", "RTN_w3_g64", "RTN_w4_g-1_sym_headfp16", "AWQ-REFINE_w4_g64_headfp16", "FP16", None]


def test_documented_example() -> None:
    name = make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", "AWQ_w4_g128_headfp16")
    assert name == "Qwen3-0.6B-openmath_SFT_NoPeft_AWQ_w4_g128_headfp16"
    assert quantized_folder_name(name) == name + "_quantized"
    p = parse_run_name(name + "_quantized")
    assert (p.base_model, p.dataset, p.method, p.peft, p.quant_tag, p.quantized) == (
        "Qwen3-0.6B",
        "openmath",
        "SFT",
        "NoPeft",
        "AWQ_w4_g128_headfp16",
        True,
    )
    assert p.run_name == name and p.folder_name == name + "_quantized"
    assert (p.tag.method, p.tag.weights_bits, p.tag.group_size, p.tag.lm_head_dtype) == ("awq", 4, 128, "fp16")


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("suffix", ["", "_quantized"])
def test_round_trip(base: str, tag: str | None, suffix: str) -> None:
    name = make_run_name(base, "gsm8k.v2", "DPO", "LoRA-r16", tag)
    p = parse_run_name(name + suffix)
    assert (p.base_model, p.dataset, p.method, p.peft, p.quant_tag) == (base, "gsm8k.v2", "DPO", "LoRA-r16", tag)
    assert p.quantized is bool(suffix)
    assert p.run_name == name and p.folder_name == name + suffix
    assert parse_run_name(Path("/models") / (name + suffix)) == p  # a folder path: its last component


def test_quant_tag_from_spec() -> None:
    assert quant_tag(resolve_quantization_spec("awq")) == "AWQ_w4_g128_headfp16"
    assert quant_tag(resolve_quantization_spec("rtn", bits=3, group_size=64), head=False) == "RTN_w3_g64"
    assert quant_tag(resolve_quantization_spec("rtn", group_size=-1, zero_point=False)) == "RTN_w4_g-1_sym_headfp16"
    assert quant_tag(resolve_quantization_spec("fp16")) == "FP16"
    tag = quant_tag(resolve_quantization_spec("awq-gptq", group_size=64))
    assert tag == "AWQ-GPTQ_w4_g64_headfp16" and parse_quant_tag(tag).method == "awq-gptq"
    # unapplied parts are not named: the checkpoint does not have them
    assert quant_tag(resolve_quantization_spec("awq", activations_bits=8, kv_cache_bits=8)) == "AWQ_w4_g128_headfp16"
    spec = resolve_quantization_spec("awq", group_size=64)
    assert make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", spec) == (
        "Qwen3-0.6B-openmath_SFT_NoPeft_AWQ_w4_g64_headfp16"
    )


def test_parse_quant_tag_fields() -> None:
    t = parse_quant_tag("RTN_w4a8_g-1_sym_kv8_headfp16_extra")
    assert (
        t.method,
        t.weights_bits,
        t.activations_bits,
        t.group_size,
        t.symmetric,
        t.kv_cache_bits,
        t.lm_head_dtype,
        t.other,
    ) == ("rtn", 4, 8, -1, True, 8, "fp16", ("extra",))
    assert parse_quant_tag("FP16").weights_bits == 16


@pytest.mark.parametrize(
    "bad, match",
    [
        ("Qwen3-0.6B", "at least 3 are needed"),
        ("justaname", "expected"),
        ("Qwen3_SFT_NoPeft", "must be '{base_model}-{dataset}'"),
        ("Qwen3-0.6B-_SFT_NoPeft", "dataset=''"),
        ("Qwen3-0.6B-openmath_S FT_NoPeft", "method='S FT'"),
        ("Qwen3-0.6B-openmath_SFT__AWQ", "peft=''"),
        ("Qwen3-0.6B-openmath_SFT_NoPeft_4bit", "quant_tag='4bit'"),
        ("Qwen3-0.6B-openmath_SFT_NoPeft_AWQ__g128", "quant_tag='AWQ__g128'"),
    ],
)
def test_parse_errors_are_clear(bad: str, match: str) -> None:
    with pytest.raises(RunNameError, match=match) as info:
        parse_run_name(bad)
    assert repr(bad) in str(info.value) and isinstance(info.value, ValueError)


def test_make_run_name_validates_each_part() -> None:
    with pytest.raises(RunNameError, match=r"dataset='open-math'.*no '-'.*'openmath'"):
        make_run_name("Qwen3-0.6B", "open-math", "SFT", "NoPeft", None)
    with pytest.raises(RunNameError, match=r"base_model='Qwen/Qwen3-0.6B'.*'Qwen3-0.6B'"):
        make_run_name("Qwen/Qwen3-0.6B", "openmath", "SFT", "NoPeft", None)
    with pytest.raises(RunNameError, match=r"base_model='my_model'"):
        make_run_name("my_model", "openmath", "SFT", "NoPeft", None)
    with pytest.raises(RunNameError, match=r"method='SFT_v2'"):
        make_run_name("Qwen3-0.6B", "openmath", "SFT_v2", "NoPeft", None)
    with pytest.raises(RunNameError, match=r"peft='-LoRA'"):
        make_run_name("Qwen3-0.6B", "openmath", "SFT", "-LoRA", None)
    with pytest.raises(RunNameError, match="reserved for the folder suffix"):
        make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", "AWQ_w4_quantized")
    with pytest.raises(RunNameError, match="must start with the quantization method"):
        make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", "w4_g128")
    with pytest.raises(RunNameError, match="the first a method"):
        make_run_name("Qwen3-0.6B", "openmath", "SFT", "NoPeft", "4bit_g128")
    assert base_model_name("Qwen/Qwen3-0.6B") == "Qwen3-0.6B" and base_model_name("/m/SmolLM2-135M/") == "SmolLM2-135M"


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("tag", ["AWQ_w4_g128_headfp16", "RTN_w3_g64", "RTN_w8_g-1_headfp16"])
def test_agrees_with_detect_folder_name_fallback(tmp_path: Path, base: str, tag: str) -> None:
    folder = tmp_path / quantized_folder_name(make_run_name(base, "openmath", "SFT", "NoPeft", tag))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    detected = detect_quantization_method(folder)
    parsed = parse_run_name(folder.name).tag
    assert detected.source == "folder name"
    assert (detected.method, detected.bits, detected.group_size) == (
        parsed.method,
        parsed.weights_bits,
        parsed.group_size,
    )
