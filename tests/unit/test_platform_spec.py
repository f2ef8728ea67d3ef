"""QuantMethod / QuantizationSpec: defaults, overrides, QuantConfig conversion, unapplied parts, metadata round trip."""

from __future__ import annotations

import json
import logging

import pytest

from awqkit.config import QuantConfig
from awqkit.spec import (
    QuantizationSpec,
    QuantMethod,
    resolve_quantization_spec,
    spec_from_metadata,
    spec_metadata,
    warn_unapplied,
)


def test_method_aliases_and_unknown() -> None:
    assert QuantMethod.parse("AWQ") is QuantMethod.AWQ
    assert QuantMethod.parse("rtn") is QuantMethod.RTN
    for alias in ("none", "fp16", "FP16", "bf16", "float"):
        assert QuantMethod.parse(alias) is QuantMethod.NONE
    assert not QuantMethod.NONE.quantizes and QuantMethod.AWQ.quantizes
    assert QuantMethod.parse("AWQ-Refine") is QuantMethod.AWQ_REFINE and QuantMethod.parse("gptq").calibrates
    with pytest.raises(ValueError, match=r"'hqq' is not known.*'none', 'rtn', 'awq', 'gptq'"):
        QuantMethod.parse("hqq")


def test_defaults_per_method() -> None:
    awq = resolve_quantization_spec("awq")
    assert (awq.method, awq.weights_bits, awq.group_size, awq.lm_head_dtype, awq.format) == (
        QuantMethod.AWQ,
        4,
        128,
        "fp16",
        "auto",
    )
    assert awq.activations_bits is None and awq.kv_cache_bits is None and awq.extras == {}
    assert awq.written_format == "gemm" and awq.unapplied() == []
    rtn = resolve_quantization_spec(QuantMethod.RTN, bits=3, group_size=64)
    rtn_fields = (rtn.method, rtn.weights_bits, rtn.group_size, rtn.written_format)
    assert rtn_fields == (QuantMethod.RTN, 3, 64, "compressed-tensors")
    none = resolve_quantization_spec("fp16")
    assert (none.method, none.weights_bits, none.group_size, none.written_format) == (QuantMethod.NONE, 16, None, None)


def test_to_quant_config() -> None:
    spec = resolve_quantization_spec(
        "awq", weights_bits=3, group_size=64, zero_point=False, modules_to_not_convert=["down_proj"]
    )
    assert spec.extras == {"zero_point": False, "modules_to_not_convert": ["down_proj"]}
    assert spec.to_quant_config() == QuantConfig(
        bits=3, group_size=64, zero_point=False, modules_to_not_convert=("down_proj",)
    )
    assert spec.unapplied() == []
    assert resolve_quantization_spec("rtn").to_quant_config() == QuantConfig()
    with pytest.raises(ValueError, match="does not quantize"):
        resolve_quantization_spec("none").to_quant_config()


def test_from_quant_config_applies_everything() -> None:
    q = QuantConfig(bits=2, group_size=32, zero_point=False, keep_unaligned_fp16=True)
    spec = QuantizationSpec.from_quant_config("rtn", q)
    assert spec.to_quant_config() == q and spec.unapplied() == []
    assert spec.extras == {"zero_point": False, "keep_unaligned_fp16": True}


def test_unapplied_parts_are_listed_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    spec = resolve_quantization_spec(
        "awq",
        activations_bits=8,
        kv_cache_bits=8,
        lm_head_dtype="int8",
        format="pack-quantized",
        extras={"smoothquant_alpha": 0.5},
    )
    assert spec.unapplied() == [  # the format is applied: 4-bit compressed-tensors (pack-quantized) is written
        "activations_bits=8",
        "kv_cache_bits=8",
        "lm_head_dtype=int8",
        "extras.smoothquant_alpha=0.5",
    ]
    # the weights part still converts: what awqkit does is unchanged by the unapplied parts
    assert spec.to_quant_config() == QuantConfig(bits=4, group_size=128, format="compressed-tensors")
    assert "planned, not applied: activations_bits=8" in spec.describe()
    with caplog.at_level(logging.WARNING, logger="awqkit.spec"):
        assert warn_unapplied(spec) == spec.unapplied()
    assert "NOT applied" in caplog.text and "kv_cache_bits=8" in caplog.text
    # 16-bit activations / KV cache are float: nothing unapplied, no warning
    caplog.clear()
    plain = resolve_quantization_spec("awq", activations_bits=16, kv_cache_bits=16, format="gemm")
    assert plain.unapplied() == [] and warn_unapplied(plain) == [] and caplog.text == ""


def test_invalid_specs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="weights_bits=9 is not supported"):
        resolve_quantization_spec("awq", bits=9)
    with pytest.raises(ValueError, match="group_size=100 is not supported"):
        resolve_quantization_spec("awq", group_size=100)
    with pytest.raises(ValueError, match="'gemm' holds 4-bit weights only"):
        resolve_quantization_spec("rtn", bits=3, format="gemm")
    with pytest.raises(ValueError, match="format='marlin'"):
        resolve_quantization_spec("awq", format="marlin")
    with pytest.raises(ValueError, match="'backend' is the old name of 'format'"):
        resolve_quantization_spec("awq", format="gemm", backend="pack-quantized")
    with pytest.raises(ValueError, match="unknown quantization setting.*'wbits'"):
        resolve_quantization_spec("awq", wbits=4)
    with pytest.raises(ValueError, match="float weights"):
        QuantizationSpec(QuantMethod.NONE, weights_bits=4, group_size=None)
    with pytest.raises(ValueError, match="activations_bits=0"):
        resolve_quantization_spec("awq", activations_bits=0)
    with pytest.raises(ValueError, match="either bits or weights_bits"):
        resolve_quantization_spec("awq", bits=4, weights_bits=4)


@pytest.mark.parametrize(
    "spec",
    [
        resolve_quantization_spec("awq"),
        resolve_quantization_spec(
            "rtn", bits=3, group_size=-1, zero_point=False, modules_to_not_convert=("re:.*o_proj",)
        ),
        resolve_quantization_spec("awq", activations_bits=8, kv_cache_bits=4, extras={"note": [1, 2]}),
        resolve_quantization_spec("awq", format="compressed-tensors", bits_overrides=(("re:.*down_proj", 8),)),
        resolve_quantization_spec("none"),
    ],
)
def test_dict_and_metadata_round_trip(spec: QuantizationSpec) -> None:
    d = json.loads(json.dumps(spec.to_dict()))
    assert QuantizationSpec.from_dict(d) == spec
    meta = json.loads(json.dumps({"method": spec.method.value, **spec_metadata(spec)}))
    assert meta["not_applied"] == spec.unapplied()
    assert spec_from_metadata(meta) == spec


def test_spec_from_older_metadata_without_spec() -> None:
    meta = {
        "method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": False,
        "quant_config": {"bits": 4, "group_size": 64, "zero_point": False, "modules_to_not_convert": []},
    }
    spec = spec_from_metadata(meta)
    assert spec == resolve_quantization_spec("awq", group_size=64, zero_point=False)
    assert spec_from_metadata({"format_version": 1}) is None
    assert spec_from_metadata({"method": "hqq", "bits": 4}) is None
    assert spec_from_metadata({"method": "awq-gptq", "bits": 4}) == resolve_quantization_spec("awq-gptq")
    with pytest.raises(ValueError, match="needs at least a 'method'"):
        QuantizationSpec.from_dict({"weights_bits": 4})


def test_spec_on_top_of_spec() -> None:
    base = resolve_quantization_spec("awq", zero_point=False)
    spec = resolve_quantization_spec(base, group_size=64)
    assert (spec.group_size, spec.extras) == (64, {"zero_point": False})
    assert base.group_size == 128  # frozen: the base is unchanged


def test_old_backend_key_reads_as_format() -> None:
    """Specs written before the rename (metadata files, plans) said ``backend`` for the storage format."""
    old = {"method": "rtn", "weights_bits": 3, "group_size": 64, "backend": "pack-quantized", "extras": {}}
    spec = QuantizationSpec.from_dict(old)
    # and "pack-quantized", the format's older spelling, reads as compressed-tensors
    assert spec.format == "compressed-tensors" and spec.written_format == "compressed-tensors"
    assert "backend" not in spec.to_dict() and spec.to_dict()["format"] == "compressed-tensors"
    assert resolve_quantization_spec("awq", backend="gemm") == resolve_quantization_spec("awq", format="gemm")
    assert QuantizationSpec.from_dict(spec.to_dict()) == spec
