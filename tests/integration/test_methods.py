"""Every quantization method (``--method``) on one harness: each writes an AutoAWQ GEMM checkpoint that loads and
generates, records what it did, is deterministic, and the refinement never ends a layer worse on its objective
than AWQ alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_architectures import QCFG, SCFG, _make_source, _quantize

from awqkit.algo.results import AWQResults
from awqkit.errors import InputError
from awqkit.io.load import load_quantized
from awqkit.nn.qlinear import QuantLinear
from awqkit.spec import QuantMethod


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    _make_source(root, "llama")
    return root


SEARCH = dataclasses.replace(SCFG, rounding_iters=40, refine_iters=20)


@pytest.fixture(scope="module")
def outputs(root: Path) -> dict[str, Path]:
    return {
        m: _quantize(root, root / f"out-{m}", method=m, search=SEARCH).path
        for m in ("awq", "gptq", "adaround", "awq-gptq", "awq-refine")
    }


@pytest.mark.parametrize("method", ["gptq", "adaround", "awq-gptq", "awq-refine"])
def test_each_method_writes_a_gemm_checkpoint_that_generates(outputs: dict[str, Path], method: str) -> None:
    folder = outputs[method]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"  # the same format whatever the method
    assert config["quantization_config"]["version"] == "gemm"
    meta = json.loads((folder / "quantization_metadata.json").read_text())
    assert meta["method"] == method
    rounding = {"gptq": "gptq", "adaround": "adaround", "awq-gptq": "gptq", "awq-refine": "refine"}[method]
    assert meta["search_config"]["rounding"] == rounding
    scaled = method.startswith("awq")
    assert meta["search_config"]["scales"] is scaled and meta["search_config"]["clip"] is scaled
    results = AWQResults.load(folder)
    assert bool(results.scales) is scaled and bool(results.clips) is scaled
    model = load_quantized(folder, backend="torch")
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(r.name for r in results.roundings) == sorted(qlinears)
    for r in results.roundings:  # the checkpoint stores the integers the method chose
        assert r.method == rounding
        assert torch.equal(qlinears[r.name].dequantized_weight(), r.weight()), r.name
    ids = torch.tensor([[5, 17, 33, 9]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    assert (folder / "README.md").read_text().count(method) >= 1


def test_rounding_alone_leaves_the_model_unscaled(outputs: dict[str, Path], root: Path) -> None:
    """gptq / adaround do not scale: their dequantized weights stay within one step of the float weights."""
    from safetensors.torch import load_file

    src = load_file(str(next((root / "src").glob("*.safetensors"))))
    model = load_quantized(outputs["gptq"], backend="torch")
    lin = model.get_submodule("model.layers.0.mlp.down_proj")
    w = src["model.layers.0.mlp.down_proj.weight"].float()
    step = lin.scales.float().repeat_interleave(lin.group_size, dim=0).T
    assert ((lin.dequantized_weight() - w).abs() <= 8 * step + 1e-6).all()  # GPTQ moves within the group's range


def test_refinement_never_ends_worse_than_awq(outputs: dict[str, Path]) -> None:
    results = AWQResults.load(outputs["awq-refine"])
    per_layer = {r.layer: (r.loss_rtn, r.loss) for r in results.roundings}
    assert all(after <= before for before, after in per_layer.values())
    assert sum(a for _, a in per_layer.values()) < 0.9 * sum(b for b, _ in per_layer.values())
    # the starting point is AWQ's: the first layer's scales and clips are AWQ alone's (the later layers' inputs
    # come from the refined layers before them, so their searches differ)
    awq = AWQResults.load(outputs["awq"])
    first = [(a, b) for a, b in zip(awq.scales, results.scales, strict=True) if a.layer == 0]
    assert first and all(torch.equal(a.scales, b.scales) for a, b in first)
    clips = [(a, b) for a, b in zip(awq.clips, results.clips, strict=True) if a.layer == 0]
    assert clips and all(torch.equal(a.max_val, b.max_val) for a, b in clips)
    assert any(not torch.equal(a.scales, b.scales) for a, b in zip(awq.scales, results.scales, strict=True))


@pytest.mark.parametrize("method", ["awq-refine", "gptq"])
def test_each_method_is_deterministic(root: Path, outputs: dict[str, Path], method: str) -> None:
    again = _quantize(root, root / f"again-{method}", method=method, search=SEARCH).path
    a, b = AWQResults.load(outputs[method]), AWQResults.load(again)
    pairs = zip(a.roundings, b.roundings, strict=True)
    assert all(torch.equal(x.q, y.q) and torch.equal(x.scales, y.scales) for x, y in pairs)


def test_a_rounding_that_disagrees_with_the_method_is_refused() -> None:
    with pytest.raises(InputError, match="rounds with 'gptq'"):
        QuantMethod("awq-gptq").search_config(dataclasses.replace(SCFG, rounding="adaround"))
    assert QuantMethod("awq").search_config(SCFG) is SCFG
    assert QuantMethod("rtn").calibrates is False and QuantMethod("awq-refine").calibrates is True


class _Keep:
    """Hooks that keep what a resumed run needs after each layer."""

    def __init__(self) -> None:
        self.hidden: dict[int, list[torch.Tensor]] = {}

    def load(self, index: int, layer: torch.nn.Module) -> None:
        pass

    def finish(self, index: int, layer: torch.nn.Module, results: AWQResults, hidden: list[torch.Tensor]) -> None:
        self.hidden[index] = [h.clone() for h in hidden]


def test_refining_against_the_float_model_resumes_exactly(root: Path) -> None:
    """refine_target="model" carries the float model's activations as a second stream: they are recorded with the
    quantized stream's, and a run resumed after a layer makes the same choices as an uninterrupted one. The
    float-model targets also make other choices than the layer's own output does."""
    from transformers import AutoModelForCausalLM

    from awqkit.pipeline import run_awq

    search = dataclasses.replace(SEARCH, rounding="refine", refine_target="model")
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    targets = {n for n, m in AutoModelForCausalLM.from_pretrained(root / "src").named_modules() if "layers." in n}
    targets = {n for n in targets if n.endswith("_proj")}

    def run(**kw: object) -> AWQResults:
        model = AutoModelForCausalLM.from_pretrained(root / "src").float()
        return run_awq(model, ids, QCFG, search, targets, progress=False, **kw)  # type: ignore[arg-type]

    keep = _Keep()
    full = run(hooks=keep)
    assert len(keep.hidden[0]) == 2 * 2  # two batches of two blocks, in each stream
    resumed = run(start=1, hidden=keep.hidden[0], results=full.for_layer(0, full.layer_seconds[:1]))
    assert [r.name for r in resumed.roundings] == [r.name for r in full.roundings]
    assert all(torch.equal(a.q, b.q) for a, b in zip(resumed.roundings, full.roundings, strict=True))
    local = run_awq(
        AutoModelForCausalLM.from_pretrained(root / "src").float(),
        ids,
        QCFG,
        dataclasses.replace(search, refine_target="layer"),
        targets,
        progress=False,
    )
    # layer 0's targets are the same in both (its inputs are the model's); later layers' differ
    later = [(a, b) for a, b in zip(local.roundings, full.roundings, strict=True) if a.layer > 0]
    assert any(not torch.equal(a.q, b.q) for a, b in later)


def test_learned_norms_are_recorded_stored_and_reapplied_bit_for_bit(root: Path, outputs: dict[str, Path]) -> None:
    """refine_norms: the norms feeding the quantized linears are learned with the rounding; the checkpoint stores
    the learned weights, the results record them, and re-applying the results to the float model gives the
    checkpoint's norms exactly. Each layer still ends no worse on its objective than its start."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from awqkit.algo.results import apply_results

    search = dataclasses.replace(SEARCH, refine_norms=0.2)
    out = _quantize(root, root / "out-norms", method="awq-refine", search=search).path
    results = AWQResults.load(out)
    names = {n.name for n in results.norms}
    layers = sorted({r.layer for r in results.roundings})
    assert names == {f"model.layers.{i}.{n}" for i in layers for n in ("input_layernorm", "post_attention_layernorm")}
    assert all(after <= before for before, after in {r.layer: (r.loss_rtn, r.loss) for r in results.roundings}.values())
    stored = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    awq = {k: v for f in outputs["awq-refine"].glob("*.safetensors") for k, v in load_file(str(f)).items()}
    changed = 0
    model = AutoModelForCausalLM.from_pretrained(root / "src").float()
    apply_results(model, results)
    for n in results.norms:
        key = n.name + ".weight"
        assert torch.equal(stored[key], n.weight.to(stored[key].dtype)), key
        assert torch.equal(model.get_submodule(n.name).weight.to(stored[key].dtype), stored[key]), key
        changed += not torch.equal(stored[key], awq[key])
    assert changed > 0  # the norms were learned, not left as AWQ folded them
    meta = json.loads((out / "quantization_metadata.json").read_text())
    assert meta["search_config"]["refine_norms"] == 0.2
