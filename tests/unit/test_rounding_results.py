"""The integers a rounding method chose travel unchanged: results object -> disk -> back -> packed checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from awqkit.algo import AWQResults, RoundingEntry, apply_results, gptq_quantize
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import replace_linears
from awqkit.quant.primitives import quantize_weight

BITS, GROUP = 4, 32


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96, bias=True), nn.Linear(96, 32, bias=False))


def _entry(lin: nn.Linear, name: str, seed: int = 0) -> RoundingEntry:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, lin.in_features, generator=g) @ torch.randn(lin.in_features, lin.in_features, generator=g)
    h = x.T @ x
    r = gptq_quantize(lin.weight.detach(), h, BITS, GROUP)
    q_rtn, _, _ = quantize_weight(lin.weight.detach(), BITS, GROUP)
    assert not torch.equal(r.q, q_rtn)  # GPTQ chose other integers than round-to-nearest: the test means something
    return RoundingEntry(0, name, "gptq", r.q.to(torch.uint8), r.scales, r.zeros, 1.0, r.loss)


def test_results_round_trip_and_apply(tmp_path: Path) -> None:
    model = _model()
    entries = [_entry(model[0], "0"), _entry(model[1], "1", seed=1)]
    res = AWQResults(roundings=entries)
    res.save(tmp_path)
    back = AWQResults.load(tmp_path)
    assert [(r.layer, r.name, r.method, r.loss_rtn, r.loss) for r in back.roundings] == [
        (r.layer, r.name, r.method, r.loss_rtn, r.loss) for r in entries
    ]
    for a, b in zip(entries, back.roundings, strict=True):
        assert b.q.dtype == torch.uint8 and torch.equal(a.q, b.q)
        assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    fresh = _model()
    apply_results(fresh, back)
    for i, r in enumerate(entries):
        assert torch.equal(fresh[i].weight.data, r.weight())
    summary = back.summary()
    assert [m["name"] for m in summary["roundings"]] == ["0", "1"]
    assert "roundings" not in AWQResults().summary()  # AWQ alone writes what it wrote before


def test_per_layer_split_and_extend() -> None:
    model = _model()
    e0, e1 = _entry(model[0], "layers.0.a"), _entry(model[1], "layers.1.b", seed=1)
    e1.layer = 1
    res = AWQResults(layer_seconds=[1.0, 2.0], roundings=[e0, e1])
    part = res.for_layer(1, [2.0])
    assert [r.name for r in part.roundings] == ["layers.1.b"] and part.layer_seconds == [2.0]
    assert list(res.integers_for(1, "layers.1.")) == ["b"] and res.integers_for(0, "layers.1.") == {}
    merged = AWQResults()
    merged.extend(res.for_layer(0, [1.0]))
    merged.extend(part)
    assert [r.name for r in merged.roundings] == ["layers.0.a", "layers.1.b"] and merged.layer_seconds == [1.0, 2.0]


def test_packer_keeps_the_chosen_integers() -> None:
    """Packing the dequantized GPTQ weight by round-to-nearest would pick another grid; given integers survive."""
    model = _model()
    entry = _entry(model[0], "0")
    model[0].weight.data.copy_(entry.weight())  # what apply_results leaves in the float model
    rtn = QuantLinear.from_linear(model[0], BITS, GROUP)
    assert not torch.equal(rtn.dequantized_weight(), entry.weight())
    replaced = replace_linears(model, ["0", "1"], BITS, GROUP, integers={"0": (entry.q, entry.scales, entry.zeros)})
    assert torch.equal(replaced["0"].dequantized_weight(), entry.weight())
    assert torch.equal(
        replaced["1"].dequantized_weight(), QuantLinear.from_linear(_model()[1], BITS, GROUP).dequantized_weight()
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, s, z: (q[:, :-1], s, z), "do not fit"),
        (lambda q, s, z: (q, s[:, :1], z[:, :1]), "do not fit"),
        (lambda q, s, z: (q.to(torch.int32) + 16, s, z), r"outside \[0, 15\]"),
    ],
)
def test_bad_integers_are_refused(change: object, message: str) -> None:
    model = _model()
    entry = _entry(model[0], "0")
    given = change(entry.q.to(torch.int32), entry.scales, entry.zeros)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        QuantLinear.from_linear(model[0], BITS, GROUP, integers=given)
