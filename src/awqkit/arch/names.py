"""Module names: find, get and set submodules by full dotted name (``model.layers.0.mlp.down_proj``), and the one
way awqkit matches names against user patterns.

Name patterns (:func:`match_names`) are never substring matches: a pattern is either a ``re:REGEX``
that must *fullmatch* the full name, or a plain name that equals the full name or its trailing dotted
components (``down_proj`` and ``mlp.down_proj`` match ``model.layers.0.mlp.down_proj``, but ``proj`` and
``mlp.gate`` do not match ``...mlp.gate_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted ``name`` (``""`` is the model itself)."""
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(
            f"model has no submodule {name!r} ({exc}); list valid names with model.named_modules()"
        ) from None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``module``."""
    if not name:
        raise ValueError("cannot replace the root module; pass a dotted submodule name")
    parent_name, _, leaf = name.rpartition(".")
    parent = get_module(model, parent_name)
    if not hasattr(parent, leaf):
        raise ValueError(f"{parent_name or 'the model'} has no child {leaf!r}; cannot set {name!r}")
    setattr(parent, leaf, module)


def _compile(pattern: str) -> re.Pattern[str] | None:
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
    return _hit(name, pattern, _compile(pattern))


def match_names(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` (in their order) matched by at least one of ``patterns``."""
    if isinstance(patterns, str):
        raise ValueError(f"patterns must be a sequence of strings, not the string {patterns!r}")
    compiled = [(p, _compile(p)) for p in patterns]
    return [name for name in names if any(_hit(name, p, rx) for p, rx in compiled)]


__all__ = ["get_module", "match_names", "name_matches", "set_module"]
