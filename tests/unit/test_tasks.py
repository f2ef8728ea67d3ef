"""Tests for awqkit.eval.tasks: ARC log-likelihood scoring, SQuAD 2.0 metrics, GSM8K extraction, generation."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import make_tiny_tokenizer
from torch import nn

from awqkit.eval import default_data_dir
from awqkit.eval.tasks import (
    compute_exact,
    compute_f1,
    evaluate_arc,
    evaluate_gsm8k,
    evaluate_squad,
    extract_answer,
    loglikelihood,
    normalize_answer,
)
from awqkit.eval.tasks import gsm8k as gsm8k_mod
from awqkit.eval.tasks import squad as squad_mod
from awqkit.eval.tasks._common import generate
from awqkit.eval.tasks.arc import choose, encode_pair, load_arc
from awqkit.eval.tasks.gsm8k import gold_answer, gsm8k_prompt, load_gsm8k, parse_number
from awqkit.eval.tasks.squad import clean_prediction, gold_answers, load_squad, map_no_answer, squad_scores


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tiny_tokenizer()


def _llama(vocab: int, init: float = 0.02) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=1024,
        initializer_range=init,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok: Any) -> nn.Module:
    return _llama(len(tok))


@pytest.fixture(scope="module")
def peaked_model(tok: Any) -> nn.Module:
    """Large init: peaked logits, so greedy choices are far from ties (batched == unbatched exactly)."""
    return _llama(len(tok), init=0.5)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- loglikelihood


def _hand_loglik(model: nn.Module, tok: Any, context: str, continuation: str) -> float:
    """lm-eval's split, then one un-padded forward and log_softmax gathered by hand (float64)."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"]) if context else 0
    if n_ctx == 0:
        whole, n_ctx = [tok.bos_token_id, *whole], 1
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


PAIRS = [
    ("What is the capital of France?", " Paris is the capital of France."),
    ("Question: hello\nAnswer:", " world"),
    ("The quick brown fox jumps over the lazy ", "dog."),  # trailing space moves into the continuation
    ("", "hello again!"),  # empty context: conditioned on BOS
    ("Quantization maps float weights", " to small integers with a scale and a zero point."),
]


def test_loglikelihood_matches_hand_computation(model, tok):
    hand = [_hand_loglik(model, tok, c, x) for c, x in PAIRS]
    for bs in (1, 3, 8):
        got = loglikelihood(model, tok, PAIRS, batch_size=bs)
        assert got == pytest.approx(hand, rel=1e-5, abs=1e-4)
    assert all(v < 0 for v in hand)


def test_encode_pair_takes_continuation_as_tail_of_whole(tok):
    ctx, cont = encode_pair(tok, "The quick brown fox jumps over the lazy ", "dog.")
    whole = tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    assert tok.decode(cont).startswith(" ")  # the moved space
    bos_ctx, _ = encode_pair(tok, "hello", " world", add_bos=True)
    assert bos_ctx[0] == tok.bos_token_id


def test_encode_pair_rejects_empty_continuation(tok):
    with pytest.raises(ValueError, match="yields no tokens"):
        encode_pair(tok, "hello", "")


# ----------------------------------------------------------------------------- ARC


ARC_ROWS = [
    {
        "id": "q1",
        "question": "What is the capital of France?",
        "answer": "B",
        "options": [{"label": "A", "text": "Berlin"}, {"label": "B", "text": "Paris"}, {"label": "C", "text": "Rome"}],
    },
    {
        "id": "q2",
        "question": "Which animal is quick and brown?",
        "answer": "A",
        "options": [
            {"label": "A", "text": "the fox"},
            {"label": "B", "text": "a lazy dog"},
            {"label": "C", "text": "hello world"},
            {"label": "D", "text": "zero point"},
        ],
    },
    {
        "id": "q3",
        "question": "What maps float weights to integers?",
        "answer": "D",
        "options": [
            {"label": "A", "text": "prompt"},
            {"label": "B", "text": "response"},
            {"label": "C", "text": "system"},
            {"label": "D", "text": "Quantization with a scale"},
        ],
    },
]


class OracleLM(nn.Module):
    """Scores uniformly, except that after any prefix of a "preferred" token sequence it puts +30 on the
    sequence's next token. Built from the questions' correct options, it ranks them first (log-likelihood
    ~0) while any other option pays ~log(vocab) at the token where it leaves the preferred path."""

    def __init__(self, preferred: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.preferred = preferred
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for seq in self.preferred:
                for t in range(min(len(row), len(seq) - 1)):
                    if row[t] != seq[t]:
                        break
                    logits[b, t, seq[t + 1]] += 30.0
        return SimpleNamespace(logits=logits)


def _oracle_for(rows: list[dict], tok: Any) -> OracleLM:
    preferred = []
    for r in rows:
        text = next(o["text"] for o in r["options"] if o["label"] == r["answer"])
        preferred.append(tok(f"Question: {r['question']}\nAnswer: {text}", add_special_tokens=False)["input_ids"])
    return OracleLM(preferred, len(tok))


def test_arc_oracle_scores_one_and_zero(tmp_path, tok):
    path = _write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    oracle = _oracle_for(ARC_ROWS, tok)
    r = evaluate_arc(oracle, tok, path=path, batch_size=4, progress=False)
    assert (r["acc"], r["acc_norm"], r["n"], r["n_options"]) == (1.0, 1.0, 3, 11)
    assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # Same oracle, but the file's gold letters point at other options: nothing is right.
    moved = [dict(r, answer="C") for r in ARC_ROWS]
    r0 = evaluate_arc(oracle, tok, path=_write_jsonl(tmp_path / "moved.jsonl", moved), progress=False)
    assert (r0["acc"], r0["acc_norm"]) == (0.0, 0.0)
    r2 = evaluate_arc(oracle, tok, path=path, limit=2, batch_size=1, progress=False)
    assert (r2["acc"], r2["n"]) == (1.0, 2)


def test_arc_random_model_is_deterministic_and_batch_independent(tmp_path, model, tok):
    path = _write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    a = evaluate_arc(model, tok, path=path, batch_size=4, progress=False)
    b = evaluate_arc(model, tok, path=path, batch_size=4, progress=False)
    c = evaluate_arc(model, tok, path=path, batch_size=1, progress=False)
    assert a == b
    assert (c["acc"], c["acc_norm"]) == (a["acc"], a["acc_norm"])
    assert 0.0 <= a["acc"] <= 1.0 and a["n"] == 3


def test_choose_acc_vs_acc_norm():
    # acc picks the higher sum; acc_norm divides by characters: -10/5 = -2 < -12/20 = -0.6.
    assert choose([-10.0, -12.0], ["abcde", "x" * 20]) == (0, 1)
    assert choose([-3.0, -3.0], ["ab", "ab"]) == (0, 0)  # first maximum wins a tie
    with pytest.raises(ValueError, match="one log-likelihood per option"):
        choose([-1.0], ["a", "b"])


def test_arc_bad_rows_and_missing_file(tmp_path):
    bad = [dict(ARC_ROWS[0], answer="E")]
    with pytest.raises(ValueError, match="not one of the option labels"):
        load_arc(_write_jsonl(tmp_path / "bad.jsonl", bad))
    with pytest.raises(FileNotFoundError, match="ARC-Challenge file not found"):
        load_arc(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="lacks the key"):
        load_arc(_write_jsonl(tmp_path / "nokey.jsonl", [{"question": "q"}]))


SHARED = {
    "arc-challenge/test.jsonl": "bafb2fcb61ad7fdf85d3540d36a00d48228317298ae976ad2c0c0f24e247151c",
    "squad-v2/dev-v2.0.json": "e67e5969b6dc6c1642154740806b79263b77fc048c7c11ee60d534eb48ef81e8",
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}


def test_shared_data_loads_by_default_with_published_hashes(model, tok):
    if not all((default_data_dir() / rel).is_file() for rel in SHARED):
        pytest.skip(f"shared data not found under {default_data_dir()}")
    r = evaluate_arc(model, tok, limit=2, progress=False)
    assert (r["n"], r["sha256"]) == (2, SHARED["arc-challenge/test.jsonl"])
    _, items = load_arc(limit=None)
    assert len(items) == 1172
    _, squad_items = load_squad(limit=None)
    assert (len(squad_items), sum(not it["answers"] for it in squad_items)) == (6078, 3168)
    _, ex, gsm_items = load_gsm8k(num_fewshot=5)
    assert (len(ex), len(gsm_items)) == (5, 1314)
    assert all(isinstance(gold_answer(row["answer"]), Decimal) for row in gsm_items)
    for rel, digest in SHARED.items():
        assert hashlib.sha256((default_data_dir() / rel).read_bytes()).hexdigest() == digest


# ----------------------------------------------------------------------------- SQuAD metrics


def test_normalize_answer_official():
    assert normalize_answer("The Cat, sat!") == "cat sat"
    assert normalize_answer("  an apple a  day ") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer(" A. ") == ""


def test_exact_and_f1_hand_values():
    assert compute_exact("The Cat.", "cat") == 1
    assert compute_exact("cat sat", "cat") == 0
    # pred tokens [cat, sat], gold [cat, sat, down]: P = 1, R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    assert compute_f1("a cat sat down", "the cat sat") == pytest.approx(0.8)
    # multiset overlap: gold {cat:2, dog:1}, pred {cat:1, dog:2} -> 2 shared; P = R = 2/3
    assert compute_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert compute_f1("cat", "dog") == 0.0
    assert compute_f1("", "") == 1.0 and compute_f1("", "cat") == 0.0 and compute_f1("cat", "") == 0.0


def test_no_answer_mapping_and_cleaning():
    for text in ("Unanswerable.", "no answer", "N/A", "", "  ", "The answer is unknown"[-7:]):
        assert map_no_answer(text) == ""
    assert map_no_answer("Paris") == "Paris"
    assert map_no_answer("I don't know") == "I don't know"  # not in the list: scored as an answer
    assert clean_prediction('<think>hmm</think>\n\nAnswer: "Paris"\nmore text') == "Paris"
    assert clean_prediction("unanswerable\n") == ""
    assert clean_prediction('The answer to the question is: "unanswerable"') == ""
    assert clean_prediction('The answer to this question is: "Spectre"') == "Spectre"
    assert clean_prediction("Answers vary") == "Answers vary"  # no "is"/":" after it: not a prefix
    assert clean_prediction('"Paris') == '"Paris'  # unmatched quote kept (normalization drops it anyway)
    assert gold_answers(["", "the"]) == [""]  # golds that normalize to empty are dropped
    assert gold_answers(["France", "the"]) == ["France"]


def test_squad_scores_aggregate():
    preds = ["paris", "the cat sat", "", "Paris", ""]
    answers = [["Paris", "Paris, France"], ["a cat sat down"], [], [], ["France"]]
    s = squad_scores(preds, answers)
    assert s["em"] == pytest.approx(2 / 5)
    assert s["f1"] == pytest.approx((1 + 0.8 + 1 + 0 + 0) / 5)
    assert s["HasAns_em"] == pytest.approx(1 / 3) and s["HasAns_f1"] == pytest.approx(1.8 / 3)
    assert s["NoAns_em"] == 0.5
    assert (s["HasAns_n"], s["NoAns_n"], s["n"]) == (3, 2, 5)
    assert squad_scores(["x"], [["x"]])["NoAns_em"] is None


def _squad_file(tmp_path: Path, n: int = 10) -> Path:
    qas = [
        {
            "id": f"q{i}",
            "question": f"question {i}?",
            "answers": [] if i % 3 == 2 else [{"text": f"answer {i}", "answer_start": 0}],
            "is_impossible": i % 3 == 2,
        }
        for i in range(n)
    ]
    data = {
        "version": "v2.0",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {"context": "hello world, the quick brown fox.", "qas": qas[: n // 2]},
                    {"context": "What is the capital of France?", "qas": qas[n // 2 :]},
                ],
            }
        ],
    }
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    return path


def test_load_squad_sampling(tmp_path):
    path = _squad_file(tmp_path)
    _, first = load_squad(path, limit=4, seed=None)
    assert [it["id"] for it in first] == ["q0", "q1", "q2", "q3"]
    _, a = load_squad(path, limit=4, seed=0)
    _, b = load_squad(path, limit=4, seed=0)
    ids = [it["id"] for it in a]
    assert ids == [it["id"] for it in b]
    assert ids == sorted(ids, key=lambda q: int(q[1:]))  # kept in file order
    _, everything = load_squad(path)
    assert len(everything) == 10 and everything[2]["answers"] == []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"qas": [{"id": "x", "question": "q?"}]}]}]}))
    with pytest.raises(ValueError, match="official SQuAD JSON layout"):
        load_squad(bad)  # paragraph without "context"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": []}]}]}))
    with pytest.raises(ValueError, match="holds no questions"):
        load_squad(bad)


def test_evaluate_squad_perfect_predictions_via_fake_generate(tmp_path, tok, monkeypatch):
    path = _squad_file(tmp_path)
    _, items = load_squad(path)
    seen: dict[str, Any] = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.update(prompts=prompts, **kw)
        out = []
        for p in prompts:
            item = next(it for it in items if f"Question: {it['question']}" in p)
            out.append(f"{item['answers'][0]}\n" if item["answers"] else "Unanswerable.")
        return out

    monkeypatch.setattr(squad_mod, "generate", fake_generate)
    r = evaluate_squad(nn.Identity(), tok, path=path, progress=False)
    assert (r["em"], r["f1"], r["HasAns_em"], r["NoAns_em"], r["n"]) == (1.0, 1.0, 1.0, 1.0, 10)
    assert r["chat_template"] is True and seen["add_special_tokens"] is False
    assert all(p.startswith("<s><|user|>\n") and p.endswith("<|assistant|>\n") for p in seen["prompts"])
    plain = make_tiny_tokenizer(chat_template=None)
    r2 = evaluate_squad(nn.Identity(), plain, path=path, limit=3, progress=False)
    assert r2["chat_template"] is False and r2["n"] == 3
    assert seen["add_special_tokens"] is True and seen["stop"] == ("\n",)
    assert all(p.endswith("\nAnswer:") for p in seen["prompts"])


def test_evaluate_squad_real_generation_batched_equals_unbatched(tmp_path, peaked_model, tok):
    path = _squad_file(tmp_path, n=4)
    kw = dict(path=path, max_new_tokens=4, return_predictions=True, progress=False)
    a = evaluate_squad(peaked_model, tok, batch_size=3, **kw)
    b = evaluate_squad(peaked_model, tok, batch_size=1, **kw)
    assert [p["raw"] for p in a["predictions"]] == [p["raw"] for p in b["predictions"]]
    assert a == b
    assert 0.0 <= a["em"] <= a["f1"] <= 1.0 and a["n"] == 4


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is\n#### 1,234", Decimal(1234)),
        ("She makes $5.", Decimal(5)),
        ("The change is -3", Decimal(-3)),
        ("We get 3 apples, then 7 more, so 10 in all.", Decimal(10)),
        ("#### 42\nQuestion: what is 7?", Decimal(42)),
        ("x is 5 ####", Decimal(5)),  # nothing after ####: last number
        ("It costs $1,234.50 in total", Decimal("1234.5")),
        ("<think>99</think> the answer: 3", Decimal(3)),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gold_and_parse_number():
    assert gold_answer("16 - 3 - 4 = <<16-3-4=9>>9 eggs\n#### 1,234") == Decimal(1234)
    assert parse_number("18.00") == Decimal(18) and parse_number("$7.") == Decimal(7)
    assert parse_number("abc") is None
    with pytest.raises(ValueError, match="no '#### N' line"):
        gold_answer("just 5")


GSM_ROWS = [
    {"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
    for i in range(1, 7)
]


def test_load_gsm8k_excludes_exemplars(tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    _, ex, items = load_gsm8k(path, limit=3, num_fewshot=2)
    assert [e["question"] for e in ex] == [GSM_ROWS[0]["question"], GSM_ROWS[1]["question"]]
    assert [it["question"] for it in items] == [r["question"] for r in GSM_ROWS[2:5]]
    with pytest.raises(ValueError, match="leaves no test items"):
        load_gsm8k(path, num_fewshot=6)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_gsm8k(path, limit=0)


def test_gsm8k_prompts(tok):
    ex = GSM_ROWS[:1]
    few = gsm8k_prompt(tok, "What is 9 plus 9?", ex, use_chat_template=False)
    assert few == (f"Question: {ex[0]['question']}\nAnswer: {ex[0]['answer']}\n\nQuestion: What is 9 plus 9?\nAnswer:")
    zero = gsm8k_prompt(tok, "What is 9 plus 9?", [], use_chat_template=True)
    assert zero.startswith("<s><|user|>\n") and "####" in zero and zero.endswith("<|assistant|>\n")
    multi = gsm8k_prompt(tok, "What is 9 plus 9?", ex, use_chat_template=True)
    assert multi.count("<|user|>") == 2 and multi.count("<|assistant|>") == 2


def test_evaluate_gsm8k_scoring_via_fake_generate(tmp_path, tok, monkeypatch):
    path = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    answers = iter(["so #### 6", "I think it is 8.", "#### 1,000", "nothing"])
    seen: dict[str, Any] = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.update(prompts=prompts, **kw)
        return [next(answers) for _ in prompts]

    monkeypatch.setattr(gsm8k_mod, "generate", fake_generate)
    r = evaluate_gsm8k(nn.Identity(), tok, path=path, num_fewshot=2, limit=4, progress=False, return_predictions=True)
    # items are rows 3..6 with golds 6, 8, 10, 12
    assert (r["em"], r["n"], r["n_no_number"], r["chat_template"]) == (0.5, 4, 1, False)
    assert [p["gold"] for p in r["predictions"]] == ["6", "8", "10", "12"]
    assert seen["stop"] == ("Question:",) and seen["add_special_tokens"] is True
    assert seen["max_new_tokens"] == 256


def test_evaluate_gsm8k_real_generation(tmp_path, peaked_model, tok):
    path = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    kw = dict(path=path, limit=3, max_new_tokens=5, return_predictions=True, progress=False)
    zero = evaluate_gsm8k(peaked_model, tok, batch_size=2, **kw)
    assert zero == evaluate_gsm8k(peaked_model, tok, batch_size=1, **kw)
    assert zero["chat_template"] is True and zero["n"] == 3 and 0.0 <= zero["em"] <= 1.0
    few = evaluate_gsm8k(peaked_model, tok, num_fewshot=1, batch_size=3, **kw)
    assert few["chat_template"] is False and few["num_fewshot"] == 1


def test_generate_argument_errors(peaked_model, tok):
    with pytest.raises(TypeError, match="has no generate"):
        generate(nn.Identity(), tok, ["hi"], max_new_tokens=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generate(peaked_model, tok, ["hi"], max_new_tokens=2, batch_size=0)
    out = generate(peaked_model, tok, ["hello", "What is the capital of France?"], max_new_tokens=3, progress=False)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
