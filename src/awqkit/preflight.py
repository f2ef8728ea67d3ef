"""Checks that run before the expensive part of a quantization (calibration and the search), so that a
mistake costs a second, not an hour.

:func:`awqkit.api.quantize` runs them in two rounds:

* before loading the model: the destination (:func:`awqkit.io.destination.check_destination`, after
  :func:`~awqkit.io.destination.recover` has finished or rolled back what a killed run left), that its
  parent is writable, the device (:func:`check_device`), the source (:func:`awqkit.io.source.inspect_source`),
  the calibration file (:func:`check_calibration_source`) and the sequence length against the model's
  positions when the config is at hand (:func:`check_seq_len`);
* after loading it: the sequence length again (GGUF and hub sources have no config before), every tensor
  for NaN/Inf (:func:`awqkit.io.source.check_finite`) and the free disk space against the output's expected
  size (:func:`expected_output_bytes`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqkit.errors import EnvironmentProblem, InputError

#: Extra room asked for beyond the packed weights: the AWQ results file, the tokenizer and metadata.
OUTPUT_MARGIN = 1.10
OUTPUT_SLACK_BYTES = 32 << 20


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that exists here; raises InputError / EnvironmentProblem."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"--device {device!r} is not a device name ({exc}); use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cpu":
        return dev
    device_module = getattr(torch, dev.type, None)
    available = bool(
        device_module is not None and hasattr(device_module, "is_available") and device_module.is_available()
    )
    if device_module is None or not available:
        raise EnvironmentProblem(
            f"--device {device}: this torch ({torch.__version__}) has no usable {dev.type} "
            f"device; use --device cpu, or install a torch build with {dev.type} support"
        )
    count = device_module.device_count() if hasattr(device_module, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise EnvironmentProblem(
            f"--device {device}: only {count} {dev.type} device(s) are visible (indices 0.."
            f"{count - 1}); pick one of them"
        )
    return dev


def check_calibration_source(source: str) -> None:
    """A calibration file must exist and be readable ('self' needs nothing); raises InputError."""
    if source == "self":
        return
    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(
            f"calibration file {source!r} {what}; pass a text/JSONL/CSV file, or --calib self for data-free calibration"
        )
    if not os.access(path, os.R_OK):
        raise InputError(f"calibration file {source!r} is not readable (permissions); fix them or copy the file")
    if path.stat().st_size == 0:
        raise InputError(f"calibration file {source!r} is empty; give it one prompt per line, or --calib self")


def max_positions(config: Any) -> int | None:
    """``max_position_embeddings`` of a config object or dict (its text part), None when it states none."""
    if isinstance(config, dict):
        text_config = config.get("text_config")
        text = text_config if isinstance(text_config, dict) else config
        value = text.get("max_position_embeddings")
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_seq_len(seq_len: int, config: Any, src: str) -> None:
    """Calibration blocks must fit the model's positions; raises InputError."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise InputError(
            f"--seq-len {seq_len} is longer than {src}'s {limit} positions "
            f"(max_position_embeddings); use --seq-len {limit} or less"
        )


def expected_output_bytes(model: nn.Module, quantized: list[str], bits: int, group_size: int) -> int:
    """About how many bytes the output folder takes: ``bits`` per quantized weight plus an fp16 scale and a
    ``bits``-wide zero per group, fp16 for every other tensor (tied tensors once), times :data:`OUTPUT_MARGIN`
    plus :data:`OUTPUT_SLACK_BYTES`."""
    targets = {f"{n}.weight" for n in quantized}
    seen: set[int] = set()
    total = 0.0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        if name in targets and t.dim() == 2:
            out_f, in_f = t.shape
            groups = 1 if group_size == -1 else max(in_f // group_size, 1)
            total += out_f * in_f * bits / 8 + out_f * groups * (2 + bits / 8)
        elif not name.endswith("inv_freq"):
            total += t.numel() * 2
    return int(total * OUTPUT_MARGIN) + OUTPUT_SLACK_BYTES


__all__ = ["check_calibration_source", "check_device", "check_seq_len", "expected_output_bytes", "max_positions"]
