"""Tokenize calibration samples, concatenate them and cut the stream into fixed-length blocks."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 256  # samples per tokenizer call


def separator_ids(tokenizer: Any) -> list[int]:
    """Token ids placed between samples: the EOS token if the tokenizer has one, else a newline."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return [int(eos)]
    return [int(t) for t in tokenizer("\n", add_special_tokens=False)["input_ids"]]


def tokenize_samples(samples: list[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each sample, without added special tokens (chat templates already carry theirs)."""
    out: list[list[int]] = []
    chunks = range(0, len(samples), _TOKENIZE_CHUNK)
    for start in tqdm(chunks, desc="tokenizing calibration data", unit="chunk", leave=False, disable=len(chunks) < 4):
        batch = samples[start : start + _TOKENIZE_CHUNK]
        # verbose=False: long samples are fine here, they are cut into blocks afterwards.
        enc = tokenizer(batch, add_special_tokens=False, verbose=False)
        out.extend([int(t) for t in ids] for ids in enc["input_ids"])
    return out


def build_blocks(samples: list[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Calibration blocks ``[n, seq_len]`` (int64) cut from the concatenated samples.

    The sample order is shuffled with ``random.Random(seed)``; samples are joined with the EOS id (or
    a newline when there is no EOS) and the stream is cut into consecutive blocks of ``seq_len``
    tokens (the incomplete tail is dropped). With more blocks than ``n_samples``, ``n_samples`` of
    them are drawn with the same RNG and kept in source order; with fewer, all are returned and a
    warning is logged. The result depends only on the inputs and ``seed``.

    Raises:
        ValueError: ``n_samples``/``seq_len`` < 1, no samples, or fewer than ``seq_len`` tokens in all.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples={n_samples} and seq_len={seq_len} must both be >= 1")
    if not samples:
        raise ValueError("no calibration samples to tokenize; the calibration source is empty")

    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    token_lists = tokenize_samples([samples[i] for i in order], tokenizer)
    sep = separator_ids(tokenizer)

    stream: list[int] = []
    for k, ids in enumerate(token_lists):
        if k and sep:
            stream.extend(sep)
        stream.extend(ids)
    total = len(stream)
    n_blocks = total // seq_len
    if n_blocks == 0:
        raise ValueError(
            f"the calibration source has only {total} tokens ({len(samples)} samples) but one block needs "
            f"seq_len={seq_len} tokens; use a smaller --seq-len or more calibration data"
        )
    if n_blocks > n_samples:
        picked = sorted(rng.sample(range(n_blocks), n_samples))
    else:
        picked = list(range(n_blocks))
        if n_blocks < n_samples:
            logger.warning(
                "The calibration source has %d tokens: only %d blocks of %d tokens instead of the %d "
                "requested; calibrating on %d blocks (add data or lower --n-samples/--seq-len)",
                total,
                n_blocks,
                seq_len,
                n_samples,
                n_blocks,
            )
    flat = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    blocks = flat[torch.tensor(picked, dtype=torch.long)].contiguous()
    logger.info(
        "Calibration: %d samples -> %d tokens -> %d blocks of %d; using %d blocks (%d tokens)",
        len(samples),
        total,
        n_blocks,
        seq_len,
        blocks.shape[0],
        blocks.numel(),
    )
    return blocks
