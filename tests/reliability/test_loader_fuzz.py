"""Fuzz ``load_quantized`` with damaged copies of one valid checkpoint (hypothesis, bounded and reproducible).

The base is a tiny RTN w4 g32 checkpoint (2-layer Llama, hidden 64), written once per module. Each example
copies it and mutates ``config.json`` (dropped or retyped keys, also in ``quantization_config``; garbage or
truncated files), the safetensors header (dtypes, shapes, data offsets, header length, garbage, a file cut
short), or the tensors themselves (NaN/Inf, wrong dtypes, dropped or extra tensors). Property: the load
either fails with a one-line :class:`awqkit.errors.AwqkitError`, or succeeds and the logits on a fixed
input are finite -- and equal to the unmutated checkpoint's when the mutation was a no-op. Never another
exception type, a crash, or silent NaN. A config edit that loads must give the unmutated logits: every key
mutated here either changes the shape some tensor must have or does not change the model, so a load with
other logits would be a wrong model built silently. A 3-bit compressed-tensors copy gets the same treatment
for its config group (``num_bits``, ``strategy``, ``group_size``, ...). Both backends (``torch``, ``auto``).

Bounded: ``derandomize=True`` (the same examples on every run, no example database) and ``max_examples``
sized so the whole module runs in under ten seconds on a 2-core CPU (``pytest --hypothesis-show-statistics``
lists how the examples ended).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_tiny_llama
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from awqkit.errors import AwqkitError
from awqkit.io.load import load_quantized

FILES = ("config.json", "model.safetensors", "quantization_metadata.json")
BACKENDS = ("torch", "auto")
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 250, 17, 64, 8, 2]])
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "tie_word_embeddings",
)
QUANT_KEYS = ("group_size", "bits", "zero_point", "version", "quant_method", "modules_to_not_convert", "w_bit")
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 64, 128, -1, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "gemm",
            "GEMM",
            "gemv",
            "awq",
            "gptq",
            "compressed-tensors",
            "LlamaForCausalLM",
            "float32",
            "int8",
            "llama",
            "mistral",
            "bert",
            "",
            "64",
        ]
    ),
    st.text(max_size=6),
    st.lists(st.integers(-1, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "bits"]), st.integers(0, 9), max_size=2),
)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The valid checkpoint, its parsed header and tensors, and the reference logits of each backend."""
    from awqkit.api import quantize
    from awqkit.config import QuantConfig

    root = tmp_path_factory.mktemp("loader_fuzz")
    src = save_tiny_llama(root / "src")
    dst = root / "q"
    quantize(src, dst, method="rtn", quant=QuantConfig(bits=4, group_size=32), progress=False)
    blob = (dst / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    quantize(src, root / "ct", method="rtn", quant=QuantConfig(bits=3, group_size=32), progress=False)
    return {
        "root": root,
        "folder": dst,
        "config": json.loads((dst / "config.json").read_text()),
        "blob": blob,
        "header": json.loads(blob[8 : 8 + n]),
        "data": blob[8 + n :],
        "tensors": load_file(str(dst / "model.safetensors")),
        "ref": {b: _logits(load_quantized(dst, backend=b)) for b in BACKENDS},
        "ct": root / "ct",
        "ct_ref": _logits(load_quantized(root / "ct", backend="torch")),
    }


def _check(
    base: dict[str, Any], mutate: Callable[[Path], None], backend: str, noop: bool | None, source: str = "folder"
) -> None:
    """Copy the base (``source``: its GEMM ``folder`` or the 3-bit ``ct`` one), apply ``mutate`` to the copy,
    load it; the property of the module docstring. ``noop``: True = must load unchanged, None = may be refused
    but if it loads the logits must be the unmutated ones (config edits: every key mutated here either
    changes a tensor's expected shape or does not change the model), False = may load with other logits."""
    with tempfile.TemporaryDirectory(dir=base["root"]) as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        for name in FILES:
            shutil.copy(base[source] / name, folder / name)
        mutate(folder)
        try:
            model = load_quantized(folder, backend=backend)
        except AwqkitError as exc:
            text = str(exc)
            assert text and "\n" not in text, f"not a one-line message: {text!r}"
            assert noop is not True, f"a no-op mutation was refused: {text}"
            _event(f"refused: {type(exc).__name__}: {_family(text)}")
            return
        logits = _logits(model)
        assert bool(torch.isfinite(logits).all()), "the load succeeded but the logits hold NaN/Inf"
        if noop is not False:
            ref = base["ref"][backend] if source == "folder" else base["ct_ref"]
            assert torch.equal(logits, ref), "the load succeeded with other logits than the unmutated checkpoint's"
        _event("loaded" + (" (no-op)" if noop else ""))


def _event(text: str) -> None:
    """Count outcomes for ``pytest --hypothesis-show-statistics`` (outside hypothesis: nothing)."""
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        event(text)


def _family(text: str) -> str:
    """The message with paths and numbers dropped, for the statistics."""
    import re

    words = [w for w in re.sub(r"\S*/\S*|\d+", "#", text).split() if w != "#"]
    return " ".join(words[:6])


# --------------------------------------------------------------------------- config.json
def _set_path(cfg: dict[str, Any], key: str, value: Any, drop: bool) -> None:
    holder = cfg
    if key.startswith("q."):
        holder = cfg.get("quantization_config")
        if not isinstance(holder, dict):
            return
        key = key[2:]
    if drop:
        holder.pop(key, None)
    else:
        holder[key] = value


CONFIG_OPS = st.lists(
    st.tuples(st.sampled_from(CONFIG_KEYS + tuple(f"q.{k}" for k in QUANT_KEYS)), VALUES, st.booleans()),
    min_size=1,
    max_size=3,
)
RAW_CONFIG = st.one_of(st.binary(max_size=40), st.sampled_from([b"[]", b"null", b"3", b'"x"', b"{}", b""]))


@FUZZ
@given(
    ops=CONFIG_OPS,
    raw=st.one_of(st.none(), RAW_CONFIG),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
    backend=st.sampled_from(BACKENDS),
)
def test_config_mutations(
    base: dict[str, Any], ops: list[tuple[str, Any, bool]], raw: bytes | None, cut: int | None, backend: str
) -> None:
    def mutate(folder: Path) -> None:
        cfg = json.loads(json.dumps(base["config"]))
        for key, value, drop in ops:
            _set_path(cfg, key, value, drop)
        text = json.dumps(cfg).encode()
        if raw is not None:
            text = raw
        elif cut is not None:
            text = text[:cut]
        (folder / "config.json").write_bytes(text)

    _check(base, mutate, backend, noop=None)


CT_WEIGHT_KEYS = ("num_bits", "group_size", "strategy", "symmetric", "type", "actorder")
CT_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            CT_WEIGHT_KEYS + ("format", "quantization_status", "config_groups", "ignore", "input_activations")
        ),
        st.one_of(
            VALUES,
            st.sampled_from(["group", "channel", "tensor", "int", "float", "pack-quantized", "compressed", "frozen"]),
        ),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
)


@settings(FUZZ, max_examples=120)
@given(ops=CT_OPS)
def test_compressed_tensors_config_mutations(base: dict[str, Any], ops: list[tuple[str, Any, bool]]) -> None:
    """The 3-bit compressed-tensors checkpoint with its config group's keys dropped or retyped."""

    def mutate(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        qc = cfg["quantization_config"]
        for key, value, drop in ops:
            holder: Any = qc
            if key in CT_WEIGHT_KEYS or key == "input_activations":
                groups = qc.get("config_groups")
                holder = groups.get("group_0") if isinstance(groups, dict) else None
            if key in CT_WEIGHT_KEYS and isinstance(holder, dict):
                holder = holder.get("weights")
            if not isinstance(holder, dict):
                continue
            if drop:
                holder.pop(key, None)
            else:
                holder[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))

    _check(base, mutate, "torch", noop=None, source="ct")


def test_config_noops_load_unchanged(base: dict[str, Any]) -> None:
    """Changes that do not change the model: architectures spelled otherwise for the same model_type,
    AutoAWQ's key names, an uppercase version, transformers' extra keys."""
    edits: list[Callable[[dict[str, Any]], None]] = [
        lambda c: c.update(architectures=["SomethingElseForCausalLM"]),
        lambda c: c["quantization_config"].update(version="GEMM"),
        lambda c: c.update(
            quantization_config={
                "quant_method": "awq",
                "w_bit": 4,
                "q_group_size": 32,
                "zero_point": True,
                "version": "gemm",
            }
        ),
        lambda c: c.update(unrelated_key={"a": 1}),
    ]
    for edit in edits:

        def mutate(folder: Path, edit: Callable[[dict[str, Any]], None] = edit) -> None:
            cfg = json.loads(json.dumps(base["config"]))
            edit(cfg)
            (folder / "config.json").write_text(json.dumps(cfg))

        _check(base, mutate, "torch", noop=True)


# --------------------------------------------------------------------------- safetensors header
SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U32", "F8_E4M3", "X9"]
SAME_WIDTH = {"I32": ["F32", "U32"], "F16": ["BF16", "I16", "U16"], "F32": ["I32", "U32"], "I64": ["F64"]}


def _write_header(folder: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)


HEADER_OPS = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 10**6), st.sampled_from(SAFETENSORS_DTYPES)),
    st.tuples(st.just("shape"), st.integers(0, 10**6), st.lists(st.integers(0, 130), max_size=3)),
    st.tuples(st.just("same_width_dtype"), st.integers(0, 10**6), st.integers(0, 2)),
    st.tuples(st.just("transpose"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("flatten"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("offsets"), st.integers(0, 10**6), st.tuples(st.integers(-64, 64), st.integers(-64, 64))),
    st.tuples(st.just("hlen"), st.integers(0, 10**6), st.sampled_from([0, 1, 7, 8, -1, 10**9, 2**63])),
    st.tuples(st.just("garbage"), st.integers(0, 10**6), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("cut_header"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("cut_file"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("metadata"), st.integers(0, 10**6), st.sampled_from([5, "x", [1], {"format": 3}, None])),
)


@FUZZ
@given(op=HEADER_OPS, backend=st.sampled_from(BACKENDS))
def test_header_mutations(base: dict[str, Any], op: tuple[str, int, Any], backend: str) -> None:
    kind, pick, arg = op
    names = sorted(k for k in base["header"] if k != "__metadata__")
    name = names[pick % len(names)]

    def mutate(folder: Path) -> None:
        header = json.loads(json.dumps(base["header"]))
        entry = header[name]
        blob, data = base["blob"], base["data"]
        n = struct.unpack("<Q", blob[:8])[0]
        if kind == "dtype":
            entry["dtype"] = arg
        elif kind == "shape":
            entry["shape"] = arg
        elif kind == "same_width_dtype":
            choices = SAME_WIDTH.get(entry["dtype"], [entry["dtype"]])
            entry["dtype"] = choices[arg % len(choices)]
        elif kind == "transpose":
            entry["shape"] = entry["shape"][::-1]
        elif kind == "flatten":
            entry["shape"] = [math.prod(entry["shape"])]
        elif kind == "offsets":
            entry["data_offsets"] = [entry["data_offsets"][0] + arg[0], entry["data_offsets"][1] + arg[1]]
        elif kind == "metadata":
            header["__metadata__"] = arg
        if kind == "hlen":
            length = arg if arg >= 0 else len(blob)
            out = struct.pack("<Q", min(length, 2**64 - 1)) + blob[8:]
        elif kind == "garbage":
            start = 8 + pick % n
            out = blob[:start] + arg + blob[start + len(arg) :]
        elif kind == "cut_header":
            out = blob[: 8 + pick % n]
        elif kind == "cut_file":
            out = blob[: pick % len(blob)]
        else:
            _write_header(folder, header, data)
            return
        (folder / "model.safetensors").write_bytes(out)

    _check(base, mutate, backend, noop=kind == "transpose" and len(set(base["header"][name]["shape"])) <= 1)


# --------------------------------------------------------------------------- tensor contents
FLOAT_CASTS = [torch.float32, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int16, torch.uint8]
CONTENT_OPS = st.one_of(
    st.tuples(st.just("nonfinite"), st.integers(0, 10**6), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("cast"), st.integers(0, 10**6), st.sampled_from(FLOAT_CASTS)),
    st.tuples(st.just("drop"), st.integers(0, 10**6), st.none()),
    st.tuples(
        st.just("extra"),
        st.integers(0, 10**6),
        st.sampled_from(["model.extra.weight", "lm_head.bias", "model.layers.0.mlp.up_proj.bias"]),
    ),
    st.tuples(st.just("scales_fp32"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("identity"), st.integers(0, 10**6), st.none()),
)


@FUZZ
@given(op=CONTENT_OPS, backend=st.sampled_from(BACKENDS))
def test_tensor_mutations(base: dict[str, Any], op: tuple[str, int, Any], backend: str) -> None:
    kind, pick, arg = op
    tensors: dict[str, torch.Tensor] = dict(base["tensors"])
    names = sorted(tensors)
    floats = [k for k in names if tensors[k].is_floating_point()]
    name = (floats if kind == "nonfinite" else names)[pick % len(floats if kind == "nonfinite" else names)]
    noop = kind == "identity" or (kind == "scales_fp32" and backend == "torch")

    def mutate(folder: Path) -> None:
        if kind == "nonfinite":
            t = tensors[name].clone()
            t.view(-1)[pick % t.numel()] = arg
            tensors[name] = t
        elif kind == "cast":
            tensors[name] = tensors[name].to(arg)
        elif kind == "drop":
            del tensors[name]
        elif kind == "extra":
            tensors[arg] = torch.zeros(64, dtype=torch.float16)
        elif kind == "scales_fp32":
            tensors.update({k: v.float() for k, v in tensors.items() if k.endswith(".scales")})
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )

    _check(base, mutate, backend, noop=noop)
