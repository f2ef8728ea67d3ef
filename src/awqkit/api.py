"""Public entry points: :func:`quantize` (typed configs) and :func:`quantize_with_awq` (the platform's call).

[STEP 1] load the float model  → [STEP 2] choose the linears to quantize → [STEP 3] calibration blocks
→ [STEP 4] search + apply (AWQ only) → [STEP 5] pack → [STEP 6] save (atomic) with metadata.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from awqkit import __version__
from awqkit.algo.results import AWQResults
from awqkit.arch import resolve_arch, spec_for_architectures
from awqkit.bench.resources import track_peak_rss
from awqkit.calib import load_calibration
from awqkit.config import CalibConfig, QuantConfig, SearchConfig, to_dict
from awqkit.engine import Source, follow_layers, open_source, run_layers
from awqkit.errors import InputError
from awqkit.files import sha256_file
from awqkit.io.destination import (
    check_destination,
    check_free_space,
    check_writable,
    commit,
    recover,
    resumable,
    staging,
)
from awqkit.io.progress import RunProgress, has_progress, run_key
from awqkit.io.save import normal_permissions, parse_size, quantized_config, write_side_files, writing_errors
from awqkit.io.source import SourceCheck, SourceInfo, inspect_source
from awqkit.io.training import training_link
from awqkit.parallel import DataParallel
from awqkit.parallel import current as current_parallel
from awqkit.preflight import (
    check_calibration_source,
    check_device,
    check_seq_len,
    expected_output_bytes,
)
from awqkit.report.card_meta import check_base_model, infer_base_model
from awqkit.report.model_card import write_model_card
from awqkit.spec import QuantizationSpec, QuantMethod, spec_metadata, warn_unapplied
from awqkit.targets import Targets, select_targets

logger = logging.getLogger(__name__)

METHODS = tuple(m.value for m in QuantMethod if m.quantizes)


@dataclass
class QuantizeReport:
    path: Path
    metadata: dict[str, Any]
    results: AWQResults | None
    seconds: float
    peak_rss_bytes: int


def _method_and_quant(
    method: str | None, spec: QuantizationSpec | None, quant: QuantConfig | None
) -> tuple[str, QuantConfig, QuantizationSpec]:
    """``(method, quant, spec)`` from what the caller passed (see :func:`quantize`)."""
    if spec is not None:
        if quant is not None:
            raise InputError("pass either spec or quant, not both (the spec's weights settings are the QuantConfig)")
        if method is not None and QuantMethod.parse(method) is not spec.method:
            raise InputError(f"method={method!r} disagrees with spec.method={spec.method.value!r}; pass one of them")
        if not spec.method.quantizes:
            raise InputError("spec.method is 'none' (the float model): there is nothing to quantize")
        warn_unapplied(spec, logger)
        method, quant = spec.method.value, spec.to_quant_config()
    method = method or "awq"
    quant = quant or QuantConfig()
    if method not in METHODS:
        raise InputError(f"method {method!r} is not supported; choose one of {list(METHODS)}")
    return method, quant, spec or QuantizationSpec.from_quant_config(method, quant)


def _check_before_loading(
    src: str | Path, dst: str | Path, method: str, calib: CalibConfig, device: str | torch.device, overwrite: bool
) -> tuple[Path, torch.device, SourceCheck]:
    """The checks of :mod:`awqkit.preflight` that need no model: ``(dst, device, source check)``."""
    recover(dst, keep=has_progress)  # a killed run's progress stays until this run's key is known
    path = check_destination(dst, overwrite=overwrite, src=src)
    check_writable(path.parent)
    dev = check_device(device)
    checked = inspect_source(src)
    if QuantMethod(method).calibrates:
        check_calibration_source(calib.source)
        if checked.config is not None:
            check_seq_len(calib.seq_len, checked.config, str(src))
    return path, dev, checked


def quantize(
    src: str | Path,
    dst: str | Path,
    *,
    method: str | None = None,
    spec: QuantizationSpec | None = None,
    quant: QuantConfig | None = None,
    calib: CalibConfig | None = None,
    search: SearchConfig | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    parallel: DataParallel | None = None,
    base_model: str | None = None,
) -> QuantizeReport:
    """Quantize the float model at ``src`` with ``method`` (default "awq"; one of :data:`METHODS`: "rtn", "awq",
    "gptq", "adaround", "awq-gptq", "awq-refine", see :meth:`awqkit.spec.QuantMethod.search_config`) and write it
    to ``dst``. Every method writes the format ``quant.format`` asks for (:attr:`QuantConfig.output_format`: AutoAWQ
    GEMM at 4 bits by default, compressed-tensors ``pack-quantized`` at other widths, with ``bits_overrides`` or
    with ``format="compressed-tensors"``).

    ``spec`` (a :class:`~awqkit.spec.QuantizationSpec`) may replace ``method`` + ``quant``: its
    weights part becomes the QuantConfig; parts awqkit does not apply (activations, KV cache, ...) are
    warned about and recorded as ``not_applied`` in the metadata. When the source folder holds
    ``training_metadata.json`` it is copied into ``dst`` and linked from the metadata (``"training"``).

    Everything that can be checked is checked before calibration starts (:mod:`awqkit.preflight`).
    ``dst`` is written to a temporary sibling and put in place when complete (:mod:`awqkit.io.destination`);
    an existing ``dst`` is refused unless ``overwrite``, and even then only a folder awqkit wrote (or an empty
    one) is replaced. Same inputs and seed give identical tensors.

    Under ``torchrun`` (an initialised ``torch.distributed`` group, or ``parallel``) every rank calls this with
    the same arguments: the AWQ search runs data-parallel (:mod:`awqkit.parallel`), rank 0 writes ``dst``, and
    every rank returns its report once ``dst`` is in place. Such a run starts afresh after a kill.

    ``base_model``: the source model's Hugging Face Hub id (``owner/name``) for the model card; by default the
    one the source names (:func:`~awqkit.report.card_meta.infer_base_model`), if any. A value that is not a
    Hub id is refused before anything runs.
    """
    base_model = check_base_model(base_model) if base_model is not None else None
    method, quant, spec = _method_and_quant(method, spec, quant)
    calib = calib or CalibConfig()
    search = QuantMethod(method).search_config(search or SearchConfig())
    par = parallel if parallel is not None else current_parallel()
    if par.active and not par.is_writer:
        return _follow(src, dst, method, quant, calib, search, device, trust_remote_code, par)
    dst, dev, checked = _check_before_loading(src, dst, method, calib, device, overwrite)
    t0 = time.perf_counter()
    with track_peak_rss() as rss:
        # [STEP 1] the source
        source = _open(src, checked, method, calib, trust_remote_code)
        model, info = source.model, source.info
        arch = resolve_arch(model)
        # [STEP 2] what is quantized, and room for it
        targets = select_targets(model, arch, quant)
        timings: dict[str, float] = {"load": time.perf_counter() - t0}
        widest = max([quant.bits, *(bits for _, bits in quant.bits_overrides)])  # an upper bound is enough here
        check_free_space(dst.parent, expected_output_bytes(model, targets.quantized, widest, quant.group_size))
        ids = None
        if QuantMethod(method).calibrates:
            # [STEP 3] calibration blocks
            check_seq_len(calib.seq_len, model.config, str(src))
            t = time.perf_counter()
            ids = _calibration_ids(calib, source)
            timings["calibration_data"] = time.perf_counter() - t
        calib_meta = _calib_metadata(calib, ids) if ids is not None else {}
        key = _run_key(info, method, quant, calib, calib_meta, search if ids is not None else None, dev, par)
        adopt = _resumable(dst, key, allow=not par.active)
        # [STEP 4-6] search (AWQ), pack and write layer by layer, then the rest of the folder, then commit
        with writing_errors(dst), staging(dst, adopt=adopt, keep_on_interrupt=has_progress) as staged:
            t = time.perf_counter()
            results, files = run_layers(
                source,
                arch,
                set(targets.quantized),
                quant,
                ids=ids,
                search=search,
                device=dev,
                staged=staged,
                key=key,
                max_shard_bytes=parse_size("2GB"),
                progress=progress,
                parallel=par,
            )
            timings["layers"] = time.perf_counter() - t
            timings["total_before_save"] = time.perf_counter() - t0
            metadata = build_metadata(
                method,
                quant,
                calib if ids is not None else None,
                search if ids is not None else None,
                info,
                targets,
                results,
                calib_meta,
                timings,
                spec=spec,
                training=training_link(info),
            )
            if par.active:
                metadata["data_parallel"] = {"world_size": par.world, "transport": par.transport}
            _write_rest(staged, dst, source, quant, targets, results, files, metadata, base_model)
            commit(staged, dst)
    par.barrier()  # the other ranks read dst once it is in place
    seconds = time.perf_counter() - t0
    logger.info("quantized %s with %s in %.1f s (peak RSS %.2f GB)", src, method, seconds, rss.peak / 1e9)
    written = json.loads((dst / "quantization_metadata.json").read_text(encoding="utf-8"))
    return QuantizeReport(dst, written, results, seconds, rss.peak)


def _run_key(
    info: SourceInfo,
    method: str,
    quant: QuantConfig,
    calib: CalibConfig,
    calib_meta: dict[str, Any],
    search: SearchConfig | None,
    dev: torch.device,
    par: DataParallel,
) -> str:
    """What a staged output's progress depends on: a resumed run must have been started with the same key."""
    return run_key(
        {
            "source": info.weights_sha256 or info.src,
            "method": method,
            "quant": to_dict(quant),
            "calib": calib_meta and {**to_dict(calib), "source": calib_meta["sha256"]},
            "search": to_dict(search) if search is not None else None,
            "awqkit": __version__,
            "torch": torch.__version__,
            "device": dev.type,
            **({"data_parallel": par.world} if par.active else {}),
        }
    )


def _write_rest(
    staged: Path,
    dst: Path,
    source: Source,
    quant: QuantConfig,
    targets: Targets,
    results: AWQResults | None,
    files: list[str],
    metadata: dict[str, Any],
    base_model: str | None,
) -> None:
    """Everything but the weights into the staged folder (config, tokenizer and side files, the search result,
    the model card), then the permissions a finished folder has. A GGUF source has no tokenizer files: the
    tokenizer and chat template transformers built from the GGUF's metadata are written instead (the GGUF's
    folder may hold anything, so nothing is copied from it). The card's base model is ``base_model``, else the
    Hub id the source names, else none (never a local path)."""
    model, info = source.model, source.info
    config = quantized_config(model, quant, sorted(targets.kept))
    gguf = info.kind == "gguf"
    src_dir = None if gguf else info.folder
    write_side_files(model, staged, src_dir=src_dir, config=config, metadata=metadata, weight_files=files)
    if gguf:
        source.tokenizer.save_pretrained(staged)
    if results is not None:
        results.save(staged)
    base = base_model or infer_base_model(info.src, info.kind, info.folder)
    write_model_card(staged, base_model=base, metadata=metadata, name=dst.name)
    normal_permissions(staged)


def _open(src: str | Path, checked: SourceCheck, method: str, calib: CalibConfig, trust_remote_code: bool) -> Source:
    """The source, read layer by layer when it is a safetensors folder of a known architecture (data-free
    calibration generates with the whole model, so it loads it whole)."""
    known = spec_for_architectures((checked.config or {}).get("architectures") or [])
    lazy_ok = not (QuantMethod(method).calibrates and calib.source == "self")
    return open_source(src, checked, known if lazy_ok else None, trust_remote_code=trust_remote_code)


def _calibration_ids(calib: CalibConfig, source: Source) -> torch.Tensor:
    """The calibration blocks ``[n_samples, seq_len]``, seeded (every data-parallel rank draws the same)."""
    torch.manual_seed(calib.seed)
    return load_calibration(calib.source, source.tokenizer, calib, model=source.model)


def _follow(
    src: str | Path,
    dst: Path | str,
    method: str,
    quant: QuantConfig,
    calib: CalibConfig,
    search: SearchConfig,
    device: str | torch.device,
    trust_remote_code: bool,
    par: DataParallel,
) -> QuantizeReport:
    """A data-parallel rank other than 0: read the source and the calibration as rank 0 does, run the AWQ layer
    loop on this rank's batches (writing nothing), then wait for rank 0 to put ``dst`` in place."""
    t0 = time.perf_counter()
    dev = check_device(device)
    checked = inspect_source(src)
    results = None
    with track_peak_rss() as rss:
        if QuantMethod(method).calibrates:
            check_calibration_source(calib.source)
            source = _open(src, checked, method, calib, trust_remote_code)
            targets = select_targets(source.model, resolve_arch(source.model), quant)
            results = follow_layers(
                source,
                set(targets.quantized),
                quant,
                ids=_calibration_ids(calib, source),
                search=search,
                device=dev,
                parallel=par,
            )
            del source
        par.barrier()
    path = Path(dst).expanduser().resolve()
    written = json.loads((path / "quantization_metadata.json").read_text(encoding="utf-8"))
    return QuantizeReport(path, written, results, time.perf_counter() - t0, rss.peak)


def _resumable(dst: Path, key: str, allow: bool = True) -> Path | None:
    """The staged folder a killed run of this same command left (None: start afresh); staged folders of killed
    runs of other commands are removed, with a notice. ``allow=False`` (data-parallel runs): never resume."""
    found = resumable(dst, lambda p: RunProgress.read_key(p) == key) if allow else []
    others = [p for p in resumable(dst, has_progress) if p not in found]
    for p in others:
        logger.warning(
            "a killed run with other settings (source, method, calibration or search) left %s; starting afresh", p
        )
    recover(dst, keep=lambda p: bool(found) and p == found[0])
    return found[0] if found else None


def _calib_metadata(calib: CalibConfig, ids: torch.Tensor) -> dict[str, Any]:
    source_hash = None
    if calib.source != "self":
        source_hash = sha256_file(calib.source)
    return {
        "source": str(calib.source),
        "sha256": source_hash,
        "n_samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "seed": calib.seed,
    }


def build_metadata(
    method: str,
    quant: QuantConfig,
    calib: CalibConfig | None,
    search: SearchConfig | None,
    info: SourceInfo,
    targets: Targets,
    results: AWQResults | None,
    calib_meta: dict[str, Any],
    timings: dict[str, float],
    *,
    spec: QuantizationSpec | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The contents of ``quantization_metadata.json``.

    ``spec`` (default: the one ``method`` + ``quant`` apply) is written as ``"spec"``, with its unapplied
    parts as ``"not_applied"``; ``training`` (:func:`awqkit.platform.info.training_link`) as ``"training"``.
    """
    import transformers

    meta: dict[str, Any] = {
        "format_version": 1,
        "method": method,
        "bits": quant.bits,
        "group_size": quant.group_size,
        "zero_point": quant.zero_point,
        "format": quant.output_format,
        "quant_config": to_dict(quant),
        "search_config": to_dict(search) if search is not None else None,
        "calib_config": to_dict(calib) if calib is not None else None,
        "calibration": calib_meta or None,
        "source_model": info.to_dict(),
        "quantized_modules": len(targets.quantized),
        "kept_float": targets.kept,
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "versions": {
            "awqkit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    meta.update(spec_metadata(spec if spec is not None else QuantizationSpec.from_quant_config(method, quant)))
    if training is not None:
        meta["training"] = training
    if results is not None:
        meta["awq"] = results.summary()
    return meta


def quantize_with_awq(
    src: str | Path,
    dst: str | Path,
    calib_path: str | Path | None,
    bits: int = 4,
    group_size: int = 128,
    seed: int = 13,
    skip_lm_head: bool = True,
    backend: str | None = None,
    method: str = "awq",
    base_model: str | None = None,
    format: str = "auto",
    bits_overrides: dict[str, int] | None = None,
) -> tuple[Path, dict[str, str]]:
    """The platform's call: quantize ``src`` into ``dst``; returns (folder, string metadata).

    Args:
        calib_path: calibration file (text, JSONL, CSV) or None / "self" for data-free calibration.
        skip_lm_head: keep the LM head (and embeddings) in fp16 — awqkit never quantizes them, so
            False is refused rather than silently ignored.
        method: the quantization method, one of :data:`METHODS` ("awq", "rtn", "awq-refine", ...).
        backend: the platform's older name for ``method``, still accepted (in awqkit "backend" is the kernel).
        base_model: the source model's Hugging Face Hub id for the model card (see :func:`quantize`).
        format: the checkpoint format, ``"auto"``, ``"gemm"`` or ``"compressed-tensors"`` (:class:`QuantConfig`).
        bits_overrides: ``{module pattern: bits}`` for mixed bit widths (compressed-tensors; :class:`QuantConfig`).
    """
    if backend is not None:
        if method != "awq" and method != backend:
            raise InputError(f"backend={backend!r} is the old name of method={method!r}; pass only method=")
        method = backend
    if not skip_lm_head:
        raise InputError("awqkit never quantizes the LM head; call with skip_lm_head=True")
    report = quantize(
        src,
        dst,
        method=method,
        quant=QuantConfig(
            bits=bits, group_size=group_size, format=format, bits_overrides=tuple((bits_overrides or {}).items())
        ),
        calib=CalibConfig(source=str(calib_path) if calib_path is not None else "self", seed=seed),
        base_model=base_model,
    )
    m = report.metadata
    flat = {
        "method": m["method"],
        "bits": str(m["bits"]),
        "group_size": str(m["group_size"]),
        "zero_point": str(m["zero_point"]).lower(),
        "format": str(m["format"]),
        "seed": str(seed),
        "calibration": str(calib_path if calib_path is not None else "self"),
        "source_model": str(src),
        "quantize_seconds": f"{report.seconds:.1f}",
        "awqkit_version": __version__,
        "lm_head": "fp16",
    }
    if m.get("calibration"):
        flat["calibration_sha256"] = str(m["calibration"]["sha256"])
        flat["calibration_samples"] = str(m["calibration"]["n_samples"])
        flat["calibration_seq_len"] = str(m["calibration"]["seq_len"])
    return report.path, flat
