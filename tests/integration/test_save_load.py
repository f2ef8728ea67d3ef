"""save_quantized -> load_quantized round trips on a tiny random Llama, plus AutoAWQ-written folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from awqkit.config import QuantConfig
from awqkit.io.load import load_quantized, read_quant_config
from awqkit.io.save import file_digest, save_quantized, verify_files
from awqkit.io.shards import ShardWriter
from awqkit.io.state import convert_for_storage, state_plan
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import get_module, replace_linears, set_module
from awqkit.quant import primitives as P
from awqkit.quant.packing import pack_ct, pack_gemm

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

AWQ_KEYS = {"quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert"}


def _tiny(tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """Tiny random Llama whose float params are already fp16-representable (they are saved in fp16, so
    the in-memory model and the loaded one then hold identical values: exact comparisons are fair)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def _layer_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def _quantized(bits=4, group_size=32, zero_point=True, tie=True):
    model = _tiny(tie)
    replace_linears(model, _layer_linears(model), bits, group_size, zero_point)
    return model, QuantConfig(bits=bits, group_size=group_size, zero_point=zero_point)


def _logits(model, seed=1):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _save(model, qc, dst, **kw):
    kw.setdefault("src_dir", None)
    kw.setdefault("metadata", {"zeta": 1, "alpha": [1, 2]})
    kw.setdefault("modules_to_not_convert", [])
    return save_quantized(model, dst, quant_config=qc, **kw)


def _keys(folder: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    return out


def test_gemm_roundtrip_exact_logits_config_and_tying(tmp_path):
    model, qc = _quantized(4, 32)
    dst = _save(model, qc, tmp_path / "out")
    loaded = load_quantized(dst)
    # Same fp16-representable params, same packed ints, same torch backend -> identical fp32 math.
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)

    cfg = json.loads((dst / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    assert set(qcfg) == AWQ_KEYS
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["zero_point"], qcfg["version"]) == (
        "awq",
        4,
        32,
        True,
        "gemm",
    )
    assert qcfg["modules_to_not_convert"] == ["lm_head"]  # float linears are always listed
    assert cfg["dtype"] == "float16" and cfg["torch_dtype"] == "float16"
    assert cfg["architectures"] == ["LlamaForCausalLM"]

    keys = _keys(dst)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    assert keys["model.layers.0.self_attn.q_proj.qweight"] == "I32"
    assert keys["model.layers.0.self_attn.q_proj.scales"] == "F16"
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert {v for k, v in keys.items() if not k.endswith(("qweight", "qzeros"))} == {"F16"}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # CPU default: the tied head keeps its stored fp16 when the fp16-head GEMV is available, else fp32
    from awqkit.kernels import cpu_avx2

    expected = torch.float16 if cpu_avx2.is_available() else torch.float32
    assert loaded.model.embed_tokens.weight.dtype == expected
    assert load_quantized(dst, fp16_head=False).model.embed_tokens.weight.dtype == torch.float32
    assert isinstance(get_module(loaded, "model.layers.1.mlp.down_proj"), QuantLinear)
    text = (dst / "quantization_metadata.json").read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, sort_keys=True, indent=2) + "\n"
    files = meta.pop("files")  # what the write recorded of each weight file, checked against the files
    assert meta == {"alpha": [1, 2], "zeta": 1}
    assert files == {"model.safetensors": file_digest(dst / "model.safetensors")}
    assert files["model.safetensors"]["bytes"] == (dst / "model.safetensors").stat().st_size
    assert verify_files(dst, {"files": files}) is None
    assert read_quant_config(dst)["group_size"] == 32
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bits,group_size,zero_point", [(3, 32, True), (5, -1, False)])
def test_ct_roundtrip(tmp_path, bits, group_size, zero_point):
    model, qc = _quantized(bits, group_size, zero_point, tie=False)
    dst = _save(model, qc, tmp_path / "ct")
    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["format"], qcfg["quantization_status"]) == (
        "compressed-tensors",
        "pack-quantized",
        "compressed",
    )
    w = qcfg["config_groups"]["group_0"]["weights"]
    strategy = "group" if group_size > 0 else "channel"
    assert (w["num_bits"], w["symmetric"], w["strategy"]) == (bits, not zero_point, strategy)
    assert qcfg["ignore"] == ["lm_head"]
    keys = _keys(dst)
    assert "lm_head.weight" in keys  # untied: both embeddings stored
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in keys) == zero_point
    loaded = load_quantized(dst)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)


def test_sharded_save_is_huggingface_hubs_split_and_loads_bit_for_bit(tmp_path):
    """A small max_shard_size gives several shards, split as huggingface_hub (and so transformers) splits the
    same tensors, with transformers' index; every stored tensor reads back bit for bit, by safetensors and by
    load_quantized, and the tied head is stored once."""
    model, qc = _quantized(4, 64)
    dst = _save(model, qc, tmp_path / "sharded", max_shard_size="40KB")
    stored = {k: convert_for_storage(k, t, dtype) for k, (t, dtype) in state_plan(model).items()}
    split = split_torch_state_dict_into_shards(stored, max_shard_size="40KB")
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(split.filename_to_tensors)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index == {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    assert set(index["weight_map"]) == set(_keys(dst)) == set(stored)
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored  # tied: stored once
    for name in shards:
        for k, t in load_file(str(dst / name)).items():
            assert index["weight_map"][k] == name and _same_bits(t, stored[k]), k
    loaded = load_quantized(dst)
    state = loaded.state_dict()
    assert all(_same_bits(state[k].to(t.dtype), t) for k, t in stored.items())
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def test_tied_heads_are_stored_once_and_other_aliases_kept(tmp_path):
    """The head the config ties is left out whether it shares the embedding's storage or holds an equal copy;
    a transposed view of the embedding is another tensor and keeps its own name (huggingface_hub's
    save_torch_state_dict dedup compares byte ranges and would drop it)."""
    model, qc = _quantized(4, 32, tie=True)
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())  # equal, unshared
    dst = _save(model, qc, tmp_path / "copy")
    assert "lm_head.weight" not in _keys(dst) and "model.embed_tokens.weight" in _keys(dst)
    torch.testing.assert_close(_logits(load_quantized(dst)), _logits(model), rtol=0, atol=1e-5)
    model, _ = _quantized(4, 32, tie=True)
    emb = model.model.embed_tokens.weight
    model.model.norm.register_buffer("emb_t", emb.detach().t())
    model.model.norm.register_buffer("emb_alias", emb.detach())
    plan = state_plan(model)
    assert "lm_head.weight" not in plan
    assert {"model.embed_tokens.weight", "model.norm.emb_t", "model.norm.emb_alias"} <= set(plan)
    assert torch.equal(plan["model.norm.emb_t"][0], emb.t())


def test_existing_dst_refused_then_overwritten(tmp_path):
    model, qc = _quantized(4, 32)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _save(model, qc, dst)
    # a folder awqkit did not write is never replaced, --overwrite or not
    with pytest.raises(FileExistsError, match="not an awqkit output"):
        _save(model, qc, dst, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"
    (dst / "keep.txt").unlink()
    _save(model, qc, dst, overwrite=True)  # an empty folder may be filled
    (dst / "stale.txt").write_text("from an older output")
    _save(model, qc, dst, overwrite=True)  # awqkit's own output is replaced whole
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp/old folders left


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    model, qc = _quantized(4, 32)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ShardWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(model, qc, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # with overwrite, the previous checkpoint survives a failed save untouched
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "quantization_metadata.json").write_text("{}")
    (tmp_path / "prev" / "marker").write_text("x")
    with pytest.raises(RuntimeError, match="disk full"):
        _save(model, qc, tmp_path / "prev", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]
    assert (tmp_path / "prev" / "marker").read_text() == "x"


def test_src_files_copied_and_metadata_checked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "generation_config.json",
    ]
    for n in names:
        (src / n).write_text(f'{{"file": "{n}"}}')
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_text("not weights")
    model, qc = _quantized(4, 32)
    dst = _save(model, qc, tmp_path / "out", src_dir=src)
    for n in names:
        assert (dst / n).read_text() == f'{{"file": "{n}"}}'
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llama"
    with pytest.raises(ValueError, match="JSON-serializable"):
        _save(model, qc, tmp_path / "bad", metadata={"x": object()})
    with pytest.raises(ValueError, match="quant_config says bits=4, group_size=64"):
        _save(model, QuantConfig(bits=4, group_size=64), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_save_refuses_untied_mismatch_and_unquantized(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear"):
        _save(_tiny(), QuantConfig(bits=4, group_size=32), tmp_path / "a")
    model, qc = _quantized(4, 32, tie=True)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() + 1)  # broken tie
    with pytest.raises(ValueError, match="tie_word_embeddings=True but lm_head.weight differs"):
        _save(model, qc, tmp_path / "b")


LLMC_W4A16 = {  # what llm-compressor writes for a symmetric W4A16 group-32 recipe
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        }
    },
    "ignore": ["lm_head"],
}
AUTOAWQ = {
    "quant_method": "awq",
    "w_bit": 4,
    "q_group_size": 32,
    "zero_point": True,
    "version": "GEMM",
    "modules_to_not_convert": None,
}


@pytest.mark.parametrize("writer", ["autoawq", "llm-compressor"])
def test_foreign_folder_loads(tmp_path, writer):
    """Folders written by other tools load and match a plain float model holding the fake-quantized weights:
    AutoAWQ (w_bit/q_group_size, modules_to_not_convert null, no metadata file) and llm-compressor W4A16
    (4-bit pack-quantized, symmetric, bf16 scales). Both with an untied lm_head."""
    zero_point = writer == "autoawq"
    scale_dtype = torch.float16 if zero_point else torch.bfloat16
    ref = _tiny(tie=False, seed=3)
    state = {k: v.half() for k, v in ref.state_dict().items()}
    for name in _layer_linears(ref):
        w = state.pop(f"{name}.weight").float()
        q, scales, zeros = P.quantize_weight(w, 4, 32, zero_point, scale_dtype=scale_dtype)
        if zero_point:
            state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"] = pack_gemm(q, zeros, scales)
        else:
            packed = pack_ct(q, zeros, scales, 4, include_zero_point=False)
            packed["weight_scale"] = scales.to(torch.bfloat16)
            state.update({f"{name}.{k}": v for k, v in packed.items()})
        fq = nn.Linear(w.shape[1], w.shape[0], bias=False)
        fq.weight.data = P.fake_quantize(w, 4, 32, zero_point, scale_dtype=scale_dtype)
        set_module(ref, name, fq)
    folder = tmp_path / writer
    folder.mkdir()
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = ref.config.to_dict()
    cfg["quantization_config"] = AUTOAWQ if zero_point else LLMC_W4A16
    (folder / "config.json").write_text(json.dumps(cfg))
    qc = read_quant_config(folder)
    assert (qc["bits"], qc["group_size"], qc["zero_point"]) == (4, 32, zero_point)
    assert qc["modules_to_not_convert"] == ([] if zero_point else ["lm_head"])
    loaded = load_quantized(folder, backend="torch")  # fp32 reference: compared with a float model below
    assert get_module(loaded, "model.layers.0.mlp.up_proj").format == ("gemm" if zero_point else "pack-quantized")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(loaded), _logits(ref), rtol=0, atol=1e-5)


def test_load_reports_mismatched_keys(tmp_path):
    model, qc = _quantized(4, 32)
    dst = _save(model, qc, tmp_path / "out")
    tensors = {}
    with safe_open(str(dst / "model.safetensors"), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["model.extra.weight"] = torch.zeros(2)
    del tensors["model.norm.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \[model.norm.weight\]; unexpected keys \[model.extra.weight\]"):
        load_quantized(dst)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        load_quantized(dst, backend="nope")
    del tensors["model.extra.weight"]
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.float16)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64  # tensors hold group 32
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is group_size=64 in quantization_config right"):
        load_quantized(dst)


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors not installed")
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_ct_checkpoint_loads_in_transformers(tmp_path):
    """Interop: transformers + compressed-tensors decompress our 3-bit checkpoint to the same model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, qc = _quantized(3, 32, True)
    dst = _save(model, qc, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(
        dst, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name in _layer_linears(_tiny()):
        ours = get_module(model, name).dequantized_weight()
        assert torch.equal(get_module(hf, name).weight.float(), ours.half().float()), name


def test_side_config_files_autoawq_read_autogptq_refused(tmp_path):
    # AutoAWQ's quant_config.json (no quant_method) is AWQ; AutoGPTQ's quantize_config.json is not
    awq = tmp_path / "awq"
    awq.mkdir()
    (awq / "quant_config.json").write_text(
        json.dumps({"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    )
    qc = read_quant_config(awq)
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("awq", 4, 64)
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.01})
    )
    with pytest.raises(ValueError, match="quant_method='gptq' is not supported"):
        read_quant_config(gptq)
