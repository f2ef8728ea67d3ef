"""awqkit eval: the runner (tasks, retention, JSON, Markdown), detection of quantized folders, the CLI subcommand."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from awqkit.commands.eval_cmd import register
from awqkit.eval.runner import TASKS, evaluate_model, metric_rows, parse_tasks, results_markdown

SEQ_LEN, WINDOWS, LIMIT = 16, 3, 3


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_data(root: Path) -> Path:
    """A data folder laid out like ../shared/data, with tiny files."""
    data = root / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(f" {s} " for s in TINY_CORPUS * 4) + "\n")
    (data / "arc-challenge").mkdir()
    arc = [
        {
            "id": f"a{i}",
            "question": f"What is {i} plus {i}?",
            "options": [
                {"label": "A", "text": "the quick brown fox"},
                {"label": "B", "text": f"hello world {i}"},
                {"label": "C", "text": "Paris"},
            ],
            "answer": "ABC"[i % 3],
        }
        for i in range(5)
    ]
    (data / "arc-challenge" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (data / "gsm8k").mkdir()
    gsm = [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)]
    (data / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    (data / "squad-v2").mkdir()
    qas = [
        {
            "id": f"q{i}",
            "question": f"question {i}?",
            "answers": [] if i % 2 else [{"text": "the quick brown fox", "answer_start": 0}],
        }
        for i in range(5)
    ]
    squad = {
        "version": "v2.0",
        "data": [
            {"title": "t", "paragraphs": [{"context": "the quick brown fox jumps over the lazy dog.", "qas": qas}]}
        ],
    }
    (data / "squad-v2" / "dev-v2.0.json").write_text(json.dumps(squad))
    return data


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalrun")
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
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    return {"root": root, "src": root / "src", "data": _write_data(root)}


@pytest.fixture(scope="module")
def self_results(env: dict[str, Path]) -> dict[str, Any]:
    """The tiny model against itself on every task."""
    return evaluate_model(
        env["src"],
        baseline=env["src"],
        tasks="all",
        limit=LIMIT,
        data_dir=env["data"],
        seq_len=SEQ_LEN,
        windows=WINDOWS,
        progress=False,
        task_options={"gsm8k": {"max_new_tokens": 6}, "squad": {"max_new_tokens": 4}},
    )


@pytest.fixture(scope="module")
def rtn_folder(env: dict[str, Path]) -> Path:
    from awqkit.api import quantize
    from awqkit.config import QuantConfig

    dst = env["root"] / "tiny_rtn"
    quantize(env["src"], dst, method="rtn", quant=QuantConfig(bits=4, group_size=32), progress=False)
    return dst


def test_parse_tasks() -> None:
    assert parse_tasks("gsm8k, ppl,ppl") == ("ppl", "gsm8k")
    assert parse_tasks("all") == TASKS
    with pytest.raises(ValueError) as err:
        parse_tasks("ppl,mmlu")
    assert "mmlu" in str(err.value) and all(t in str(err.value) for t in TASKS)
    with pytest.raises(ValueError, match="valid tasks"):
        parse_tasks("")


def test_argument_errors_come_before_loading(env: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="valid tasks: ppl, kl, arc, squad, gsm8k"):
        evaluate_model(missing, tasks=["ppl", "hellaswag"])
    with pytest.raises(ValueError, match="baseline"):
        evaluate_model(env["src"], tasks="ppl,kl", data_dir=env["data"])
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        evaluate_model(missing, tasks="ppl")
    with pytest.raises(FileNotFoundError, match="perplexity text"):
        evaluate_model(env["src"], tasks="ppl", text=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="limit"):
        evaluate_model(env["src"], tasks="arc", limit=0)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda-magic'"):
        evaluate_model(env["src"], tasks="ppl", backend="cuda-magic")
    with pytest.raises(ValueError, match=r"task_options\['arc'\]\['limit'\]"):
        evaluate_model(env["src"], tasks="arc", task_options={"arc": {"limit": 0}})


def test_task_limit_overrides_the_shared_limit(env: dict[str, Path]) -> None:
    r = evaluate_model(
        env["src"],
        tasks="arc,gsm8k",
        limit=2,
        data_dir=env["data"],
        progress=False,
        task_options={"arc": {"limit": 4}, "gsm8k": {"max_new_tokens": 2}},
    )
    assert r["tasks"]["arc"]["model"]["n"] == 4  # its own limit
    assert r["tasks"]["gsm8k"]["model"]["n"] == 2  # the shared one
    everything = evaluate_model(
        env["src"], tasks="arc", data_dir=env["data"], progress=False, task_options={"arc": {"limit": 3}}
    )
    assert everything["tasks"]["arc"]["model"]["n"] == 3
    assert r["settings"]["task_options"]["arc"] == {"limit": 4}  # recorded as given


def test_self_comparison_is_perfect(self_results: dict[str, Any]) -> None:
    t = self_results["tasks"]
    assert list(t) == list(TASKS)
    assert t["kl"]["model"]["kl"] == 0.0
    assert t["kl"]["model"]["top1_agreement"] == 1.0
    assert t["kl"]["model"]["n_tokens"] == WINDOWS * (SEQ_LEN - 1)
    assert t["ppl"]["model"]["ppl"] == t["ppl"]["baseline"]["ppl"]
    assert t["ppl"]["computed_in"] == "kl"
    for task in ("arc", "squad", "gsm8k"):
        assert t[task]["model"]["n"] == LIMIT and t[task]["model"] == t[task]["baseline"]
        assert set(t[task]["seconds_by_model"]) == {"model", "baseline"}
    rows = self_results["metrics"]
    assert {(r["task"], r["metric"]) for r in rows} >= {
        ("ppl", "ppl"),
        ("kl", "kl"),
        ("arc", "acc"),
        ("squad", "f1"),
        ("gsm8k", "em"),
    }
    defined = [r for r in rows if r["retention"] is not None]
    assert {(r["task"], r["metric"]) for r in defined} >= {("ppl", "ppl"), ("kl", "top1_agreement")}
    for r in defined:
        assert r["retention"] == 1.0 and r["ratio"] == 1.0, r
    kl_row = next(r for r in rows if r["metric"] == "kl")
    assert kl_row["retention"] is None and kl_row["baseline"] == 0.0
    for r in rows:  # undefined only where the baseline is 0 (kl by definition)
        assert r["retention"] is not None or r["baseline"] == 0.0


def test_ppl_is_exp_mean_nll_by_hand(env: dict[str, Path], self_results: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["src"])
    model = AutoModelForCausalLM.from_pretrained(env["src"], dtype=torch.float32).eval()
    raw = (env["data"] / "wikitext-2-raw" / "wiki.test.raw").read_text()
    text = "\n\n".join(line for line in raw.split("\n") if line)
    ids = tok(text, add_special_tokens=False)["input_ids"][: WINDOWS * SEQ_LEN]
    windows = torch.tensor(ids).view(WINDOWS, SEQ_LEN)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(-1, w[1:, None]).sum().item()
            count += SEQ_LEN - 1
    expected = math.exp(nll / count)
    assert self_results["tasks"]["ppl"]["model"]["ppl"] == pytest.approx(expected, rel=1e-5)
    # ppl alone (its own pass, no baseline) gives the same number as the shared kl pass
    alone = evaluate_model(
        env["src"], tasks="ppl", data_dir=env["data"], seq_len=SEQ_LEN, windows=WINDOWS, progress=False
    )
    assert alone["tasks"]["ppl"]["model"]["ppl"] == self_results["tasks"]["ppl"]["model"]["ppl"]
    assert alone["baseline"] is None and "baseline" not in alone["tasks"]["ppl"]
    assert all(r["retention"] is None for r in alone["metrics"])
    md = results_markdown(alone)
    assert "retention" not in md and "| ppl" in md


def test_results_record_settings_versions_and_data(env: dict[str, Path], self_results: dict[str, Any]) -> None:
    import transformers

    from awqkit import __version__

    r = self_results
    assert r["awqkit_version"] == __version__
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["transformers"] == transformers.__version__
    s = r["settings"]
    assert (s["seq_len"], s["windows"], s["stride"]) == (SEQ_LEN, WINDOWS, SEQ_LEN)
    assert (s["limit"], s["backend"]) == (LIMIT, "auto")
    text = env["data"] / "wikitext-2-raw" / "wiki.test.raw"
    assert r["data"]["text"]["sha256"] == _sha(text)
    assert r["data"]["arc"]["sha256"] == _sha(env["data"] / "arc-challenge" / "test.jsonl")
    assert r["data"]["gsm8k"]["sha256"] == _sha(env["data"] / "gsm8k" / "test.jsonl")
    assert r["data"]["squad"]["sha256"] == _sha(env["data"] / "squad-v2" / "dev-v2.0.json")
    for who in ("model", "baseline"):
        assert r[who]["detection"]["method"] == "fp" and r[who]["kernels"] == {"backend": None, "layers": {}}
        assert r[who]["loaded_as"].startswith("float32")
    for key in ("load_model", "load_baseline", "total", *TASKS):
        assert r["wall_seconds"][key] >= 0.0
    assert json.loads(json.dumps(r)) == r  # JSON round trip
    assert metric_rows(r) == r["metrics"]


def test_markdown_table(self_results: dict[str, Any]) -> None:
    md = results_markdown(self_results)
    assert "| task" in md and "retention (1.0 = baseline, ↑)" in md and "model / baseline" in md
    assert "ppl ↓" in md and "acc ↑" in md and "baseline / model" in md
    ppl_line = next(line for line in md.splitlines() if line.startswith("| ppl"))
    assert ppl_line.count("1.0000") == 2  # ratio and retention


def test_quantized_folder_is_detected_and_kernels_recorded(env: dict[str, Path], rtn_folder: Path) -> None:
    r = evaluate_model(
        rtn_folder,
        baseline=env["src"],
        tasks="ppl,kl",
        data_dir=env["data"],
        seq_len=SEQ_LEN,
        windows=2,
        backend="torch",
        progress=False,
    )
    det = r["model"]["detection"]
    assert (det["method"], det["bits"], det["group_size"], det["format"]) == ("rtn", 4, 32, "awq")
    assert det["source"] == "quantization_metadata.json+config.json"
    assert r["model"]["loaded_as"].startswith("quantized")
    assert r["model"]["kernels"] == {"backend": "torch", "layers": {"torch (float32)": 14}}
    assert r["baseline"]["detection"]["method"] == "fp"
    kl = r["tasks"]["kl"]["model"]
    assert kl["kl"] > 0.0 and 0.0 <= kl["top1_agreement"] <= 1.0
    ppl_row = next(x for x in r["metrics"] if x["metric"] == "ppl")
    assert ppl_row["ratio"] == pytest.approx(ppl_row["model"] / ppl_row["baseline"])
    assert ppl_row["retention"] == pytest.approx(ppl_row["baseline"] / ppl_row["model"])
    assert "rtn (4-bit, group size 32" in results_markdown(r)


def test_auto_backend_records_the_kernel_that_ran(env: dict[str, Path], rtn_folder: Path) -> None:
    from awqkit.kernels import cpu_avx2, cpu_int4

    r = evaluate_model(rtn_folder, tasks="ppl", data_dir=env["data"], seq_len=SEQ_LEN, windows=1, progress=False)
    layers = r["model"]["kernels"]["layers"]
    assert sum(layers.values()) == 14 and r["model"]["kernels"]["backend"] == "auto"
    if cpu_avx2.is_available():  # layers of 64-column multiples; narrower ones go to the next kernel
        from awqkit.io.load import load_quantized
        from awqkit.nn.qlinear import QuantLinear

        plain = load_quantized(rtn_folder, backend="torch")
        fit = sum(cpu_avx2.layer_unsupported_reason(m) is None for m in plain.modules() if isinstance(m, QuantLinear))
        assert fit > 0 and layers.get("cpu-avx2 (float32)", 0) == fit
    elif cpu_int4.is_available():
        assert layers.get("cpu-int4 (bfloat16)", 0) > 0
    else:
        assert layers == {"torch (float32)": 14}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register(sub)
    return p


def test_cli_writes_json_and_markdown(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, md = tmp_path / "res" / "eval.json", tmp_path / "eval.md"
    text = env["data"] / "wikitext-2-raw" / "wiki.test.raw"
    a = _parser().parse_args(
        [
            "eval",
            str(env["src"]),
            "--baseline",
            str(env["src"]),
            "--text",
            str(text),
            "--seq-len",
            str(SEQ_LEN),
            "--windows",
            "2",
            "--json",
            str(out),
            "--markdown",
            str(md),
            "--no-progress",
        ]
    )
    assert a.command == "eval" and a.tasks is None
    assert a.func(a) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["settings"]["tasks"] == ["ppl", "kl"]  # the default with --baseline
    assert data["settings"]["windows"] == 2 and data["tasks"]["kl"]["model"]["kl"] == 0.0
    assert md.read_text() in printed and "retention" in printed and f"wrote {out}" in printed


def test_cli_errors(env: dict[str, Path]) -> None:
    p = _parser()
    a = p.parse_args(["eval", str(env["src"]), "--tasks", "ppl,bogus"])
    with pytest.raises(ValueError, match="valid tasks"):
        a.func(a)
    a = p.parse_args(["eval", str(env["src"]), "--tasks", "kl"])
    with pytest.raises(ValueError, match="--baseline"):
        a.func(a)
    with pytest.raises(SystemExit):
        p.parse_args(["eval", str(env["src"]), "--limit", "0"])
    assert p.parse_args(["eval", "m", "--windows", "all"]).windows is None


@pytest.mark.slow  # subprocesses; CI runs it once with `pytest -m slow`
def test_bench_rows_with_retention(env: dict[str, Path], rtn_folder: Path) -> None:
    from awqkit.bench.modes import BenchConfig, disk_weight_bytes

    settings = BenchConfig(prompt_tokens=8, new_tokens=3, batch_sizes=(1, 2), repeats=1, warmup=0)
    r = evaluate_model(
        rtn_folder,
        baseline=env["src"],
        tasks="ppl",
        data_dir=env["data"],
        seq_len=SEQ_LEN,
        windows=WINDOWS,
        backend="torch",
        bench=settings,
        progress=False,
    )
    rows = {x["metric"]: x for x in r["metrics"] if x["task"] == "bench"}
    assert list(rows) == [
        "prefill_ms",
        "decode_tok_s_b1",
        "decode_tok_s_b2",
        "peak_rss_mb",
        "weights_disk_mb",
        "weights_memory_mb",
    ]
    assert all(row["model"] > 0 and row["baseline"] > 0 for row in rows.values())
    speed, disk = rows["decode_tok_s_b1"], rows["weights_disk_mb"]
    assert speed["higher_is_better"] and speed["retention"] == pytest.approx(speed["model"] / speed["baseline"])
    assert not disk["higher_is_better"] and disk["retention"] == pytest.approx(disk["baseline"] / disk["model"])
    assert disk["model"] == pytest.approx(disk_weight_bytes(rtn_folder) / 1e6)
    bench = r["tasks"]["bench"]
    assert bench["model"]["backend"] == "torch" and bench["baseline"]["backend"] is None
    assert r["settings"]["bench"]["batch_sizes"] == [1, 2] or r["settings"]["bench"]["batch_sizes"] == (1, 2)
    assert "decode_tok_s_b2" in results_markdown(r)


def test_nonfinite_metrics_and_strict_json() -> None:
    from awqkit.eval.runner import nonfinite_metrics, results_json

    results = {
        "baseline": {"path": "b"},
        "tasks": {
            "ppl": {"model": {"ppl": math.nan}, "baseline": {"ppl": 12.0}},
            "kl": {"model": {"kl": math.inf, "top1_agreement": 0.5}, "baseline": {"kl": 0.0, "top1_agreement": 1.0}},
            "arc": {"model": {"acc": 0.25, "acc_norm": 0.5, "n": 4}, "baseline": {"acc": -math.inf, "acc_norm": 0.5}},
        },
    }
    results["metrics"] = metric_rows(results)
    assert nonfinite_metrics(results) == ["ppl", "kl", "arc/acc (baseline)"]
    text = results_json(results)
    data = json.loads(text)  # strict JSON: no NaN / Infinity tokens
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    assert data["tasks"]["ppl"]["model"]["ppl"] is None and data["tasks"]["ppl"]["baseline"]["ppl"] == 12.0
    assert data["nonfinite_metrics"] == ["ppl", "kl", "arc/acc (baseline)"]
    assert math.isnan(results["tasks"]["ppl"]["model"]["ppl"])  # the results themselves are left as they are
    finite = {"baseline": None, "tasks": {"ppl": {"model": {"ppl": 3.0}}}}
    assert nonfinite_metrics(finite) == [] and "nonfinite_metrics" not in json.loads(results_json(finite))
