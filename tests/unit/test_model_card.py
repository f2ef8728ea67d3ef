"""Hugging Face model card: front matter, description, results table, idempotent results updates."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from awqkit.report.model_card import (
    CARD_MARKER,
    RESULTS_END,
    RESULTS_START,
    update_model_card_results,
    write_model_card,
)

BASE = "HuggingFaceTB/SmolLM2-135M"


def parse_front_matter(text: str) -> dict[str, Any]:
    """Minimal YAML reader for the card's front matter: ``key: scalar`` and ``key:`` + ``- item`` lists."""
    lines = text.splitlines()
    assert lines[0] == "---", "the card must start with YAML front matter"
    end = lines.index("---", 1)
    out: dict[str, Any] = {}
    key = None
    for line in lines[1:end]:
        if line.startswith("- "):
            assert key is not None and isinstance(out[key], list), line
            out[key].append(json.loads(line[2:]) if line[2:].startswith('"') else line[2:])
            continue
        m = re.fullmatch(r"([A-Za-z_]+):(?: (.*))?", line)
        assert m, f"unexpected front matter line {line!r}"
        key, value = m.group(1), m.group(2)
        out[key] = [] if value is None else json.loads(value) if value.startswith('"') else value
    return out


def _check_with_yaml(text: str, expected: dict[str, Any]) -> None:
    try:
        import yaml
    except ImportError:  # not a dependency; the hand parser above already checked the block
        return
    block = text.split("---\n")[1]
    assert yaml.safe_load(block) == expected


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from awqkit.api import quantize
    from awqkit.config import QuantConfig

    root = tmp_path_factory.mktemp("card")
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    (root / "src" / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- text\n---\n# tiny\n")
    quantize(root / "src", root / "q", method="rtn", quant=QuantConfig(bits=4, group_size=32), progress=False)
    (root / "wiki.txt").write_text("\n".join(TINY_CORPUS * 4))
    return {"root": root, "src": root / "src", "q": root / "q", "text": root / "wiki.txt"}


@pytest.fixture(scope="module")
def results(folders: dict[str, Path]) -> dict[str, Any]:
    from awqkit.eval.runner import evaluate_model

    return evaluate_model(
        folders["q"],
        baseline=folders["src"],
        tasks="ppl,kl",
        text=folders["text"],
        seq_len=16,
        windows=2,
        backend="torch",
        progress=False,
    )


@pytest.fixture
def qdir(folders: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the quantized folder (tests write README.md into it)."""
    return Path(shutil.copytree(folders["q"], tmp_path / "tiny-rtn-w4-g32"))


def test_front_matter_and_description(qdir: Path) -> None:
    path = write_model_card(qdir, base_model=BASE)
    assert path == qdir / "README.md"
    text = path.read_text()
    fm = parse_front_matter(text)
    assert fm["base_model"] == BASE and fm["base_model_relation"] == "quantized"
    assert fm["tags"][:4] == ["awq", "4-bit", "awqkit", "quantized"] and "rtn" in fm["tags"]
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    assert fm["license"] == "apache-2.0"  # from the source folder's card, named in the metadata
    _check_with_yaml(text, fm)
    assert CARD_MARKER in text and RESULTS_START not in text
    assert "| group size | 32 |" in text and "| weight bits | 4 |" in text
    assert "| zero point | yes (asymmetric) |" in text and "round-to-nearest" in text
    assert "load_quantized(path)" in text and "AutoAWQForCausalLM.from_quantized" in text
    assert f"https://huggingface.co/{BASE}" in text
    # deterministic: the same inputs give the same bytes
    assert write_model_card(qdir, base_model=BASE).read_text() == text


def test_metadata_argument_and_quoting(qdir: Path) -> None:
    meta = json.loads((qdir / "quantization_metadata.json").read_text())
    meta.update(
        {
            "method": "awq",
            "license": "mit",
            "calibration": {
                "source": "/data/calib/pile.txt",
                "sha256": "ab" * 32,
                "n_samples": 128,
                "seq_len": 512,
                "seed": 13,
            },
            "search_config": {"clip": True},
        }
    )
    odd = "/models/my model: v2"
    text = write_model_card(qdir, base_model=odd, metadata=meta).read_text()
    fm = parse_front_matter(text)
    assert fm["base_model"] == odd and fm["license"] == "mit"
    assert fm["tags"][:4] == ["awq", "4-bit", "awqkit", "quantized"]
    _check_with_yaml(text, fm)
    assert "`pile.txt`: 128 samples × 512 tokens, seed 13" in text and "/data/calib" not in text
    assert "| zero point | yes (asymmetric) |" in text and "AWQ (activation-aware" in text
    assert "huggingface.co//models" not in text  # a path is not linked as a hub id
    named = write_model_card(qdir, base_model=BASE, name="SmolLM2-135M-AWQ-w4").read_text()
    assert "# SmolLM2-135M-AWQ-w4\n" in named and '"<user>/SmolLM2-135M-AWQ-w4"' in named
    assert qdir.name not in named


def test_results_table_and_idempotent_update(qdir: Path, results: dict[str, Any]) -> None:
    full = write_model_card(qdir, base_model=BASE, results=results).read_text()
    assert full.count(RESULTS_START) == 1 and full.count(RESULTS_END) == 1
    block = full[full.index(RESULTS_START) : full.index(RESULTS_END)]
    assert "## Evaluation" in full and "retention (1.0 = baseline, ↑)" in block and "| ppl" in block
    assert "top1_agreement" in block and "baseline `src` (fp)" in block and "torch (float32): 14" in block

    write_model_card(qdir, base_model=BASE)  # no results: no table
    update_model_card_results(qdir, results)
    once = (qdir / "README.md").read_text()
    assert once == full  # appending the section gives what write_model_card writes
    update_model_card_results(qdir, results)
    assert (qdir / "README.md").read_text() == once  # idempotent

    changed = json.loads(json.dumps(results))
    changed["tasks"]["ppl"]["model"]["ppl"] = 123.456
    changed["metrics"][0]["model"] = 123.456
    update_model_card_results(qdir, changed)
    text = (qdir / "README.md").read_text()
    assert text.count(RESULTS_START) == 1 and "123.5" in text
    assert text.split(RESULTS_START)[0] == full.split(RESULTS_START)[0]  # the rest is untouched


def test_update_refuses_foreign_or_missing_cards(qdir: Path, results: dict[str, Any]) -> None:
    card = qdir / "README.md"
    assert card.is_file()  # quantize() wrote one; updating our own card works ...
    update_model_card_results(qdir, results)
    card.unlink()
    with pytest.raises(FileNotFoundError):  # ... a missing one is an error
        update_model_card_results(qdir, results)
    (qdir / "README.md").write_text("---\nlicense: mit\n---\n# someone else's card\n")
    with pytest.raises(ValueError, match="not written by awqkit"):
        update_model_card_results(qdir, results)
    assert (qdir / "README.md").read_text().endswith("someone else's card\n")


def test_float_folder_and_bad_arguments(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a quantized folder"):
        write_model_card(folders["src"], base_model=BASE)
    with pytest.raises(ValueError, match="base_model"):
        write_model_card(folders["q"], base_model=" ")
    with pytest.raises(FileNotFoundError):
        write_model_card(tmp_path / "missing", base_model=BASE)
