"""Data-free calibration: sample token sequences from the model itself."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _vocab_limit(model: Any, tokenizer: Any) -> int:
    """Number of ids that can be sampled: the smaller of the model's and the tokenizer's vocabularies
    (checkpoints often pad the embedding matrix beyond the tokenizer)."""
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if model_vocab is None:
        model_vocab = model.get_input_embeddings().weight.shape[0]
    try:
        tok_vocab = len(tokenizer)
    except TypeError:
        tok_vocab = model_vocab
    return int(min(model_vocab, tok_vocab))


def _cache_kwarg(model: Any) -> str:
    """The forward() keyword for the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return cache


@contextlib.contextmanager
def _preserve_rng(device: torch.device) -> Iterator[None]:
    """Leave the global CPU (and this CUDA device's) RNG state as it was."""
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, enabled=True):
        yield


def _check_device(model: Any, device: torch.device) -> None:
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta":
        return  # offloaded (accelerate hooks move the inputs)
    same = weight.device.type == device.type and (device.index is None or weight.device.index == device.index)
    if not same:
        raise ValueError(
            f"self_generate: the model's embeddings are on {weight.device} but device={device}; "
            f"move the model with model.to({str(device)!r}) or pass device={str(weight.device)!r}"
        )


def _sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """One token per row from ``logits [b, V]`` (float32), with temperature and top-k."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=gen)
        return indices.gather(-1, choice)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)


@torch.inference_mode()
def self_generate(
    model: Any,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int,
    *,
    batch_size: int = 8,
    temperature: float = 1.0,
    top_k: int = 50,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Data-free calibration blocks ``[n_samples, seq_len]`` (int64, on CPU) sampled from ``model``.

    Every sequence starts with the BOS token (or, without one, a random non-special token) and is
    extended token by token (KV cache, ``temperature``, ``top_k``; ``top_k <= 0`` disables it) until
    it has ``seq_len`` tokens; EOS does not stop it. Sampling uses a ``torch.Generator`` seeded with
    ``seed``, so the result is deterministic for a given seed, ``batch_size`` and device, and the
    global torch RNG state is left unchanged. The model runs in its own dtype on ``device`` (where it
    must already be); it is put in eval mode for the call and restored afterwards.
    """
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"n_samples={n_samples}, seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    device = torch.device(device)
    _check_device(model, device)
    vocab = _vocab_limit(model, tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    start_pool = None
    if bos is None:  # start from random non-special tokens
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        start_pool = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    cache_kw = _cache_kwarg(model)
    was_training = model.training
    model.eval()

    out = torch.empty(n_samples, seq_len, dtype=torch.long)
    with _preserve_rng(device):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        cpu_gen = torch.Generator().manual_seed(seed)
        bar = tqdm(total=n_samples * seq_len, desc="self-generating calibration data", unit="tok")
        try:
            for start in range(0, n_samples, batch_size):
                b = min(batch_size, n_samples - start)
                if start_pool is None:
                    if bos is None:  # cannot happen: start_pool is built whenever there is no BOS token
                        raise RuntimeError("self_generate: no BOS token and no start-token pool")
                    first = torch.full((b, 1), int(bos), dtype=torch.long)
                else:
                    first = start_pool[torch.randint(len(start_pool), (b, 1), generator=cpu_gen)]
                ids = torch.empty(b, seq_len, dtype=torch.long, device=device)
                ids[:, :1] = first.to(device)
                bar.update(b)
                cache = None
                for t in range(1, seq_len):
                    step_in = ids[:, :t] if cache is None else ids[:, t - 1 : t]
                    res = model(input_ids=step_in, use_cache=True, **{cache_kw: cache})
                    cache = _output_cache(res)
                    logits = res.logits[:, -1, :vocab].float()
                    ids[:, t : t + 1] = _sample(logits, temperature, top_k, gen)
                    bar.update(b)
                out[start : start + b] = ids.cpu()
        finally:
            bar.close()
            model.train(was_training)
    logger.info(
        "Self-generated %d calibration blocks of %d tokens (%d tokens, seed %d)", n_samples, seq_len, out.numel(), seed
    )
    return out
