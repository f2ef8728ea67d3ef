"""The CLI: defaults come from the config dataclasses; quantize → generate on a tiny local model; errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CORPUS, save_tiny_llama
from huggingface_hub import ModelCard

from awqkit import cli
from awqkit.config import CalibConfig, QuantConfig, SearchConfig, defaults


def test_cli_defaults_are_the_dataclass_defaults() -> None:
    a = cli.build_parser().parse_args(["quantize", "--src", "s", "--dst", "d"])
    q, c, s = defaults(QuantConfig), defaults(CalibConfig), defaults(SearchConfig)
    assert (a.bits, a.group_size, a.keep_lm_head_fp16) == (q["bits"], q["group_size"], q["keep_lm_head_fp16"])
    assert (a.calib, a.n_samples, a.seq_len, a.seed) == (c["source"], c["n_samples"], c["seq_len"], c["seed"])
    assert (a.n_grid, a.scale_mode, a.search_samples, a.search_tokens, a.propagate, a.batch_size) == (
        s["n_grid"],
        s["scale_mode"],
        s["search_samples"],
        s["search_tokens"],
        s["propagate"],
        s["batch_size"],
    )
    assert (a.clip_n_tokens, a.clip_independent, a.gqa_v_o) == (s["clip_n_tokens"], s["clip_independent"], s["gqa_v_o"])
    assert a.method == "awq" and not a.overwrite and not a.no_clip
    # every SearchConfig field reaches the config (a new field without a flag would fail here)
    _, _, search = cli._configs(
        cli.build_parser().parse_args(
            ["quantize", "--src", "s", "--dst", "d", "--gqa-v-o", "--clip-independent", "--clip-n-tokens", "0"]
        )
    )
    assert (search.gqa_v_o, search.clip_independent, search.clip_n_tokens) == (True, True, 0)
    assert set(defaults(SearchConfig)) <= set(vars(a)) | {"clip"}


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "src")
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    return root


def test_quantize_then_generate(tiny_src: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tiny_src / "out"
    args = [
        "quantize",
        "--method",
        "awq",
        "--src",
        str(tiny_src / "src"),
        "--dst",
        str(dst),
        "--bits",
        "4",
        "--group-size",
        "32",
        "--keep-lm-head-fp16",
        "--calib",
        str(tiny_src / "calib.txt"),
        "--n-samples",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--search-samples",
        "2",
        "--search-tokens",
        "64",
        "--n-grid",
        "5",
        "--base-model",
        "HuggingFaceTB/SmolLM2-135M",
    ]
    assert cli.main(args) == 0
    meta = json.loads((dst / "quantization_metadata.json").read_text())
    assert meta["method"] == "awq" and meta["calibration"]["n_samples"] == 4
    assert meta["search_config"]["n_grid"] == 5
    card = (dst / "README.md").read_text()  # the model card names the final folder, never the temp sibling
    data = ModelCard.load(dst / "README.md").data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M" and data.tags[0] == "awq"  # --base-model, the method
    assert ".tmp-" not in card and dst.name in card
    # the same command again must refuse the existing output (exit 2, message names the flag)
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["generate", str(dst), "--prompt", "the cat", "--max-new-tokens", "3"]) == 0


def test_bad_group_size_is_a_clear_error(tiny_src: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(
        [
            "quantize",
            "--method",
            "rtn",
            "--src",
            str(tiny_src / "src"),
            "--dst",
            str(tiny_src / "bad"),
            "--group-size",
            "128",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "group_size=128" in err and "model.layers.0" in err and "[32, 64, -1]" in err
    assert not (tiny_src / "bad").exists()


def test_quantize_with_awq_platform_call(tiny_src: Path) -> None:
    from awqkit import quantize_with_awq

    path, meta = quantize_with_awq(
        tiny_src / "src",
        tiny_src / "platform",
        tiny_src / "calib.txt",
        bits=4,
        group_size=32,
        seed=13,
        skip_lm_head=True,
        backend="rtn",  # the platform's older keyword for method=
    )
    assert path == tiny_src / "platform" and (path / "config.json").is_file()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["method"] == "rtn" and meta["bits"] == "4" and meta["group_size"] == "32" and meta["seed"] == "13"
    with pytest.raises(ValueError, match="skip_lm_head"):
        quantize_with_awq(tiny_src / "src", tiny_src / "p2", None, skip_lm_head=False)
    with pytest.raises(ValueError, match="old name of method"):
        quantize_with_awq(tiny_src / "src", tiny_src / "p3", None, backend="awq", method="rtn")
    assert not (tiny_src / "p2").exists() and not (tiny_src / "p3").exists()
