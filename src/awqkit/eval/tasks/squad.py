"""SQuAD 2.0 extractive QA by greedy generation, scored with the official SQuAD 2.0 metrics.

Items: the questions of the official JSON (``data[].paragraphs[].qas[]``) in file order. With ``limit``
and ``seed`` set, ``limit`` of them are drawn without replacement by ``random.Random(seed).sample`` and
kept in file order (a spread over all articles, not just the first one); with ``seed=None`` the first
``limit`` are taken. A question is answerable iff its ``answers`` list is non-empty (as the official
script decides ``has_ans``).

Prompt: with a chat template, one user turn: the instruction :data:`INSTRUCTION`, the context and the
question, rendered with the generation prompt. Without one: the same text followed by ``"\\nAnswer:"``
and generation stops at the first newline. Greedy decoding, ``max_new_tokens`` (default 32).

Answer extraction (:func:`clean_prediction`): ``<think>`` blocks are dropped, the first non-empty line
is kept, a leading ``"Answer:"`` / ``"The answer (to the question) is:"`` and matching enclosing quotes
are stripped. Then the no-answer mapping: a prediction
whose :func:`normalize_answer` form is empty or one of :data:`NO_ANSWER_FORMS` (``"unanswerable"``,
``"no answer"``, ...) becomes ``""``, the official encoding of "no answer".

Metrics (official ``evaluate-v2.0.py``, reported as fractions in [0, 1]; the official script prints
them x100): gold answers are the answer texts whose normalized form is non-empty, or ``[""]`` for an
unanswerable question; ``exact`` = max over golds of ``normalize_answer(gold) == normalize_answer(pred)``;
``f1`` = max over golds of the token F1 of the normalized, whitespace-split texts (if either side has
no tokens, F1 = 1 when both have none else 0; otherwise with ``common`` = the multiset intersection,
precision = common / pred tokens, recall = common / gold tokens, F1 = 2PR / (P + R), 0 when nothing is
shared). An unanswerable question therefore scores 1 only for an empty (mapped) prediction, and its F1
equals its EM.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from awqkit.eval.tasks._common import (
    chat_prompt,
    check_positive,
    generate,
    has_chat_template,
    resolve_data_file,
    strip_thinking,
)
from awqkit.files import sha256_file

logger = logging.getLogger(__name__)

#: Location of the SQuAD 2.0 dev set inside the data folder.
SQUAD_RELPATH = "squad-v2/dev-v2.0.json"
INSTRUCTION = (
    "Answer the question with a short span copied exactly from the context. "
    'If the context does not contain the answer, reply with the single word "unanswerable".'
)
#: Normalized predictions that mean "no answer" (mapped to the empty string).
NO_ANSWER_FORMS = frozenset(
    {
        "",
        "unanswerable",
        "no answer",
        "not answerable",
        "cannot be answered",
        "cannot answer",
        "unknown",
        "none",
        "na",
        "not mentioned",
        "not given",
        "not stated",
        "no answer found",
    }
)
_ANSWER_PREFIX = re.compile(
    r"^(?:the\s+)?(?:final\s+)?answer(?:\s+to\s+(?:this|the)\s+question)?(?:\s+is\s*:?|\s*:)\s*", re.IGNORECASE
)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD normalization: lowercase, drop punctuation, drop articles a/an/the, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def compute_exact(gold: str, pred: str) -> int:
    """1 if the normalized texts are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    """Official token F1 between one gold answer and a prediction (see the module docstring)."""
    gold_toks = normalize_answer(gold).split()
    pred_toks = normalize_answer(pred).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str]) -> list[str]:
    """Official gold list: answer texts with a non-empty normalized form, or ``[""]`` if none."""
    golds = [a for a in answers if normalize_answer(a)]
    return golds or [""]


def map_no_answer(pred: str) -> str:
    """``""`` when the prediction means "no answer" (:data:`NO_ANSWER_FORMS`), else ``pred`` unchanged."""
    return "" if normalize_answer(pred) in NO_ANSWER_FORMS else pred


def clean_prediction(text: str) -> str:
    """Answer text from a raw generation: no ``<think>`` block, first non-empty line, a leading
    ``"Answer:"`` / ``"The answer is"`` / ``"The answer to the question is:"`` removed, matching enclosing
    quotes removed, then :func:`map_no_answer`."""
    text = strip_thinking(text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = _ANSWER_PREFIX.sub("", line).strip()
    while len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    return map_no_answer(line)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Official SQuAD 2.0 aggregates over already-cleaned predictions (``""`` = no answer).

    ``answers[i]`` is question ``i``'s raw gold texts (empty for an unanswerable question).
    Returns ``em``, ``f1``, ``HasAns_em``, ``HasAns_f1``, ``HasAns_n``, ``NoAns_em`` (= NoAns F1), ``NoAns_n``
    and ``n``; a subset mean is ``None`` when the subset is empty.
    """
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"need one prediction per question, got {len(predictions)} for {len(answers)}")
    em: list[int] = []
    f1: list[float] = []
    has: list[bool] = []
    for pred, ans in zip(predictions, answers, strict=True):
        golds = gold_answers(ans)
        em.append(max(compute_exact(g, pred) for g in golds))
        f1.append(max(compute_f1(g, pred) for g in golds))
        has.append(bool(ans))

    def mean(values: Sequence[float], keep: list[bool]) -> float | None:
        sel = [v for v, k in zip(values, keep, strict=True) if k]
        return sum(sel) / len(sel) if sel else None

    no = [not h for h in has]
    return {
        "em": sum(em) / len(em),
        "f1": sum(f1) / len(f1),
        "HasAns_em": mean(em, has),
        "HasAns_f1": mean(f1, has),
        "HasAns_n": sum(has),
        "NoAns_em": mean(em, no),
        "NoAns_n": sum(no),
        "n": len(em),
    }


def load_squad(
    path: str | Path | None = None, limit: int | None = None, seed: int | None = 0
) -> tuple[Path, list[dict[str, Any]]]:
    """``(file, items)`` with items ``{"id", "context", "question", "answers": [texts]}`` (see the module
    docstring for how ``limit``/``seed`` pick them)."""
    check_positive("limit", limit)
    file = resolve_data_file(path, SQUAD_RELPATH, "SQuAD 2.0")
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
        items = [
            {
                "id": qa.get("id"),
                "context": para["context"],
                "question": qa["question"],
                "answers": [a["text"] for a in qa.get("answers") or []],
            }
            for article in data["data"]
            for para in article["paragraphs"]
            for qa in para["qas"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{file} is not in the official SQuAD JSON layout (data[].paragraphs[].{{context, qas[]}}): {exc!r}"
        ) from None
    if not items:
        raise ValueError(f"{file} holds no questions")
    if limit is not None and limit < len(items):
        if seed is None:
            items = items[:limit]
        else:
            keep = sorted(random.Random(seed).sample(range(len(items)), limit))
            items = [items[i] for i in keep]
    return file, items


def squad_prompt(tokenizer: Any, context: str, question: str, use_chat_template: bool) -> str:
    """The prompt text for one question (chat-rendered or plain, see the module docstring)."""
    body = f"{INSTRUCTION}\n\nContext: {context}\n\nQuestion: {question}"
    if use_chat_template:
        return chat_prompt(tokenizer, [{"role": "user", "content": body}])
    return f"{body}\nAnswer:"


def evaluate_squad(
    model: nn.Module,
    tokenizer: Any,
    *,
    path: str | Path | None = None,
    limit: int | None = None,
    seed: int | None = 0,
    batch_size: int = 4,
    max_new_tokens: int = 32,
    use_chat_template: bool | None = None,
    return_predictions: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """SQuAD 2.0 EM / F1 of a causal LM by greedy generation (see the module docstring).

    Args:
        path: the ``dev-v2.0.json`` file or a data folder; ``None`` reads
            ``default_data_dir()/squad-v2/dev-v2.0.json``.
        limit: number of questions (``None``: all 6,078 of the shared file).
        seed: how ``limit`` questions are drawn (``None``: the first ``limit`` in file order).
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
        return_predictions: add ``"predictions"``: ``[{"id", "prediction", "raw", "answers"}]``.
    Returns:
        ``{"task": "squad_v2", "em", "f1", "HasAns_em", "HasAns_f1", "HasAns_n", "NoAns_em", "NoAns_n", "n",
        "seed", "max_new_tokens", "chat_template", "path", "sha256"}``.
    """
    file, items = load_squad(path, limit, seed)
    chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template; pass False or None")
    prompts = [squad_prompt(tokenizer, it["context"], it["question"], chat) for it in items]
    logger.info("SQuAD 2.0: %d questions from %s (chat template: %s)", len(items), file, chat)
    raw = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        add_special_tokens=not chat,
        stop=() if chat else ("\n",),
        progress=progress,
        desc="squad_v2",
    )
    preds = [clean_prediction(r) for r in raw]
    result: dict[str, Any] = {"task": "squad_v2", **squad_scores(preds, [it["answers"] for it in items])}
    result.update(
        {
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "chat_template": chat,
            "path": str(file),
            "sha256": sha256_file(file),
        }
    )
    if return_predictions:
        result["predictions"] = [
            {"id": it["id"], "prediction": p, "raw": r, "answers": it["answers"]}
            for it, p, r in zip(items, preds, raw, strict=True)
        ]
    return result
