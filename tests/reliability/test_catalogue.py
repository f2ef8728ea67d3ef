"""docs/errors.md is well formed and every catalogued error is fed to awqkit by a reliability test."""

from __future__ import annotations

import re
from pathlib import Path

from errors_catalogue import entries

HERE = Path(__file__).resolve().parent


def test_catalogue_entries_are_complete() -> None:
    found = entries()
    assert len(found) >= 40, f"only {len(found)} catalogued errors"
    for e in found.values():
        assert e.cause and e.fix and e.message, e
        assert e.section, e


def test_every_entry_has_a_test() -> None:
    sources = "\n".join(p.read_text(encoding="utf-8") for p in HERE.glob("test_*.py") if p.name != Path(__file__).name)
    used = set(re.findall(r"[\"']([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+)[\"']", sources))
    untested = sorted(set(entries()) - used)
    assert not untested, f"catalogued errors with no reliability test: {untested}"
    unknown = sorted(i for i in used - set(entries()) if re.fullmatch(r"[A-Z]+-[A-Z0-9-]+", i) and "-" in i)
    assert not unknown, f"tests name errors docs/errors.md lacks: {unknown}"
