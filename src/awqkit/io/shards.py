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
``save_file`` of the same tensors. The assignment of tensors to shards, the file names and the index are those
of :func:`awqkit.io.save._write_shards`, so this writer's output equals today's checkpoints byte for byte.

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
INDEX = "model.safetensors.index.json"
LAYOUT_FORMAT = 1
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

    ``shards`` holds the specs of each file in the order they were given; ``metadata`` is the
    ``__metadata__`` pairs (None: no ``__metadata__`` entry)."""

    shards: tuple[tuple[TensorSpec, ...], ...]
    max_shard_bytes: int
    metadata: tuple[tuple[str, str], ...] | None = (("format", "pt"),)

    def __post_init__(self) -> None:
        names = [s.name for shard in self.shards for s in shard]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise InputError(f"tensor names {dup[:5]} appear more than once; each tensor is stored once")
        if self.max_shard_bytes <= 0:
            raise InputError(f"max_shard_bytes={self.max_shard_bytes} must be positive")
        if self.metadata is not None and not all(isinstance(x, str) for kv in self.metadata for x in kv):
            raise InputError("safetensors metadata holds only str keys and str values; convert them to str")
        for fname in self.files():
            if len(self._headers[fname]) - 8 > _MAX_HEADER:
                raise InputError(f"the header of {fname} exceeds {_MAX_HEADER} bytes; use smaller shards")

    @classmethod
    def plan(
        cls, specs: Sequence[TensorSpec], max_shard_bytes: int, metadata: Mapping[str, str] | None = PT_METADATA
    ) -> ShardLayout:
        """Assign ``specs``, in order, to consecutive shards of at most ``max_shard_bytes`` bytes of data; a
        tensor larger than that gets a shard of its own (as :func:`awqkit.io.save._write_shards` does)."""
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        meta = None if metadata is None else tuple((k, v) for k, v in metadata.items())
        return cls(tuple(tuple(s) for s in shards), max_shard_bytes, meta)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record of this layout (for a progress file); :meth:`from_json` rebuilds it."""
        return {
            "format": LAYOUT_FORMAT,
            "max_shard_bytes": self.max_shard_bytes,
            "metadata": None if self.metadata is None else dict(self.metadata),
            "tensors": [[s.name, _NAMES[s.dtype], list(s.shape)] for shard in self.shards for s in shard],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardLayout:
        """The layout :meth:`to_json` recorded; CheckpointError when ``data`` is not such a record."""
        try:
            if data["format"] != LAYOUT_FORMAT:
                raise ValueError(f"format {data['format']!r}")
            specs = [TensorSpec(name, tuple(shape), DTYPES[dt]) for name, dt, shape in data["tensors"]]
            return cls.plan(specs, int(data["max_shard_bytes"]), data["metadata"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the recorded shard layout is unreadable ({exc!r}); start the run afresh") from None

    def files(self) -> list[str]:
        """The shard file names: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
        n = len(self.shards)
        return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

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
        return dict(sorted((s.name, f) for f, shard in zip(self.files(), self.shards, strict=True) for s in shard))

    @property
    def total_size(self) -> int:
        """Bytes of all tensors' data (the index's ``metadata.total_size``)."""
        return sum(s.nbytes for shard in self.shards for s in shard)

    def index_text(self) -> str:
        """``model.safetensors.index.json``'s text (written only when there are several shards)."""
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map()}
        return json.dumps(index, indent=2) + "\n"

    @cached_property
    def _places(self) -> dict[str, tuple[TensorSpec, str, int]]:
        """``{name: (spec, file, absolute byte offset of its data)}``."""
        return {
            s.name: (s, f, len(self._headers[f]) + begin)
            for f, shard in zip(self.files(), self.shards, strict=True)
            for s, begin in _offsets(shard)
        }

    @cached_property
    def _headers(self) -> dict[str, bytes]:
        """``{file: its first 8 + N bytes}`` (length prefix and padded header)."""
        out = {}
        for fname, shard in zip(self.files(), self.shards, strict=True):
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
        return len(self._headers[fname]) + sum(s.nbytes for s in self.shards[self.files().index(fname)])


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


__all__ = ["DTYPES", "INDEX", "PT_METADATA", "ShardLayout", "ShardWriter", "TensorSpec"]
