"""Keep a model's (tied) LM head in float16 storage while computing in float32.

awqkit checkpoints store the LM head and embeddings in fp16 (``"lm_head": "fp16"`` in the metadata). On
CPU the loader widens every non-quantized weight to fp32 (no fast fp16 arithmetic there), which doubles
the largest single read of a decode step: SmolLM2-135M's tied 49152 x 576 head is 113 MB in fp32 against
57 MB in fp16. :func:`store_head_fp16` swaps the head (and, when it is tied to it, the input embedding)
for modules that keep the fp16 weight and compute in fp32: the head through the ``cpu-avx2`` fp16 GEMV
(exact fp16 -> fp32 widening, fp32 accumulation) for decode-sized inputs and ``F.linear`` on the widened
weight otherwise; the embedding looks rows up in fp16 and widens them. Outputs equal the fp32 model's to
fp32 accumulation-order noise, because the swap only happens when every weight is exactly representable
in fp16 (checked). The fp16 tensors are buffers (same state-dict keys), not parameters, so the model's
``dtype`` (its first floating parameter's) stays the compute dtype. For inference only.

Which modules: the model's ``get_output_embeddings()`` when it is exactly ``nn.Linear``, and its
``get_input_embeddings()`` when that is exactly ``nn.Embedding`` (no max_norm) sharing the head's weight.
Subclasses (for example Gemma's scaled embedding) are left alone.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from awqkit.kernels import cpu_avx2

logger = logging.getLogger(__name__)


class Fp16Linear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored in float16 ``[out, in]``; computed in fp32 on CPU, ``y`` in ``x.dtype``."""

    weight: Tensor  # buffers (registered in __init__), declared for type checkers
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dtype != torch.float16 or weight.dim() != 2:
            raise ValueError(f"Fp16Linear needs a 2-D float16 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return cpu_avx2.f16_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage=float16"


class Fp16Embedding(nn.Module):
    """Embedding lookup from a float16 table, widened to ``dtype`` (the model's compute dtype)."""

    weight: Tensor  # a buffer (registered in __init__), declared for type checkers

    def __init__(self, weight: Tensor, padding_idx: int | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: Tensor) -> Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, storage=float16, dtype={self.dtype}"


def _exactly_fp16(t: Tensor) -> bool:
    half = t.detach().to(torch.float16)
    return bool(torch.isfinite(half).all()) and torch.equal(half.to(t.dtype), t.detach())


def _set(model: nn.Module, target: nn.Module, new: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
            return name
    raise ValueError("module not found in the model")  # pragma: no cover - callers pass the model's own modules


def store_head_fp16(model: nn.Module) -> bool:
    """Swap ``model``'s LM head (and its tied input embedding) for fp16-storage modules, in place.

    Returns True when the head was swapped, False (with an INFO line saying why) when it was left as it
    is: no ``get_output_embeddings``, a head that is not exactly ``nn.Linear``, or weights not exactly
    representable in fp16 (the swap must not change a single weight).
    """
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if type(head) is not nn.Linear:
        logger.info("fp16 head storage: skipped (output embedding is %s, not nn.Linear)", type(head).__name__)
        return False
    if not _exactly_fp16(head.weight) or (head.bias is not None and not _exactly_fp16(head.bias)):
        logger.info("fp16 head storage: skipped (the head's weights are not exactly representable in fp16)")
        return False
    dtype = head.weight.dtype
    weight = head.weight.detach().to(torch.float16).contiguous()
    bias = None if head.bias is None else head.bias.detach().to(torch.float16)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    tied = type(emb) is nn.Embedding and emb.weight is head.weight and emb.max_norm is None
    name = _set(model, head, Fp16Linear(weight, bias))
    if tied and emb is not None:  # tied: emb is the nn.Embedding sharing the head's weight
        _set(model, emb, Fp16Embedding(weight, emb.padding_idx, dtype))
    logger.info(
        "fp16 head storage: %s keeps its %s weight in float16%s",
        name,
        tuple(weight.shape),
        " (shared with the tied input embedding)" if tied else "",
    )
    return True


__all__ = ["Fp16Linear", "Fp16Embedding", "store_head_fp16"]
