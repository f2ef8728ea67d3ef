"""A streaming safetensors shard writer: files written tensor by tensor, in any order, resumable after a crash.

Why hand-written: ``safetensors.torch.save_file`` (the library's only writer) takes every tensor of a file at
once, so a 2 GB shard costs 2 GB of memory, and it cannot continue a half-written file. The engine finishes one
decoder layer at a time and must write it out and drop it, and a killed run must continue where it stopped.
Everything else is the library's: its readers load these files, and the bytes are the reference writer's.

File format (safetensors, as the reference writer of safetensors 0.8 produces it, checked by the tests):

* bytes ``0..8``: ``N``, the header length, unsigned 64-bit little-endian;
* bytes ``8..8+N``: the header, compact UTF-8 JSON (no spaces, non-ASCII unescaped)
  ``{"__metadata__":{"format":"pt"},"<name>":{"dtype":"F16","shape":[4,8],"data_offsets":[begin,end]},...}``
  right-padded with spaces so that ``N % 8 == 0`` and the data section starts 8-byte aligned;
  ``__metadata__`` (string values only) comes first and is left out when the layout's metadata is None;
* bytes ``8+N..``: the data section, each tensor's elements in row-major order, little-endian, at
  ``[begin, end)`` relative to the data section's start. The ranges tile it with no gap and no overlap (the
  reader refuses anything else), an empty tensor has ``begin == end``, a scalar has ``shape == []``.

Tensors in a file are ordered as the reference orders them: by dtype, widest first (I64, F64, F32, I32, BF16,
F16, I16, I8, U8, BOOL), then by name. Since element sizes only shrink along that order every tensor starts at
a multiple of its element size (the given order would put an F32 after an odd-length I8 at a misaligned
address, which the reader accepts but hands out misaligned tensors), and each shard is byte-identical to
``save_file`` of the same tensors.

Which tensor goes into which file and the file names are huggingface_hub's: its planner
``split_state_dict_into_shards_factory`` (behind ``split_torch_state_dict_into_shards`` and transformers'
``save_pretrained``) runs on the :class:`TensorSpec` records, so the engine plans the output before any tensor
exists, and the index is the one transformers writes. A layout records its assignment (:meth:`ShardLayout.to_json`),
so a run resumed after a huggingface_hub upgrade that plans otherwise sees another layout and starts afresh.

:class:`ShardWriter` creates each file with its header at its final size (sparse: a full disk shows on a
write, not at creation), then ``pwrite``s each tensor at its place. A file does not record which of its regions
were written, so the caller keeps that record (the engine: its progress file) and tells a resumed writer
through :meth:`ShardWriter.mark_written`. Hosts are little-endian (big-endian ones are refused).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from huggingface_hub import constants, split_state_dict_into_shards_factory
from torch import Tensor

from awqkit.errors import CheckpointError, EnvironmentProblem, InputError
from awqkit.files import write_atomic

#: safetensors dtype names, in the reference writer's order within a file (widest first).
DTYPES: dict[str, torch.dtype] = {
    "I64": torch.int64,
    "F64": torch.float64,
    "F32": torch.float32,
    "I32": torch.int32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_RANK = {k: i for i, k in enumerate(DTYPES)}
PT_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})
INDEX = constants.SAFETENSORS_INDEX_FILE  # "model.safetensors.index.json"
FILENAME_PATTERN = constants.SAFETENSORS_WEIGHTS_FILE_PATTERN  # "model{suffix}.safetensors", as transformers names them
LAYOUT_FORMAT = 2  # 2: the record holds each file's tensors (1 held the tensors only and planned them again)
_MAX_HEADER = 100_000_000  # the reader refuses longer headers


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape (``()`` for a scalar) and torch dtype (one of :data:`DTYPES`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not isinstance(self.name, str) or not self.name or self.name == "__metadata__":
            raise InputError(f"tensor name {self.name!r} cannot be stored in safetensors; use a non-empty str")
        if self.dtype not in _NAMES:
            raise InputError(
                f"tensor {self.name} has dtype {self.dtype}, which this writer does not store; "
                f"convert it to one of {', '.join(str(d) for d in DTYPES.values())}"
            )
        if any(d < 0 for d in self.shape):
            raise InputError(f"tensor {self.name} has a negative dimension in shape {list(self.shape)}")

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> TensorSpec:
        """The spec of ``tensor`` stored under ``name``."""
        return cls(name, tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data (0 for an empty tensor)."""
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ShardLayout:
    """Which tensors go into which file, and where: build it with :meth:`plan`.

    ``shards`` holds the specs of each file in the order huggingface_hub assigned them, ``file_names`` the name
    of each file; ``metadata`` is the ``__metadata__`` pairs (None: no ``__metadata__`` entry)."""

    shards: tuple[tuple[TensorSpec, ...], ...]
    file_names: tuple[str, ...]
    max_shard_bytes: int
    metadata: tuple[tuple[str, str], ...] | None = (("format", "pt"),)

    def __post_init__(self) -> None:
        _check_unique([s.name for shard in self.shards for s in shard])
        if self.max_shard_bytes <= 0:
            raise InputError(f"max_shard_bytes={self.max_shard_bytes} must be positive")
        files = self.file_names
        if len(files) != len(self.shards) or len(set(files)) != len(files) or not files:
            raise InputError(f"{len(self.shards)} shard(s) need as many distinct file names, got {list(files)}")
        if any(not isinstance(f, str) or Path(f).name != f or not f.endswith(".safetensors") for f in files):
            raise InputError(f"shard file names {list(files)} must be plain *.safetensors names")
        if self.metadata is not None and not all(isinstance(x, str) for kv in self.metadata for x in kv):
            raise InputError("safetensors metadata holds only str keys and str values; convert them to str")
        for fname in files:
            if len(self._headers[fname]) - 8 > _MAX_HEADER:
                raise InputError(f"the header of {fname} exceeds {_MAX_HEADER} bytes; use smaller shards")

    @classmethod
    def plan(
        cls, specs: Sequence[TensorSpec], max_shard_bytes: int, metadata: Mapping[str, str] | None = PT_METADATA
    ) -> ShardLayout:
        """Shard ``specs`` as huggingface_hub shards a state dict of these tensors in this order (see the module
        docstring): consecutive runs of at most ``max_shard_bytes`` bytes of data, a tensor larger than that in a
        file of its own."""
        _check_unique([s.name for s in specs])  # before the dict below would merge them
        if not specs:
            raise InputError("there are no tensors to write; a checkpoint holds at least one")
        if max_shard_bytes <= 0:
            raise InputError(f"max_shard_bytes={max_shard_bytes} must be positive")
        by_name = {s.name: s for s in specs}
        split = split_state_dict_into_shards_factory(
            by_name,
            get_storage_size=lambda s: s.nbytes,  # specs own no storage: no get_storage_id, none is shared
            filename_pattern=FILENAME_PATTERN,
            max_shard_size=max_shard_bytes,
        )
        shards = tuple(tuple(by_name[n] for n in keys) for keys in split.filename_to_tensors.values())
        meta = None if metadata is None else tuple((k, v) for k, v in metadata.items())
        return cls(shards, tuple(split.filename_to_tensors), max_shard_bytes, meta)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record of this layout (for a progress file); :meth:`from_json` rebuilds it."""
        return {
            "format": LAYOUT_FORMAT,
            "max_shard_bytes": self.max_shard_bytes,
            "metadata": None if self.metadata is None else dict(self.metadata),
            "shards": [
                {"file": f, "tensors": [[s.name, _NAMES[s.dtype], list(s.shape)] for s in shard]}
                for f, shard in zip(self.file_names, self.shards, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardLayout:
        """The layout :meth:`to_json` recorded, as recorded (not planned again: the files were created for it);
        CheckpointError when ``data`` is not such a record."""
        try:
            if data["format"] != LAYOUT_FORMAT:
                raise ValueError(f"format {data['format']!r}")
            shards = tuple(
                tuple(TensorSpec(name, tuple(shape), DTYPES[dt]) for name, dt, shape in shard["tensors"])
                for shard in data["shards"]
            )
            files = tuple(shard["file"] for shard in data["shards"])
            meta = data["metadata"]
            metadata = None if meta is None else tuple((k, v) for k, v in meta.items())
            return cls(shards, files, int(data["max_shard_bytes"]), metadata)
        except (AttributeError, KeyError, TypeError, ValueError, InputError) as exc:
            raise CheckpointError(f"the recorded shard layout is unreadable ({exc!r}); start the run afresh") from None

    def files(self) -> list[str]:
        """The shard file names: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
        return list(self.file_names)

    def spec(self, name: str) -> TensorSpec:
        """The spec of tensor ``name``; InputError when the layout does not hold it."""
        place = self._places.get(name)
        if place is None:
            raise InputError(
                f"tensor {name} is not in the shard layout; it holds {len(self._places)} tensors planned before writing"
            )
        return place[0]

    def weight_map(self) -> dict[str, str]:
        """``{tensor name: file name}``, sorted by tensor name (the index's ``weight_map``)."""
        return dict(sorted((s.name, f) for f, shard in zip(self.file_names, self.shards, strict=True) for s in shard))

    @property
    def total_size(self) -> int:
        """Bytes of all tensors' data (the index's ``metadata.total_size``)."""
        return sum(s.nbytes for shard in self.shards for s in shard)

    def index_text(self) -> str:
        """``model.safetensors.index.json``'s text (written only when there are several shards), as transformers'
        ``save_pretrained`` writes it from huggingface_hub's split (its ``total_parameters`` left out: the packed
        buffers' element count is no parameter count). Hand-written because huggingface_hub writes the index only
        inside ``save_torch_state_dict``, which needs every tensor in memory at once."""
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map()}
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    @cached_property
    def _places(self) -> dict[str, tuple[TensorSpec, str, int]]:
        """``{name: (spec, file, absolute byte offset of its data)}``."""
        return {
            s.name: (s, f, len(self._headers[f]) + begin)
            for f, shard in zip(self.file_names, self.shards, strict=True)
            for s, begin in _offsets(shard)
        }

    @cached_property
    def _headers(self) -> dict[str, bytes]:
        """``{file: its first 8 + N bytes}`` (length prefix and padded header)."""
        out = {}
        for fname, shard in zip(self.file_names, self.shards, strict=True):
            head: dict[str, Any] = {} if self.metadata is None else {"__metadata__": dict(self.metadata)}
            for s, begin in _offsets(shard):
                head[s.name] = {
                    "dtype": _NAMES[s.dtype],
                    "shape": list(s.shape),
                    "data_offsets": [begin, begin + s.nbytes],
                }
            text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            text += b" " * (-len(text) % 8)
            out[fname] = len(text).to_bytes(8, "little") + text
        return out

    def _file_size(self, fname: str) -> int:
        return len(self._headers[fname]) + sum(s.nbytes for s in self.shards[self.file_names.index(fname)])


def _check_unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"tensor names {dup[:5]} appear more than once; each tensor is stored once")


def _offsets(shard: Iterable[TensorSpec]) -> list[tuple[TensorSpec, int]]:
    """The specs of one file in the reference's order, each with its ``begin`` in the data section."""
    out, pos = [], 0
    for s in sorted(shard, key=lambda s: (_RANK[_NAMES[s.dtype]], s.name)):
        out.append((s, pos))
        pos += s.nbytes
    return out


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (one ``pwrite`` moves at most ~2 GiB on Linux)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class ShardWriter:
    """Writes the files of ``layout`` into ``folder`` one tensor at a time, in any order.

    ``resume=False`` creates (or truncates) every file with its header at its final size; ``resume=True``
    reopens the files a previous writer of an equal layout created (CheckpointError when one is missing, has
    another header or another size). A resumed writer knows nothing written: call :meth:`mark_written` with the
    tensors the caller recorded as finished, then :meth:`write` the rest (the tensors of a layer that was
    being written at the crash are not recorded, so they are simply written again). Use it as a context
    manager or call :meth:`close`; leaving on an exception closes the files without the completeness check.
    """

    def __init__(self, folder: str | Path, layout: ShardLayout, *, resume: bool = False) -> None:
        if sys.byteorder != "little":
            raise EnvironmentProblem("safetensors data is little-endian; this writer runs on little-endian hosts")
        self.folder = Path(folder)
        self.layout = layout
        self._written: set[str] = set()
        self._fds: dict[str, int] = {}
        try:
            for fname in layout.files():
                (self._reopen if resume else self._create)(fname)
        except BaseException:
            self._release()
            raise

    def _create(self, fname: str) -> None:
        fd = os.open(self.folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._fds[fname] = fd
        _pwrite(fd, memoryview(self.layout._headers[fname]), 0)
        os.ftruncate(fd, self.layout._file_size(fname))

    def _reopen(self, fname: str) -> None:
        path = self.folder / fname
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {path} is missing; start the run afresh")
        fd = os.open(path, os.O_RDWR)
        self._fds[fname] = fd
        want = self.layout._headers[fname]
        if os.pread(fd, len(want), 0) != want or os.fstat(fd).st_size != self.layout._file_size(fname):
            raise CheckpointError(
                f"cannot resume: {path} was written for another layout (its header or size "
                "differs: another model, dtype or max_shard_size); start the run afresh"
            )

    def write(self, name: str, tensor: Tensor, *, rewrite: bool = False) -> None:
        """Write ``tensor`` as ``name`` (any device, any strides; shape and dtype must equal the spec's).

        InputError for an unknown name, another shape or dtype, or a tensor written (or marked) before unless
        ``rewrite``."""
        fd = self._fd_of(name)
        spec, _, offset = self.layout._places[name]
        if name in self._written and not rewrite:
            raise InputError(f"tensor {name} was already written; pass rewrite=True to overwrite it")
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            found = f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
            raise InputError(f"tensor {name} is {found}, the layout expects {spec.dtype} {list(spec.shape)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            _pwrite(fd, flat.view(torch.uint8).numpy().data, offset)  # a view: no copy of the data
        self._written.add(name)

    def mark_written(self, names: Iterable[str]) -> None:
        """Record ``names`` as already in the files (a resumed writer: the tensors the caller recorded)."""
        names = list(names)
        for name in names:
            self._fd_of(name)
        self._written.update(names)

    def missing(self) -> list[TensorSpec]:
        """The specs not yet written (nor marked), in the layout's order."""
        return [s for shard in self.layout.shards for s in shard if s.name not in self._written]

    def flush(self) -> None:
        """fsync every file."""
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> list[str]:
        """Flush and close the files, then write the index when there are several shards; returns the names
        of the files written (shards, then the index). CheckpointError when a tensor was never written (the
        files are closed and stay as they are, for a resumed writer)."""
        if not self._fds:
            raise CheckpointError(f"the shard writer of {self.folder} is already closed")
        try:
            self.flush()
        finally:
            self._release()
        missing = [s.name for s in self.missing()]
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) were never written to {self.folder}: "
                f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}"
            )
        files = self.layout.files()
        if len(files) > 1:
            write_atomic(self.folder / INDEX, self.layout.index_text(), durable=True)
            files.append(INDEX)
        return files

    def _fd_of(self, name: str) -> int:
        self.layout.spec(name)
        fd = self._fds.get(self.layout._places[name][1])
        if fd is None:
            raise CheckpointError(f"the shard writer of {self.folder} is closed")
        return fd

    def _release(self) -> None:
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._release()

    def __del__(self) -> None:
        self._release()


__all__ = ["DTYPES", "FILENAME_PATTERN", "INDEX", "PT_METADATA", "ShardLayout", "ShardWriter", "TensorSpec"]
