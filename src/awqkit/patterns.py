"""Module-name patterns: the one way awqkit matches full dotted module names against user patterns.

A pattern is never a substring test: it is either a ``re:REGEX`` that must *fullmatch* the full name, or a
plain name that equals the full name or its trailing dotted components (``down_proj`` and ``mlp.down_proj``
match ``model.layers.0.mlp.down_proj``, but ``proj`` and ``mlp.gate`` do not match ``...mlp.gate_proj``).

Pure ``re`` (no torch), so :mod:`awqkit.config` validates and applies patterns without importing torch;
:mod:`awqkit.arch.names` re-exports these functions next to its module getters and setters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    """The compiled regex of a ``re:`` pattern (None for a plain name); ValueError naming a bad regex."""
    if not pattern.startswith("re:"):
        return None
    try:
        return re.compile(pattern[3:])
    except re.error as exc:
        raise ValueError(f"invalid regex in module pattern {pattern!r}: {exc}") from None


def _hit(name: str, pattern: str, rx: re.Pattern[str] | None) -> bool:
    if rx is not None:
        return rx.fullmatch(name) is not None
    return name == pattern or name.endswith("." + pattern)


def name_matches(name: str, pattern: str) -> bool:
    """True when full module ``name`` matches ``pattern`` (see the module docstring)."""
    return _hit(name, pattern, compile_pattern(pattern))


def match_names(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` (in their order) matched by at least one of ``patterns``."""
    if isinstance(patterns, str):
        raise ValueError(f"patterns must be a sequence of strings, not the string {patterns!r}")
    compiled = [(p, compile_pattern(p)) for p in patterns]
    return [name for name in names if any(_hit(name, p, rx) for p, rx in compiled)]


__all__ = ["compile_pattern", "match_names", "name_matches"]
