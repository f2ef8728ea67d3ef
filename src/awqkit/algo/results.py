"""The serializable result of a search: scales per mapping, clipping bounds per linear, the integers a rounding
method chose, and statistics.

It joins the three phases (search → apply → pack): :func:`apply_results` re-applies a saved result to
a fresh float model with no calibration, reproducing the searched model's weights bit for bit, and
:meth:`AWQResults.integers_for` gives the packer the integers of the linears a rounding method (GPTQ, AdaRound)
quantized, which it packs as they are instead of rounding the float weight to nearest.

On disk (:meth:`AWQResults.save`): ``awq_results.safetensors`` (tensors ``scale.{i}``, ``clip_min.{j}``,
``clip_max.{j}``, ``round_q.{k}`` (uint8), ``round_scales.{k}``, ``round_zeros.{k}``, ``norm_weight.{k}``) and
``awq_results.json`` (everything else, in the same order).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from awqkit.algo.fold import apply_clip, fold_scales
from awqkit.quant.primitives import dequantize

RESULTS_JSON = "awq_results.json"
RESULTS_TENSORS = "awq_results.safetensors"


@dataclass
class ScaleEntry:
    """Scales folded for one mapping: prev's outputs / s, the linears' inputs · s."""

    layer: int
    prev: str  # full module name
    linears: list[str]  # full module names
    scales: Tensor  # [in] float32
    mode: str
    alpha: float
    loss_identity: float
    loss_best: float
    fallback: bool = False
    heads: list[int] | None = None  # [head_dim, n_rep]: scales tied per kv head (grouped-query v → o)


@dataclass
class ClipEntry:
    """Clamp bounds for one linear, per (output row, group)."""

    layer: int
    name: str
    min_val: Tensor  # [out, n_groups] float32
    max_val: Tensor
    err_before: float
    err_after: float
    mean_ratio: float


@dataclass
class RoundingEntry:
    """The integers a rounding method chose for one linear, on its group grid (what the checkpoint stores)."""

    layer: int
    name: str  # full module name
    method: str  # "gptq", "adaround", "refine"
    q: Tensor  # [out, in] uint8, values in [0, 2^bits - 1]
    scales: Tensor  # [out, n_groups] float32 (fp16-representable)
    zeros: Tensor  # [out, n_groups] int32
    # gptq / adaround: the linear's output error with round-to-nearest on the same grid, and with the chosen
    # integers; refine: the decoder layer's objective (output MSE, the same for each of its linears) at the
    # starting point and at the end (never above the start: awqkit.refine keeps the start otherwise)
    loss_rtn: float
    loss: float

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def weight(self) -> Tensor:
        """The dequantized weight ``(q - zero) * scale``, float32 ``[out, in]``."""
        return dequantize(self.q.to(torch.int32), self.scales, self.zeros, self.group_size)


@dataclass
class NormEntry:
    """A norm's weight as the block refinement learned it (``refine_norms``), after AWQ's folding: what the
    checkpoint stores, set over the folded weight when the result is re-applied."""

    layer: int
    name: str  # full module name
    weight: Tensor  # [channels] float32


@dataclass
class AWQResults:
    """Everything the search decided, enough to rebuild the quantized weights from the float model."""

    norm_offset: float = 0.0
    scales: list[ScaleEntry] = field(default_factory=list)
    clips: list[ClipEntry] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    roundings: list[RoundingEntry] = field(default_factory=list)
    norms: list[NormEntry] = field(default_factory=list)

    def for_layer(self, index: int, seconds: list[float]) -> AWQResults:
        """The entries of decoder layer ``index`` alone, with ``seconds`` as its layer time (resume records)."""
        return AWQResults(
            self.norm_offset,
            [e for e in self.scales if e.layer == index],
            [c for c in self.clips if c.layer == index],
            seconds,
            roundings=[r for r in self.roundings if r.layer == index],
            norms=[n for n in self.norms if n.layer == index],
        )

    def extend(self, other: AWQResults) -> None:
        """Append ``other``'s entries (the next layers' results, read back on resume)."""
        self.scales += other.scales
        self.clips += other.clips
        self.roundings += other.roundings
        self.norms += other.norms
        self.layer_seconds += other.layer_seconds

    def integers_for(self, layer: int, prefix: str = "") -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """``{name without prefix: (q int32, scales, zeros)}`` of layer ``layer``'s rounded linears, for the packer."""
        return {
            r.name[len(prefix) :]: (r.q.to(torch.int32), r.scales, r.zeros)
            for r in self.roundings
            if r.layer == layer and r.name.startswith(prefix)
        }

    def save(self, folder: Path) -> None:
        """Write ``awq_results.json`` and ``awq_results.safetensors`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for i, e in enumerate(self.scales):
            tensors[f"scale.{i}"] = e.scales.float().contiguous()
        for j, c in enumerate(self.clips):
            tensors[f"clip_min.{j}"] = c.min_val.float().contiguous()
            tensors[f"clip_max.{j}"] = c.max_val.float().contiguous()
        for k, r in enumerate(self.roundings):
            tensors[f"round_q.{k}"] = r.q.to(torch.uint8).contiguous()
            tensors[f"round_scales.{k}"] = r.scales.float().contiguous()
            tensors[f"round_zeros.{k}"] = r.zeros.to(torch.int32).contiguous()
        for k, n in enumerate(self.norms):
            tensors[f"norm_weight.{k}"] = n.weight.float().contiguous()
        save_file(tensors, str(folder / RESULTS_TENSORS), metadata={"format": "pt"})
        doc = {
            "norm_offset": self.norm_offset,
            "scales": [{k: v for k, v in asdict(e).items() if k != "scales"} for e in self.scales],
            "clips": [{k: v for k, v in asdict(c).items() if k not in ("min_val", "max_val")} for c in self.clips],
            "layer_seconds": self.layer_seconds,
            "info": self.info,
        }
        if self.roundings:  # absent for AWQ alone, so its files stay as they were
            doc["roundings"] = [
                {k: v for k, v in asdict(r).items() if k not in ("q", "scales", "zeros")} for r in self.roundings
            ]
        if self.norms:
            doc["norms"] = [{"layer": n.layer, "name": n.name} for n in self.norms]
        (folder / RESULTS_JSON).write_text(json.dumps(_json_safe(doc), indent=1))

    @classmethod
    def load(cls, folder: Path) -> AWQResults:
        """Read a result written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / RESULTS_JSON).is_file() or not (folder / RESULTS_TENSORS).is_file():
            raise FileNotFoundError(f"{folder} holds no {RESULTS_JSON} + {RESULTS_TENSORS}; was it written by awqkit?")
        doc = json.loads((folder / RESULTS_JSON).read_text())
        t = load_file(str(folder / RESULTS_TENSORS))
        scales = [ScaleEntry(scales=t[f"scale.{i}"], **e) for i, e in enumerate(doc["scales"])]
        clips = [
            ClipEntry(min_val=t[f"clip_min.{j}"], max_val=t[f"clip_max.{j}"], **c) for j, c in enumerate(doc["clips"])
        ]
        roundings = [
            RoundingEntry(q=t[f"round_q.{k}"], scales=t[f"round_scales.{k}"], zeros=t[f"round_zeros.{k}"], **r)
            for k, r in enumerate(doc.get("roundings", []))
        ]
        norms = [NormEntry(weight=t[f"norm_weight.{k}"], **n) for k, n in enumerate(doc.get("norms", []))]
        return cls(
            doc["norm_offset"],
            scales,
            clips,
            doc.get("layer_seconds", []),
            doc.get("info", {}),
            roundings=roundings,
            norms=norms,
        )

    def summary(self) -> dict[str, Any]:
        return _json_safe(self._summary())

    def _summary(self) -> dict[str, Any]:
        """Per-mapping and per-layer statistics for metadata and reports (no tensors)."""
        out: dict[str, Any] = {
            "mappings": [
                {
                    "layer": e.layer,
                    "prev": e.prev,
                    "linears": e.linears,
                    "mode": e.mode,
                    "alpha": round(e.alpha, 4),
                    "loss_rtn": e.loss_identity,
                    "loss_awq": e.loss_best,
                    "fallback": e.fallback,
                }
                for e in self.scales
            ],
            "clips": [
                {
                    "layer": c.layer,
                    "name": c.name,
                    "mean_ratio": round(c.mean_ratio, 4),
                    "err_before": c.err_before,
                    "err_after": c.err_after,
                }
                for c in self.clips
            ],
            "layer_seconds": [round(s, 3) for s in self.layer_seconds],
        }
        if self.roundings:
            out["roundings"] = [
                {"layer": r.layer, "name": r.name, "method": r.method, "loss_rtn": r.loss_rtn, "loss": r.loss}
                for r in self.roundings
            ]
        if self.norms:
            out["norms"] = [{"layer": n.layer, "name": n.name} for n in self.norms]
        return out


def apply_layer_results(model: nn.Module, results: AWQResults, layer: int) -> None:
    """Fold the scales, apply the clips, set the rounded linears' and learned norms' weights recorded for decoder
    layer ``layer`` (in recorded order).

    The touched modules are computed in float32 and cast back to their dtype, exactly as the search
    pipeline does, so re-applying reproduces its weights bit for bit.
    """
    names = [n for e in results.scales if e.layer == layer for n in [e.prev, *e.linears]]
    names += [c.name for c in results.clips if c.layer == layer]
    names += [r.name for r in results.roundings if r.layer == layer]
    names += [n.name for n in results.norms if n.layer == layer]
    dtypes = {}
    for n in dict.fromkeys(names):
        mod = model.get_submodule(n)
        dtypes[n] = next(mod.parameters()).dtype
        mod.float()
    for e in results.scales:
        if e.layer == layer:
            fold_scales(
                model.get_submodule(e.prev),
                [_linear(model, n) for n in e.linears],
                e.scales,
                results.norm_offset,
                (e.heads[0], e.heads[1]) if e.heads else None,
            )
    for c in results.clips:
        if c.layer == layer:
            apply_clip(_linear(model, c.name), c.min_val, c.max_val)
    for r in results.roundings:
        if r.layer == layer:
            lin = _linear(model, r.name)
            lin.weight.data.copy_(r.weight().to(lin.weight.device))
    for ne in results.norms:
        if ne.layer == layer:
            norm = model.get_submodule(ne.name)
            if not isinstance(norm.weight, Tensor) or norm.weight.shape != ne.weight.shape:
                raise TypeError(f"the result's norm {ne.name!r} [{ne.weight.numel()}] does not fit the model's module")
            norm.weight.data.copy_(ne.weight.to(norm.weight.device))
    for n, dt in dtypes.items():
        model.get_submodule(n).to(dt)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """The linear ``name`` of ``model``; a result naming anything else does not belong to this model."""
    mod = model.get_submodule(name)
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"the result names {name!r} as a linear, but the model holds a {type(mod).__name__} there")
    return mod


@torch.no_grad()
def apply_results(model: nn.Module, results: AWQResults) -> None:
    """Re-apply a whole search result to a fresh float ``model`` (same architecture and weights)."""
    layers = {e.layer for e in results.scales} | {c.layer for c in results.clips} | {r.layer for r in results.roundings}
    layers |= {n.layer for n in results.norms}
    for layer in sorted(layers):
        apply_layer_results(model, results, layer)


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become None, so the metadata stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
