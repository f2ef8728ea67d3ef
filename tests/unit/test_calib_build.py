"""Calibration sets from training data: sampling rule and seed, chat rendering, the file format and --calib reading."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import make_tiny_tokenizer

from awqkit.calib.sources import read_samples
from awqkit.config import CalibConfig
from awqkit.platform.calib_build import (
    MissingDependencyError,
    build_calibration_set,
    calibration_file_name,
    calibration_sample_size,
    read_calibration_file,
    read_calibration_meta,
    read_dataset,
    render_prompt,
    sample_rows,
    write_calibration_file,
)

SYSTEM = "You are a careful\nmath tutor."
# Prompts that would break a line-based format: newlines, CR, tabs, Unicode line/paragraph separators, NEL.
TRICKY = [
    "line one\nline two\n\nline four",
    "crlf\r\nand cr\rend",
    "tab\tand unicode \u2028 sep \u2029 and \x85 nel",
    "  leading and trailing spaces  ",
    'quotes " and backslash \\n (not a newline)',
    "héllo wörld ✓ 数学",
]


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"question": f"Question {i}:\nwhat is {i} + {i}?", "answer": str(2 * i), "id": i} for i in range(n)]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _expected(tok: Any, question: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize(
    "rows, size",
    [
        (0, 0),
        (5, 5),
        (8, 8),
        (10, 8),
        (53, 8),
        (60, 9),
        (100, 15),
        (140, 21),
        (853, 127),
        (854, 128),
        (2000, 128),
        (10**6, 128),
    ],
)
def test_sample_size_rule(rows: int, size: int) -> None:
    assert calibration_sample_size(rows) == size


def test_sample_size_is_configurable() -> None:
    assert calibration_sample_size(1000, fraction=0.5, min_samples=4, max_samples=300) == 300
    assert calibration_sample_size(20, fraction=0.5, min_samples=4, max_samples=300) == 10
    with pytest.raises(ValueError, match="fraction"):
        calibration_sample_size(10, fraction=0)
    with pytest.raises(ValueError, match="min_samples"):
        calibration_sample_size(10, min_samples=20, max_samples=10)


def test_sampling_is_seeded() -> None:
    a = sample_rows(2000, 128, seed=42)
    assert a == sample_rows(2000, 128, seed=42) and a == sorted(a) and len(set(a)) == 128
    assert a != sample_rows(2000, 128, seed=43)
    assert sample_rows(10, 10, seed=1) == list(range(10))


def test_render_prompt_equals_apply_chat_template() -> None:
    tok = make_tiny_tokenizer()
    q = "What is 2 + 2?\nShow your work."
    assert render_prompt(tok, q) == _expected(tok, q)
    assert render_prompt(tok, q, SYSTEM) == _expected(tok, q, SYSTEM)
    assert render_prompt(tok, q).endswith("<|assistant|>\n")  # the generation prompt is there
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(make_tiny_tokenizer(chat_template=None), q)


def test_template_kwargs_reach_the_template() -> None:
    tok = make_tiny_tokenizer(
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<gen think={{ enable_thinking }}>{% endif %}"
    )
    assert render_prompt(tok, "q", chat_template_kwargs={"enable_thinking": False}) == "q<gen think=False>"


@pytest.mark.parametrize("n_rows, expected", [(10, 8), (100, 15), (2000, 128)])
def test_build_from_jsonl(tmp_path: Path, n_rows: int, expected: int) -> None:
    tok = make_tiny_tokenizer()
    rows = _rows(n_rows)
    data = _jsonl(tmp_path / "openmath.jsonl", rows)
    res = build_calibration_set(data, tok, out_dir=tmp_path / "out", system_prompt=SYSTEM, n_blocks=1, seq_len=8)
    assert res.n_samples == expected == len(res.row_indices)
    # named after the training set's rows (the platform's len(df)), not the prompts drawn
    assert res.path == tmp_path / "out" / f"calibration_openmath_{n_rows}samples.txt"
    assert res.meta_path == tmp_path / "out" / f"calibration_openmath_{n_rows}samples.meta.json"
    assert res.row_indices == sample_rows(n_rows, expected, 42)
    want = [_expected(tok, rows[i]["question"], SYSTEM) for i in res.row_indices]
    assert read_calibration_file(res.path) == want
    # --calib reads it back identically (each prompt holds newlines)
    assert read_samples(res.path, tok, CalibConfig(source=str(res.path))) == want
    assert len(res.path.read_text(encoding="utf-8").splitlines()) == expected  # one record per line
    meta = json.loads(res.meta_path.read_text())
    assert (meta["n_samples"], meta["train_rows"], res.train_rows) == (expected, n_rows, n_rows)
    assert meta["sampling"]["row_indices"] == res.row_indices and meta["sampling"]["seed"] == 42
    assert meta["tokens"]["per_prompt"] == res.token_counts and all(c > 0 for c in res.token_counts)
    assert res.token_counts == [len(tok(p, add_special_tokens=False)["input_ids"]) for p in want]


def test_name_counts_the_training_rows_not_the_prompts_drawn(tmp_path: Path) -> None:
    """GSM8K's 1319-row test set sampled at 128: the platform looks for calibration_gsm8k_1319samples.txt."""
    rows = [{"question": f"Problem {i}: what is {i} + 1?", "answer": str(i + 1)} for i in range(1319)]
    data = _jsonl(tmp_path / "test.jsonl", rows)
    res = build_calibration_set(
        data, make_tiny_tokenizer(), dataset_name="gsm8k", out_dir=tmp_path / "out", n_blocks=1, seq_len=8
    )
    assert res.path == tmp_path / "out" / "calibration_gsm8k_1319samples.txt"
    assert res.meta_path == tmp_path / "out" / "calibration_gsm8k_1319samples.meta.json"
    assert (res.n_samples, res.train_rows) == (128, 1319) and len(read_calibration_file(res.path)) == 128
    meta = json.loads(res.meta_path.read_text())
    assert (meta["n_samples"], meta["train_rows"], meta["file"]) == (128, 1319, res.path.name)
    assert (meta["sampling"]["n_samples"], meta["sampling"]["rows"]) == (128, 1319)
    got = read_calibration_meta(res.path)
    assert got is not None and (got["n_samples"], got["train_rows"], got["dataset_name"]) == (128, 1319, "gsm8k")
    assert got["meta_path"] == str(res.meta_path) and got["seed"] == 42


def test_read_calibration_meta_of_older_and_foreign_files(tmp_path: Path) -> None:
    cal = tmp_path / "calibration_x_40samples.txt"
    cal.write_text('{"text": "a"}\n')
    assert read_calibration_meta(cal) is None  # no meta file beside it
    meta = cal.with_suffix(".meta.json")
    meta.write_text(json.dumps({"format": "awqkit-calibration-jsonl/1", "sampling": {"rows": 40, "n_samples": 8}}))
    got = read_calibration_meta(cal)  # written before the top-level keys: read from "sampling"
    assert got is not None and (got["n_samples"], got["train_rows"]) == (8, 40)
    meta.write_text(json.dumps({"n_samples": 3}))
    assert read_calibration_meta(cal) is None  # not awqkit's
    meta.write_text("{not json")
    assert read_calibration_meta(cal) is None


def test_same_rows_every_time_and_other_seed(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer()
    data = _jsonl(tmp_path / "d.jsonl", _rows(300))
    a = build_calibration_set(data, tok, out_dir=tmp_path / "a", n_blocks=1, seq_len=8)
    b = build_calibration_set(data, tok, out_dir=tmp_path / "b", n_blocks=1, seq_len=8)
    c = build_calibration_set(data, tok, out_dir=tmp_path / "c", seed=7, n_blocks=1, seq_len=8)
    assert a.row_indices == b.row_indices and a.path.read_bytes() == b.path.read_bytes()
    assert a.n_samples == c.n_samples == 45 and a.row_indices != c.row_indices


def test_file_format_round_trips_tricky_prompts(tmp_path: Path) -> None:
    path = write_calibration_file(TRICKY, tmp_path / "calibration_x_6samples.txt")
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(TRICKY)
    assert read_calibration_file(path) == TRICKY
    assert read_samples(path, make_tiny_tokenizer(), CalibConfig()) == TRICKY
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        write_calibration_file(["ok", "  \n"], tmp_path / "bad.txt")


def test_plain_text_still_one_prompt_per_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text('first prompt\n\nsecond {not json}\n{"text": "a JSON-looking line"}\n', encoding="utf-8")
    expected = ["first prompt", "second {not json}", '{"text": "a JSON-looking line"}']
    assert read_samples(path, make_tiny_tokenizer(), CalibConfig()) == expected
    assert read_calibration_file(path) == expected


def test_csv_with_custom_column_and_name(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer()
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["Problem", "solution"])
        w.writeheader()
        for i in range(40):
            w.writerow({"Problem": f"multi-line\nproblem {i}" if i % 3 else "", "solution": str(i)})
    res = build_calibration_set(
        path, tok, column="problem", dataset_name="open math_v2", out_dir=tmp_path, n_blocks=1, seq_len=8
    )
    assert res.n_rows == 40 and res.n_usable_rows == 26 and res.n_samples == 8
    assert res.path.name == "calibration_open-math-v2_40samples.txt"  # all 40 rows, empty prompts included
    assert any("14 of 40 rows have an empty 'Problem'" in w for w in res.warnings)
    assert all(p.endswith("<|assistant|>\n") and "multi-line\nproblem" in p for p in read_calibration_file(res.path))


def test_warns_when_set_is_too_small(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _jsonl(tmp_path / "tiny.jsonl", _rows(10))
    with caplog.at_level(logging.WARNING, logger="awqkit.platform.calib_build"):
        res = build_calibration_set(data, make_tiny_tokenizer(), out_dir=tmp_path, n_blocks=128, seq_len=16)
    assert 1 <= res.blocks_available < 128
    assert any("fewer than the 128 requested (2048 tokens)" in w for w in res.warnings)
    assert "fewer than the 128 requested" in caplog.text
    assert "calibration blocks of 16 tokens available" in res.summary()
    ok = build_calibration_set(data, make_tiny_tokenizer(), out_dir=tmp_path / "ok", n_blocks=2, seq_len=16)
    assert ok.blocks_available >= 2 and ok.warnings == []
    # less than one block is an error, raised before anything is written
    with pytest.raises(ValueError, match="not enough for one calibration block of 512 tokens"):
        build_calibration_set(data, make_tiny_tokenizer(), out_dir=tmp_path / "none", n_blocks=128, seq_len=512)
    assert not (tmp_path / "none").exists()


def test_input_errors(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer()
    data = _jsonl(tmp_path / "d.jsonl", _rows(10))
    with pytest.raises(ValueError, match=r"column 'prompt' .* columns found: \['answer', 'id', 'question'\]"):
        build_calibration_set(data, tok, column="prompt", out_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        read_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.xlsx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported extension '.xlsx'"):
        read_dataset(tmp_path / "d.xlsx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face dataset saved with save_to_disk"):
        read_dataset(tmp_path / "folder")
    with pytest.raises(ValueError, match="no chat template"):
        build_calibration_set(data, make_tiny_tokenizer(chat_template=None), out_dir=tmp_path)


def _block_imports(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # "import name" now raises ImportError


def test_parquet_without_pyarrow_or_pandas_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block_imports(monkeypatch, "pyarrow", "pyarrow.parquet", "pandas")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match="pip install pyarrow") as info:
        read_dataset(tmp_path / "d.parquet")
    assert isinstance(info.value, ValueError)  # the CLI turns it into exit status 2


def test_parquet_through_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(20)
    seen: list[str] = []

    def read_table(path: str) -> Any:
        seen.append(path)
        return types.SimpleNamespace(to_pylist=lambda: rows)

    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = read_table  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    (tmp_path / "openmath.parquet").write_bytes(b"PAR1")
    res = build_calibration_set(
        tmp_path / "openmath.parquet", make_tiny_tokenizer(), out_dir=tmp_path, n_blocks=1, seq_len=8
    )
    assert seen == [str(tmp_path / "openmath.parquet")] and res.n_samples == 8
    assert res.path.name == "calibration_openmath_20samples.txt"


def _hf_dir(tmp_path: Path, marker: str) -> Path:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / marker).write_text("{}")
    return folder


def test_saved_dataset_without_datasets_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block_imports(monkeypatch, "datasets")
    with pytest.raises(MissingDependencyError, match="needs the 'datasets' package.*pip install datasets"):
        read_dataset(_hf_dir(tmp_path, "dataset_dict.json"))


def test_saved_dataset_dict_uses_the_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = {"train": _rows(30), "test": [{"question": "held out"}]}
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: dict(splits)  # type: ignore[attr-defined]  # a DatasetDict is a dict
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = _hf_dir(tmp_path, "dataset_dict.json")
    assert read_dataset(folder) == splits["train"]
    assert read_dataset(folder, split="test") == splits["test"]
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; choose one with --split"):
        read_dataset(folder, split="validation")
    fake.load_from_disk = lambda path: splits["train"]  # type: ignore[attr-defined]  # a single Dataset
    assert read_dataset(folder) == splits["train"]


def test_cli_calib_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from awqkit.commands import calib_cmd

    model = tmp_path / "model"
    make_tiny_tokenizer().save_pretrained(model)
    data = _jsonl(tmp_path / "openmath.jsonl", _rows(100))
    parser = argparse.ArgumentParser(prog="awqkit")
    calib_cmd.register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(
        [
            "calib",
            "build",
            "--dataset",
            str(data),
            "--model",
            str(model),
            "--out",
            str(tmp_path / "out"),
            "--system-prompt",
            SYSTEM,
            "--n-samples",
            "4",
            "--seq-len",
            "16",
            "--template-kwarg",
            "enable_thinking=false",
        ]
    )
    assert a.template_kwarg == [("enable_thinking", False)] and a.seed == 42
    assert a.func(a) == 0
    out = capsys.readouterr().out
    path = tmp_path / "out" / "calibration_openmath_100samples.txt"
    assert f"wrote {path} (15 prompts drawn from 100 training rows)" in out and "tokens:" in out
    tok = make_tiny_tokenizer()
    rows = _rows(100)
    assert read_calibration_file(path) == [
        _expected(tok, rows[i]["question"], SYSTEM) for i in sample_rows(100, 15, 42)
    ]
    assert calibration_file_name("openmath", 100) == path.name


def test_real_parquet_and_saved_dataset_give_the_jsonl_prompts(tmp_path: Path) -> None:
    """With the real pyarrow / datasets (dev extra), Parquet and save_to_disk folders give the same prompts
    and rows as the JSONL of the same table."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    tok = make_tiny_tokenizer()
    rows = _rows(100)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hfds"))
    ref = build_calibration_set(
        _jsonl(tmp_path / "train.jsonl", rows), tok, out_dir=tmp_path / "j", n_blocks=1, seq_len=8
    )
    for src in (tmp_path / "train.parquet", tmp_path / "hfds"):
        res = build_calibration_set(src, tok, dataset_name="train", out_dir=tmp_path / src.stem, n_blocks=1, seq_len=8)
        assert res.n_samples == 15 and res.row_indices == ref.row_indices
        assert read_calibration_file(res.path) == read_calibration_file(ref.path)
