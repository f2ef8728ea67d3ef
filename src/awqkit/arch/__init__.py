"""Architecture mappings (data) and their resolution against live models."""

from awqkit.arch.resolve import (
    ResolvedMapping,
    get_layers,
    layer_linears,
    matches,
    resolve_arch,
    resolve_mappings,
    spec_for_architectures,
    supported_architectures,
)
from awqkit.arch.specs import REGISTRY, ArchSpec, DecodeSpec, Mapping

__all__ = [
    "REGISTRY",
    "ArchSpec",
    "DecodeSpec",
    "Mapping",
    "ResolvedMapping",
    "get_layers",
    "layer_linears",
    "matches",
    "resolve_arch",
    "resolve_mappings",
    "spec_for_architectures",
    "supported_architectures",
]
