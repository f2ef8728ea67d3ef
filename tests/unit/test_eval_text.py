"""``awqkit eval --text FILE``: a user's text file is scored as it is; the default WikiText-2 test keeps its joining."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from awqkit.errors import InputError
from awqkit.eval import load_text_file, load_wikitext_test, make_windows, perplexity
from awqkit.eval.runner import _read_text, evaluate_model

SEQ_LEN = 8
#: Blank lines, lines of spaces, leading spaces and CRLF endings: everything WikiText's joining changes.
RAW = (
    "  The quick brown fox jumps over the lazy dog.\r\n"
    "\r\n"
    "\r\n"
    "    What is the capital of France?\n"
    "   \n"
    "Paris is the capital of France.\n"
    "\n"
    "\n"
    "\n"
    "  hello world, hello again!\n"
) * 4


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def raw_file(tmp_path: Path) -> Path:
    f = tmp_path / "mine.txt"
    f.write_bytes(RAW.encode("utf-8"))
    return f


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama folder with the tiny tokenizer, and a data folder whose WikiText file is :data:`RAW`."""
    root = tmp_path_factory.mktemp("evaltext")
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    (root / "data" / "wikitext-2-raw").mkdir(parents=True)
    (root / "data" / "wikitext-2-raw" / "wiki.test.raw").write_bytes(RAW.encode("utf-8"))
    return {"src": root / "src", "data": root / "data", "tok": tok, "model": model}


def test_load_text_file_returns_the_file_unchanged(raw_file: Path) -> None:
    assert load_text_file(raw_file) == RAW  # every blank line, space and "\r\n" kept
    assert load_text_file(str(raw_file)) == RAW
    bom = raw_file.with_name("bom.txt")
    bom.write_bytes(b"\xef\xbb\xbf x\n\ny")
    assert load_text_file(bom) == "\ufeff x\n\ny"  # as it is, byte-order mark included


def test_windows_are_the_raw_files_tokens_not_the_joined_ones(raw_file: Path) -> None:
    tok = make_tiny_tokenizer()
    raw_ids = _ids(tok, raw_file.read_bytes().decode("utf-8"))
    n = len(raw_ids) // SEQ_LEN
    windows = make_windows(tok, load_text_file(raw_file), SEQ_LEN)
    assert windows.flatten().tolist() == raw_ids[: n * SEQ_LEN]
    joined = make_windows(tok, load_wikitext_test(raw_file), SEQ_LEN)
    assert joined.shape[1] == SEQ_LEN and joined.flatten().tolist() != windows.flatten()[: joined.numel()].tolist()


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (None, FileNotFoundError, r"perplexity text file not found: .*missing\.txt; pass the path of an existing"),
        (b"", InputError, r"is empty \(no text to score\); pass a file that holds text"),
        (b" \n\r\n\t\n", InputError, r"is empty \(no text to score\)"),
        ("caf\u00e9\n".encode("latin-1"), InputError, r"is not UTF-8 text \(byte 3: .*\); convert it to UTF-8"),
    ],
)
def test_load_text_file_errors_are_one_line(
    tmp_path: Path, content: bytes | None, error: type[Exception], match: str
) -> None:
    f = tmp_path / "missing.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(error, match=match) as info:
        load_text_file(f)
    assert "\n" not in str(info.value) and str(f) in str(info.value)


def test_a_folder_is_not_a_text_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"is a folder; pass a text file .*--data-dir"):
        load_text_file(tmp_path)
    with pytest.raises(InputError, match="is a folder"):
        _read_text(tmp_path, None)  # --text DATA_FOLDER no longer means WikiText-2 in that folder


def test_user_text_is_read_as_is_and_the_default_still_joins(tiny: dict[str, Any], raw_file: Path) -> None:
    mine = _read_text(raw_file, tiny["data"])  # --text wins over --data-dir
    assert (mine.path, mine.content, mine.read_as) == (raw_file, RAW, "as is")
    default = _read_text(None, tiny["data"])
    assert default.path == tiny["data"] / "wikitext-2-raw" / "wiki.test.raw"
    assert default.content == load_wikitext_test(default.path) and default.read_as == "wikitext"
    assert "\n\n\n" not in default.content and "\r" not in default.content and default.content != RAW


def test_evaluate_model_scores_the_raw_file(tiny: dict[str, Any], raw_file: Path) -> None:
    tok, model = tiny["tok"], tiny["model"]
    kw: dict[str, Any] = {"tasks": "ppl", "seq_len": SEQ_LEN, "windows": 4, "progress": False}
    mine = evaluate_model(tiny["src"], text=raw_file, **kw)
    expected = perplexity(model, make_windows(tok, RAW, SEQ_LEN, 4), progress=False)["ppl"]
    assert mine["tasks"]["ppl"]["model"]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert mine["data"]["text"]["read_as"] == "as is" and mine["settings"]["text"] == str(raw_file)
    # the same bytes as the default WikiText file are joined first: another text, another number
    default = evaluate_model(tiny["src"], data_dir=tiny["data"], **kw)
    joined = perplexity(model, make_windows(tok, load_wikitext_test(raw_file), SEQ_LEN, 4), progress=False)["ppl"]
    assert default["data"]["text"]["read_as"] == "wikitext"
    assert default["tasks"]["ppl"]["model"]["ppl"] == pytest.approx(joined, rel=1e-6)
    assert default["data"]["text"]["sha256"] == mine["data"]["text"]["sha256"]
    assert default["tasks"]["ppl"]["model"]["ppl"] != pytest.approx(expected, rel=1e-6)
