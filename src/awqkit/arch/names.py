"""Module names: find, get and set submodules by full dotted name (``model.layers.0.mlp.down_proj``), and the one
way awqkit matches names against user patterns (:mod:`awqkit.patterns`, torch-free, re-exported here).

Name patterns (:func:`match_names`) are never substring matches: a pattern is either a ``re:REGEX``
that must *fullmatch* the full name, or a plain name that equals the full name or its trailing dotted
components (``down_proj`` and ``mlp.down_proj`` match ``model.layers.0.mlp.down_proj``, but ``proj`` and
``mlp.gate`` do not match ``...mlp.gate_proj``).
"""

from __future__ import annotations

from torch import nn

from awqkit.patterns import match_names, name_matches


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


__all__ = ["get_module", "match_names", "name_matches", "set_module"]
