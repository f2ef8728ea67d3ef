"""Write a quantized checkpoint's tensors as the engine finishes each decoder layer (issue 13: memory).

:class:`OutputWriter` plans the whole output before any tensor exists (:func:`output_specs`: every tensor's name,
shape and storage dtype, from the model skeleton: quantized linears become :class:`~awqkit.nn.qlinear.QuantLinear`
buffers, every other float tensor fp16, the tied output head left out), lays it out in shards
(:class:`~awqkit.io.shards.ShardLayout`, the assignment and file names of
:func:`awqkit.io.save.save_quantized`, so the files are byte-identical to saving the whole quantized model), and
writes each part when it is ready: the tensors outside the decoder layers (:meth:`write_outside_layers`), then
each finished layer (:meth:`write_layer`: its linears packed, its tensors written, its memory freed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from awqkit.config import QuantConfig
from awqkit.io.shards import ShardLayout, ShardWriter, TensorSpec
from awqkit.io.state import convert_for_storage
from awqkit.nn import hf
from awqkit.nn.qlinear import QuantLinear
from awqkit.nn.replace import replace_linears


def tied_output_key(model: nn.Module) -> str | None:
    """The output head's weight name when the config ties it to the input embedding (it is stored once, under
    the embedding's name), else None."""
    config = hf.config(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out, inp = hf.output_embeddings(model), hf.input_embeddings(model)
    if not getattr(text, "tie_word_embeddings", False) or out is None or out is inp:
        return None
    return next((f"{n}.weight" for n, m in model.named_modules() if m is out), None)


def output_specs(model: nn.Module, targets: Iterable[str], quant: QuantConfig) -> list[TensorSpec]:
    """Every tensor of the quantized checkpoint of ``model`` (real or on the meta device) with the linears
    ``targets`` quantized under ``quant``, in state-dict order (see the module docstring)."""
    targets = set(targets)
    shapes: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for name in targets:
        lin = model.get_submodule(name)
        if isinstance(lin, QuantLinear):
            continue
        if not isinstance(lin, nn.Linear):  # targets are the decoder layers' nn.Linear modules
            raise TypeError(f"{name} is {type(lin).__name__}, not an nn.Linear to quantize")
        with torch.device("meta"):
            q = QuantLinear(
                lin.in_features,
                lin.out_features,
                quant.bits_for(name),
                quant.group_size,
                bias=lin.bias is not None,
                zero_point=quant.zero_point,
                format=quant.layout,
            )
        shapes[name] = {k: (tuple(t.shape), t.dtype) for k, t in q.state_dict().items()}
    tied = tied_output_key(model)
    specs: list[TensorSpec] = []
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if key == tied or t.numel() == 0:
            continue
        if module in shapes:
            if leaf == "weight":  # the linear's place in the state dict takes its packed buffers
                specs += [TensorSpec(f"{module}.{k}", s, d) for k, (s, d) in shapes[module].items()]
            continue
        specs.append(TensorSpec(key, tuple(t.shape), torch.float16 if t.is_floating_point() else t.dtype))
    return specs


class OutputWriter:
    """The shards of one quantized checkpoint, written part by part (see the module docstring)."""

    def __init__(
        self, model: nn.Module, targets: Iterable[str], quant: QuantConfig, layers_prefix: str, max_shard_bytes: int
    ) -> None:
        self.targets = set(targets)
        self.quant = quant
        self.layers_prefix = layers_prefix
        self.layout = ShardLayout.plan(output_specs(model, self.targets, quant), max_shard_bytes)
        self.writer: ShardWriter | None = None

    def open(self, folder: Path, *, resume: bool = False) -> None:
        """Create the shard files in ``folder`` (or reopen them to continue a killed run's)."""
        self.writer = ShardWriter(folder, self.layout, resume=resume)

    @property
    def _w(self) -> ShardWriter:
        if self.writer is None:
            raise RuntimeError("OutputWriter.open() was not called (or the writer is closed)")
        return self.writer

    def _names(self, keep: Callable[[str], bool]) -> list[str]:
        return [s.name for shard in self.layout.shards for s in shard if keep(s.name)]

    def outside_layers(self) -> list[str]:
        return self._names(lambda n: not n.startswith(self.layers_prefix + "."))

    def layer_names(self, index: int) -> list[str]:
        prefix = f"{self.layers_prefix}.{index}."
        return self._names(lambda n: n.startswith(prefix))

    def mark_done(self, layers: int) -> None:
        """A resumed writer: the tensors outside the layers and of layers ``0 .. layers - 1`` are on disk."""
        self._w.mark_written(self.outside_layers() + [n for i in range(layers) for n in self.layer_names(i)])

    def write_outside_layers(self, read: Callable[[list[str]], dict[str, Tensor]]) -> None:
        """The tensors outside the decoder layers (embeddings, final norm, output head), from ``read`` (their
        names -> tensors in the model's stored dtype), one at a time."""
        for name in self.outside_layers():
            t = read([name])[name]
            self._w.write(
                name, convert_for_storage(name, t, torch.float16 if t.is_floating_point() else t.dtype), rewrite=True
            )

    def write_layer(
        self, index: int, layer: nn.Module, integers: Mapping[str, tuple[Tensor, Tensor, Tensor]] | None = None
    ) -> None:
        """Pack decoder layer ``index``'s target linears (from its folded and clipped float weights, or the
        ``integers`` a rounding method chose, keyed by layer-relative name), write all its tensors, then put the
        layer on the meta device (its memory is freed)."""
        prefix = f"{self.layers_prefix}.{index}."
        names = [n[len(prefix) :] for n in self.targets if n.startswith(prefix)]
        q = self.quant
        bits = {n: q.bits_for(prefix + n) for n in names}
        replace_linears(layer, sorted(names), bits, q.group_size, q.zero_point, integers=integers, format=q.layout)
        state = layer.state_dict()
        for name in self.layer_names(index):
            t = state[name[len(prefix) :]]
            dtype = self.layout_dtype(name)
            self._w.write(name, convert_for_storage(name, t, dtype), rewrite=True)
        layer.to("meta")

    def flush(self) -> None:
        """fsync the files (before a layer is recorded as done)."""
        self._w.flush()

    def layout_dtype(self, name: str) -> torch.dtype:
        return self.layout.spec(name).dtype

    def close(self) -> list[str]:
        """Finish the files (CheckpointError when a tensor was never written); returns their names."""
        files = self._w.close()
        self.writer = None
        return files


__all__ = ["OutputWriter", "output_specs", "tied_output_key"]
