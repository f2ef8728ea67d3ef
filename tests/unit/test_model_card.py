"""Hugging Face model card: front matter through huggingface_hub (base model as a Hub id, tags by method),
loading instructions, the results table and model-index (from awqkit eval too), idempotent updates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_tokenizer
from huggingface_hub import ModelCard
from transformers import LlamaConfig, LlamaForCausalLM

from awqkit import cli
from awqkit.errors import InputError
from awqkit.report.card_meta import check_base_model, infer_base_model
from awqkit.report.model_card import (
    CARD_MARKER,
    RESULTS_END,
    RESULTS_START,
    update_model_card_results,
    write_model_card,
)

BASE = "HuggingFaceTB/SmolLM2-135M"


def _front(path: Path) -> str:
    """The YAML front matter block of a card file, as text."""
    return path.read_text(encoding="utf-8").split("---\n")[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
    data = ModelCard.load(path).data.to_dict()
    assert data["base_model"] == BASE and data["base_model_relation"] == "quantized"
    assert data["tags"] == ["4-bit", "awqkit", "quantized", "rtn"]  # round-to-nearest runs no AWQ: no awq tag
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"  # from the source folder's card, named in the metadata
    assert "model-index" not in data
    text = path.read_text()
    assert CARD_MARKER in text and RESULTS_START not in text
    assert "| group size | 32 |" in text and "| weight bits | 4 |" in text
    assert "| zero point | yes (asymmetric) |" in text and "round-to-nearest" in text
    assert f"[{BASE}](https://huggingface.co/{BASE})" in text
    # loading: awqkit (its auto backend described as the registry picks), transformers 5 + gptqmodel, vLLM, SGLang
    assert "load_quantized(path)" in text and "`cpu-avx2`" in text and "`cpu-int4`" in text
    assert "# pip install gptqmodel" in text and "autoawq`" not in text and "AutoAWQForCausalLM" not in text
    assert f"vllm serve <user>/{qdir.name} --quantization awq" in text
    assert f"python -m sglang.launch_server --model-path <user>/{qdir.name}" in text
    # deterministic: the same inputs give the same bytes
    assert write_model_card(qdir, base_model=BASE).read_text() == text


def test_tags_follow_the_method(qdir: Path) -> None:
    meta = json.loads((qdir / "quantization_metadata.json").read_text())
    expected = {
        "awq": ["awq", "4-bit", "awqkit", "quantized"],
        "awq-refine": ["awq", "4-bit", "awqkit", "quantized", "awq-refine"],
        "awq-gptq": ["awq", "gptq", "4-bit", "awqkit", "quantized", "awq-gptq"],
        "gptq": ["gptq", "4-bit", "awqkit", "quantized"],
        "adaround": ["4-bit", "awqkit", "quantized", "adaround"],
    }
    for method, tags in expected.items():
        path = write_model_card(qdir, base_model=BASE, metadata={**meta, "method": method})
        assert ModelCard.load(path).data.tags == tags, method
        assert method.upper() in path.read_text()


def test_metadata_argument_and_calibration_text(qdir: Path) -> None:
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
    text = write_model_card(qdir, base_model=BASE, metadata=meta).read_text()
    assert ModelCard.load(qdir / "README.md").data.license == "mit"
    assert "`pile.txt`: 128 samples × 512 tokens, seed 13" in text and "/data/calib" not in text
    assert "| zero point | yes (asymmetric) |" in text and "AWQ (activation-aware" in text
    named = write_model_card(qdir, base_model=BASE, name="SmolLM2-135M-AWQ-w4").read_text()
    assert "# SmolLM2-135M-AWQ-w4\n" in named and '"<user>/SmolLM2-135M-AWQ-w4"' in named
    assert qdir.name not in named


def test_base_model_must_be_a_hub_id(qdir: Path) -> None:
    assert check_base_model(f"  {BASE} ") == BASE
    for bad in ("/models/my model: v2", str(qdir), "./tiny", "tiny", "a/b/c", " "):
        with pytest.raises(InputError, match="is not a Hugging Face Hub id; pass the source model's id as owner/name"):
            write_model_card(qdir, base_model=bad)
    path = write_model_card(qdir)  # no Hub id known: no base_model, and no path standing in for it
    assert ModelCard.load(path).data.base_model is None
    assert "base_model" not in _front(path) and str(qdir.parent) not in path.read_text()
    assert "a local model (its Hub id was not given)" in path.read_text()


def test_infer_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "m"
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    folder.mkdir()

    def write(config: str | None, training: str | None = None) -> str | None:
        (folder / "config.json").write_text(json.dumps({"_name_or_path": config}))
        (folder / "training_metadata.json").write_text(json.dumps({"base_model": training}))
        return infer_base_model(str(folder), "folder", folder)

    assert write(str(folder)) is None  # an absolute path
    assert write("models/tiny-llama") is None  # Hub-id form, but a local folder here
    assert write(BASE) == BASE
    assert write(BASE, "org/Tiny-2") == "org/Tiny-2"  # the training metadata comes first
    assert write(BASE, "Tiny-2") == BASE  # a name without its owner is not a Hub id
    assert infer_base_model("Qwen/Qwen3-0.6B", "hub", None) == "Qwen/Qwen3-0.6B"
    assert infer_base_model(str(folder / "m.gguf"), "gguf", folder) is None  # a GGUF's folder is not read


def test_quantize_card_base_model(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from awqkit import api
    from awqkit.config import QuantConfig

    q = folders["q"]  # the source names no Hub id: the card names no base model, and no local path
    assert ModelCard.load(q / "README.md").data.base_model is None
    assert str(folders["root"]) not in _front(q / "README.md") and "src" not in _front(q / "README.md")
    src = Path(shutil.copytree(folders["src"], tmp_path / "src"))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "_name_or_path": BASE}))
    quant = QuantConfig(bits=4, group_size=32)
    api.quantize(src, tmp_path / "q1", method="rtn", quant=quant, progress=False)
    assert ModelCard.load(tmp_path / "q1" / "README.md").data.base_model == BASE
    api.quantize(src, tmp_path / "q2", method="rtn", quant=quant, progress=False, base_model="org/Tiny-2")
    assert ModelCard.load(tmp_path / "q2" / "README.md").data.base_model == "org/Tiny-2"  # the argument wins

    def must_not_run(*a: Any, **k: Any) -> None:
        raise AssertionError("the bad base_model must be refused before any work")

    monkeypatch.setattr(api, "_check_before_loading", must_not_run)
    with pytest.raises(InputError, match="base model './q1' is not a Hugging Face Hub id"):
        api.quantize(src, tmp_path / "q3", method="rtn", quant=quant, base_model="./q1")
    assert not (tmp_path / "q3").exists()


def test_results_table_model_index_and_idempotent_update(qdir: Path, results: dict[str, Any]) -> None:
    full = write_model_card(qdir, base_model=BASE, results=results).read_text()
    assert full.count(RESULTS_START) == 1 and full.count(RESULTS_END) == 1
    block = full[full.index(RESULTS_START) : full.index(RESULTS_END)]
    assert "## Evaluation" in full and "retention (1.0 = baseline, ↑)" in block and "| ppl" in block
    assert "top1_agreement" in block and "baseline `src` (fp)" in block and "torch (float32): 14" in block
    card = ModelCard.load(qdir / "README.md")
    assert card.data.model_name == qdir.name and card.data.base_model == BASE
    (ppl,) = card.data.eval_results  # kl and top-1 agreement compare with the baseline: table only
    assert (ppl.task_type, ppl.dataset_type, ppl.dataset_name) == ("text-generation", "text", "wiki.txt")
    assert ppl.metric_type == "perplexity" and ppl.metric_name == "perplexity (2 windows × 16 tokens)"
    assert ppl.metric_value == pytest.approx(results["tasks"]["ppl"]["model"]["ppl"], abs=1e-4)

    write_model_card(qdir, base_model=BASE)  # no results: no table, no model-index
    assert "model-index" not in _front(qdir / "README.md")
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
    assert ModelCard.load(qdir / "README.md").data.eval_results[0].metric_value == 123.456
    assert text.split(RESULTS_START)[0].split("---\n", 2)[2] == full.split(RESULTS_START)[0].split("---\n", 2)[2]


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
    broken = f"---\nlicense: [mit\n---\n{CARD_MARKER}\n# edited by hand\n"
    (qdir / "README.md").write_text(broken)
    with pytest.raises(ValueError, match="front matter does not parse"):
        update_model_card_results(qdir, results)
    assert (qdir / "README.md").read_text() == broken


def test_float_folder_and_bad_arguments(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a quantized folder"):
        write_model_card(folders["src"], base_model=BASE)
    with pytest.raises(FileNotFoundError):
        write_model_card(tmp_path / "missing", base_model=BASE)


def test_awqkit_eval_writes_the_card_of_an_awqkit_output_only(
    folders: dict[str, Path], qdir: Path, capsys: pytest.CaptureFixture
) -> None:
    def run(folder: Path, *extra: str) -> None:
        common = ["--text", str(folders["text"]), "--seq-len", "16", "--windows", "2", "--backend", "torch"]
        assert cli.main(["eval", str(folder), *common, "--no-progress", *extra]) == 0

    src_before = _files(folders["src"])
    run(qdir, "--baseline", str(folders["src"]))
    once = (qdir / "README.md").read_bytes()
    assert f"updated {qdir / 'README.md'}" in capsys.readouterr().out
    card = ModelCard.load(qdir / "README.md")
    assert RESULTS_START in card.text and "| ppl" in card.text
    assert [e.metric_type for e in card.data.eval_results] == ["perplexity"]
    run(qdir, "--baseline", str(folders["src"]))
    assert (qdir / "README.md").read_bytes() == once  # the same results: the same bytes
    capsys.readouterr()
    run(qdir, "--no-card")  # other results, but the card is left as it is
    assert (qdir / "README.md").read_bytes() == once and "updated" not in capsys.readouterr().out
    run(folders["src"])  # a float folder awqkit did not write (it has its own README.md): never written to
    assert _files(folders["src"]) == src_before and "updated" not in capsys.readouterr().out
