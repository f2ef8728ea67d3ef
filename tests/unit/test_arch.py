"""Architecture resolution: the registry, mapping binding (incl. GQA), and name matching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from awqkit.arch import get_layers, layer_linears, matches, resolve_arch, resolve_mappings
from awqkit.arch.resolve import supported_architectures
from awqkit.arch.specs import REGISTRY, Mapping

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402

COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16, vocab_size=64
)
ARCHS = {
    "LlamaForCausalLM": (T.LlamaConfig, T.LlamaForCausalLM, "llama"),
    "MistralForCausalLM": (T.MistralConfig, T.MistralForCausalLM, "mistral"),
    "Qwen2ForCausalLM": (T.Qwen2Config, T.Qwen2ForCausalLM, "qwen2"),
    "Qwen3ForCausalLM": (T.Qwen3Config, T.Qwen3ForCausalLM, "qwen3"),
    "Gemma3ForCausalLM": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, "gemma3"),
}


def _build(arch: str, kv_heads: int = 2) -> nn.Module:
    cfg_cls, model_cls, _ = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**COMMON, num_key_value_heads=kv_heads)).eval()


def test_registry_covers_exactly_the_tested_architectures():
    assert supported_architectures() == sorted(ARCHS)
    names = [a for spec in REGISTRY for a in spec.architectures]
    assert len(names) == len(set(names))  # no class served by two specs


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_resolve_arch_and_bind_mappings(arch):
    model = _build(arch)
    spec = resolve_arch(model)
    assert spec.name == ARCHS[arch][2]
    assert spec.norm_offset == (1.0 if arch.startswith("Gemma") else 0.0)
    layers = get_layers(model, spec)
    assert len(layers) == 2
    for i, layer in enumerate(layers):
        bound = resolve_mappings(layer, spec, i)
        # GQA (2 kv heads, 4 query heads): v_proj -> o_proj is skipped, the other three stay
        assert [m.mapping.prev.rsplit(".", 1)[-1] for m in bound] == [
            "input_layernorm",
            "pre_feedforward_layernorm" if arch.startswith("Gemma") else "post_attention_layernorm",
            "up_proj",
        ]
        for m in bound:
            assert m.prev is layer.get_submodule(m.mapping.prev)
            assert m.inspect is layer.get_submodule(m.mapping.inspect)
            assert [id(x) for x in m.linears] == [id(layer.get_submodule(n)) for n in m.mapping.linears]
            # every consumer reads exactly what prev outputs
            prev_out = m.prev.weight.shape[0]
            assert all(lin.in_features == prev_out for lin in m.linears)
        # every linear of the layer is balanced by some mapping, except o_proj under GQA
        covered = {n for m in bound for n in m.mapping.linears}
        assert set(layer_linears(layer)) - covered == {"self_attn.o_proj"}


def test_resolve_arch_prefers_config_architectures():
    class Wrapper(nn.Module):
        pass

    model = Wrapper()
    model.config = T.LlamaConfig(**COMMON, architectures=["Qwen3ForCausalLM"])
    assert resolve_arch(model).name == "qwen3"


def test_gemma3_norms_are_one_plus_w():
    model = _build("Gemma3ForCausalLM")
    layer = get_layers(model, resolve_arch(model))[0]
    x = torch.randn(2, 64)
    norm = layer.pre_feedforward_layernorm
    # weight 0 must be the identity scale: the spec's norm_offset=1 is right for this class
    assert torch.equal(norm.weight, torch.zeros(64))
    y = norm(x)
    torch.testing.assert_close(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_v_to_o_mapping_kept_without_gqa(arch):
    model = _build(arch, kv_heads=4)
    spec = resolve_arch(model)
    bound = resolve_mappings(get_layers(model, spec)[0], spec, 0)
    assert [m.mapping.prev for m in bound] == [m.prev for m in spec.mappings]
    vo = bound[1]
    assert vo.mapping.prev == "self_attn.v_proj" and vo.mapping.linears == ("self_attn.o_proj",)
    assert vo.mapping.scoring == "linear" and vo.inspect is vo.linears[0]


def test_unknown_architecture_lists_every_supported_name():
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError) as info:
        resolve_arch(model)
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg
    for name in supported_architectures():
        assert name in msg


def test_wrong_layers_path_and_missing_module_are_loud():
    model = _build("LlamaForCausalLM")
    spec = resolve_arch(model)
    with pytest.raises(ValueError, match="not found"):
        get_layers(model, dataclasses.replace(spec, layers="model.blocks"))
    with pytest.raises(ValueError, match="not a ModuleList"):
        get_layers(model, dataclasses.replace(spec, layers="model.norm"))
    bad = dataclasses.replace(spec, mappings=(Mapping("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),))
    with pytest.raises(ValueError, match="qkv_proj"):
        resolve_mappings(get_layers(model, spec)[0], bad, 0)
    not_linear = dataclasses.replace(spec, mappings=(Mapping("input_layernorm", ("mlp.act_fn",), "mlp"),))
    with pytest.raises(ValueError, match="expected nn.Linear"):
        resolve_mappings(get_layers(model, spec)[0], not_linear, 0)


def test_mapping_validation():
    with pytest.raises(ValueError, match="scoring"):
        Mapping("a", ("b",), "b", "bogus")
    with pytest.raises(ValueError, match="single linear"):
        Mapping("a", ("b", "c"), "b", "linear")
    with pytest.raises(ValueError, match="single linear"):
        Mapping("a", ("b",), "c", "linear")


NAME = "model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize(
    "patterns,expected",
    [
        ((NAME,), True),  # exact full name
        (("gate_proj",), True),  # leaf
        (("re:model\\.layers\\.\\d+\\.mlp\\.gate_proj",), True),  # regex, fullmatch
        (("re:.*gate_proj",), True),
        (("gate",), False),  # no substring matching
        (("proj",), False),
        (("gate_pro",), False),
        (("layers",), False),  # an inner component is not the leaf
        (("model.layers.0.mlp",), False),  # a prefix is not a match
        (("re:gate",), False),  # regexes fullmatch, never search
        (("re:gate_proj",), False),  # ... against the full name
        (("re:model",), False),
        (("GATE_PROJ",), False),  # case-sensitive
        ((), False),
        (("up_proj", "gate_proj"), True),  # any pattern
    ],
)
def test_matches_semantics(patterns, expected):
    assert matches(NAME, patterns) is expected


def test_matches_accepts_lists_and_leaf_only_names():
    assert matches("lm_head", ["lm_head"])
    assert matches("lm_head", ["re:lm_head"])
    assert not matches("lm_head_extra", ["lm_head"])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tied_gqa_v_o_fold_preserves_attention_output(arch):
    """Opt-in tied v -> o: (head_dim, n_rep) resolved from the attention module, and folding per-kv-channel
    scales into v's rows and their per-head repeats into o's columns leaves the real layer's output unchanged."""
    from awqkit.algo.fold import expand_heads, fold_scales

    model = _build(arch, kv_heads=2)
    spec = resolve_arch(model)
    layer = get_layers(model, spec)[0]
    bound = resolve_mappings(layer, spec, 0, tie_heads=True)
    vo = [m for m in bound if m.mapping.prev == "self_attn.v_proj"]
    assert len(vo) == 1 and vo[0].heads == (16, 2)
    with torch.no_grad():  # random norms so the check is not trivially passed by unit weights
        for _, p in layer.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.3)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).unsqueeze(0)
    rot = model.model.rotary_emb
    emb = rot(x, pos) if not arch.startswith("Gemma") else rot(x, pos, model.config.layer_types[0])
    kw = dict(position_embeddings=emb, attention_mask=None)
    with torch.no_grad():
        before = layer.self_attn(layer.input_layernorm(x), **kw)[0]
    s = torch.exp(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    o0 = layer.self_attn.o_proj.weight.detach().clone()
    fold_scales(vo[0].prev, vo[0].linears, s, heads=vo[0].heads)
    with torch.no_grad():
        after = layer.self_attn(layer.input_layernorm(x), **kw)[0]
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    torch.testing.assert_close(layer.self_attn.o_proj.weight, o0 * expand_heads(s, 16, 2), rtol=1e-6, atol=0)
    # repeating in the wrong order (tile instead of repeat per head) is NOT equivalent
    assert not torch.equal(expand_heads(s, 16, 2), s.repeat(2))


def test_expand_and_reduce_heads():
    from awqkit.algo.fold import expand_heads, reduce_heads

    s = torch.arange(6.0)  # 2 kv heads of width 3
    assert expand_heads(s, 3, 2).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert torch.equal(reduce_heads(expand_heads(s, 3, 2), 3, 2), s)
    with pytest.raises(ValueError, match="heads"):
        expand_heads(torch.ones(5), 3, 2)


def test_importing_arch_loads_no_kernel_or_module_code() -> None:
    """arch/ is data and name resolution: importing it must not pull in nn/ or the kernels (issue 14)."""
    import subprocess
    import sys

    code = "import sys, awqkit.arch; print(' '.join(sorted(m for m in sys.modules if m.startswith('awqkit'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "awqkit.arch" in loaded
    assert not [m for m in loaded if m.startswith(("awqkit.nn", "awqkit.kernels", "awqkit.io"))], loaded
