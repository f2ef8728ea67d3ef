"""Helpers shared by the task evaluators: data files, the model's device, and batched greedy generation.

Generation (:func:`generate`) works with any transformers causal LM on CPU or GPU: prompts are tokenized
one by one and left-padded by hand with an attention mask (the tokenizer is not modified), the pad token
falls back to the EOS token when the tokenizer has none, decoding is greedy (``do_sample=False``; sampling knobs of the
model's generation config are cleared so they neither apply nor warn), and prompts are sorted by length
so that each batch pads little; the texts come back in the input order.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from awqkit.errors import InputError
from awqkit.eval.perplexity import DATA_ENV_VAR, default_data_dir
from awqkit.nn import hf

logger = logging.getLogger(__name__)

_THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def resolve_data_file(path: str | Path | None, relpath: str, what: str) -> Path:
    """The data file to read.

    ``path`` may be the file itself, a folder holding ``relpath`` (e.g. the shared data folder) or a folder
    holding the file's base name; ``None`` means ``default_data_dir() / relpath``.

    Raises:
        FileNotFoundError: naming the paths that were looked for and how to fix it.
    """
    p = Path(path).expanduser() if path is not None else default_data_dir() / relpath
    if p.is_dir():
        candidates = [p / relpath, p / Path(relpath).name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"{what} file not found in folder {p} (looked for {candidates[0]} and {candidates[1]}); "
                "pass the file's path"
            )
        return found
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}; pass its path or set ${DATA_ENV_VAR}")
    return p


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (blank lines skipped), each checked to hold the ``required`` keys."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({exc}); expected one object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno} holds a {type(row).__name__}, expected a JSON object")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno} lacks the key(s) {missing}; each row needs {list(required)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
    """Raise :class:`~awqkit.errors.InputError` (a ``ValueError``) unless ``value`` is a positive int (or None
    when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered with the tokenizer's chat template plus the generation prompt, as text.

    ``enable_thinking=False`` is passed to the template (Qwen3-style templates then skip the reasoning
    block; other templates ignore unknown variables).
    """
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def strip_thinking(text: str) -> str:
    """``text`` without ``<think>...</think>`` blocks (an unterminated block runs to the end)."""
    return _THINK_RE.sub("", text)


def truncate_at(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any string in ``stop``."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def _greedy_config(model: nn.Module, pad_id: int, eos_id: int | None, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.do_sample = False
    cfg.num_beams = 1
    for knob in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(cfg, knob):
            setattr(cfg, knob, None)
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.pad_token_id = pad_id
    if cfg.eos_token_id is None and eos_id is not None:
        cfg.eos_token_id = eos_id
    return cfg


def _sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 4,
    add_special_tokens: bool = True,
    stop: Sequence[str] = (),
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, special tokens skipped), in input order.

    Args:
        prompts: full prompt texts. Pass ``add_special_tokens=False`` for prompts rendered by a chat
            template (they already hold the BOS token where the template wants one).
        max_new_tokens: generation budget per prompt.
        stop: strings that end an answer; generation stops at them (``stop_strings``) and the decoded
            text is cut before the first one.
    Raises:
        TypeError: the model has no ``generate`` method (not a transformers generation model).
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    check_positive("batch_size", batch_size, allow_none=False)
    check_positive("max_new_tokens", max_new_tokens, allow_none=False)
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); pass a transformers causal LM")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    gen_cfg = _greedy_config(model, pad_id, tokenizer.eos_token_id, max_new_tokens)
    extra: dict[str, Any] = {}
    if stop:
        gen_cfg.stop_strings = list(stop)
        extra["tokenizer"] = tokenizer
    device = model_device(model)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    out: list[str] = [""] * len(prompts)
    batches = list(_sorted_batches([len(e) for e in encoded], batch_size))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding
                    n = len(encoded[i])
                    ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[row, width - n :] = 1
                gen = hf.generate(
                    model,
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_cfg,
                    **extra,
                )
                for row, i in enumerate(idx):
                    text = tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True)
                    out[i] = truncate_at(text, stop) if stop else text
    finally:
        model.train(was_training)
    return out
