"""What :mod:`awqkit.bench.modes` measures: one :class:`ModeSpec` per checkpoint x dtype x backend x decode loop,
and :func:`build_specs`, which lists them for ``awqkit bench`` (baseline modes first, per loop)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from awqkit.io.detect import is_quantized_folder
from awqkit.runtime.decoder import supported

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOOPS = ("transformers", "awqkit")


@dataclass(frozen=True)
class ModeSpec:
    """One model to measure. ``quantized``: load with ``load_quantized`` and ``backend``; ``dtype``: the
    dense model's dtype, or the dtype of a quantized model's non-quantized weights."""

    label: str
    path: str
    quantized: bool
    dtype: str = "float32"
    backend: str | None = None
    device: str = "cpu"
    loop: str = "transformers"

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"decode loop {self.loop!r} is not one of {LOOPS}")


_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _awqkit_loop_reason(path: str, dtype: str, device: str) -> str | None:
    """Why awqkit's decode loop cannot run this folder's model as asked (None when it can)."""

    if dtype != "float32" or device != "cpu":
        return f"it runs float32 on CPU (asked: {dtype} on {device})"
    cfg = Path(path) / "config.json"
    archs = (json.loads(cfg.read_text()).get("architectures") or []) if cfg.is_file() else []
    if not set(archs) & set(supported()):
        return f"architecture {archs or '(unknown)'} is not one of {supported()}"
    return None


def build_specs(
    model: str,
    baseline: str | None,
    backends: list[str],
    dtype: str,
    baseline_dtypes: list[str],
    device: str = "cpu",
    loops: tuple[str, ...] | list[str] = ("transformers",),
) -> list[ModeSpec]:
    """The :class:`~awqkit.bench.modes.ModeSpec` list: for each loop, baseline modes first, then MODEL's.
    Modes the ``awqkit`` loop cannot run (not float32 on CPU, an architecture it does not know) are left
    out with a log line."""
    for d in (dtype, *baseline_dtypes):
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r} is not one of {sorted(DTYPES)}")
    bad = [lp for lp in loops if lp not in LOOPS]
    if bad or not loops:
        raise ValueError(f"decode loops {list(loops)}: choose from {LOOPS}")
    specs = [s for lp in loops for s in _loop_specs(model, baseline, backends, dtype, baseline_dtypes, device, lp)]
    if not specs:
        raise ValueError(
            f"no mode to measure: awqkit's decode loop cannot run {model} as asked; add the transformers loop"
        )
    return specs


def _loop_specs(
    model: str,
    baseline: str | None,
    backends: list[str],
    dtype: str,
    baseline_dtypes: list[str],
    device: str,
    loop: str,
) -> list[ModeSpec]:
    specs = []
    tag = " [awqkit loop]" if loop == "awqkit" else ""
    if baseline is not None:
        if not Path(baseline).is_dir():
            raise FileNotFoundError(f"baseline folder not found: {baseline}")
        if is_quantized_folder(baseline):
            raise ValueError(f"--baseline {baseline} is a quantized checkpoint; pass the dense (float) model")
        name = Path(baseline).name
        specs += [
            ModeSpec(f"{name} {_DTYPE_SHORT[d]} dense{tag}", str(baseline), False, d, None, device, loop)
            for d in baseline_dtypes
        ]
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    name = Path(model).name
    if is_quantized_folder(model):
        rest = "" if dtype == "float32" else f", {_DTYPE_SHORT[dtype]} rest"
        specs += [ModeSpec(f"{name} int4 ({b}{rest}){tag}", str(model), True, dtype, b, device, loop) for b in backends]
    else:
        specs.append(ModeSpec(f"{name} {_DTYPE_SHORT[dtype]} dense{tag}", str(model), False, dtype, None, device, loop))
    if loop == "awqkit":
        kept = []
        for spec in specs:
            reason = _awqkit_loop_reason(spec.path, spec.dtype, spec.device)
            if reason is None:
                kept.append(spec)
            else:
                logger.info("no awqkit-loop row for %s: %s", spec.label, reason)
        specs = kept
    return specs
