"""Calibration data: file readers, chat-template rendering, block cutting and self-generation."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from awqkit.calib import build_blocks, load_calibration, read_samples, self_generate
from awqkit.config import CalibConfig
from awqkit.files import sha256_file

CFG = CalibConfig(source="x", n_samples=4, seq_len=16, seed=0)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _chat(tok: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


# ------------------------------------------------------------------------------------------ sources
def test_txt_one_prompt_per_line(tmp_path: Path, tiny_tokenizer: Any) -> None:
    p = tmp_path / "prompts.txt"
    p.write_text("first prompt\n\n   \nsecond prompt\r\nthird {not json}\n", encoding="utf-8")
    assert read_samples(p, tiny_tokenizer, CFG) == ["first prompt", "second prompt", "third {not json}"]


def test_jsonl_text_field_keeps_newlines(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"text": "line one\nline two"}, {"text": "solo"}, {"text": ""}]
    assert read_samples(_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, CFG) == ["line one\nline two", "solo"]
    # the same content in a .txt file is detected as JSONL by its content
    assert read_samples(_jsonl(tmp_path / "d.txt", rows), tiny_tokenizer, CFG) == ["line one\nline two", "solo"]


def test_json_array_file(tmp_path: Path, tiny_tokenizer: Any) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a b"}, {"text": "c d"}]), encoding="utf-8")
    assert read_samples(p, tiny_tokenizer, CFG) == ["a b", "c d"]


def test_question_answer_rendered_with_chat_template(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"question": "What is 2+2?", "answer": "4", "id": 7}, {"question": "Only a prompt?"}]
    got = read_samples(_jsonl(tmp_path / "qa.jsonl", rows), tiny_tokenizer, CFG)
    expected_full = _chat(
        tiny_tokenizer, [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], gen=False
    )
    expected_prompt = _chat(tiny_tokenizer, [{"role": "user", "content": "Only a prompt?"}], gen=True)
    assert got == [expected_full, expected_prompt]
    assert got[1].endswith("<|assistant|>\n") and not got[0].endswith("<|assistant|>\n")


def test_system_prompt_is_prepended(tmp_path: Path, tiny_tokenizer: Any) -> None:
    cfg = CalibConfig(source="x", system_prompt="Be brief.")
    got = read_samples(_jsonl(tmp_path / "qa.jsonl", [{"prompt": "hi", "completion": "hello"}]), tiny_tokenizer, cfg)
    assert got == [
        _chat(
            tiny_tokenizer,
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
            gen=False,
        )
    ]


def test_messages_column_rendered_whole(tmp_path: Path, tiny_tokenizer: Any) -> None:
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    # "messages" wins over a text column in detection order
    got = read_samples(_jsonl(tmp_path / "m.jsonl", [{"messages": conv, "text": "ignored"}]), tiny_tokenizer, CFG)
    assert got == [_chat(tiny_tokenizer, conv, gen=True)]
    assert "ignored" not in got[0] and "U2" in got[0]


def test_csv_instruction_input_output(tmp_path: Path, tiny_tokenizer: Any) -> None:
    p = tmp_path / "alpaca.csv"
    with open(p, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerow({"instruction": "Translate", "input": "bonjour, le monde", "output": "hello, world"})
        w.writerow({"instruction": "Say hi", "input": "", "output": "hi"})
    got = read_samples(p, tiny_tokenizer, CFG)
    assert got == [
        _chat(
            tiny_tokenizer,
            [
                {"role": "user", "content": "Translate\n\nbonjour, le monde"},
                {"role": "assistant", "content": "hello, world"},
            ],
            gen=False,
        ),
        _chat(
            tiny_tokenizer, [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}], gen=False
        ),
    ]


def test_explicit_columns(tmp_path: Path, tiny_tokenizer: Any) -> None:
    p = _jsonl(tmp_path / "x.jsonl", [{"Q": "why", "A": "because", "text": "raw"}])
    cfg = CalibConfig(source="x", prompt_column="q", response_column="A")  # case-insensitive match
    assert read_samples(p, tiny_tokenizer, cfg) == [
        _chat(
            tiny_tokenizer, [{"role": "user", "content": "why"}, {"role": "assistant", "content": "because"}], gen=False
        )
    ]
    assert read_samples(p, tiny_tokenizer, CalibConfig(source="x", text_column="text")) == ["raw"]
    with pytest.raises(ValueError, match="nope.*columns found"):
        read_samples(p, tiny_tokenizer, CalibConfig(source="x", text_column="nope"))


def test_unknown_columns_error_lists_columns(tmp_path: Path, tiny_tokenizer: Any) -> None:
    p = _jsonl(tmp_path / "weird.jsonl", [{"foo": "a", "bar": "b"}, {"baz": "c"}])
    with pytest.raises(ValueError) as info:
        read_samples(p, tiny_tokenizer, CFG)
    msg = str(info.value)
    for needle in ("'bar'", "'baz'", "'foo'", "--prompt-column", "--text-column", "weird.jsonl"):
        assert needle in msg


def test_no_chat_template_falls_back_to_plain_text(
    tmp_path: Path, tiny_tokenizer_no_template: Any, caplog: pytest.LogCaptureFixture
) -> None:
    p = _jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    with caplog.at_level(logging.WARNING, logger="awqkit.calib"):
        assert read_samples(p, tiny_tokenizer_no_template, CFG) == ["Q?\n\nA."]
    assert any("no chat template" in r.getMessage() for r in caplog.records)


def test_bad_jsonl_line_reports_line_number(tmp_path: Path, tiny_tokenizer: Any) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_samples(p, tiny_tokenizer, CFG)


def test_text_file_hash(tmp_path: Path) -> None:
    p = tmp_path / "h.txt"
    p.write_bytes(b"abc\n")
    assert sha256_file(p) == hashlib.sha256(b"abc\n").hexdigest()


# ------------------------------------------------------------------------------------------- blocks
def _corpus(n: int = 60) -> list[str]:
    return [f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(n)]


def test_blocks_shape_determinism_and_content(tiny_tokenizer: Any) -> None:
    samples = _corpus()
    a = build_blocks(samples, tiny_tokenizer, n_samples=5, seq_len=16, seed=1)
    b = build_blocks(samples, tiny_tokenizer, n_samples=5, seq_len=16, seed=1)
    c = build_blocks(samples, tiny_tokenizer, n_samples=5, seq_len=16, seed=2)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    source_ids = {t for s in samples for t in tiny_tokenizer(s, add_special_tokens=False)["input_ids"]}
    allowed = source_ids | {tiny_tokenizer.eos_token_id}
    assert set(a.flatten().tolist()) <= allowed
    assert tiny_tokenizer.bos_token_id not in allowed  # no special tokens were added


def test_blocks_are_consecutive_windows_of_the_stream(tiny_tokenizer: Any) -> None:
    samples = ["hello world hello again"]  # one sample: the stream is exactly its tokens
    ids = tiny_tokenizer(samples[0], add_special_tokens=False)["input_ids"]
    seq_len = 8
    assert len(ids) >= seq_len
    blocks = build_blocks(samples, tiny_tokenizer, n_samples=100, seq_len=seq_len, seed=0)
    n = len(ids) // seq_len
    assert blocks.tolist() == [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def test_blocks_fewer_than_requested_warns(tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="awqkit.calib"):
        blocks = build_blocks(_corpus(4), tiny_tokenizer, n_samples=1000, seq_len=16, seed=0)
    assert 1 <= blocks.shape[0] < 1000 and blocks.shape[1] == 16
    assert any("requested" in r.getMessage() for r in caplog.records)


def test_blocks_too_small_source_raises_with_token_count(tiny_tokenizer: Any) -> None:
    text = "hello world"
    n_tokens = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=rf"only {n_tokens} tokens.*seq_len=512.*--seq-len"):
        build_blocks([text], tiny_tokenizer, n_samples=4, seq_len=512, seed=0)


def test_load_calibration_from_file_and_errors(tmp_path: Path, tiny_tokenizer: Any) -> None:
    p = tmp_path / "c.txt"
    p.write_text("\n".join(_corpus(40)), encoding="utf-8")
    cfg = CalibConfig(source=str(p), n_samples=3, seq_len=8, seed=5)
    blocks = load_calibration(p, tiny_tokenizer, cfg)
    assert blocks.shape == (3, 8)
    assert torch.equal(blocks, build_blocks(_corpus(40), tiny_tokenizer, 3, 8, 5))
    with pytest.raises(ValueError, match=r"missing\.jsonl.*does not exist.*one prompt per line"):
        load_calibration(tmp_path / "missing.jsonl", tiny_tokenizer, cfg)
    with pytest.raises(ValueError, match="no model"):
        load_calibration("self", tiny_tokenizer, cfg)


# ------------------------------------------------------------------------------------- self-gen
@pytest.fixture
def tiny_llama(tiny_tokenizer: Any) -> Iterator[Any]:
    """A random 2-layer Llama (conftest runs tiny-model modules on one thread)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    yield LlamaForCausalLM(cfg).eval()


def test_self_generate_shape_determinism_and_rng(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = self_generate(tiny_llama, tiny_tokenizer, n_samples=5, seq_len=12, seed=3, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    b = self_generate(tiny_llama, tiny_tokenizer, n_samples=5, seq_len=12, seed=3, batch_size=2)
    c = self_generate(tiny_llama, tiny_tokenizer, n_samples=5, seq_len=12, seed=4, batch_size=2)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert int(a.min()) >= 0 and int(a.max()) < len(tiny_tokenizer)
    assert len(set(a[:, 1:].flatten().tolist())) > 5  # actually sampled, not a constant
    assert torch.equal(torch.get_rng_state(), state)


def test_self_generate_matches_full_recompute(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    """With top_k=1 (greedy) the KV-cached loop must equal argmax over full-prefix forwards."""
    got = self_generate(tiny_llama, tiny_tokenizer, n_samples=2, seq_len=6, seed=0, top_k=1)
    ids = torch.full((2, 1), tiny_tokenizer.bos_token_id, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            nxt = tiny_llama(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(got, ids)


def test_load_calibration_self(tiny_llama: Any, tiny_tokenizer: Any) -> None:
    cfg = CalibConfig(source="self", n_samples=2, seq_len=8, seed=9)
    blocks = load_calibration("self", tiny_tokenizer, cfg, model=tiny_llama)
    assert torch.equal(blocks, self_generate(tiny_llama, tiny_tokenizer, 2, 8, 9))


def test_calib_reads_parquet_and_saved_datasets_like_calib_build(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """--calib reads what `awqkit calib build` reads: the same rows give the same samples whatever the container."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"What is {i} + {i}?\nShow work.", "answer": str(2 * i)} for i in range(5)]
    want = read_samples(_jsonl(tmp_path / "qa.jsonl", rows), tiny_tokenizer, CFG)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    assert read_samples(tmp_path / "qa.parquet", tiny_tokenizer, CFG) == want
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert read_samples(tmp_path / "saved", tiny_tokenizer, CFG) == want
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        read_samples(tmp_path / "nowhere.parquet", tiny_tokenizer, CFG)
