"""A transformers model built from its config with every parameter on the meta device.

Both readers of checkpoints use it: :func:`awqkit.io.load.load_quantized` assigns the packed tensors into the
skeleton, and :class:`awqkit.io.lazy.LazyModel` fills one decoder layer at a time from the source's shards.
Buffers that are not in the state dict (rotary ``inv_freq``, Gemma's ``embed_scale``) are computed for real at
construction, as transformers computes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """While active, every registered ``nn.Parameter`` moves to the meta device (buffers stay real).
    Patches ``nn.Module.register_parameter`` process-wide: do not construct models concurrently."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def no_init() -> contextlib.AbstractContextManager:
    """transformers' ``no_init_weights`` (skips random initialisation), wherever this version keeps it."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def empty_model(config: Any, dtype: torch.dtype, *, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` in ``dtype`` with its parameters on meta, in eval mode."""
    from transformers import AutoModelForCausalLM

    with params_on_meta(), no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


__all__ = ["empty_model", "no_init", "params_on_meta"]
