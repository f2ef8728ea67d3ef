"""The lm-evaluation-harness adapter: log-likelihoods equal awqkit's own, the "awqkit" model name, the CLI.

Everything runs offline: tasks are lm-eval task configs over a local JSONL file (never a hub data set).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CORPUS, save_tiny_llama

from awqkit import cli
from awqkit.eval import lm_eval_adapter as adapter
from awqkit.eval.tasks.arc import encode_pair, evaluate_arc, loglikelihood

PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("The quick brown fox ", "jumps over the lazy dog."),  # trailing space moves to the continuation
    ("hello world,", " hello again!"),
    ("", "Quantization maps float weights"),  # empty context: conditioned on BOS
]
TASK = "awqkit_tiny_arc"
N_ITEMS = 5


def _lm_eval() -> Any:
    return pytest.importorskip("lm_eval", reason='lm-eval is an optional extra: pip install "awqkit[lm-eval]"')


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float Llama, its 4-bit RTN quantization (awqkit's own quantize path), and ARC-style items."""
    from awqkit.api import quantize
    from awqkit.config import QuantConfig

    root = tmp_path_factory.mktemp("lmeval")
    save_tiny_llama(root / "src")
    quantize(root / "src", root / "q4", method="rtn", quant=QuantConfig(bits=4, group_size=32), progress=False)
    options = ["the quick brown fox", "hello world", "Paris", "a scale and a zero point"]
    rows = []
    for i in range(N_ITEMS):
        opts = options[i % 2 :] if i % 2 else options  # 4 or 3 options
        # our ARC format (question / options / answer label) and lm-eval's (choices / gold) in one row
        rows.append(
            {
                "question": f"What is {i} plus {i}?",
                "answer": "ABCD"[i % len(opts)],
                "options": [{"label": "ABCD"[k], "text": t} for k, t in enumerate(opts)],
                "choices": opts,
                "gold": i % len(opts),
            }
        )
    data = root / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return {"src": root / "src", "q4": root / "q4", "data": data, "tasks": tasks}


def _greedy_pair(model: torch.nn.Module, tok: Any) -> tuple[str, str]:
    """A (context, continuation) whose one continuation token is the model's argmax (found by search)."""
    for text in TINY_CORPUS:
        words = text.split(" ")
        for k in range(1, len(words)):
            ctx = " ".join(words[:k])
            ids = tok(ctx, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            cont = tok.decode([top])
            if encode_pair(tok, ctx, cont) == (ids, [top]):
                return ctx, cont
    pytest.fail("no context whose greedy next token survives decode + re-encode")


def _is_greedy(model: torch.nn.Module, tok: Any, ctx: str, cont: str) -> bool:
    """Whether every continuation token (split as lm-eval does) is the argmax of the model's logits."""
    c, x = encode_pair(tok, ctx, cont)
    with torch.inference_mode():
        logits = model(torch.tensor([c + x])).logits[0, len(c) - 1 : len(c) + len(x) - 1]
    return bool((logits.argmax(-1) == torch.tensor(x)).all())


@pytest.mark.parametrize(
    ("folder", "backend", "batch_size"), [("src", "auto", 1), ("q4", "torch", 2), ("q4", "auto", 3)]
)
def test_loglikelihood_matches_ours(folders: dict[str, Path], folder: str, backend: str, batch_size: int) -> None:
    _lm_eval()
    from lm_eval.api.instance import Instance

    lm = adapter.load_lm_eval_model(folders[folder], backend=backend, batch_size=batch_size)
    assert isinstance(lm, adapter.AwqkitLM) and lm.batch_size == batch_size
    if folder == "q4":
        assert lm.awqkit_load["loaded_as"].startswith("quantized")
        assert sum(lm.awqkit_load["kernels"]["layers"].values()) == 14  # 7 linears x 2 layers
    else:
        assert lm.awqkit_load["loaded_as"].startswith("float32") and lm.awqkit_load["kernels"]["layers"] == {}
    pairs = [*PAIRS, _greedy_pair(lm.model, lm.tokenizer)]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    ours = loglikelihood(lm.model, lm.tokenizer, pairs, batch_size=2)
    assert len(got) == len(pairs)
    for (ll, greedy), want, (ctx, cont) in zip(got, ours, pairs, strict=True):
        assert ll == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy is _is_greedy(lm.model, lm.tokenizer, ctx, cont), (ctx, cont)
    assert got[-1][1] is True and not all(g for _, g in got)  # both flag values are exercised


def test_registered_model_name_matches_our_arc(folders: dict[str, Path]) -> None:
    lm_eval = _lm_eval()
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    assert get_model(adapter.MODEL_NAME) is adapter.AwqkitLM
    assert adapter.register_with_lm_eval()  # idempotent, also once the class is resolved
    results = lm_eval.simple_evaluate(
        model="awqkit",
        model_args=f"pretrained={folders['q4']},backend=torch,batch_size=2",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(folders["tasks"]), include_defaults=False),
        log_samples=False,
    )
    lm_eval_metrics = results["results"][TASK]
    assert lm_eval_metrics["sample_len"] == N_ITEMS
    assert results["config"]["awqkit"]["kernels"]["layers"] == {"torch (float32)": 14}
    loaded = adapter.load_lm_eval_model(folders["q4"], backend="torch")
    ours = evaluate_arc(loaded.model, loaded.tokenizer, path=folders["data"], progress=False)
    assert ours["n"] == N_ITEMS
    assert lm_eval_metrics["acc,none"] == pytest.approx(ours["acc"])
    assert lm_eval_metrics["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_cli_lm_eval_writes_json(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _lm_eval()
    out = tmp_path / "res" / "lm_eval.json"
    rc = cli.main(
        [
            "lm-eval",
            str(folders["q4"]),
            "--tasks",
            TASK,
            "--include-path",
            str(folders["tasks"]),
            "--no-default-tasks",
            "--limit",
            "3",
            "--backend",
            "torch",
            "--batch-size",
            "2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert TASK in printed and "acc_norm" in printed and f"wrote {out}" in printed
    saved = json.loads(out.read_text())
    assert saved["results"][TASK]["sample_len"] == 3 and 0.0 <= saved["results"][TASK]["acc,none"] <= 1.0
    assert saved["config"]["awqkit"]["detection"]["bits"] == 4


def test_argument_errors_come_before_loading(folders: dict[str, Path], tmp_path: Path) -> None:
    _lm_eval()
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\): 'awqkit_tiny_ar' \(close: awqkit_tiny_arc\)"):
        adapter.run_lm_eval(missing, "awqkit_tiny_ar", include_path=folders["tasks"], include_defaults=False)
    with pytest.raises(ValueError, match="no lm-eval task"):
        adapter.run_lm_eval(missing, " , ")
    with pytest.raises(ValueError, match="include_path"):
        adapter.run_lm_eval(missing, TASK, include_defaults=False)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        adapter.run_lm_eval(missing, TASK, include_path=folders["tasks"], include_defaults=False)


def test_missing_lm_eval_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    hint = 'pip install "awqkit[lm-eval]"'
    with pytest.raises(ImportError, match="awqkit\\[lm-eval\\]") as err:
        adapter.load_lm_eval_model(tmp_path)
    assert hint in str(err.value)
    with pytest.raises(ImportError, match="awqkit\\[lm-eval\\]"):
        adapter.run_lm_eval(tmp_path, "arc_challenge")
    assert cli.main(["lm-eval", str(tmp_path), "--tasks", "arc_challenge"]) == 2
    assert hint in capsys.readouterr().err


def test_importing_awqkit_does_not_import_lm_eval() -> None:
    code = (
        "import sys, awqkit, awqkit.cli; awqkit.cli.build_parser(); "
        "from awqkit.commands import lm_eval_cmd; print('lm_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_parse_tasks_and_cli_arguments() -> None:
    assert adapter.parse_lm_eval_tasks(" arc_challenge, hellaswag ,") == ["arc_challenge", "hellaswag"]
    assert adapter.parse_lm_eval_tasks([{"task": "x"}, "y"]) == [{"task": "x"}, "y"]
    a = cli.build_parser().parse_args(["lm-eval", "m", "--tasks", "t", "--limit", "0.5", "--batch-size", "auto"])
    assert (a.limit, a.batch_size, a.backend, a.num_fewshot, a.default_tasks) == (0.5, "auto", "auto", None, True)
    assert cli.build_parser().parse_args(["lm-eval", "m", "--tasks", "t", "--limit", "10"]).limit == 10
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["lm-eval", "m", "--tasks", "t", "--limit", "0"])
