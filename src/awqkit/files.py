"""Files: content hashes and atomic writes, the one implementation of each (every other module calls these).

Hashes (hex sha256, read in 4 MiB chunks):

* :func:`sha256_file`: one file's bytes.
* :func:`sha256_named_files`: several files sorted by name, each hashed as its name then its bytes (the source
  weights' hash: renaming a shard changes it, the order of the list does not).
* :func:`sha256_tree`: a file's bytes, or a folder's files sorted by relative path, each as its POSIX relative
  path, a NUL byte, then its bytes (a calibration data set given as a folder).

Writes: :func:`write_atomic` and :func:`write_json_atomic` write a temporary file in the target's folder and
``os.replace`` it over the target, so a reader sees the old file or the new one, never a part; the temporary file
is removed if anything fails. The file gets the target's current permissions, else ``0o666`` less the umask (what
``open`` gives a new file). ``durable=True`` also fsyncs the data before the rename (state a killed run resumes
from).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 22


def _update(h: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def sha256_named_files(paths: Iterable[str | Path]) -> str:
    """Hex sha256 over files sorted by name, each as its name (UTF-8) then its bytes."""
    h = hashlib.sha256()
    for p in sorted((Path(x) for x in paths), key=lambda x: x.name):
        h.update(p.name.encode())
        _update(h, p)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, or of a folder's files (sorted; each its relative path, NUL, its bytes)."""
    root = Path(path)
    h = hashlib.sha256()
    if root.is_file():
        _update(h, root)
        return h.hexdigest()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        _update(h, p)
    return h.hexdigest()


def _new_file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def partial_files(path: str | Path) -> list[Path]:
    """Temporary files a :func:`write_atomic` of ``path`` that was killed left behind (``.NAME.*.part`` beside it)."""
    target = Path(path)
    return sorted(target.parent.glob(f".{target.name}.*.part"))


def write_atomic(path: str | Path, data: str | bytes, *, durable: bool = False) -> None:
    """Write ``data`` (text as UTF-8, newlines as given) to ``path`` through a temporary sibling and a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2, durable: bool = False) -> None:
    """``data`` as JSON (``default=str`` for paths and the like; a final newline) through :func:`write_atomic`."""
    write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n", durable=durable)


__all__ = ["partial_files", "sha256_file", "sha256_named_files", "sha256_tree", "write_atomic", "write_json_atomic"]
