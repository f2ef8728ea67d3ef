"""compressed-tensors export at every bit width (4-bit included, asymmetric and symmetric) and mixed bits.

Each output is read back three ways: by the ``compressed_tensors`` library itself (its own config-group matching
picks each linear's scheme, its pack-quantized compressor decompresses it: equal bit for bit to awqkit's
dequantized weight in the stored fp16 scale dtype), by transformers' ``from_pretrained``, and by awqkit's
``load_quantized``.

transformers 5 + compressed-tensors 0.20 load these folders two ways, each with a limit (upstream, not awqkit's):
the default path builds the compressed layout on the meta device without packing the zero point's shape, so it
refuses asymmetric folders (``weight_zero_point`` size mismatch), and ``CompressedTensorsConfig(dequantize=True)``
decompresses every dense layer with the first config group's scheme, so it reads mixed widths wrongly. Hence
symmetric folders (mixed or not) go through the default path and the asymmetric 4-bit folder through
``dequantize=True``; asymmetric mixed widths are checked through compressed-tensors and awqkit only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, greedy, save_tiny_llama
from safetensors.torch import load_file

import awqkit.pipeline
from awqkit import cli
from awqkit.api import quantize
from awqkit.config import CalibConfig, QuantConfig, SearchConfig, parse_bits_override
from awqkit.errors import InputError
from awqkit.io.load import load_quantized
from awqkit.nn.qlinear import QuantLinear
from awqkit.spec import resolve_quantization_spec, spec_from_metadata, warn_unapplied

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

CALIB = {"n_samples": 4, "seq_len": 32}
SEARCH = SearchConfig(batch_size=2, search_samples=2, search_tokens=64, n_grid=5)
DOWN = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    save_tiny_llama(root / "src")
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    return root


def _quantize(root: Path, name: str, quant: QuantConfig, method: str = "rtn", search: SearchConfig = SEARCH):
    return quantize(
        root / "src",
        root / name,
        method=method,
        quant=quant,
        calib=CalibConfig(source=str(root / "calib.txt"), **CALIB),
        search=search,
        progress=False,
    )


def _qcfg(dst: Path) -> dict:
    return json.loads((dst / "config.json").read_text())["quantization_config"]


def _ct_decompressed(dst: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """``{linear: (num_bits, weight)}`` as the compressed-tensors library reads ``dst``: its config groups applied
    to the float model by its own matching rules, each linear's tensors decompressed by its compressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    config = transformers.AutoConfig.from_pretrained(dst)
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    apply_quantization_config(model, QuantizationConfig.model_validate(_qcfg(dst)))
    tensors = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        mine = {k[len(name) + 1 :]: t for k, t in tensors.items() if k.rpartition(".")[0] == name}
        out[name] = (scheme.weights.num_bits, PackedQuantizationCompressor.decompress(mine, scheme)["weight"])
    return out


def _check_bit_for_bit(dst: Path) -> dict[str, QuantLinear]:
    """compressed-tensors quantizes exactly awqkit's linears, at awqkit's widths, to awqkit's weights (the library
    multiplies in the fp16 scale dtype: one rounding of awqkit's exact float32 product)."""
    ours = load_quantized(dst, backend="torch")
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    theirs = _ct_decompressed(dst)
    assert set(theirs) == set(quantized) and len(quantized) == 14
    for name, (bits, weight) in theirs.items():
        assert bits == quantized[name].bits, name
        assert torch.equal(weight.float(), quantized[name].dequantized_weight().half().float()), name
    return quantized


def _ids() -> torch.Tensor:
    return torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))


def _check_transformers(dst: Path, dequantize: bool) -> None:
    """transformers loads ``dst`` (see the module docstring for which path) to the logits awqkit computes, and
    generates the same tokens."""
    kw = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, **kw).eval()
    ours = load_quantized(dst, backend="torch")
    with torch.no_grad():
        a, b = ours(_ids()).logits, hf(_ids()).logits
    # default path: the same float32 dequantization (equal); dequantize=True: weights rounded to fp16 once
    torch.testing.assert_close(b, a, rtol=0, atol=0 if not dequantize else 2e-3 * a.abs().max().item())
    assert greedy(hf, _ids(), 6) == greedy(ours, _ids(), 6)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
def test_4bit_compressed_tensors(root: Path, zero_point: bool) -> None:
    name = f"w4-{'asym' if zero_point else 'sym'}"
    quant = QuantConfig(bits=4, group_size=32, zero_point=zero_point, format="compressed-tensors")
    report = _quantize(root, name, quant)
    dst = report.path
    qc = _qcfg(dst)
    assert (qc["quant_method"], qc["format"], list(qc["config_groups"])) == (
        "compressed-tensors",
        "pack-quantized",
        ["group_0"],
    )
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert (group["weights"]["num_bits"], group["weights"]["symmetric"]) == (4, not zero_point)
    assert (
        report.metadata["format"] == "compressed-tensors" and report.metadata["spec"]["format"] == "compressed-tensors"
    )
    keys = load_file(str(dst / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight_packed" in keys and not any(k.endswith("qweight") for k in keys)
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in keys) == zero_point
    quantized = _check_bit_for_bit(dst)
    assert {(m.bits, m.format, m.zero_point) for m in quantized.values()} == {(4, "pack-quantized", zero_point)}
    _check_transformers(dst, dequantize=zero_point)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
def test_mixed_bits_awq(root: Path, zero_point: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """down_proj at 8 bits, the rest at 4: two config groups naming their linears; the AWQ scale and clip searches
    quantize each linear at its own width."""
    seen: dict[str, list] = {"scales": [], "clip": []}
    scales, clip = awqkit.pipeline.search_scales, awqkit.pipeline.search_clip

    def spy_scales(linears, *a, **kw):
        seen["scales"].append((len(linears), kw["bits"]))
        return scales(linears, *a, **kw)

    def spy_clip(w, *a, **kw):
        seen["clip"].append((w.shape[1], kw["bits"]))
        return clip(w, *a, **kw)

    monkeypatch.setattr(awqkit.pipeline, "search_scales", spy_scales)
    monkeypatch.setattr(awqkit.pipeline, "search_clip", spy_clip)
    quant = QuantConfig(bits=4, group_size=32, zero_point=zero_point, bits_overrides=(("mlp.down_proj", 8),))
    report = _quantize(root, f"mixed-{zero_point}", quant, method="awq")
    dst = report.path
    # up -> down is the only single-linear mapping (in 128); clip sees down_proj as the only 128-wide input
    assert (1, [8]) in seen["scales"] and (3, [4, 4, 4]) in seen["scales"] and (2, [4, 4]) in seen["scales"]
    assert {bits for width, bits in seen["clip"] if width == 128} == {8}
    assert {bits for width, bits in seen["clip"] if width == 64} == {4}

    groups = _qcfg(dst)["config_groups"]
    assert list(groups) == ["group_0", "group_1"]
    assert [g["weights"]["num_bits"] for g in groups.values()] == [4, 8]
    assert groups["group_1"]["targets"] == list(DOWN)
    assert len(groups["group_0"]["targets"]) == 12 and not set(DOWN) & set(groups["group_0"]["targets"])
    assert report.metadata["format"] == "compressed-tensors"
    assert "| weight bits | 4; `mlp.down_proj`: 8 |" in (dst / "README.md").read_text()  # the model card
    quantized = _check_bit_for_bit(dst)
    assert {n for n, m in quantized.items() if m.bits == 8} == set(DOWN)
    from awqkit.quant.packing import unpack_ct

    down = quantized[DOWN[0]]
    q, _, _ = unpack_ct(down.weight_packed, down.weight_scale, (down.out_features, down.in_features), 8)
    assert int(q.max()) - int(q.min()) > 15  # really 8-bit integers, not 4-bit ones stored wide
    if not zero_point:
        _check_transformers(dst, dequantize=False)


@pytest.mark.parametrize("method", ["awq-gptq", "awq-refine"])
def test_mixed_bits_rounding_methods(root: Path, method: str) -> None:
    """GPTQ and block refinement choose each linear's integers at its own width."""
    search = SearchConfig(**{**vars(SEARCH), "refine_iters": 2})
    quant = QuantConfig(bits=3, group_size=32, bits_overrides=(("re:.*\\.mlp\\.down_proj", 6),))
    report = _quantize(root, f"mixed-{method}", quant, method=method, search=search)
    tops = {r.name: int(r.q.max()) for r in report.results.roundings}
    assert len(tops) == 14 and all(top <= 7 for n, top in tops.items() if n not in DOWN)
    assert all(tops[n] > 7 for n in DOWN)
    _check_bit_for_bit(report.path)


def test_cli_format_and_bits_override(root: Path, capsys: pytest.CaptureFixture) -> None:
    dst = root / "cli-out"
    argv = ["quantize", "--method", "rtn", "--src", str(root / "src"), "--dst", str(dst), "--group-size", "32"]
    assert cli.main([*argv, "--bits-override", "re:.*\\.mlp\\..*=8", "--bits-override", "down_proj=5"]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    quantized = {n: m.bits for n, m in load_quantized(dst).named_modules() if isinstance(m, QuantLinear)}
    assert quantized["model.layers.1.mlp.down_proj"] == 5 and quantized["model.layers.1.mlp.gate_proj"] == 8
    assert quantized["model.layers.1.self_attn.o_proj"] == 4
    assert [g["weights"]["num_bits"] for g in _qcfg(dst)["config_groups"].values()] == [4, 5, 8]


def test_bad_combinations_are_refused_before_any_work(root: Path) -> None:
    with pytest.raises(InputError, match="format 'gemm' holds one 4-bit setting, not bits=3"):
        QuantConfig(bits=3, format="gemm")
    with pytest.raises(InputError, match="format 'gemm' holds one 4-bit setting, not bits_overrides"):
        QuantConfig(format="gemm", bits_overrides=(("down_proj", 8),))
    with pytest.raises(InputError, match="format='marlin' is not a format awqkit writes"):
        QuantConfig(format="marlin")
    with pytest.raises(InputError, match="bits=9 is not supported"):
        QuantConfig(bits_overrides=(("down_proj", 9),))
    with pytest.raises(InputError, match="invalid regex"):
        QuantConfig(bits_overrides=(("re:(", 8),))
    with pytest.raises(InputError, match="is not PATTERN=BITS"):
        parse_bits_override("down_proj")
    with pytest.raises(InputError, match="'gemm' holds 4-bit weights only"):
        resolve_quantization_spec("rtn", bits=3, format="gemm")
    for overrides, match in [
        ((("gate", 8),), "matches no quantized linear"),  # never a substring of gate_proj
        ((("q_proj", 8),), r"fused group self_attn.\(q\|k\|v\)_proj of layer 0 different bit widths"),
    ]:
        with pytest.raises(InputError, match=match):
            _quantize(root, "refused", QuantConfig(group_size=32, bits_overrides=overrides), method="awq")
        assert not (root / "refused").exists()


def test_bits_for_patterns() -> None:
    quant = QuantConfig(bits_overrides=(("re:.*\\.mlp\\..*", 8), ("down_proj", 3)))
    assert quant.bits_for("model.layers.0.mlp.up_proj") == 8
    assert quant.bits_for("model.layers.0.mlp.down_proj") == 3  # the last matching entry wins
    assert quant.bits_for("model.layers.0.self_attn.o_proj") == 4
    assert quant.bits_for("model.layers.0.mlp.down_proj_x") == 8  # plain names match whole components only
    assert (quant.output_format, quant.layout) == ("compressed-tensors", "pack-quantized")
    assert (QuantConfig().output_format, QuantConfig(bits=3).output_format) == ("gemm", "compressed-tensors")
    assert QuantConfig(format="pack-quantized").format == "compressed-tensors"
    assert parse_bits_override("re:a(?=b)=6") == ("re:a(?=b)", 6)


def test_spec_4bit_compressed_tensors_is_applied(caplog: pytest.LogCaptureFixture) -> None:
    """A spec asking for pack-quantized at 4 bits (the old spelling) is applied, not 'planned but NOT applied'."""
    spec = resolve_quantization_spec("awq", format="pack-quantized", bits_overrides=[["down_proj", 8]])
    assert spec.unapplied() == [] and warn_unapplied(spec) == [] and "NOT applied" not in caplog.text
    quant = spec.to_quant_config()
    assert (quant.format, quant.bits_overrides, spec.written_format) == (
        "compressed-tensors",
        (("down_proj", 8),),
        "compressed-tensors",
    )
    assert "down_proj w8" in spec.describe()
    # outputs of older awqkit recorded such a request as not applied: they hold what "auto" wrote (gemm)
    old = {"spec": {"method": "awq", "format": "pack-quantized"}, "not_applied": ["format=pack-quantized"]}
    assert spec_from_metadata(old) == resolve_quantization_spec("awq")
