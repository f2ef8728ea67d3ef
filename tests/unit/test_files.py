"""awqkit.files: the one hashing and atomic-write implementation (digests checked against hashlib by hand)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from awqkit import files


def test_hashes_follow_their_documented_recipes(tmp_path: Path) -> None:
    a, b = tmp_path / "b.bin", tmp_path / "a.bin"
    a.write_bytes(b"first" * 1000)
    b.write_bytes(b"second")
    assert files.sha256_file(a) == hashlib.sha256(b"first" * 1000).hexdigest()
    named = hashlib.sha256(b"a.bin" + b"second" + b"b.bin" + b"first" * 1000).hexdigest()
    assert files.sha256_named_files([a, b]) == files.sha256_named_files([b, a]) == named
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_bytes(b"x")
    tree = hashlib.sha256(b"a.bin\0second" + b"b.bin\0" + b"first" * 1000 + b"sub/c.txt\0x").hexdigest()
    assert files.sha256_tree(tmp_path) == tree
    assert files.sha256_tree(a) == files.sha256_file(a)


def test_atomic_writes_replace_whole_files_and_keep_permissions(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.json"
    files.write_json_atomic(target, {"a": Path("x")})
    assert json.loads(target.read_text()) == {"a": "x"} and target.read_text().endswith("\n")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    target.chmod(0o600)
    files.write_atomic(target, "text\n", durable=True)
    assert target.read_text() == "text\n" and target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "results.md"
    target.write_text("old")

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]
