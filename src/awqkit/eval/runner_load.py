"""Loading model folders for :mod:`awqkit.eval.runner`: detection, the right loader, and which kernels run.

* The quantization method is detected with :func:`~awqkit.io.detect.detect_quantization_method`.
* A folder whose detection came from a quantization config (``config.json``'s ``quantization_config``,
  AutoAWQ's ``quant_config.json``, ...) is loaded with :func:`~awqkit.io.load.load_quantized` (awqkit,
  AutoAWQ GEMM and compressed-tensors pack-quantized checkpoints; anything else is a clear error),
  its non-quantized weights in float32 on CPU.
* Any other folder is a float model: ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)``.
  A method found only in the folder's name (or awqkit metadata) is reported but does not make the folder
  quantized; a float folder whose weights hold packed quantized tensors (``*.qweight``, ...) is refused, as
  transformers would leave those layers randomly initialized, and transformers' load failures become a
  :class:`~awqkit.errors.CheckpointError` naming the folder.

Detection is :func:`awqkit.io.detect.detect_quantization_method`, the same that ``awqkit info`` and
:func:`~awqkit.io.load.load_quantized` use, so all three agree on every folder.

Kernel backends (``backend``, quantized folders only): ``"auto"`` picks the fastest available kernel for
each layer; on x86 CPUs that is ``cpu-avx2`` (awqkit's native GEMV, fp32 arithmetic, the reference's results to
summation order; prefill-sized inputs run the reference) where the layer fits it, else ``cpu-int4`` (PyTorch's
int4 kernel, computing in **bfloat16** with fp32 accumulation, so outputs carry bf16 rounding), else the fp32
``torch`` reference.
``"torch"`` forces the fp32 reference everywhere. :func:`kernel_summary` records what each quantized
layer actually runs on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqkit import kernels
from awqkit.errors import AwqkitError, CheckpointError, InputError
from awqkit.io.detect import QuantizationInfo, detect_quantization_method
from awqkit.io.load import load_quantized
from awqkit.io.validate import check_float_weights
from awqkit.kernels import cpu_int4
from awqkit.nn.qlinear import QuantLinear

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model folder loaded for evaluation."""

    path: Path
    model: nn.Module
    tokenizer: Any
    detection: QuantizationInfo
    quantized: bool
    kernels: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: path, detection, loader, kernels, load time."""
        return {
            "path": str(self.path),
            "detection": self.detection.to_dict(),
            "loaded_as": "quantized (awqkit.io.load.load_quantized)"
            if self.quantized
            else "float32 (transformers AutoModelForCausalLM)",
            "kernels": self.kernels,
            "load_seconds": round(self.load_seconds, 3),
        }


def check_folder(path: str | Path, what: str) -> Path:
    """``path`` as a Path; FileNotFoundError / InputError (a ValueError) unless it is a folder with config.json."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} folder {p} does not exist; pass a model folder holding config.json")
    if not p.is_dir():
        raise InputError(f"{what} {p} is a file; pass the model folder that holds it")
    if not (p / "config.json").is_file():
        raise InputError(f"{what} folder {p} has no config.json; pass a Hugging Face model folder")
    return p


def kernel_summary(model: nn.Module, backend: str, device: str | torch.device) -> dict[str, Any]:
    """Which kernel each quantized layer runs on for a float32 activation on ``device``.

    Returns ``{"backend": requested, "layers": {"cpu-int4 (bfloat16)": n, "torch (float32)": m, ...}}``;
    ``layers`` is empty for a model without quantized layers (then ``backend`` is ``None``).
    """

    counts: dict[str, int] = {}
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        x = torch.zeros(1, module.in_features, dtype=torch.float32, device=device)
        with torch.inference_mode():
            name = kernels.resolve_backend(module.backend, x, module).name
        if name == "cpu-int4":
            dtype = module.__dict__.get("_cpu_int4_compute_dtype", cpu_int4.DEFAULT_COMPUTE_DTYPE)
            label = f"cpu-int4 ({str(dtype).removeprefix('torch.')})"
        elif name in ("torch", "cpu-avx2"):
            label = f"{name} (float32)"
        else:
            label = name
        counts[label] = counts.get(label, 0) + 1
    return {"backend": backend if counts else None, "layers": counts}


def load_for_eval(
    path: str | Path,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    what: str = "model",
) -> LoadedModel:
    """Detect and load the folder ``path`` with its tokenizer (see the module docstring)."""
    from transformers import AutoTokenizer

    folder = check_folder(path, what)
    t0 = time.perf_counter()
    info = detect_quantization_method(folder)
    quantized = info.format is not None
    if not quantized and info.method != "fp":
        logger.warning(
            "%s: method %r is only suggested by %s; loading it as a float model", folder, info.method, info.source
        )
    if quantized:
        model = load_quantized(folder, device=device, backend=backend, trust_remote_code=trust_remote_code)
    else:
        model = _load_float(folder, info, device, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    loaded = LoadedModel(
        folder, model, tokenizer, info, quantized, kernel_summary(model, backend, device), time.perf_counter() - t0
    )
    logger.info(
        "loaded %s %s (%s, detected from %s) in %.1f s", what, folder, info.method, info.source, loaded.load_seconds
    )
    return loaded


def _load_float(folder: Path, info: QuantizationInfo, device: str | torch.device, trust_remote_code: bool) -> nn.Module:
    """The float model in ``folder`` in float32 on ``device`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    check_float_weights(folder, None if info.method == "fp" else info.method)
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except AwqkitError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"loading {folder} as a float model failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); check that it is a complete Hugging Face "
            "causal LM folder (config.json and weights)"
        ) from None
    return model.to(device).eval()


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same strings to the same ids."""
    try:
        return bool(a.get_vocab() == b.get_vocab())
    except (AttributeError, NotImplementedError):
        return len(a) == len(b)


__all__ = ["LoadedModel", "check_folder", "kernel_summary", "load_for_eval", "same_vocabulary"]
