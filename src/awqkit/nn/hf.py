"""Typed access to the Hugging Face model API on models awqkit holds as ``nn.Module``.

awqkit passes models around as ``nn.Module`` (any transformers causal LM, or a small stand-in in the tests) and
calls transformers' ``PreTrainedModel`` / ``GenerationMixin`` methods on them. ``nn.Module.__getattr__`` types
every attribute a class does not declare as ``Tensor | Module``, so a type checker cannot call
``model.get_input_embeddings()`` or read ``model.config`` on an ``nn.Module``. These functions make exactly
those calls and state what transformers returns; they check nothing (a model without the method raises
AttributeError, as the direct call did), except :func:`weight`, which says so when a module's ``weight`` is not a
tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel


def config(model: nn.Module) -> Any:
    """``model.config``: a ``PretrainedConfig``, whose fields depend on the architecture (hence ``Any``)."""
    return cast("PreTrainedModel", model).config


def input_embeddings(model: nn.Module) -> nn.Module:
    """``model.get_input_embeddings()``."""
    return cast("PreTrainedModel", model).get_input_embeddings()


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` (None for a model without an LM head)."""
    head: nn.Module | None = cast("PreTrainedModel", model).get_output_embeddings()
    return head


def weight(module: nn.Module) -> Tensor:
    """``module.weight`` of an embedding or linear layer; TypeError when it is not a tensor."""
    w = module.weight
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__}.weight is {type(w).__name__}, not a tensor")
    return w


def generate(model: nn.Module, **kwargs: Any) -> Tensor:
    """``model.generate(**kwargs)`` as the token ids ``[B, prompt + new]``: what it returns unless
    ``return_dict_in_generate`` is set, which awqkit's callers do not ask for."""
    return cast(Tensor, cast("GenerationMixin", model).generate(**kwargs))


__all__ = ["config", "generate", "input_embeddings", "output_embeddings", "weight"]
