"""What every measured mode shares (the awqkit/transformers modes and llama.cpp's): the seeded prompt and the
summary of repeated timings."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import Tensor


def make_prompt(vocab_size: int, batch: int, n_tokens: int, seed: int = 0) -> Tensor:
    """Seeded random token ids ``[batch, n_tokens]`` in ``[0, vocab_size)`` (the same for every mode)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, n_tokens), generator=g)


def summarize(samples: list[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "samples"}`` of a list of floats."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


__all__ = ["make_prompt", "summarize"]
