"""A float source model read from its safetensors shards one part at a time (issue 13: memory of one layer).

:class:`LazyModel` builds the transformers model from ``config.json`` with every parameter on the meta device
(:func:`awqkit.io.skeleton.empty_model`) and fills only what is needed when it is needed: the embeddings and
the final norm while the calibration inputs are captured, then one decoder layer at a time; a part is put back
on the meta device when it is done (:meth:`LazyModel.release`). Tensors are read with ``safe_open`` per file and
call, so no mapping of a shard stays open and the resident memory is the tensors in use, not the files.

It takes the dtype transformers' ``dtype="auto"`` would (the config's, else the first floating tensor's), so a
lazily read model computes exactly what :func:`awqkit.io.source.load_source` would load. GGUF, ``.bin`` and hub
sources have no shard index to read from and are loaded whole (:func:`lazy_or_none` returns None for them).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from awqkit.errors import CheckpointError
from awqkit.io import validate
from awqkit.io.skeleton import empty_model
from awqkit.nn import hf

logger = logging.getLogger(__name__)


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder (one file or an index and its shards), by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        files = validate.check_index(folder)
        if files is None:
            files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
        self.where: dict[str, str] = {}
        for fname in files:
            for key in validate.safetensors_keys(folder / fname):
                self.where[key] = fname

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The tensors ``names`` (each file opened once, and closed before returning)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.where[n]].append(n)
        out: dict[str, Tensor] = {}
        for fname, keys in by_file.items():
            with safe_open(str(self.folder / fname), framework="pt") as fh:
                for k in keys:
                    out[k] = fh.get_tensor(k)
        return out

    def iter_chunks(self, max_bytes: int = 64 << 20) -> Iterator[tuple[str, Tensor]]:
        """Every tensor as ``(name, rows)`` pieces of at most about ``max_bytes`` (for a scan that must hold
        neither the model nor its largest tensor: a shard stays mapped only while one piece is read)."""
        from safetensors import safe_open

        for name, fname in self.where.items():
            with safe_open(str(self.folder / fname), framework="pt") as fh:
                sl = fh.get_slice(name)
                shape = sl.get_shape()
            if not shape:
                with safe_open(str(self.folder / fname), framework="pt") as fh:
                    yield name, fh.get_tensor(name)
                continue
            row_bytes = max(1, _numel(shape[1:]) * _ELEMENT_BYTES.get(sl.get_dtype(), 8))
            step = max(1, max_bytes // row_bytes)
            for start in range(0, shape[0], step):
                with safe_open(str(self.folder / fname), framework="pt") as fh:
                    yield name, fh.get_slice(name)[start : start + step]

    def first_float_dtype(self) -> torch.dtype | None:
        from safetensors import safe_open

        for fname in dict.fromkeys(self.where.values()):
            with safe_open(str(self.folder / fname), framework="pt") as fh:
                for k in fh.keys():
                    dtype = fh.get_slice(k).get_dtype()
                    if dtype in ("F64", "F32", "F16", "BF16"):
                        return {
                            "F64": torch.float64,
                            "F32": torch.float32,
                            "F16": torch.float16,
                            "BF16": torch.bfloat16,
                        }[dtype]
        return None


_ELEMENT_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _config_dtype(config: Any) -> torch.dtype | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


class LazyModel:
    """The model of a safetensors folder, its parameters read on demand (see the module docstring).

    ``model``: the transformers model (parameters on meta until :meth:`load`). ``layers_prefix``: the dotted
    path of the decoder layers (``model.layers``).
    """

    def __init__(self, folder: Path, layers_prefix: str, *, trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig

        self.folder = folder
        self.reader = CheckpointReader(folder)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.dtype = _config_dtype(config) or self.reader.first_float_dtype() or torch.float32
        self.model = empty_model(config, self.dtype, trust_remote_code=trust_remote_code)
        self.layers_prefix = layers_prefix
        self.names = list(self.model.state_dict().keys())
        tied = self._tied_output_key()
        missing = [n for n in self.names if n not in self.reader and n != tied]
        if missing:
            raise CheckpointError(
                f"{folder}: the checkpoint lacks {len(missing)} tensors the model built from its "
                f"config has ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})"
            )

    def _tied_output_key(self) -> str | None:
        config = hf.config(self.model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else None
        if not getattr(text or config, "tie_word_embeddings", False):
            return None
        out = hf.output_embeddings(self.model)
        return next((f"{n}.weight" for n, m in self.model.named_modules() if m is out), None)

    def names_under(self, prefix: str) -> list[str]:
        """State-dict names at or below ``prefix`` (``""``: all), in state-dict order."""
        return [n for n in self.names if not prefix or n == prefix or n.startswith(prefix + ".")]

    def load(self, names: list[str]) -> None:
        """Read the tensors ``names`` into the model (stored dtype, CPU)."""
        tied = self._tied_output_key()
        wanted = [n for n in names if n != tied]
        for name, t in self.reader.read(wanted).items():
            _assign(self.model, name, t.to(self.dtype) if t.is_floating_point() else t)

    def load_outside_layers(self) -> None:
        """Everything but the decoder layers and the output head: what runs to capture the layers' inputs."""
        head = self._output_head_prefix()
        self.load(
            [
                n
                for n in self.names
                if not n.startswith(self.layers_prefix + ".") and not (head and n.startswith(head + "."))
            ]
        )

    def _output_head_prefix(self) -> str | None:
        out = hf.output_embeddings(self.model)
        return next((n for n, m in self.model.named_modules() if m is out), None)

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The tensors ``names`` as the model holds them: from the model when loaded, else from the checkpoint
        (stored dtype); the tied output head reads the input embedding."""
        state = self.model.state_dict()
        tied = self._tied_output_key()
        out: dict[str, Tensor] = {}
        for name in names:
            t = state.get(name)
            if t is None or t.is_meta:
                key = self._input_embedding_key() if name == tied else name
                t = self.reader.read([key])[key]
                t = t.to(self.dtype) if t.is_floating_point() else t
            out[name] = t
        return out

    def _input_embedding_key(self) -> str:
        inp = hf.input_embeddings(self.model)
        return next(f"{n}.weight" for n, m in self.model.named_modules() if m is inp)

    def release_outside_layers(self) -> None:
        """Put what :meth:`load_outside_layers` read back on the meta device."""
        for name in self.names:
            if not name.startswith(self.layers_prefix + "."):
                t = self.model.state_dict()[name]
                if not t.is_meta:
                    _assign(self.model, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _assign(model: nn.Module, name: str, t: Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf in parent._parameters:
        parent._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in parent._buffers:
        parent._buffers[leaf] = t
    else:
        raise CheckpointError(f"{name} is neither a parameter nor a buffer of {type(model).__name__}")


def lazy_or_none(folder: Path | None, layers_prefix: str, *, trust_remote_code: bool = False) -> LazyModel | None:
    """A :class:`LazyModel` of a local safetensors folder, or None when the source cannot be read lazily (GGUF,
    ``.bin`` or hub sources; checkpoints whose tensor names differ from the model's): it is then loaded whole."""
    if folder is None or not any(folder.glob("*.safetensors")):
        return None
    try:
        return LazyModel(folder, layers_prefix, trust_remote_code=trust_remote_code)
    except CheckpointError as exc:
        logger.info("reading %s whole instead of layer by layer: %s", folder, exc)
        return None


__all__ = ["CheckpointReader", "LazyModel", "lazy_or_none"]
