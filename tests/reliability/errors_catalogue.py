"""The error catalogue ``docs/errors.md`` as data, for the reliability tests.

Every test that feeds a catalogued input calls :func:`assert_error` (or :func:`expect`) with the entry's id,
so the message it checks is the one the documentation states, and ``test_catalogue.py`` can check that
every entry is exercised somewhere in ``tests/reliability``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CATALOGUE = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
_ENTRY = re.compile(r"^### `(?P<id>[A-Z0-9][A-Z0-9-]*)`\s*$")
_FIELD = re.compile(r"^- (?P<key>message|cause|fix): (?P<value>.+)$")


@dataclass(frozen=True)
class Entry:
    id: str
    message: str  # a regular expression
    cause: str
    fix: str
    section: str


@lru_cache(maxsize=1)
def entries() -> dict[str, Entry]:
    """``{id: Entry}`` of every entry of ``docs/errors.md`` (ValueError on a malformed entry)."""
    out: dict[str, Entry] = {}
    section, current, fields = "", None, {}

    def close() -> None:
        if current is None:
            return
        missing = {"message", "cause", "fix"} - set(fields)
        if missing:
            raise ValueError(f"docs/errors.md entry {current} lacks {sorted(missing)}")
        msg = fields["message"]
        if not (msg.startswith("`") and msg.endswith("`")):
            raise ValueError(f"docs/errors.md entry {current}: the message must be one `regex` in backticks")
        re.compile(msg[1:-1])
        if current in out:
            raise ValueError(f"docs/errors.md entry {current} appears twice")
        out[current] = Entry(current, msg[1:-1], fields["cause"], fields["fix"], section)

    text = re.sub(r"<!--.*?-->", "", CATALOGUE.read_text(encoding="utf-8"), flags=re.DOTALL)  # format notes
    for line in text.splitlines():
        if line.startswith("## "):
            close()
            current, fields, section = None, {}, line[3:].strip()
        elif m := _ENTRY.match(line):
            close()
            current, fields = m.group("id"), {}
        elif current is not None and (f := _FIELD.match(line)):
            fields[f.group("key")] = f.group("value").strip()
    close()
    return out


def expect(error_id: str) -> str:
    """The message regex of catalogue entry ``error_id`` (KeyError naming the id when it is not catalogued)."""
    try:
        return entries()[error_id].message
    except KeyError:
        raise KeyError(f"{error_id} is not in docs/errors.md; add an entry for it") from None


def assert_error(error_id: str, text: str) -> None:
    """``text`` (an exception message or a command's stderr) matches catalogue entry ``error_id``."""
    pattern = expect(error_id)
    assert re.search(pattern, text, re.DOTALL), f"{error_id}: {pattern!r} not found in:\n{text}"
