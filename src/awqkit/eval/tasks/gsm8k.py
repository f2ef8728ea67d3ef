"""GSM8K exact match by greedy generation.

Data: any JSONL with ``question`` and ``answer``; the gold is the text after the last ``####`` of the
answer, commas removed (GSM8K's worked solutions end in ``#### N``).

Prompting (``num_fewshot``):

* ``0`` (default), chat template (used when the tokenizer has one, unless ``use_chat_template=False``):
  one user turn, :data:`ZERO_SHOT_INSTRUCTION` + the question.
* ``0`` without a chat template: the instruction, ``"\\n\\nQuestion: {question}\\nAnswer:"``.
* ``k > 0``: the first ``k`` rows of the file are the exemplars and are excluded from the test items
  (which then start at row ``k``); lm-eval's ``gsm8k`` format ``"Question: {q}\\nAnswer: {worked
  solution with #### N}\\n\\n"`` per exemplar, then ``"Question: {q}\\nAnswer:"``, no chat template by
  default. With ``use_chat_template=True`` the exemplars become user/assistant turns instead.

Test items are the first ``limit`` rows after the exemplars, in file order. Decoding is greedy up to
``max_new_tokens`` (default 256); in the plain formats generation stops at ``"Question:"`` (the next
exemplar the model would invent).

Extraction (:func:`extract_answer`): after ``<think>`` blocks are dropped, the first number after the
last ``####`` if there is one, otherwise the last number in the text; a number is an optional ``-``,
optional ``$``, digits with optional thousands commas and an optional decimal part; ``$`` and commas
are removed and a trailing period dropped. ``em`` = fraction of items whose extracted number equals the
gold numerically (``Decimal`` equality, so ``18`` = ``18.00``); an item with no number is wrong.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from torch import nn

from awqkit.eval.tasks._common import (
    chat_prompt,
    check_positive,
    generate,
    has_chat_template,
    read_jsonl,
    resolve_data_file,
    strip_thinking,
)
from awqkit.files import sha256_file

logger = logging.getLogger(__name__)

#: Location of the GSM8K test split inside the data folder.
GSM8K_RELPATH = "gsm8k/test.jsonl"
ZERO_SHOT_INSTRUCTION = (
    "Solve the following math problem step by step. At the end, write the final answer as a plain "
    'number after "####", for example "#### 42".'
)
_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_STOP = ("Question:",)


def parse_number(text: str) -> Decimal | None:
    """``text`` as a number after removing ``$``, commas, spaces and a trailing period; ``None`` if it is not one."""
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def gold_answer(answer: str) -> Decimal:
    """The number after the last ``####`` of a GSM8K solution (commas removed).

    Raises:
        ValueError: no ``####`` or no number after it.
    """
    if "####" not in answer:
        raise ValueError(f"gold answer {answer[-60:]!r} has no '#### N' line; GSM8K answers end in '#### <number>'")
    value = parse_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"gold answer text after '####' is not a number: {answer.rsplit('####', 1)[1]!r}")
    return value


def extract_answer(text: str) -> Decimal | None:
    """The predicted number of a generation (see the module docstring), or ``None`` if there is none."""
    text = strip_thinking(text)
    if "####" in text:
        m = _NUMBER_RE.search(text.rsplit("####", 1)[1])
        if m:
            return parse_number(m.group(0))
    found = _NUMBER_RE.findall(text)
    return parse_number(found[-1]) if found else None


def _plain_block(question: str, answer: str | None = None) -> str:
    return f"Question: {question}\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def gsm8k_prompt(tokenizer: Any, question: str, exemplars: list[dict[str, Any]], use_chat_template: bool) -> str:
    """The prompt text for one question (formats in the module docstring)."""
    if use_chat_template:
        if exemplars:
            messages: list[dict[str, str]] = []
            for ex in exemplars:
                messages.append({"role": "user", "content": f"Question: {ex['question']}"})
                messages.append({"role": "assistant", "content": str(ex["answer"])})
            messages.append({"role": "user", "content": f"Question: {question}"})
        else:
            messages = [{"role": "user", "content": f"{ZERO_SHOT_INSTRUCTION}\n\n{question}"}]
        return chat_prompt(tokenizer, messages)
    if exemplars:
        return "".join(_plain_block(ex["question"], ex["answer"]) for ex in exemplars) + _plain_block(question)
    return f"{ZERO_SHOT_INSTRUCTION}\n\n" + _plain_block(question)


def load_gsm8k(
    path: str | Path | None = None, limit: int | None = None, num_fewshot: int = 0
) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """``(file, exemplars, items)``: the first ``num_fewshot`` rows, then the first ``limit`` rows after them."""
    check_positive("limit", limit)
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    file = resolve_data_file(path, GSM8K_RELPATH, "GSM8K")
    rows = read_jsonl(file, ("question", "answer"))
    if num_fewshot >= len(rows):
        raise ValueError(f"num_fewshot={num_fewshot} leaves no test items in {file} ({len(rows)} rows)")
    exemplars, items = rows[:num_fewshot], rows[num_fewshot:]
    if limit is not None:
        items = items[:limit]
    return file, exemplars, items


def evaluate_gsm8k(
    model: nn.Module,
    tokenizer: Any,
    *,
    path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    use_chat_template: bool | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 256,
    return_predictions: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """GSM8K exact match of a causal LM (see the module docstring).

    Args:
        path: a JSONL file or a data folder; ``None`` reads ``default_data_dir()/gsm8k/test.jsonl``.
        limit: number of test items (``None``: all rows after the exemplars).
        num_fewshot: exemplars taken from the start of the file (0: zero-shot with an instruction).
        use_chat_template: ``None`` = use the tokenizer's template for zero-shot only.
        return_predictions: add ``"predictions"``: ``[{"prediction": str | None, "gold": str, "raw"}]``.
    Returns:
        ``{"task": "gsm8k", "em", "n", "n_no_number", "num_fewshot", "chat_template", "max_new_tokens",
        "path", "sha256"}``; ``em`` is a fraction in [0, 1].
    """
    file, exemplars, items = load_gsm8k(path, limit, num_fewshot)
    golds = [gold_answer(str(row["answer"])) for row in items]
    chat = (has_chat_template(tokenizer) and num_fewshot == 0) if use_chat_template is None else use_chat_template
    if chat and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template; pass False or None")
    prompts = [gsm8k_prompt(tokenizer, str(row["question"]), exemplars, chat) for row in items]
    logger.info("GSM8K: %d items, %d-shot from %s (chat template: %s)", len(items), num_fewshot, file, chat)
    raw = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        add_special_tokens=not chat,
        stop=() if chat else _STOP,
        progress=progress,
        desc="gsm8k",
    )
    preds = [extract_answer(r) for r in raw]
    correct = sum(p is not None and p == g for p, g in zip(preds, golds, strict=True))
    result: dict[str, Any] = {
        "task": "gsm8k",
        "em": correct / len(items),
        "n": len(items),
        "n_no_number": sum(p is None for p in preds),
        "num_fewshot": num_fewshot,
        "chat_template": chat,
        "max_new_tokens": max_new_tokens,
        "path": str(file),
        "sha256": sha256_file(file),
    }
    if return_predictions:
        result["predictions"] = [
            {"prediction": None if p is None else str(p), "gold": str(g), "raw": r}
            for p, g, r in zip(preds, golds, raw, strict=True)
        ]
    return result
