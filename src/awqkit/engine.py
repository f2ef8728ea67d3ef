"""One quantization run from the float source to the weights of a staged output folder, a decoder layer at a time.

* **Source** (:func:`open_source`): a local safetensors folder is read lazily (:class:`awqkit.io.lazy.LazyModel`:
  parameters on the meta device; the embeddings and final norm are read to capture the first layer's inputs,
  then one layer at a time); GGUF, ``.bin`` and hub sources are loaded whole, as before.
* **Output** (:class:`awqkit.io.stream.OutputWriter`): the shards are planned up front and written part by part:
  the tensors outside the layers first, then each layer as it finishes (packed, written, freed).
* **Progress** (:class:`awqkit.io.progress.RunProgress`): after each written layer its results and the next
  layer's inputs are recorded in the staged folder, so a killed run continues after its last finished layer and
  writes the same bytes as an uninterrupted one (:func:`run_layers` with ``resume=True``).

Peak memory is then about the runtime, one layer in float32 with its search copies, the calibration activations
and the embedding during capture, whatever the number of layers (with glibc's heap bounded: :mod:`awqkit.heap`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from awqkit.algo.results import AWQResults
from awqkit.arch import ArchSpec, get_layers
from awqkit.config import QuantConfig, SearchConfig
from awqkit.files import sha256_named_files
from awqkit.heap import bound_heap, release_free_memory
from awqkit.io.lazy import LazyModel, lazy_or_none
from awqkit.io.progress import RunProgress
from awqkit.io.source import (
    SourceCheck,
    SourceInfo,
    check_finite,
    check_finite_tensors,
    load_source,
)
from awqkit.io.stream import OutputWriter
from awqkit.nn.qlinear import QuantLinear
from awqkit.parallel import SINGLE, DataParallel
from awqkit.pipeline import run_awq

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """The float model to quantize; ``lazy`` is set when its parameters are read on demand."""

    model: nn.Module
    tokenizer: Any
    info: SourceInfo
    lazy: LazyModel | None


def open_source(
    src: str | Path, checked: SourceCheck, arch: ArchSpec | None, *, trust_remote_code: bool = False
) -> Source:
    """The source, read lazily when it is a local safetensors folder of a known architecture (see the module
    docstring); every tensor is checked for NaN/Inf, one at a time."""
    lazy = (
        lazy_or_none(checked.folder, arch.layers, trust_remote_code=trust_remote_code)
        if checked.kind == "folder" and arch is not None
        else None
    )
    if lazy is None:
        model, tokenizer, info = load_source(src, trust_remote_code=trust_remote_code, checked=checked)
        check_finite(model, f"source model {src}")
        return Source(model, tokenizer, info, None)
    from transformers import AutoTokenizer

    logger.info("reading %s layer by layer from its safetensors shards", src)
    check_finite_tensors(lazy.reader.iter_chunks(), f"source model {src}")
    tokenizer = AutoTokenizer.from_pretrained(checked.load_dir, trust_remote_code=trust_remote_code)
    config = lazy.model.config
    info = SourceInfo(
        src=str(src),
        kind="folder",
        folder=checked.folder,
        architectures=list(getattr(config, "architectures", None) or [type(lazy.model).__name__]),
        weights_sha256=sha256_named_files(checked.files),
        name_or_path=str((checked.config or {}).get("_name_or_path") or src),
    )
    return Source(lazy.model, tokenizer, info, lazy)


class _ReadHooks:
    """Reads each layer before the pipeline processes it and frees it after (a data-parallel rank that does
    not write: :func:`follow_layers`)."""

    def __init__(self, source: Source, first: int) -> None:
        self.source, self.first = source, first

    def load(self, index: int, layer: nn.Module) -> None:
        lazy = self.source.lazy
        if lazy is not None:
            if index == self.first:  # the first layer's inputs are captured: the embeddings are no longer needed
                lazy.release_outside_layers()
            lazy.load(lazy.names_under(f"{lazy.layers_prefix}.{index}"))

    def finish(self, index: int, layer: nn.Module, results: AWQResults | None, hidden: list[Tensor] | None) -> None:
        if self.source.lazy is not None:
            layer.to("meta")
        release_free_memory()


class _Hooks(_ReadHooks):
    """Reads each layer before the pipeline processes it and writes, records and frees it after."""

    def __init__(self, source: Source, writer: OutputWriter, record: RunProgress, first: int) -> None:
        super().__init__(source, first)
        self.writer, self.record = writer, record

    def finish(self, index: int, layer: nn.Module, results: AWQResults | None, hidden: list[Tensor] | None) -> None:
        prefix = f"{self.writer.layers_prefix}.{index}."
        self.writer.write_layer(index, layer, results.integers_for(index, prefix) if results is not None else None)
        self.writer.flush()
        self.record.record_layer(index, results, hidden)
        release_free_memory()


def _meta_quant_linears(model: nn.Module, arch: ArchSpec, targets: set[str], quant: QuantConfig, layers: int) -> None:
    """Layers a killed run already wrote: their target linears become empty (meta) QuantLinear modules, so the
    model describes the checkpoint (its config lists what stays float) without being computed again."""
    for name in sorted(targets):
        parts = name[len(arch.layers) + 1 :].split(".", 1)
        if not name.startswith(arch.layers + ".") or int(parts[0]) >= layers:
            continue
        parent_name, _, leaf = name.rpartition(".")
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is a quantization target but a {type(lin).__name__}, not nn.Linear")
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
        setattr(model.get_submodule(parent_name), leaf, q)


def run_layers(
    source: Source,
    arch: ArchSpec,
    targets: set[str],
    quant: QuantConfig,
    *,
    ids: Tensor | None,
    search: SearchConfig,
    device: torch.device,
    staged: Path,
    key: str,
    max_shard_bytes: int,
    progress: bool = True,
    parallel: DataParallel = SINGLE,
) -> tuple[AWQResults | None, list[str]]:
    """Quantize every layer of ``source`` (AWQ when calibration ``ids`` are given, else round-to-nearest) into
    the shards of ``staged``, continuing a killed run's progress recorded there under ``key``; returns the
    search results (AWQ) and the weight files written. Under data parallelism this is rank 0's part; the
    other ranks run :func:`follow_layers`."""
    bound_heap()  # the peak stays that of one layer however many layers follow (awqkit.heap)
    model = source.model
    layers = get_layers(model, arch)
    writer = OutputWriter(model, targets, quant, arch.layers, max_shard_bytes)
    record = RunProgress(staged, key)
    state = record.state()
    if state is not None and state.get("extra", {}).get("layout") != writer.layout.to_json():
        logger.warning("the progress in %s was recorded for another output layout; starting afresh", staged)
        state = None
    done, hidden, results = 0, None, None
    if source.lazy is not None and (state is None or ids is not None):
        source.lazy.load_outside_layers()  # written now, or run to capture the first layer's inputs
    if state is not None:
        done, hidden, results = record.resume(arch.norm_offset)
        writer.open(staged, resume=True)
        writer.mark_done(done)
        _meta_quant_linears(model, arch, targets, quant, done)
        logger.warning("continuing the run recorded in %s after its layer %d of %d", staged, done, len(layers))
    else:
        writer.open(staged)
        writer.write_outside_layers(source.lazy.read if source.lazy is not None else _state_reader(model))
        record.start({"layout": writer.layout.to_json()})
    hooks = _Hooks(source, writer, record, done)
    if ids is not None:
        results = run_awq(
            model,
            ids,
            quant,
            search,
            targets,
            device=device,
            progress=progress,
            hooks=hooks,
            start=done,
            hidden=hidden,
            results=results,
            parallel=parallel,
        )
    else:
        for i in range(done, len(layers)):
            hooks.load(i, layers[i])
            hooks.finish(i, layers[i], None, None)
    files = writer.close()
    record.remove()
    return results, files


def follow_layers(
    source: Source,
    targets: set[str],
    quant: QuantConfig,
    *,
    ids: Tensor,
    search: SearchConfig,
    device: torch.device,
    parallel: DataParallel,
) -> AWQResults:
    """A data-parallel rank other than 0: the same AWQ layer loop on its share of the calibration batches,
    reading the layers as rank 0 does and writing nothing (:mod:`awqkit.parallel`)."""
    bound_heap()
    if source.lazy is not None:
        source.lazy.load_outside_layers()
    return run_awq(
        source.model,
        ids,
        quant,
        search,
        targets,
        device=device,
        progress=False,
        hooks=_ReadHooks(source, 0),
        parallel=parallel,
    )


def _state_reader(model: nn.Module) -> Any:
    def read(names: list[str]) -> dict[str, Tensor]:
        state = model.state_dict()
        return {n: state[n] for n in names}

    return read


__all__ = ["Source", "follow_layers", "open_source", "run_layers"]
