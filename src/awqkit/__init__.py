"""awqkit: activation-aware weight quantization (AWQ) for Hugging Face causal LMs.

Public API: :func:`quantize_with_awq` (the platform's call), :func:`quantize` (typed configs),
:func:`load_quantized` (a transformers model with awqkit's quantized linears), the config dataclasses.
Heavy modules are imported lazily so ``import awqkit`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "quantize": "awqkit.api",
    "quantize_with_awq": "awqkit.api",
    "QuantizeReport": "awqkit.api",
    "load_quantized": "awqkit.io.load",
    "save_quantized": "awqkit.io.save",
    "QuantConfig": "awqkit.config",
    "CalibConfig": "awqkit.config",
    "SearchConfig": "awqkit.config",
    "AWQResults": "awqkit.algo.results",
    "apply_results": "awqkit.algo.results",
    "run_awq": "awqkit.pipeline",
    "supported_architectures": "awqkit.arch",
    "QuantMethod": "awqkit.spec",
    "QuantizationSpec": "awqkit.spec",
    "resolve_quantization_spec": "awqkit.spec",
    "make_run_name": "awqkit.naming",
    "parse_run_name": "awqkit.naming",
    "quant_tag": "awqkit.naming",
    "build_calibration_set": "awqkit.platform.calib_build",
    "describe_folder": "awqkit.platform.info",
    "detect_quantization_method": "awqkit.io.detect",
    "evaluate_model": "awqkit.eval.runner",
    "write_model_card": "awqkit.report.model_card",
    "load_plan": "awqkit.platform.plan",
    "Plan": "awqkit.platform.plan",
    "PlanError": "awqkit.platform.plan",
    "run_batch": "awqkit.platform.batch",
    "BatchReport": "awqkit.platform.batch",
    "orchestrate": "awqkit.platform.orchestrate",
    "OrchestrateReport": "awqkit.platform.orchestrate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'awqkit' has no attribute {name!r}")
