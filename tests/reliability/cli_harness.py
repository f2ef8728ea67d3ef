"""Run the ``awqkit`` command in-process and check that it changed nothing it does not own."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from awqkit import cli


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run(*argv: str) -> Result:
    """``awqkit ARGV`` in this process: exit status, stdout and stderr (argparse's SystemExit included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code) if isinstance(exc.code, int) else 1
    return Result(rc, out.getvalue(), err.getvalue())


def tree_hash(path: Path) -> str:
    """sha256 over every file (relative name, mode bits and content) and folder name under ``path``; a file
    hashes its content; a missing path hashes to 'missing'."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "missing"
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(root, path)
        h.update(f"D {rel}\n".encode())
        for name in sorted(files):
            p = Path(root) / name
            h.update(f"F {rel}/{name} {p.stat().st_mode & 0o777}\n".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def one_line_error(result: Result, command: str) -> str:
    """The single ``awqkit <command>: error: ...`` line of ``result.err`` (asserts there is exactly one and no
    traceback)."""
    assert "Traceback" not in result.err, result.err
    lines = [ln for ln in result.err.splitlines() if ln.startswith(f"awqkit {command}: error: ")]
    assert len(lines) == 1, result.err
    return lines[0]
