"""Fused groups (vLLM's ``qkv_proj`` and ``gate_up_proj``) are quantized all or none by ``select_targets``.

vLLM refuses a checkpoint where some but not all shards of a fused module are quantized, so a
``modules_to_not_convert`` pattern that splits a group is an error, and ``keep_unaligned_fp16`` keeps a group
with a member that does not fit in fp16 whole.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from awqkit.arch import matches, resolve_arch
from awqkit.arch.specs import REGISTRY
from awqkit.config import QuantConfig
from awqkit.errors import InputError
from awqkit.targets import _alternation, select_targets

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM),
    "mistral": (T.MistralConfig, T.MistralForCausalLM),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM),
}
QKV = tuple(f"self_attn.{p}_proj" for p in "qkv")
LINEARS = (*QKV, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _model(arch: str = "llama", **config: int) -> nn.Module:
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**{**COMMON, "num_key_value_heads": 2, "head_dim": 16, **config})).eval()


def _select(model: nn.Module, **quant):
    return select_targets(model, resolve_arch(model), QuantConfig(**{"bits": 4, "group_size": 32, **quant}))


def _names(layers, rels) -> set[str]:
    return {f"model.layers.{i}.{r}" for i in layers for r in rels}


def test_every_spec_declares_vllms_fused_groups():
    for spec in REGISTRY:
        assert spec.fused == (QKV, ("mlp.gate_proj", "mlp.up_proj")), spec.name


def test_alternation_labels_and_regexes():
    import re

    assert _alternation(QKV) == "self_attn.(q|k|v)_proj"
    assert _alternation(("mlp.gate_proj", "mlp.up_proj")) == "mlp.(gate|up)_proj"
    assert _alternation(("a.x", "b.y")) == "(a.x|b.y)"
    rx = re.compile(_alternation(QKV, re.escape))
    assert all(rx.fullmatch(r) for r in QKV) and not rx.fullmatch("self_attn.o_proj")


def test_excluding_one_member_of_qkv_names_the_group_and_the_fix():
    model = _model()
    with pytest.raises(InputError) as info:
        _select(model, modules_to_not_convert=("model.layers.0.self_attn.q_proj",))
    msg = str(info.value)
    assert "\n" not in msg
    assert "self_attn.(q|k|v)_proj of layer 0" in msg
    assert "excludes self_attn.q_proj but not self_attn.k_proj, self_attn.v_proj;" in msg
    assert "'model.layers.0.self_attn.q_proj'" in msg  # the pattern to remove
    assert r"`re:model\.layers\.0\.self_attn\.(q|k|v)_proj`" in msg  # the pattern to add
    assert "vLLM" in msg


def test_the_suggested_pattern_keeps_exactly_the_group():
    model = _model()
    suggested = r"re:model\.layers\.0\.self_attn\.(q|k|v)_proj"
    targets = _select(model, modules_to_not_convert=(suggested,))
    assert set(targets.kept) == _names([0], QKV)
    assert set(targets.kept.values()) == {"modules_to_not_convert"}
    assert set(targets.quantized) == _names([0, 1], LINEARS) - _names([0], QKV)
    # the three exact names work as well
    names = tuple(sorted(_names([0], QKV)))
    assert _select(model, modules_to_not_convert=names).kept == targets.kept


def test_a_leaf_name_splitting_every_layer_suggests_a_pattern_for_every_layer():
    model = _model()
    with pytest.raises(InputError, match=r"layer 0 \(and 1 more split group\)") as info:
        _select(model, modules_to_not_convert=("q_proj",))
    suggested = r"re:model\.layers\.\d+\.self_attn\.(q|k|v)_proj"
    assert f"`{suggested}`" in str(info.value)
    targets = _select(model, modules_to_not_convert=(suggested,))
    assert set(targets.kept) == _names([0, 1], QKV)


def test_gate_up_is_a_group_too():
    with pytest.raises(
        InputError, match=r"fused group mlp\.\(gate\|up\)_proj of layer 0.*excludes mlp\.gate_proj but not mlp\.up_proj"
    ):
        _select(_model(), modules_to_not_convert=("gate_proj",))
    targets = _select(_model(), modules_to_not_convert=("gate_proj", "up_proj"))
    assert set(targets.kept) == _names([0, 1], ("mlp.gate_proj", "mlp.up_proj"))


def test_linears_in_no_group_are_excluded_alone():
    targets = _select(_model(), modules_to_not_convert=("o_proj", "model.layers.1.mlp.down_proj"))
    assert set(targets.kept) == _names([0, 1], ("self_attn.o_proj",)) | {"model.layers.1.mlp.down_proj"}
    assert len(targets.quantized) == 14 - 3


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_keeps_its_groups_whole(arch):
    model = _model(arch)
    with pytest.raises(InputError, match=r"splits the fused group self_attn\.\(q\|k\|v\)_proj"):
        _select(model, modules_to_not_convert=("v_proj",))
    targets = _select(model, modules_to_not_convert=(r"re:.*self_attn\.(q|k|v)_proj",))
    assert set(targets.kept) == _names([0, 1], QKV)


# 8 heads of 12 on hidden 64, one kv head: q [96x64] and o [64x96] fit group 32 at 4 bits, but k/v [12x64]
# break the 4-bit GEMM layout (out_features % 8).
UNALIGNED_KV = dict(num_attention_heads=8, num_key_value_heads=1, head_dim=12)


def test_unaligned_members_keep_their_whole_group_in_fp16(caplog):
    model = _model(**UNALIGNED_KV)
    with caplog.at_level(logging.WARNING, logger="awqkit.api"):
        targets = _select(model, keep_unaligned_fp16=True)
    assert set(targets.kept) == _names([0, 1], QKV)
    assert targets.kept["model.layers.0.self_attn.k_proj"].startswith("shape [12x64] does not fit group_size 32")
    reason = targets.kept["model.layers.1.self_attn.q_proj"]
    assert reason.startswith("kept in fp16 with its fused group (self_attn.k_proj: shape [12x64]")
    assert set(targets.quantized) == _names([0, 1], LINEARS) - _names([0, 1], QKV)  # o_proj stays quantized
    fused = [r.getMessage() for r in caplog.records if "fused group" in r.getMessage()]
    assert len(fused) == 1  # one warning for the group, not one per layer
    assert "self_attn.(q|k|v)_proj of layers 0-1" in fused[0]
    assert "self_attn.k_proj, self_attn.v_proj do not fit" in fused[0]


def test_unaligned_members_without_keep_unaligned_fp16_are_still_an_error():
    expected = r"2 linears do not fit group_size=32.*self_attn\.k_proj.*--keep-unaligned"
    with pytest.raises(InputError, match=expected) as e:
        _select(_model(num_hidden_layers=1, **UNALIGNED_KV))
    # their input size fits every group size: the error names the output size and the format that takes it,
    # and suggests no group size (none would help)
    assert "not a multiple of 8" in str(e.value) and "--format compressed-tensors" in str(e.value)
    assert "Group sizes that fit" not in str(e.value)


def test_an_input_size_misfit_suggests_the_group_sizes_that_fit():
    with pytest.raises(InputError, match=r"Group sizes that fit every layer: \[32, -1\]") as e:
        _select(_model(num_hidden_layers=1, intermediate_size=96), group_size=64)
    assert "--format compressed-tensors" not in str(e.value)


def test_a_group_kept_whole_for_alignment_is_no_split_by_a_user_pattern():
    """The user keeps q_proj, k/v do not fit: the whole group is float anyway, so nothing is split."""
    model = _model(**UNALIGNED_KV)
    targets = _select(model, keep_unaligned_fp16=True, modules_to_not_convert=("q_proj",))
    assert set(targets.kept) == _names([0, 1], QKV)
    assert targets.kept["model.layers.0.self_attn.q_proj"] == "modules_to_not_convert"


def test_every_kept_or_quantized_set_respects_the_groups():
    """Whatever is asked, no group ends up split (the invariant vLLM needs)."""
    model = _model(**UNALIGNED_KV)
    spec = resolve_arch(model)
    asks = [
        dict(keep_unaligned_fp16=True),
        dict(keep_unaligned_fp16=True, modules_to_not_convert=("gate_proj", "up_proj", "down_proj")),
        dict(keep_unaligned_fp16=True, modules_to_not_convert=(r"re:.*\.1\..*",)),
    ]
    for ask in asks:
        targets = _select(model, **ask)
        quantized = set(targets.quantized)
        for i in range(2):
            for group in spec.fused:
                members = {f"model.layers.{i}.{r}" in quantized for r in group}
                assert len(members) == 1, (ask, i, group)
        assert not any(matches(n, ("q_proj",)) for n in quantized)
