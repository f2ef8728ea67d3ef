"""The streaming safetensors shard writer (awqkit.io.shards): byte-identical to the reference writer, loadable by
safetensors and transformers, order-free, resumable, and strict about what it is given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from awqkit.errors import CheckpointError, InputError
from awqkit.io import shards as S
from awqkit.io.shards import DTYPES, INDEX, ShardLayout, ShardWriter, TensorSpec


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
        if t.numel() >= 3:
            t.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
        return t
    lo, hi = (0, 256) if dtype == torch.uint8 else (-100, 100)
    return torch.randint(lo, hi, shape, generator=g, dtype=dtype)


def _all_dtypes() -> dict[str, torch.Tensor]:
    """One tensor per dtype (odd lengths, so a given-order layout would misalign), plus empty and scalar ones."""
    out = {f"t.{name}": _sample(dt, (3, 5) if i % 2 else (7,), i) for i, (name, dt) in enumerate(DTYPES.items())}
    out["empty.f32"] = torch.zeros(0, 4)
    out["empty.i8"] = torch.zeros(2, 0, dtype=torch.int8)
    out["scalar.bf16"] = torch.tensor(1.5, dtype=torch.bfloat16)
    out["scalar.i64"] = torch.tensor(-7)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _write(
    folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int = 1 << 30, order: list[str] | None = None, **plan_kw
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    layout = ShardLayout.plan([TensorSpec.of(k, t) for k, t in tensors.items()], max_bytes, **plan_kw)
    with ShardWriter(folder, layout) as w:
        for k in order or list(tensors):
            w.write(k, tensors[k])
    return layout.files() + ([INDEX] if len(layout.shards) > 1 else [])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_every_dtype_round_trips_and_equals_the_reference_bytes(tmp_path: Path) -> None:
    tensors = _all_dtypes()
    assert _write(tmp_path / "ours", tensors) == ["model.safetensors"]
    ours = tmp_path / "ours" / "model.safetensors"
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    loaded = load_file(str(ours))
    assert loaded.keys() == tensors.keys() and all(_same_bits(loaded[k], t) for k, t in tensors.items())
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(_same_bits(f.get_tensor(k), t) for k, t in tensors.items())
    raw = ours.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and raw[8 + n - 1 : 8 + n] in (b" ", b"}")
    assert header["empty.f32"]["data_offsets"][0] == header["empty.f32"]["data_offsets"][1]
    assert header["scalar.i64"]["shape"] == []
    sizes = {k: torch.empty((), dtype=t.dtype).element_size() for k, t in tensors.items()}
    assert all(v["data_offsets"][0] % sizes[k] == 0 for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_metadata_as_the_reference_writes_it(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    tensors = {"b": torch.ones(3, dtype=torch.float16), "a": torch.arange(5)}
    _write(tmp_path / "ours", tensors, metadata=metadata)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def _sharded_dict() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"embed.weight": _sample(torch.float16, (16, 8), 0)}  # 256 bytes
    for i in range(3):
        out[f"layers.{i}.w"] = _sample(torch.float16, (8, 8), i + 1)  # 128 bytes
        out[f"layers.{i}.q"] = _sample(torch.int32, (5,), i + 7)  # 20 bytes
        out[f"layers.{i}.n"] = _sample(torch.bfloat16, (8,), i + 9)  # 16 bytes
    out["huge"] = _sample(torch.float32, (100,), 20)  # 400 bytes > max
    out["norm"] = _sample(torch.float16, (8,), 21)
    return out


def _reference_shards(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    """What transformers' ``save_pretrained`` writes for these tensors: huggingface_hub's
    ``split_torch_state_dict_into_shards``, each shard by ``save_file``, the index by ``json.dumps`` (sorted keys;
    without the ``total_parameters`` transformers adds)."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_bytes)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    names = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(INDEX)
    return names


@pytest.mark.parametrize("max_bytes", [1, 150, 164, 200, 400, 10**6])
def test_the_plan_is_huggingface_hubs(max_bytes: int) -> None:
    """File names and the tensor -> file assignment equal huggingface_hub's on the same tensors, including a
    tensor over the limit (its own file, placed where the hub places it) and a limit below every tensor."""
    tensors = _sharded_dict()
    layout = ShardLayout.plan([TensorSpec.of(k, t) for k, t in tensors.items()], max_bytes)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_bytes)
    assert layout.files() == list(split.filename_to_tensors)
    assert [[s.name for s in shard] for shard in layout.shards] == list(split.filename_to_tensors.values())
    assert layout.weight_map() == dict(sorted(split.tensor_to_filename.items()))
    assert layout.total_size == split.metadata["total_size"]
    assert (layout.files() == ["model.safetensors"]) == (max_bytes == 10**6)
    if max_bytes == 1:
        assert layout.files()[-1] == f"model-{len(tensors):05d}-of-{len(tensors):05d}.safetensors"


@pytest.mark.parametrize("max_bytes", [150, 164, 200, 10**6])  # 164: layer 0 fills a shard exactly
def test_same_files_as_the_in_memory_writer(tmp_path: Path, max_bytes: int) -> None:
    tensors = _sharded_dict()
    (tmp_path / "ref").mkdir()
    ref_names = _reference_shards(tensors, tmp_path / "ref", max_bytes)
    names = _write(tmp_path / "ours", tensors, max_bytes)
    assert sorted(names) == sorted(ref_names)
    assert _files(tmp_path / "ours") == _files(tmp_path / "ref")  # shards and index, byte for byte
    if max_bytes < 10**6:
        index = json.loads((tmp_path / "ours" / INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert list(index["weight_map"]) == sorted(tensors)
        huge_file = index["weight_map"]["huge"]
        assert [k for k, f in index["weight_map"].items() if f == huge_file] == ["huge"]
        for name in set(index["weight_map"].values()):
            loaded = load_file(str(tmp_path / "ours" / name))
            assert all(_same_bits(t, tensors[k]) for k, t in loaded.items())


def test_write_order_does_not_matter(tmp_path: Path) -> None:
    tensors = _sharded_dict()
    keys = list(tensors)
    _write(tmp_path / "a", tensors, 200)
    _write(tmp_path / "b", tensors, 200, order=keys[::-1])
    _write(tmp_path / "c", tensors, 200, order=keys[1:] + keys[:1])  # embeddings last
    assert _files(tmp_path / "a") == _files(tmp_path / "b") == _files(tmp_path / "c")


def test_resume_after_a_crash_gives_the_same_files(tmp_path: Path) -> None:
    tensors = _sharded_dict()
    keys = list(tensors)
    _write(tmp_path / "whole", tensors, 200)
    layout = ShardLayout.plan([TensorSpec.of(k, t) for k, t in tensors.items()], 200)
    (tmp_path / "resumed").mkdir()
    w = ShardWriter(tmp_path / "resumed", layout)
    for k in keys[:5]:
        w.write(k, tensors[k])
    w.write(keys[5], torch.zeros_like(tensors[keys[5]]))  # the layer being written when the run died
    w.flush()
    del w  # killed: no close, no index
    assert not (tmp_path / "resumed" / INDEX).exists()
    stored = json.loads(json.dumps(layout.to_json()))  # as kept in a progress file
    assert stored == layout.to_json()  # a stored record compares equal to a fresh one
    layout2 = ShardLayout.from_json(stored)
    assert layout2 == layout and layout2.spec("norm") == TensorSpec("norm", (8,), torch.float16)
    with ShardWriter(tmp_path / "resumed", layout2, resume=True) as w:
        w.mark_written(keys[:5])
        assert sorted(s.name for s in w.missing()) == sorted(keys[5:])  # in the layout's order
        for k in keys[5:]:
            w.write(k, tensors[k])
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_resume_refuses_files_of_another_layout(tmp_path: Path) -> None:
    tensors = _sharded_dict()
    _write(tmp_path, tensors, 200)
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    other = ShardLayout.plan([*specs[:-1], TensorSpec("norm", (8,), torch.float32)], 200)
    with pytest.raises(CheckpointError, match="another layout"):
        ShardWriter(tmp_path, other, resume=True)
    with pytest.raises(CheckpointError, match="missing"):
        ShardWriter(tmp_path / "nowhere", ShardLayout.plan(specs, 200), resume=True)


def test_wrong_inputs_are_named_errors(tmp_path: Path) -> None:
    layout = ShardLayout.plan([TensorSpec("a", (2, 3), torch.float16), TensorSpec("b", (), torch.int64)], 1 << 20)
    w = ShardWriter(tmp_path, layout)
    with pytest.raises(InputError, match=r"tensor a is torch.float16 \[3, 2\].*expects torch.float16 \[2, 3\]"):
        w.write("a", torch.zeros(3, 2, dtype=torch.float16))
    with pytest.raises(InputError, match=r"tensor a is torch.float32 \[2, 3\]"):
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(InputError, match="tensor c is not in the shard layout"):
        w.write("c", torch.zeros(2, 3, dtype=torch.float16))
    w.write("a", torch.zeros(3, 2, dtype=torch.float16).t())  # strided views are written contiguous
    with pytest.raises(InputError, match="already written"):
        w.write("a", torch.ones(2, 3, dtype=torch.float16))
    w.write("a", torch.ones(2, 3, dtype=torch.float16, requires_grad=True), rewrite=True)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) were never written.*: b"):
        w.close()
    with pytest.raises(CheckpointError, match="closed"):
        w.write("b", torch.tensor(1))
    with pytest.raises(InputError, match="dtype torch.complex64"):
        TensorSpec("c", (2,), torch.complex64)
    with pytest.raises(InputError, match="more than once"):
        ShardLayout.plan([TensorSpec("a", (1,), torch.int8)] * 2, 10)
    bad = {"file": "model.safetensors", "tensors": [["a", "C64", [2]]]}
    with pytest.raises(CheckpointError, match="unreadable"):
        ShardLayout.from_json({**layout.to_json(), "shards": [bad]})
    with pytest.raises(CheckpointError, match="unreadable"):  # a path, not a file name in the folder
        ShardLayout.from_json({**layout.to_json(), "shards": [{**layout.to_json()["shards"][0], "file": "../x"}]})
    with pytest.raises(CheckpointError, match="unreadable"):  # awqkit < format 2 planned the record again
        ShardLayout.from_json({**layout.to_json(), "format": 1})
    with pytest.raises(InputError, match="no tensors"):
        ShardLayout.plan([], 10)
    w2 = ShardWriter(tmp_path, layout, resume=True)
    w2.mark_written(["a"])
    w2.write("b", torch.tensor(3))
    assert w2.close() == ["model.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], torch.ones(2, 3, dtype=torch.float16))


def test_short_pwrites_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    monkeypatch.setattr(S.os, "pwrite", lambda fd, data, off: real(fd, data[:3], off))
    tensors = {"x": _sample(torch.float32, (33,), 1), "y": _sample(torch.bfloat16, (5,), 2)}
    _write(tmp_path, tensors)
    assert all(_same_bits(load_file(str(tmp_path / "model.safetensors"))[k], t) for k, t in tensors.items())


def test_transformers_loads_a_tiny_llama_written_shard_by_shard(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    sd = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(tmp_path)
    names = _write(tmp_path, sd, 3000, order=list(sd)[::-1])
    assert len(names) > 2
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = model.state_dict()
    assert got.keys() == sd.keys() and all(_same_bits(got[k], v) for k, v in sd.items())
