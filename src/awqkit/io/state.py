"""What a quantized model stores: its state dict without duplicates, each tensor in its storage dtype, and the
safetensors shards that hold them (:func:`awqkit.io.save.save_quantized` writes the folder around them).

Tied weights: an alias (one tensor under two names, as ``tie_weights()`` makes them) is stored once, under the name
transformers' loader expects; so is an output head the config ties to an equal input embedding held in its own
memory. Storage identity is huggingface_hub's; the rest is transformers' config, which no storage helper reads.
Every float tensor that is not a quantized linear's packed buffer is stored in fp16.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from huggingface_hub import get_torch_storage_id
from torch import Tensor, nn

from awqkit.errors import InputError
from awqkit.io.shards import INDEX, ShardLayout, ShardWriter, TensorSpec
from awqkit.nn import hf

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0


def state_plan(model: nn.Module) -> dict[str, tuple[Tensor, torch.dtype]]:
    """``{key: (tensor, storage dtype)}`` without duplicates: aliases (same storage and view; the kept name is
    not in ``all_tied_weights_keys``, as transformers' loader expects) and an output head the config ties to an
    equal input embedding in its own memory (transformers re-ties it on load; no storage helper can see that)."""
    sd = model.state_dict()
    config = hf.config(model)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied_flag = bool(getattr(text_cfg, "tie_word_embeddings", False))
    droppable = set(getattr(model, "all_tied_weights_keys", None) or {})
    out_emb = hf.output_embeddings(model) if hasattr(model, "get_output_embeddings") else None
    in_emb = hf.input_embeddings(model) if hasattr(model, "get_input_embeddings") else None
    out_key = next((f"{n}.weight" for n, m in model.named_modules() if m is out_emb and out_emb is not None), None)
    in_key = next((f"{n}.weight" for n, m in model.named_modules() if m is in_emb and in_emb is not None), None)
    if tied_flag and out_key:
        droppable.add(out_key)
    # Storage identity is huggingface_hub's get_torch_storage_id (None on meta); not its save_torch_state_dict
    # dedup (_remove_duplicate_names, private), which compares byte ranges: it would drop a transposed or
    # reshaped alias that loaders need under its own name.
    groups: dict[tuple, list[str]] = {}
    for key, t in sd.items():
        storage = get_torch_storage_id(t) if t.numel() else None
        if storage is not None:
            groups.setdefault((storage, t.storage_offset(), t.dtype, tuple(t.shape), t.stride()), []).append(key)
    drop: set[str] = set()
    for keys in groups.values():
        if len(keys) > 1:
            keep = [k for k in keys if k not in droppable] or keys[:1]
            drop.update(k for k in keys if k not in keep)
    if tied_flag and out_key in sd and in_key in sd and out_key not in drop:
        if torch.equal(sd[out_key], sd[in_key]):
            drop.add(out_key)
        else:
            raise ValueError(
                f"config says tie_word_embeddings=True but {out_key} differs from {in_key}; re-tie them "
                "(model.tie_weights()) or set model.config.tie_word_embeddings=False before saving"
            )
    plan: dict[str, tuple[Tensor, torch.dtype]] = {}
    for key, t in sd.items():
        if key not in drop:
            plan[key] = (t, torch.float16 if t.is_floating_point() else t.dtype)
    return plan


def convert_for_storage(key: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as the CPU tensor of ``dtype`` stored under ``key`` (its own memory); a float tensor whose values
    overflow fp16 is an InputError naming it (fp16 would store Inf)."""
    t = t.detach()
    if t.is_floating_point() and t.numel() and dtype == torch.float16 and t.dtype != torch.float16:
        peak = float(t.abs().max())
        if math.isfinite(peak) and peak > FP16_MAX:
            raise InputError(
                f"tensor {key} has |value| {peak:g} > {FP16_MAX} and would overflow in fp16; awqkit "
                "stores non-quantized tensors in fp16, so this model cannot be saved as is"
            )
    out = t.to(device="cpu", dtype=dtype).contiguous()
    if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        out = out.clone()  # own storage: safetensors refuses tensors that share memory (e.g. untied aliases)
    return out


def write_shards(plan: dict[str, tuple[Tensor, torch.dtype]], folder: Path, max_bytes: int) -> list[str]:
    """Write the state dict as safetensors shards (and their index when there are several) through
    :class:`~awqkit.io.shards.ShardWriter`, the writer the streaming engine uses too; returns the file names."""
    specs = [TensorSpec(k, tuple(t.shape), dtype) for k, (t, dtype) in plan.items()]
    for spec in specs:
        if spec.nbytes > max_bytes:
            logger.warning(
                "tensor %s (%d bytes) exceeds max_shard_size; it gets a shard of its own", spec.name, spec.nbytes
            )
    with ShardWriter(folder, ShardLayout.plan(specs, max_bytes)) as writer:
        for key, (t, dtype) in plan.items():
            writer.write(key, convert_for_storage(key, t, dtype))
    return writer.layout.files() + ([INDEX] if len(writer.layout.files()) > 1 else [])


__all__ = ["FP16_MAX", "convert_for_storage", "state_plan", "write_shards"]
