"""Catalogued errors of the Python API (library callers) and of missing optional packages: each input raises a
ValueError-family awqkit error whose message matches docs/errors.md, and writes nothing."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_tiny_llama, tiny_fp16_llama
from errors_catalogue import assert_error
from torch import nn

from awqkit.api import quantize
from awqkit.config import QuantConfig
from awqkit.io.save import save_quantized
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import get_module, replace_linears
from awqkit.quant import packing, primitives
from awqkit.spec import resolve_quantization_spec


def _raises(error_id: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert_error(error_id, str(info.value))


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("api_faults") / "tiny")


def test_quantize_arguments(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    _raises("API-METHOD", quantize, src, dst, method="gptq-ish")
    spec = resolve_quantization_spec("awq", bits=4, group_size=32)
    _raises("API-SPEC", quantize, src, dst, spec=spec, quant=QuantConfig())
    _raises("API-SPEC", quantize, src, dst, spec=spec, method="rtn")
    _raises("API-SPEC", quantize, src, dst, spec=resolve_quantization_spec("fp"))
    assert not dst.exists()


def test_save_arguments(tmp_path: Path) -> None:
    model = tiny_fp16_llama(64, 128, 320)
    qc = QuantConfig(bits=4, group_size=32)
    _raises(
        "API-SAVE-MODEL",
        save_quantized,
        model,
        tmp_path / "a",
        src_dir=None,
        quant_config=qc,
        metadata={},
        modules_to_not_convert=[],
    )
    replace_linears(model, ["model.layers.0.mlp.down_proj"], 4, 32, True)
    _raises(
        "API-SAVE-MODEL",
        save_quantized,
        model,
        tmp_path / "b",
        src_dir=None,
        quant_config=QuantConfig(bits=4, group_size=64),
        metadata={},
        modules_to_not_convert=[],
    )
    _raises(
        "API-METADATA",
        save_quantized,
        model,
        tmp_path / "c",
        src_dir=None,
        quant_config=qc,
        metadata={"when": torch.zeros(1)},
        modules_to_not_convert=[],
    )
    assert list(tmp_path.iterdir()) == []


def test_primitive_arguments() -> None:
    w = torch.randn(8, 64)
    _raises("API-QUANT-ARGS", primitives.compute_qparams, w, 9, 32)
    _raises("API-QUANT-ARGS", primitives.compute_qparams, w[0], 4, 32)
    _raises("API-QUANT-ARGS", primitives.compute_qparams, w.int(), 4, 32)
    _raises("API-QUANT-ARGS", primitives.compute_qparams, w, 4, 48)
    _raises("API-QUANT-ARGS", primitives.compute_qparams, w, 4, 0)


def test_packing_arguments() -> None:
    q, scales, zeros = primitives.quantize_weight(torch.randn(16, 64), 4, 32)
    _raises("API-PACK-ARGS", packing.pack_gemm, q.float(), zeros, scales)
    _raises("API-PACK-ARGS", packing.pack_gemm, q + 16, zeros, scales)
    _raises("API-PACK-ARGS", packing.pack_gemm, q[:12], zeros[:12], scales[:12])
    _raises("API-PACK-ARGS", packing.pack_gemm, q, zeros, scales[0])
    _raises("API-PACK-ARGS", packing.pack_gemm, q.tolist(), zeros, scales)


def test_module_arguments() -> None:
    model = tiny_fp16_llama(64, 128, 320)
    _raises("API-MODULE", get_module, model, "model.layers.7.mlp")
    _raises("API-MODULE", QuantLinear.from_linear, nn.ReLU(), 4, 32)
    with torch.device("meta"):
        meta = nn.Linear(64, 64)
    _raises("API-MODULE", QuantLinear.from_linear, meta, 4, 32)


def test_missing_optional_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from awqkit.platform.calib_build import read_dataset
    from awqkit.platform.plan import load_plan

    real_import = builtins.__import__

    def no(*names: str) -> Any:
        def fake(name: str, *args: Any, **kwargs: Any) -> Any:
            if name.split(".")[0] in names:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        return fake

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    (tmp_path / "ds" / "state.json").write_text("{}")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    (tmp_path / "plan.yaml").write_text("output_dir: out\n")
    monkeypatch.setattr(builtins, "__import__", no("datasets", "pyarrow", "pandas", "yaml"))
    monkeypatch.setattr("importlib.import_module", lambda name, *a: no("datasets", "pyarrow", "pandas")(name))
    _raises("DEP-MISSING", read_dataset, tmp_path / "ds")
    _raises("DEP-MISSING", read_dataset, tmp_path / "rows.parquet")
    _raises("DEP-MISSING", load_plan, tmp_path / "plan.yaml")
    assert json.loads((tmp_path / "ds" / "state.json").read_text()) == {}
