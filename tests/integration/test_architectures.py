"""End-to-end ``awqkit.api.quantize`` on tiny random models of every supported architecture.

Each model is built from a config (no hub), saved with the tiny tokenizer, quantized with AWQ (4 bits,
group 32) on a small calibration file, and checked: the folder layout and metadata, the loaded model's
logits against the float model, and that search → apply → pack are separable (re-applying the saved
``AWQResults`` to the float source reproduces the checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_tokenizer
from safetensors.torch import load_file

from awqkit.algo.results import RESULTS_JSON, RESULTS_TENSORS, AWQResults, apply_results
from awqkit.api import quantize, select_targets
from awqkit.arch import get_layers, resolve_arch
from awqkit.calib import load_calibration
from awqkit.calib.capture import capture_layer_inputs
from awqkit.config import CalibConfig, QuantConfig, SearchConfig
from awqkit.io.load import load_quantized
from awqkit.io.source import load_source
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import replace_linears
from awqkit.pipeline import run_awq

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402

QCFG = QuantConfig(bits=4, group_size=32)
SCFG = SearchConfig(batch_size=2, search_samples=2, search_tokens=64, n_grid=5)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# Relative Frobenius error of the 4-bit logits against the float logits. RTN of Gaussian weights at
# 4 bits / group 32 perturbs each weight by ~8 % of its RMS (step ≈ range/15 ≈ 4σ/15, error ≈ step/√12);
# the observed logits error is ≈0.10-0.12 for the Llama family (where the residual stream is half
# embedding, which is not quantized) and ≈0.22-0.24 for Gemma3 (whose post-attention / post-MLP norms
# rescale every branch to unit RMS, so the quantized branches dominate the residual). On these random
# models the absolute bound alone is weak (folding Gemma's norms with offset 0 instead of 1 gives only
# ≈0.34), hence also: AWQ's error is at most AWQ_VS_RTN times RTN's (observed ratios 0.97-1.09; 1.53 for
# the offset bug), and folding alone leaves the float logits unchanged.
MAX_REL_ERR = {"llama": 0.2, "mistral": 0.2, "qwen2": 0.2, "qwen3": 0.2, "gemma3": 0.3}
AWQ_VS_RTN = 1.3


def _config(arch: str, vocab: int, kv_heads: int = 2):
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        vocab_size=vocab,
    )
    if arch == "gemma3":
        return T.Gemma3TextConfig(**common, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    return {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config}[arch](
        **common
    )


def _model_class(arch: str):
    return {
        "llama": T.LlamaForCausalLM,
        "mistral": T.MistralForCausalLM,
        "qwen2": T.Qwen2ForCausalLM,
        "qwen3": T.Qwen3ForCausalLM,
        "gemma3": T.Gemma3ForCausalLM,
    }[arch]


def _make_source(root: Path, arch: str, kv_heads: int = 2) -> Path:
    """Tiny random model + tiny tokenizer + calibration file under ``root``; returns the model folder."""
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = _model_class(arch)(_config(arch, len(tok), kv_heads)).eval()
    src = root / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    (root / "calib.txt").write_text("\n".join(TINY_CORPUS * 6) + "\n")
    return src


def _calib(root: Path) -> CalibConfig:
    return CalibConfig(source=str(root / "calib.txt"), n_samples=4, seq_len=32)


def _quantize(root: Path, dst: Path, method: str = "awq", **kw):
    return quantize(
        root / "src",
        dst,
        method=method,
        quant=kw.pop("quant", QCFG),
        calib=kw.pop("calib", _calib(root)),
        search=kw.pop("search", SCFG),
        progress=False,
        **kw,
    )


def _ids(vocab: int) -> torch.Tensor:
    # 24 tokens: longer than Gemma3's sliding window (8), so local and global layers differ
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _float_model(src: Path):
    return T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def _tensors(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


@pytest.fixture(scope="module", params=ARCHS)
def run(request, tmp_path_factory):
    """(arch, root, dst, report) for one AWQ run per architecture, shared by the tests below."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    _make_source(root, arch)
    dst = root / "awq"
    report = _quantize(root, dst)
    return arch, root, dst, report


def test_folder_layout_and_metadata(run):
    arch, root, dst, report = run
    assert report.path == dst.absolute()
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["version"], qc["zero_point"]) == (
        "awq",
        4,
        32,
        "gemm",
        True,
    )
    assert "lm_head" in qc["modules_to_not_convert"]
    assert (dst / "tokenizer.json").is_file()  # tokenizer files copied from the source
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left

    meta = json.loads((dst / "quantization_metadata.json").read_text())
    assert meta == json.loads(json.dumps(report.metadata, sort_keys=True))
    assert (meta["method"], meta["bits"], meta["group_size"]) == ("awq", 4, 32)
    assert meta["quantized_modules"] == 2 * 7  # q k v o gate up down, 2 layers
    assert meta["calibration"]["n_samples"] == 4 and meta["calibration"]["seq_len"] == 32
    mappings = meta["awq"]["mappings"]
    norm2 = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    # GQA (2 kv heads / 4 heads): v_proj -> o_proj is skipped; three mappings per layer
    assert [(m["layer"], m["prev"].rsplit(".", 1)[-1]) for m in mappings] == [
        (i, p) for i in range(2) for p in ("input_layernorm", norm2, "up_proj")
    ]
    for m in mappings:
        assert m["mode"] in ("x", "duo") and 0.0 <= m["alpha"] <= 1.0 and not m["fallback"]
        assert m["loss_rtn"] > 0 and m["loss_awq"] >= 0
    # clip search on every quantized linear except q/k
    assert sorted(c["name"].split(".", 2)[-1] for c in meta["awq"]["clips"]) == sorted(
        f"{i}.{n}"
        for i in range(2)
        for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )
    for c in meta["awq"]["clips"]:
        assert c["err_after"] <= c["err_before"]

    results_doc = json.loads((dst / RESULTS_JSON).read_text())
    assert (dst / RESULTS_TENSORS).is_file()
    assert [e["alpha"] for e in results_doc["scales"]] == pytest.approx([m["alpha"] for m in mappings], abs=1e-4)
    assert results_doc["norm_offset"] == (1.0 if arch == "gemma3" else 0.0)


def test_awq_loss_not_above_rtn_for_every_mapping(run):
    _, _, dst, _ = run
    meta = json.loads((dst / "quantization_metadata.json").read_text())
    mappings = meta["awq"]["mappings"]
    assert mappings
    assert all(m["loss_awq"] <= m["loss_rtn"] for m in mappings)
    # and the search does something: some mapping strictly improves on RTN
    assert any(m["loss_awq"] < m["loss_rtn"] for m in mappings)


def _rtn_model(src: Path) -> torch.nn.Module:
    """The float source packed directly (RTN), with what save stores in fp16 rounded to fp16."""
    model = _float_model(src)
    targets = select_targets(model, resolve_arch(model), QCFG).quantized
    _round_unquantized(model, targets)
    replace_linears(model, targets, QCFG.bits, QCFG.group_size, QCFG.zero_point)
    return model


def _round_unquantized(model: torch.nn.Module, targets: list[str]) -> None:
    quantized_weights = {f"{n}.weight" for n in targets}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in quantized_weights:
                p.copy_(p.half().float())


def test_loaded_logits_close_to_float(run):
    arch, root, dst, _ = run
    float_model = _float_model(root / "src")
    q = load_quantized(dst)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 14
    ids = _ids(float_model.config.vocab_size)
    lf, lq = _logits(float_model, ids), _logits(q, ids)
    assert torch.isfinite(lq).all()
    err_awq = _rel(lq, lf)
    assert 1e-3 < err_awq < MAX_REL_ERR[arch]  # close, and really quantized
    err_rtn = _rel(_logits(_rtn_model(root / "src"), ids), lf)
    assert err_awq < AWQ_VS_RTN * err_rtn, (err_awq, err_rtn)


def test_folding_alone_preserves_float_logits(run):
    """The searched scales, folded without clipping, are an exact equivalence transform of the float model."""
    arch, root, dst, _ = run
    results = AWQResults.load(dst)
    assert any(not torch.equal(e.scales, torch.ones_like(e.scales)) for e in results.scales)
    results.clips = []
    model = _float_model(root / "src")
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    apply_results(model, results)
    assert _rel(_logits(model, ids), before) < 1e-5


def _reapply(src: Path, dst: Path, qcfg: QuantConfig = QCFG) -> torch.nn.Module:
    """Float source + saved AWQResults + fp16 rounding of what save stores in fp16 + packing."""
    model = _float_model(src)
    apply_results(model, AWQResults.load(dst))
    targets = select_targets(model, resolve_arch(model), qcfg).quantized
    _round_unquantized(model, targets)
    replace_linears(model, targets, qcfg.bits, qcfg.group_size, qcfg.zero_point)
    return model


def test_reapplying_results_reproduces_the_checkpoint(run):
    arch, root, dst, _ = run
    rebuilt = _reapply(root / "src", dst)
    q = load_quantized(dst)
    ids = _ids(rebuilt.config.vocab_size)
    torch.testing.assert_close(_logits(rebuilt, ids), _logits(q, ids), rtol=0, atol=1e-4)
    # the packed tensors themselves are identical
    saved = _tensors(dst)
    state = rebuilt.state_dict()
    for key, t in saved.items():
        if key.endswith((".qweight", ".qzeros", ".scales")):
            assert torch.equal(state[key], t), key


def test_search_then_apply_is_bit_exact(run):
    """run_awq's folded/clipped float weights equal apply_results on a fresh float model, bit for bit."""
    arch, root, dst, _ = run
    model, tok, _ = load_source(root / "src", hash_files=False)
    ids = load_calibration(str(root / "calib.txt"), tok, _calib(root))
    targets = set(select_targets(model, resolve_arch(model), QCFG).quantized)
    results = run_awq(model, ids, QCFG, SCFG, targets, progress=False)
    original = _float_model(root / "src").state_dict()
    fresh = _float_model(root / "src")
    apply_results(fresh, results)
    searched = model.state_dict()
    changed = 0
    for key, t in fresh.state_dict().items():
        assert torch.equal(t, searched[key]), key
        changed += not torch.equal(t, original[key])
    assert changed > 0  # something was folded / clipped
    # and the search itself is deterministic: the same decisions as the run saved in dst
    saved = AWQResults.load(dst)
    assert [(e.prev, e.alpha, e.mode) for e in saved.scales] == [(e.prev, e.alpha, e.mode) for e in results.scales]
    assert all(torch.equal(a.scales, b.scales) for a, b in zip(saved.scales, results.scales, strict=True))
    assert all(
        torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)
        for a, b in zip(saved.clips, results.clips, strict=True)
    )


def test_captured_layer_inputs_replay_the_model(run):
    """Layer-0 inputs and per-layer kwargs (masks, rotary embeddings; Gemma3's sliding/global layers) that
    the pipeline captures reproduce the model's own hidden states when the layers are replayed."""
    arch, root, _, _ = run
    model = _float_model(root / "src")
    layers = get_layers(model, resolve_arch(model))
    ids = _ids(model.config.vocab_size)
    inputs = capture_layer_inputs(model, layers, ids, batch_size=2)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        h = inputs.hidden[0]
        torch.testing.assert_close(h, ref[0], rtol=0, atol=1e-6)
        for i, layer in enumerate(layers[:-1]):
            out = layer(h, **inputs.kwargs_for(i, 2, "cpu"))
            h = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(h, ref[i + 1], rtol=0, atol=1e-5)
    if arch == "gemma3":  # sliding-window layer 0 gets an explicit band mask, global layer 1 does not
        m0, m1 = inputs.kwargs[0][2]["attention_mask"], inputs.kwargs[1][2]["attention_mask"]
        assert m0 is not None
        assert m1 is None or not torch.equal(m0, m1)


# --------------------------------------------------------------------------- Llama-only API behaviour


@pytest.fixture(scope="module")
def llama_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_api")
    _make_source(root, "llama")
    return root


def test_same_inputs_and_seed_give_identical_tensors(llama_root):
    a = _quantize(llama_root, llama_root / "det_a").path
    b = _quantize(llama_root, llama_root / "det_b").path
    for name in ("model.safetensors", RESULTS_TENSORS):
        ta, tb = _tensors(a, name), _tensors(b, name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), (name, key)
    ma = json.loads((a / "quantization_metadata.json").read_text())
    mb = json.loads((b / "quantization_metadata.json").read_text())
    for m in (ma, mb):
        m.pop("timings_seconds")
        m["awq"].pop("layer_seconds")
    assert ma == mb


def test_existing_dst_is_refused_unless_overwrite(llama_root):
    dst = llama_root / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        _quantize(llama_root, dst, method="rtn")
    with pytest.raises(FileExistsError, match="not an awqkit output"):  # not awqkit's: never replaced
        _quantize(llama_root, dst, method="rtn", overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    (dst / "keep.txt").unlink()
    _quantize(llama_root, dst, method="rtn", overwrite=True)
    (dst / "keep.txt").write_text("mine")
    _quantize(llama_root, dst, method="rtn", overwrite=True)  # awqkit's own output is replaced whole
    assert not (dst / "keep.txt").exists()
    assert json.loads((dst / "quantization_metadata.json").read_text())["method"] == "rtn"
    assert not [p.name for p in llama_root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_group_size_not_dividing_in_features_names_the_layer(llama_root, method):
    dst = llama_root / f"bad_group_{method}"
    with pytest.raises(ValueError) as info:
        _quantize(llama_root, dst, method=method, quant=QuantConfig(bits=4, group_size=128))
    msg = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "group_size=128" in msg
    assert "model.layers.0.mlp.down_proj" not in msg  # in_features 128 fits
    assert not dst.exists()


def test_keep_unaligned_fp16_quantizes_only_aligned_linears(llama_root):
    dst = llama_root / "unaligned"
    qc = QuantConfig(bits=4, group_size=128, keep_unaligned_fp16=True)
    report = _quantize(llama_root, dst, quant=qc)
    meta = report.metadata
    assert meta["quantized_modules"] == 2  # only the two down_proj (in_features 128)
    assert len(meta["kept_float"]) == 12
    assert [m["prev"] for m in meta["awq"]["mappings"]] == [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    q = load_quantized(dst)
    assert sorted(n for n, m in q.named_modules() if isinstance(m, QuantLinear)) == [
        f"model.layers.{i}.mlp.down_proj" for i in range(2)
    ]
    float_model = _float_model(llama_root / "src")
    ids = _ids(float_model.config.vocab_size)
    assert _rel(_logits(q, ids), _logits(float_model, ids)) < MAX_REL_ERR["llama"]


def test_rtn_writes_a_loadable_folder(llama_root):
    dst = llama_root / "rtn"
    report = _quantize(llama_root, dst, method="rtn")
    assert report.results is None
    meta = json.loads((dst / "quantization_metadata.json").read_text())
    assert meta["method"] == "rtn" and "awq" not in meta and meta["calibration"] is None
    assert not (dst / RESULTS_JSON).exists()
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["version"]) == ("awq", 4, 32, "gemm")
    q = load_quantized(dst)
    float_model = _float_model(llama_root / "src")
    ids = _ids(float_model.config.vocab_size)
    lq = _logits(q, ids)
    assert torch.isfinite(lq).all()
    assert 1e-3 < _rel(lq, _logits(float_model, ids)) < MAX_REL_ERR["llama"]
    # RTN is exactly "pack the float weights": the same as replace_linears on the float model
    torch.testing.assert_close(_logits(_rtn_model(llama_root / "src"), ids), lq, rtol=0, atol=1e-4)


def test_modules_to_not_convert_keeps_linears_float(llama_root):
    # whole fused groups (vLLM's gate_up_proj, qkv_proj) and a linear in no group (layer 0's o_proj)
    qc = QuantConfig(
        bits=4,
        group_size=32,
        modules_to_not_convert=(
            "gate_proj",
            "up_proj",
            r"re:model\.layers\.1\.self_attn\..*",
            "layers.0.self_attn.o_proj",
        ),
    )
    dst = llama_root / "keep"
    report = _quantize(llama_root, dst, quant=qc)
    kept = sorted(report.metadata["kept_float"])
    assert kept == sorted(
        [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")]
        + [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
        + ["model.layers.0.self_attn.o_proj"]
    )
    assert report.metadata["quantized_modules"] == 14 - 9
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert set(kept) | {"lm_head"} == set(ignore)
    prevs = [m["prev"] for m in report.metadata["awq"]["mappings"]]
    assert "model.layers.1.input_layernorm" not in prevs  # no quantized consumer left
    assert "model.layers.0.post_attention_layernorm" not in prevs
    assert "model.layers.0.input_layernorm" in prevs  # q/k/v of layer 0 are still quantized
    assert "model.layers.0.mlp.up_proj" in prevs  # down_proj is still quantized behind a float up_proj
    q = load_quantized(dst)
    qnames = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert not qnames & set(kept) and len(qnames) == 5
    rebuilt = _reapply(llama_root / "src", dst, qc)
    ids = _ids(q.config.vocab_size)
    torch.testing.assert_close(_logits(rebuilt, ids), _logits(q, ids), rtol=0, atol=1e-4)


def test_float_propagation_without_clip_and_mha(tmp_path):
    """Non-default settings: float propagation, no clip, no GQA (v -> o mapping kept), and 5 blocks in
    batches of 2 (a last batch of 1, with its own captured kwargs)."""
    _make_source(tmp_path, "llama", kv_heads=4)
    scfg = SearchConfig(
        batch_size=2, search_samples=3, search_tokens=64, n_grid=5, clip=False, propagate="float", scale_mode="x"
    )
    calib = CalibConfig(source=str(tmp_path / "calib.txt"), n_samples=5, seq_len=32)
    report = _quantize(tmp_path, tmp_path / "out", search=scfg, calib=calib)
    assert report.metadata["calibration"]["n_samples"] == 5
    mappings = report.metadata["awq"]["mappings"]
    assert [m["prev"].rsplit(".", 1)[-1] for m in mappings] == [
        "input_layernorm",
        "v_proj",
        "post_attention_layernorm",
        "up_proj",
    ] * 2
    assert all(m["mode"] == "x" for m in mappings)
    assert report.metadata["awq"]["clips"] == []
    rebuilt = _reapply(tmp_path / "src", tmp_path / "out")
    q = load_quantized(tmp_path / "out")
    ids = _ids(q.config.vocab_size)
    torch.testing.assert_close(_logits(rebuilt, ids), _logits(q, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2])  # 4: MHA, so o_proj is scored by its full Gram as down_proj is
def test_clip_over_every_token_equals_clip_over_a_sample_of_all_tokens(tmp_path, kv_heads):
    """clip_n_tokens=0 (per-group Gram blocks over every token) chooses what a token sample holding every
    token chooses: the same objective on the same tokens."""
    _make_source(tmp_path, "llama", kv_heads=kv_heads)
    model, tok, _ = load_source(tmp_path / "src", hash_files=False)
    ids = load_calibration(str(tmp_path / "calib.txt"), tok, _calib(tmp_path))
    targets = set(select_targets(model, resolve_arch(model), QCFG).quantized)
    runs = []
    for n_tokens in (0, 10**6):  # every search batch is sampled whole: 4 blocks, search_samples=4
        scfg = dataclasses.replace(SCFG, search_samples=4, clip_n_tokens=n_tokens)
        runs.append(run_awq(_float_model(tmp_path / "src"), ids, QCFG, scfg, targets, progress=False))
    gram, sample = runs
    assert [c.name for c in gram.clips] == [c.name for c in sample.clips] and gram.clips
    assert any(c.name.endswith("o_proj") for c in gram.clips)
    for a, b in zip(gram.clips, sample.clips, strict=True):
        assert a.err_after == pytest.approx(b.err_after, rel=1e-4), a.name
        same = (torch.isclose(a.min_val, b.min_val) & torch.isclose(a.max_val, b.max_val)).float().mean().item()
        assert same > 0.99, (a.name, same)
