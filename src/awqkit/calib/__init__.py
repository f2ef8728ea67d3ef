"""Calibration data: read a file (text / JSONL / JSON / CSV) or sample from the model ("self"),
and cut it into ``[n_samples, seq_len]`` token blocks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from awqkit.calib.blocks import build_blocks, separator_ids, tokenize_samples
from awqkit.calib.selfgen import self_generate
from awqkit.calib.sources import ACCEPTED_KINDS, PAIR_COLUMNS, read_samples
from awqkit.config import CalibConfig
from awqkit.files import sha256_file

logger = logging.getLogger(__name__)

SELF_SOURCE = "self"


def load_calibration(
    source: str | Path,
    tokenizer: Any,
    cfg: CalibConfig,
    model: Any = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Calibration blocks ``[n, cfg.seq_len]`` (int64, CPU) from ``source``.

    ``"self"`` samples ``cfg.n_samples`` sequences from ``model`` (:func:`self_generate`, on ``device``,
    default: the device of the model's input embeddings, ``batch_size`` sequences at a time). Any other
    value is a file path read by :func:`read_samples` and cut by :func:`build_blocks` (``n`` may then be
    smaller than ``cfg.n_samples`` when the file is short; a warning is logged).

    Raises:
        ValueError: ``"self"`` without a model, a missing file, or any error from the readers.
    """
    if isinstance(source, str) and source == SELF_SOURCE:
        if model is None:
            raise ValueError(
                'calibration source "self" (data-free) samples from the model, but no model was '
                "given; pass model=... or use a calibration file"
            )
        if device is None:
            emb_device: torch.device = model.get_input_embeddings().weight.device
            device = torch.device("cpu") if emb_device.type == "meta" else emb_device
        logger.info(
            "Calibration source: self-generated (%d x %d tokens, seed %d)", cfg.n_samples, cfg.seq_len, cfg.seed
        )
        return self_generate(
            model, tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed, batch_size=batch_size, device=device
        )

    path = Path(source).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"calibration source {str(path)!r} {what}; expected {ACCEPTED_KINDS}")
    samples = read_samples(path, tokenizer, cfg)
    logger.info("Calibration source: %s (%d samples, sha256 %s)", path, len(samples), sha256_file(path)[:12])
    return build_blocks(samples, tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed)


__all__ = [
    "ACCEPTED_KINDS",
    "PAIR_COLUMNS",
    "SELF_SOURCE",
    "build_blocks",
    "load_calibration",
    "read_samples",
    "self_generate",
    "separator_ids",
    "tokenize_samples",
]
