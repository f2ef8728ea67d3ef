"""The AWQ searches (scales, clipping), folding, the rounding methods (GPTQ, AdaRound), and the serializable results
that join them."""

from awqkit.algo.adaround import AdaRoundResult, adaround
from awqkit.algo.clip_search import ClipSearchResult, sample_tokens, search_clip
from awqkit.algo.fold import apply_clip, fold_scales
from awqkit.algo.gptq import GPTQResult, gptq_quantize
from awqkit.algo.results import (
    AWQResults,
    ClipEntry,
    RoundingEntry,
    ScaleEntry,
    apply_layer_results,
    apply_results,
)
from awqkit.algo.scale_search import (
    GramScorer,
    ModuleScorer,
    ScaleSearchResult,
    candidate_scales,
    search_scales,
    weight_mean,
)

__all__ = [
    "AWQResults",
    "AdaRoundResult",
    "GPTQResult",
    "RoundingEntry",
    "adaround",
    "gptq_quantize",
    "ClipEntry",
    "ClipSearchResult",
    "GramScorer",
    "ModuleScorer",
    "ScaleEntry",
    "ScaleSearchResult",
    "apply_clip",
    "apply_layer_results",
    "apply_results",
    "candidate_scales",
    "fold_scales",
    "sample_tokens",
    "search_clip",
    "search_scales",
    "weight_mean",
]
