"""AWQ then a rounding method (SearchConfig.rounding): the layer loop rounds each linear true-sequentially, the
checkpoint stores exactly the integers chosen, each linear's output error is at most round-to-nearest's, and the
run is deterministic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_architectures import SCFG, _make_source, _quantize

from awqkit.algo.results import AWQResults
from awqkit.io.load import load_quantized
from awqkit.nn.qlinear import QuantLinear


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rounding")
    _make_source(root, "llama")
    return root


@pytest.mark.parametrize("rounding", ["gptq", "adaround"])
def test_rounded_checkpoint_stores_the_chosen_integers(root: Path, rounding: str) -> None:
    search = dataclasses.replace(SCFG, rounding=rounding, rounding_iters=60)
    report = _quantize(root, root / f"out-{rounding}", search=search)
    results = AWQResults.load(report.path)
    model = load_quantized(report.path, backend="torch")
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    # every quantized linear was rounded, in call order within each layer (q, k, v, o, gate, up, down)
    assert sorted(r.name for r in results.roundings) == sorted(qlinears)
    first_layer = [r.name.rsplit(".", 1)[-1] for r in results.roundings if r.layer == 0]
    assert first_layer == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for r in results.roundings:
        assert r.method == rounding and r.loss <= r.loss_rtn * (1 + 1e-6), r.name
        assert torch.equal(qlinears[r.name].dequantized_weight(), r.weight()), r.name
    assert sum(r.loss for r in results.roundings) < 0.95 * sum(r.loss_rtn for r in results.roundings)
    assert report.metadata["search_config"]["rounding"] == rounding
    assert [m["name"] for m in report.metadata["awq"]["roundings"]] == [r.name for r in results.roundings]


def test_rounding_is_deterministic(root: Path) -> None:
    search = dataclasses.replace(SCFG, rounding="gptq")
    a = AWQResults.load(_quantize(root, root / "det-a", search=search).path)
    b = AWQResults.load(_quantize(root, root / "det-b", search=search).path)
    assert all(torch.equal(x.q, y.q) for x, y in zip(a.roundings, b.roundings, strict=True))
