"""Typed, frozen configuration. Field names equal the on-disk keys (``quantization_config`` and
``quantization_metadata.json``); the CLI reads its defaults from these dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from awqkit.errors import InputError
from awqkit.patterns import compile_pattern, name_matches

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
#: Output formats: "auto" (AutoAWQ gemm at 4 bits, compressed-tensors otherwise), "gemm" (AutoAWQ, 4 bits only),
#: "compressed-tensors" (pack-quantized, any bits, mixed bits allowed).
FORMATS = ("auto", "gemm", "compressed-tensors")
#: Other spellings of a format that are read (older specs and plans said "pack-quantized").
FORMAT_ALIASES = {"pack-quantized": "compressed-tensors"}
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
SCALE_MODES = ("x", "duo", "both")
PROPAGATE_MODES = ("quantized", "float")
RANK_BY = ("subset", "gram")
ROUNDINGS = ("none", "gptq", "adaround", "refine")
Rounding = Literal["none", "gptq", "adaround", "refine"]
REFINE_TARGETS = ("layer", "model")
REFINE_INITS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized and stored.

    bits: integer width of each weight (2..8), for every linear no ``bits_overrides`` entry names.
    group_size: input channels sharing one scale/zero (32/64/128/256, or -1 for one group per row).
    zero_point: asymmetric quantization with an integer zero point (True) or symmetric (False).
    version: AutoAWQ kernel layout tag written into ``quantization_config`` ("gemm").
    modules_to_not_convert: exact leaf/full names or ``re:``-prefixed regexes of linears kept in float.
    keep_unaligned_fp16: keep linears whose in_features is not a multiple of group_size in fp16 (with a
        warning) instead of failing.
    keep_lm_head_fp16: never quantize the LM head (and embeddings); store them in fp16. Always True: awqkit does
        not quantize the head, and False is refused rather than ignored.
    format: the checkpoint format (:data:`FORMATS`): ``"auto"`` writes AutoAWQ ``gemm`` at 4 bits with no
        overrides and compressed-tensors otherwise; ``"gemm"`` (4 bits only, one width); ``"compressed-tensors"``
        (``pack-quantized`` at any width, asymmetric or symmetric; the only one holding mixed widths).
        ``"pack-quantized"`` is read as ``"compressed-tensors"``.
    bits_overrides: ``(pattern, bits)`` pairs giving the linears a pattern matches another width (mixed bits;
        compressed-tensors only). Patterns are module-name patterns (:mod:`awqkit.patterns`: a plain name equal to
        the full name or its trailing components, or ``re:REGEX`` fullmatching it; never a substring); where
        several match a linear, the last one wins.
    """

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: tuple[str, ...] = ()
    keep_unaligned_fp16: bool = False
    keep_lm_head_fp16: bool = True
    format: str = "auto"
    bits_overrides: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InputError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise InputError(f"group_size={self.group_size} is not supported; choose one of {SUPPORTED_GROUP_SIZES}")
        if self.version != "gemm":
            raise InputError(f"version={self.version!r} is not supported; awqkit writes 'gemm'")
        if not self.keep_lm_head_fp16:
            raise InputError(
                "keep_lm_head_fp16=False is not supported: awqkit never quantizes the LM head "
                "(drop the option, or --no-keep-lm-head-fp16 on the command line)"
            )
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))
        object.__setattr__(self, "format", canonical_format(self.format))
        object.__setattr__(self, "bits_overrides", _checked_overrides(self.bits_overrides))
        if self.format == "gemm" and (self.bits != 4 or self.bits_overrides):
            what = f"bits={self.bits}" if self.bits != 4 else f"bits_overrides {list(map(list, self.bits_overrides))}"
            raise InputError(
                f"format 'gemm' holds one 4-bit setting, not {what}; use format 'compressed-tensors' (or 'auto')"
            )

    @property
    def max_int(self) -> int:
        return 2**self.bits - 1

    def bits_for(self, name: str) -> int:
        """The width of the linear at full module ``name``: the last ``bits_overrides`` entry matching it, else
        ``bits``."""
        for pattern, bits in reversed(self.bits_overrides):
            if name_matches(name, pattern):
                return bits
        return self.bits

    @property
    def output_format(self) -> str:
        """The format written, ``format`` resolved: ``"gemm"`` or ``"compressed-tensors"``."""
        if self.format != "auto":
            return self.format
        return "gemm" if self.bits == 4 and not self.bits_overrides else "compressed-tensors"

    @property
    def layout(self) -> str:
        """The :class:`~awqkit.nn.qlinear.QuantLinear` layout of :attr:`output_format`: ``"gemm"`` or
        ``"pack-quantized"``."""
        return "gemm" if self.output_format == "gemm" else "pack-quantized"


def canonical_format(value: str) -> str:
    """``value`` as one of :data:`FORMATS` (case-insensitive; :data:`FORMAT_ALIASES` read); InputError otherwise."""
    fmt = str(value).strip().lower()
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise InputError(f"format={value!r} is not a format awqkit writes; choose one of {FORMATS}")
    return fmt


def parse_bits_override(text: str) -> tuple[str, int]:
    """``"PATTERN=BITS"`` (the command line's ``--bits-override``) as ``(pattern, bits)``; split at the last
    ``=`` (a regex may hold one). InputError naming the expected form otherwise."""
    pattern, sep, bits = str(text).rpartition("=")
    if not sep or not pattern or not bits.strip().isdigit():
        raise InputError(
            f"bits override {text!r} is not PATTERN=BITS; write e.g. 'down_proj=8' or 're:.*\\.mlp\\..*=8'"
        )
    return pattern, int(bits)


def _checked_overrides(value: Mapping[str, int] | Iterable[Any]) -> tuple[tuple[str, int], ...]:
    """``bits_overrides`` as ``((pattern, bits), ...)`` (a mapping, or pairs such as JSON's lists), each pattern a
    valid module-name pattern and each width supported; InputError naming the bad entry otherwise."""
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    out: list[tuple[str, int]] = []
    for pair in pairs:
        if isinstance(pair, str) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(
                f"bits_overrides entry {pair!r} is not a (pattern, bits) pair; write e.g. ('down_proj', 8)"
            )
        pattern, bits = pair
        if not isinstance(pattern, str) or not pattern:
            raise InputError(f"bits_overrides pattern {pattern!r} must be a module name or a re:REGEX pattern")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
            raise InputError(
                f"bits_overrides {pattern!r}: bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}"
            )
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise InputError(f"bits_overrides: {exc}") from None
        out.append((pattern, bits))
    return tuple(out)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``source`` is a text/JSONL/CSV file or ``"self"`` (data-free, sampled from the model).

    n_samples blocks of seq_len tokens are cut from the concatenated, tokenized samples (seeded).
    prompt_column / response_column / messages_column / text_column choose fields of tabular rows;
    None means "detect from the usual names" (question/answer, instruction/output, messages, text).
    """

    source: str = "self"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 13
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    text_column: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise InputError(f"n_samples={self.n_samples} must be >= 1")
        if self.seq_len < 8:
            raise InputError(f"seq_len={self.seq_len} must be >= 8 tokens")


@dataclass(frozen=True)
class EvalConfig:
    """What ``awqkit eval`` measures unless told otherwise (also the defaults of :func:`awqkit.eval.runner.
    evaluate_model` and of a plan's ``[eval]`` table, which differs only in ``tasks``).

    tasks: ``ppl``, ``kl``, ``arc``, ``squad``, ``gsm8k``. limit: items per downstream task (None: all).
    seq_len / windows: WikiText-2 windows for ppl and kl (``windows=None``: every complete window).
    batch_size: windows per forward pass. backend: the kernel that runs a quantized folder (``auto``, ``torch``,
    ``cpu-avx2``, ``cpu-int4``, ``triton``).
    """

    tasks: tuple[str, ...] = ("ppl",)
    limit: int | None = None
    seq_len: int = 2048
    windows: int | None = 16
    batch_size: int = 1
    backend: str = "auto"


@dataclass(frozen=True)
class BenchConfig:
    """What ``awqkit bench`` (and ``awqkit eval --bench``) times: a ``prompt_tokens`` prompt then ``new_tokens`` greedy
    tokens at each batch size, ``repeats`` timed runs after ``warmup`` untimed ones (medians reported); ``threads``
    None keeps torch's."""

    prompt_tokens: int = 128
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"prompt_tokens, new_tokens, repeats must be >= 1 and warmup >= 0, got {self}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")


@dataclass(frozen=True)
class SearchConfig:
    """The AWQ searches.

    ``scales=False`` skips the scale search (no scaling: the methods that only round, ``gptq`` and ``adaround``).
    Scale search: for each mapping, s = x̄^α (``x``), s = x̄^α / w̄^(1-α) (``duo``) or both, α on
    ``n_grid`` evenly spaced points of [0, 1] (both ends included; α = 0 in ``x`` mode is the identity).
    Scored by the fp32 MSE of the scoring module's output: on the first ``search_samples`` calibration
    blocks for modules that mix positions (attention), on ``search_tokens`` tokens sampled evenly from
    every block for position-wise modules (MLP), and exactly on every token for a single linear.
    Clip search: per (output channel, group), shrink [min, max] by factors 1, 1 - 1/clip_n_grid, ...,
    down to 1 - clip_max_shrink; error measured on ``clip_n_tokens`` tokens sampled from the search
    blocks, or with ``clip_n_tokens=0`` exactly on every calibration token (per-group Gram blocks). With
    ``clip_independent``, two more passes over the same grid shrink the min and the max end alone.
    propagate: what the next layer sees — outputs of the already-quantized layer ("quantized") or
    of the float layer ("float").
    gqa_v_o: also scale v_proj → o_proj under grouped-query attention, with scales tied per kv head
    (exact; see ``Mapping.tie_heads``). Off by default: reference AWQ skips v → o when shapes differ.
    Ranked scale search, for mappings scored on a module (attention, MLP): rank the whole grid cheaply, then
    score only the identity and the ``rank_top_k`` best candidates on the full objective (0: every candidate,
    the exhaustive search). ``rank_by="subset"``: the ranking is the same objective on ``rank_tokens`` tokens
    (whole blocks for attention, a strided token sample for the MLP); ``"gram"``: the balanced linears' own
    output error over every calibration token, from per-group Gram blocks of their input.
    Rounding, after the scales and clips (``rounding="none"``: round to nearest when packing): each linear's
    integers are chosen on its group grid to minimise its output error over every calibration token, from the
    full Gram matrix of its input, true-sequentially (a linear's inputs come from the layer with the linears
    before it already rounded): ``"gptq"`` (:func:`awqkit.algo.gptq.gptq_quantize`, dampening ``gptq_damp``,
    ``gptq_act_order``) or ``"adaround"`` (:func:`awqkit.algo.adaround.adaround`, ``rounding_iters`` steps);
    ``"refine"`` instead learns the rounding and clipping range of every linear of a decoder layer together
    against the float layer's output (:mod:`awqkit.refine`: ``refine_iters`` steps of signed gradient descent
    on ``refine_batch_size`` calibration sequences each, step ``refine_lr``, None meaning ``1 / refine_iters``),
    keeping AWQ's integers where it does not help. ``refine_target``: the float layer's output on the same inputs
    (``"layer"``), or the float model's activations after that layer (``"model"``: the layer also learns to
    undo the error of the quantized layers before it, as AutoRound does; a second activation stream is kept).
    ``refine_init``: the starting point, AWQ's round to nearest (``"rtn"``) or GPTQ's integers on AWQ's grid
    (``"gptq"``, with ``gptq_damp`` / ``gptq_act_order``; the rounding offsets then move around GPTQ's
    error-compensated weights). ``refine_norms``: with ``r > 0`` the weights of the norms that feed the quantized
    linears (the mappings' ``prev`` norms) are learned with them, each channel's scale within ``[1 - r, 1 + r]`` of
    its value after AWQ's folding (norm tweaking, Li et al. 2023: a per-channel input scale the integers need not
    be recomputed for); 0 leaves the norms as AWQ folded them.
    """

    scales: bool = True
    n_grid: int = 20
    scale_mode: Literal["x", "duo", "both"] = "both"
    search_samples: int = 16
    search_tokens: int = 8192
    clip: bool = True
    clip_n_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_n_tokens: int = 512
    clip_independent: bool = False
    propagate: Literal["quantized", "float"] = "quantized"
    batch_size: int = 8
    gqa_v_o: bool = False
    rank_top_k: int = 3
    rank_by: Literal["subset", "gram"] = "subset"
    rank_tokens: int = 512
    rounding: Rounding = "none"
    rounding_iters: int = 1000
    refine_iters: int = 50
    refine_lr: float | None = None
    refine_batch_size: int = 2
    refine_target: Literal["layer", "model"] = "model"
    refine_init: Literal["rtn", "gptq"] = "rtn"
    refine_norms: float = 0.0
    gptq_damp: float = 0.01
    gptq_act_order: bool = False

    def __post_init__(self) -> None:
        if self.scale_mode not in SCALE_MODES:
            raise InputError(f"scale_mode={self.scale_mode!r}; choose one of {SCALE_MODES}")
        if self.propagate not in PROPAGATE_MODES:
            raise InputError(f"propagate={self.propagate!r}; choose one of {PROPAGATE_MODES}")
        if self.n_grid < 2:
            raise InputError(f"n_grid={self.n_grid} must be >= 2 (it includes both ends of [0, 1])")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise InputError(f"clip_max_shrink={self.clip_max_shrink} must be in [0, 1)")
        if self.rank_by not in RANK_BY:
            raise InputError(f"rank_by={self.rank_by!r}; choose one of {RANK_BY}")
        if self.rounding not in ROUNDINGS:
            raise InputError(f"rounding={self.rounding!r}; choose one of {ROUNDINGS}")
        if self.rounding_iters < 0 or self.gptq_damp < 0 or self.refine_iters < 0:
            raise InputError(
                f"rounding_iters={self.rounding_iters}, refine_iters={self.refine_iters} and "
                f"gptq_damp={self.gptq_damp} must be >= 0"
            )
        if self.refine_init not in REFINE_INITS:
            raise InputError(f"refine_init={self.refine_init!r}; choose one of {REFINE_INITS}")
        if self.refine_target not in REFINE_TARGETS:
            raise InputError(f"refine_target={self.refine_target!r}; choose one of {REFINE_TARGETS}")
        if self.refine_batch_size < 1:
            raise InputError(f"refine_batch_size={self.refine_batch_size} must be >= 1")
        if not 0.0 <= self.refine_norms < 1.0:
            raise InputError(f"refine_norms={self.refine_norms} must be in [0, 1) (0: the norms are not learned)")
        if self.refine_lr is not None and self.refine_lr <= 0:
            raise InputError(f"refine_lr={self.refine_lr} must be > 0 (or None: 1 / refine_iters)")
        if self.rank_tokens < 1:
            raise InputError(f"rank_tokens={self.rank_tokens} must be >= 1")
        if self.rank_top_k < 0:
            raise InputError(f"rank_top_k={self.rank_top_k} must be >= 0 (0: score every candidate exactly)")
        if min(self.search_samples, self.search_tokens, self.batch_size) < 1 or self.clip_n_tokens < 0:
            raise InputError(
                "search_samples, search_tokens and batch_size must be >= 1, clip_n_tokens >= 0 "
                "(0: every calibration token)"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples, and tuples in them, become lists)."""
    out = dataclasses.asdict(cfg)
    return {
        k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v for k, v in out.items()
    }


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build config ``cls`` from a dict, ignoring unknown keys (forward compatible)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def defaults(cls: type) -> dict[str, Any]:
    """Default value of every field of a config dataclass (the CLI's single source of defaults)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


__all__ = [
    "FORMATS",
    "QuantConfig",
    "CalibConfig",
    "SearchConfig",
    "canonical_format",
    "parse_bits_override",
    "to_dict",
    "from_dict",
    "defaults",
    "field",
]
