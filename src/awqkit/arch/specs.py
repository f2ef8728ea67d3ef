"""Architecture knowledge, as data.

An :class:`ArchSpec` says where the decoder layers live, which operation feeds which linears
(a :class:`Mapping`: "previous op → the linears that share its output, and the module whose output
scores the choice"), which linears are not clipped, how the norms multiply (``w`` or ``1 + w``) and what
is never converted. Names inside a mapping are relative to one decoder layer. Adding a model is adding
an entry here; algorithm code never looks at model types.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    """One AWQ scaling group inside a decoder layer.

    prev: the op whose output feeds ``linears`` (a norm, or a linear whose output rows are scaled).
    linears: linears sharing that input; their input columns are multiplied by s.
    inspect: module whose output scores a candidate s (the linears' lowest common parent, or the
        single linear itself).
    scoring: how ``inspect`` can be evaluated on a subset of calibration data —
        ``"sequence"``: mixes positions (attention), scored on whole calibration blocks;
        ``"tokens"``: acts on each position alone (an MLP), scored on a token sample drawn from every block;
        ``"linear"``: inspect is the single balanced linear, scored exactly on every calibration token
        through the input Gram matrix (``‖ΔW x‖² = tr(ΔW G ΔWᵀ)``).
    require_shapes_match: skip the mapping when prev's output size differs from the linears' input
        size (v_proj → o_proj under grouped-query attention) — unless ``tie_heads`` allows the tied form.
    tie_heads: the attention module (layer-relative) whose ``head_dim`` splits prev's output into
        key/value heads. Under grouped-query attention each v head feeds ``n_rep`` query heads, so
        o_proj's input is v's output with every head block repeated ``n_rep`` times (``repeat_kv``).
        Scales chosen per v channel and repeated the same way fold exactly; the search then runs in
        v's channel space. Used only when ``SearchConfig.gqa_v_o`` is on.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    scoring: str = "sequence"
    require_shapes_match: bool = False
    tie_heads: str | None = None

    def __post_init__(self) -> None:
        if self.scoring not in ("sequence", "tokens", "linear"):
            raise ValueError(f"Mapping.scoring={self.scoring!r}; choose sequence, tokens or linear")
        if self.scoring == "linear" and self.linears != (self.inspect,):
            raise ValueError("Mapping.scoring='linear' needs inspect to be the mapping's single linear")


@dataclass(frozen=True)
class DecodeSpec:
    """Where awqkit's own decode loop (:mod:`awqkit.runtime.decoder`) finds a Llama-style model's parts.

    Top-level paths (from the ``*ForCausalLM`` model): ``embed``, ``rotary`` (the module whose
    ``forward(x, position_ids)`` returns ``(cos, sin)``), ``final_norm``, ``head``. Layer-relative paths:
    the two pre-norms, the attention module (its ``head_dim``, ``scaling`` and, where present,
    ``sliding_window`` are read from it), the projections, optional per-head ``q_norm``/``k_norm``
    (Qwen3), the gated MLP (``act_fn`` must be SiLU). The layer computes
    ``h += o(attn(input_norm(h))); h += down(silu(gate(x)) * up(x)), x = post_attn_norm(h)``.
    """

    embed: str = "model.embed_tokens"
    rotary: str = "model.rotary_emb"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    attn: str = "self_attn"
    qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    gate_up: tuple[str, str] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"


@dataclass(frozen=True)
class ArchSpec:
    """What awqkit must know about one family of Hugging Face architectures.

    architectures: ``config.architectures`` class names served by this spec.
    layers: dotted path, from the top-level model, of the ``nn.ModuleList`` of decoder layers.
    mappings: scaling groups, in forward order.
    no_clip: regex (fullmatch on the layer-relative name) of linears whose clip search is skipped —
        q/k projections feed a q·kᵀ product, whose error the per-linear clip objective cannot see.
    norm_offset: the norms compute ``x̂ · (norm_offset + w)``: 0 for Llama-style, 1 for Gemma's (1 + w).
    not_convert: regexes (fullmatch on the full module name) of linears never quantized.
    decode: where awqkit's decode loop finds the parts, or None when it does not run this family.
    config_fields: integer fields the (text) config must state; transformers would fill absent ones with its
        defaults and build a model of another size than the weights.
    fused: groups of linears (layer-relative names) that vLLM fuses into one module (``qkv_proj``,
        ``gate_up_proj``) and loads only when all or none of them are quantized; awqkit keeps each group
        whole (see :func:`awqkit.targets.select_targets`). Empty: the family fuses nothing.
    """

    name: str
    architectures: tuple[str, ...]
    layers: str
    mappings: tuple[Mapping, ...]
    no_clip: str = r"self_attn\.(q|k)_proj"
    norm_offset: float = 0.0
    not_convert: tuple[str, ...] = (r"lm_head",)
    decode: DecodeSpec | None = None
    config_fields: tuple[str, ...] = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    fused: tuple[tuple[str, ...], ...] = ()


# Llama-style decoder layer: input_layernorm → attention; post_attention_layernorm → gated MLP.
# v_proj → o_proj when their shapes match (as in llm-awq PR #67 / AutoAWQ), or, opt-in, tied per kv head
# under grouped-query attention (see Mapping.tie_heads).
_LLAMA_MAPPINGS = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Mapping(
        "self_attn.v_proj",
        ("self_attn.o_proj",),
        "self_attn.o_proj",
        "linear",
        require_shapes_match=True,
        tie_heads="self_attn",
    ),
    Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "tokens"),
    Mapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"),
)

# Gemma3: four norms per layer; post_attention_layernorm acts on the attention *output*, so the MLP
# is fed by pre_feedforward_layernorm. Norms multiply by (1 + w): folding uses (1 + w)/s − 1.
# q_norm/k_norm act per head on q/k outputs, so scaling q/k/v inputs stays exact.
_GEMMA3_MAPPINGS = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Mapping(
        "self_attn.v_proj",
        ("self_attn.o_proj",),
        "self_attn.o_proj",
        "linear",
        require_shapes_match=True,
        tie_heads="self_attn",
    ),
    Mapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "tokens"),
    Mapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"),
)

# vLLM's fused modules of a Llama-style layer: qkv_proj and gate_up_proj (the same names in Gemma3).
_LLAMA_FUSED = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)

_LLAMA_DECODE = DecodeSpec()
_QWEN3_DECODE = DecodeSpec(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")

# Gemma3 has no decode spec (sandwich norms, scaled embeddings, soft-capping): it runs the transformers loop.
REGISTRY: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("LlamaForCausalLM",), "model.layers", _LLAMA_MAPPINGS, decode=_LLAMA_DECODE, fused=_LLAMA_FUSED),
    ArchSpec(
        "mistral", ("MistralForCausalLM",), "model.layers", _LLAMA_MAPPINGS, decode=_LLAMA_DECODE, fused=_LLAMA_FUSED
    ),
    ArchSpec("qwen2", ("Qwen2ForCausalLM",), "model.layers", _LLAMA_MAPPINGS, decode=_LLAMA_DECODE, fused=_LLAMA_FUSED),
    ArchSpec("qwen3", ("Qwen3ForCausalLM",), "model.layers", _LLAMA_MAPPINGS, decode=_QWEN3_DECODE, fused=_LLAMA_FUSED),
    ArchSpec("gemma3", ("Gemma3ForCausalLM",), "model.layers", _GEMMA3_MAPPINGS, norm_offset=1.0, fused=_LLAMA_FUSED),
)
