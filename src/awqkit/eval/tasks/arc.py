"""ARC-Challenge multiple choice scored by log-likelihood, in lm-evaluation-harness's ``arc_challenge`` format.

Protocol:

* Prompt (context): ``"Question: {question}\\nAnswer:"``; each option is the continuation
  ``" " + option text`` (lm-eval's ``target_delimiter``), zero-shot, no chat template.
* Each option is scored by the summed log-likelihood of its continuation tokens given the context
  (:func:`loglikelihood`).
* ``acc``: fraction of questions whose highest-scoring option (argmax of the summed log-likelihood) is
  the gold one. ``acc_norm``: the same with each score divided by the option text's length in
  characters (``len(option text)``, without the leading space), as lm-eval's ``acc_norm``. Ties go to the
  first option (``argmax``).

Tokenization at the boundary follows lm-eval: trailing whitespace of the context moves to the start of
the continuation; ``context`` and ``context + continuation`` are tokenized separately (no special
tokens) and the continuation's tokens are the tail of the whole text's tokens after the first
``len(tokens(context))`` ones, so BPE merges across the boundary are scored as the model would see them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from awqkit.eval.tasks._common import (
    check_positive,
    model_device,
    read_jsonl,
    resolve_data_file,
)
from awqkit.files import sha256_file

logger = logging.getLogger(__name__)

#: Location of the ARC-Challenge test split inside the data folder.
ARC_RELPATH = "arc-challenge/test.jsonl"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(
    tokenizer: Any, context: str, continuation: str, *, add_bos: bool = False
) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` split as lm-eval does (see the module docstring).

    With ``add_bos`` (or an empty context) the tokenizer's BOS token, else its EOS token, is put before
    the context, so the first continuation token always has something to be predicted from.

    Raises:
        ValueError: the continuation yields no tokens, or an empty context with no BOS/EOS token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _ids(tokenizer, context + continuation)
    n_ctx = len(_ids(tokenizer, context)) if context else 0
    ctx, cont = whole[:n_ctx], whole[n_ctx:]
    if not cont:
        raise ValueError(
            f"continuation {continuation!r} yields no tokens after context {context[-40:]!r}; "
            "every scored continuation must be non-empty"
        )
    if add_bos or not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither")
        ctx = [prefix, *ctx]
    return ctx, cont


def loglikelihood(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    add_bos: bool = False,
    progress: bool = False,
) -> list[float]:
    """Summed log-likelihood ``sum_t log P(continuation token t | context, earlier continuation tokens)``
    of each ``(context, continuation)`` pair, in input order.

    Tokens are split by :func:`encode_pair`. Each pair is one row ``(ctx + cont)[:-1]`` of a right-padded
    batch (pairs are sorted by length so that batches pad little); padding sits after every real token,
    so a causal model's scores of the real tokens do not see it, and it is masked out
    (``attention_mask`` 0) as well. Logits are cast to float32 before ``log_softmax`` and sums are taken
    in float64. The model must already sit on its device; it is put in eval mode for the call.
    """
    check_positive("batch_size", batch_size, allow_none=False)
    encoded = [encode_pair(tokenizer, c, x, add_bos=add_bos) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    results: list[float] = [0.0] * len(encoded)
    starts = range(0, len(order), batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in tqdm(starts, desc="loglikelihood", disable=not progress, unit="batch"):
                idx = order[s : s + batch_size]
                rows = [(encoded[i][0] + encoded[i][1])[:-1] for i in idx]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for b, r in enumerate(rows):
                    ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
                    mask[b, : len(r)] = 1
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                for b, i in enumerate(idx):
                    ctx, cont = encoded[i]
                    first = len(ctx) - 1  # position predicting the first continuation token
                    logp = torch.log_softmax(logits[b, first : first + len(cont)].float(), dim=-1)
                    target = torch.tensor(cont, dtype=torch.long, device=logp.device).unsqueeze(-1)
                    results[i] = logp.gather(-1, target).sum(dtype=torch.float64).item()
                del logits, out
    finally:
        model.train(was_training)
    return results


def arc_prompt(question: str) -> str:
    """lm-eval's ARC context: ``"Question: {question}\\nAnswer:"``."""
    return f"Question: {question}\nAnswer:"


def choose(logliks: Sequence[float], options: Sequence[str]) -> tuple[int, int]:
    """``(argmax of logliks, argmax of logliks[i] / len(options[i]))``: the ``acc`` and ``acc_norm`` picks.

    ``options`` are the option texts without the leading space; lengths are in characters. The first
    maximum wins a tie.
    """
    if len(logliks) != len(options) or not options:
        raise ValueError(f"need one log-likelihood per option, got {len(logliks)} for {len(options)} options")
    pick = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    norm = [ll / max(1, len(o)) for ll, o in zip(logliks, options, strict=True)]
    pick_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return pick, pick_norm


def load_arc(path: str | Path | None = None, limit: int | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """``(file, items)``: the first ``limit`` rows (file order) of an ARC JSONL, each checked.

    Rows need ``question``, ``options`` (a list of ``{"label", "text"}``) and ``answer`` (one of the labels).
    """
    check_positive("limit", limit)
    file = resolve_data_file(path, ARC_RELPATH, "ARC-Challenge")
    rows = read_jsonl(file, ("question", "options", "answer"))
    items = rows if limit is None else rows[:limit]
    for n, row in enumerate(items, start=1):
        labels = [str(o.get("label")) for o in row["options"]] if isinstance(row["options"], list) else []
        if len(labels) < 2 or str(row["answer"]) not in labels:
            raise ValueError(
                f"{file} row {n} (id {row.get('id')!r}): answer {row['answer']!r} is not one of the option "
                f"labels {labels}; rows need options [{{label, text}}, ...] with at least two options"
            )
    return file, items


def evaluate_arc(
    model: nn.Module,
    tokenizer: Any,
    *,
    path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    add_bos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """ARC-Challenge accuracy of a causal LM (see the module docstring for the protocol).

    Args:
        path: the JSONL file or a data folder; ``None`` reads ``default_data_dir()/arc-challenge/test.jsonl``.
        limit: score the first ``limit`` questions in file order (``None``: all).
        batch_size: option sequences per forward pass.
        add_bos: put the BOS token before every context (lm-eval's default is not to).
    Returns:
        ``{"task": "arc_challenge", "acc", "acc_norm", "n", "n_options", "path", "sha256"}`` with
        ``acc``/``acc_norm`` as fractions in [0, 1].
    """
    file, items = load_arc(path, limit)
    pairs: list[tuple[str, str]] = []
    for row in items:
        ctx = arc_prompt(str(row["question"]))
        pairs.extend((ctx, " " + str(o["text"])) for o in row["options"])
    logger.info("ARC: %d questions, %d options from %s", len(items), len(pairs), file)
    scores = loglikelihood(model, tokenizer, pairs, batch_size=batch_size, add_bos=add_bos, progress=progress)
    correct = correct_norm = 0
    pos = 0
    for row in items:
        options = [str(o["text"]) for o in row["options"]]
        gold = [str(o["label"]) for o in row["options"]].index(str(row["answer"]))
        pick, pick_norm = choose(scores[pos : pos + len(options)], options)
        pos += len(options)
        correct += pick == gold
        correct_norm += pick_norm == gold
    n = len(items)
    return {
        "task": "arc_challenge",
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "n": n,
        "n_options": len(pairs),
        "path": str(file),
        "sha256": sha256_file(file),
    }
