"""What a model folder is (``awqkit info PATH``), and the link from a quantized folder to its training run.

Sources, files first and the folder name last:

* :func:`awqkit.io.detect.detect_quantization_method`: method, bits, group size (the storage config:
  ``config.json``'s ``quantization_config`` or a side file; ``quantization_metadata.json``; then the folder
  name), and :func:`~awqkit.io.detect.describe_loader`: whether awqkit's loader reads the folder. The
  method shown, the spec and the loader's verdict all come from that one detection, so ``info``,
  ``load_quantized`` and ``awqkit eval`` agree on every folder;
* ``quantization_metadata.json`` (awqkit): the spec and what of it was not applied, calibration, the
  source model (path, architectures, weights sha256), the training link, versions;
* the ``.meta.json`` beside the calibration file, when that file was built by ``awqkit calib build`` and is
  still where the metadata says (:func:`awqkit.platform.calib_build.read_calibration_meta`): the prompts drawn
  (``n_samples``) and the training set's rows (``train_rows``, the number in its name). ``awqkit info`` on such
  a calibration file itself prints the same (:func:`format_calibration_file`);
* ``training_metadata.json``: written by training; carried verbatim into the quantized folder, and linked
  from ``quantization_metadata.json["training"]`` (:func:`training_link`): the file's sha256, the source
  folder's absolute path and the sha256 of its weights (the same hash as ``source_model.weights_sha256``,
  :func:`awqkit.files.sha256_named_files`);
* the folder name, parsed as a run name (:func:`awqkit.naming.parse_run_name`), for the parts
  no file gives (base model, dataset, ...); the method a name suggests is the detection's (the same parse).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awqkit.files import sha256_file, sha256_named_files
from awqkit.io.detect import describe_loader, detect_quantization_method
from awqkit.io.source import _weight_files
from awqkit.io.training import TRAINING_METADATA, read_json_dict, training_link
from awqkit.naming import RunNameError, parse_run_name
from awqkit.platform.calib_build import read_calibration_meta
from awqkit.spec import QuantizationSpec, QuantMethod, spec_from_metadata

logger = logging.getLogger(__name__)

QUANTIZATION_METADATA = "quantization_metadata.json"
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def _sizes(folder: Path) -> dict[str, Any]:
    weights = sorted({p for pat in WEIGHT_GLOBS for p in folder.glob(pat) if p.is_file()})
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {
        "weights_bytes": sum(p.stat().st_size for p in weights),
        "weight_files": len(weights),
        "folder_bytes": sum(p.stat().st_size for p in files),
        "files": len(files),
    }


@dataclass
class FolderInfo:
    """Everything :func:`describe_folder` found; ``to_dict()`` for JSON, ``format()`` for people."""

    path: Path
    detected: dict[str, Any]
    spec: QuantizationSpec | None
    spec_source: str | None
    not_applied: list[str]
    calibration: dict[str, Any] | None
    sizes: dict[str, Any]
    source_model: dict[str, Any] | None
    training_link: dict[str, Any] | None
    training_metadata: dict[str, Any] | None
    run_name: dict[str, Any] | None
    run_name_error: str | None
    quantization_metadata: dict[str, Any] | None
    checks: dict[str, Any] = field(default_factory=dict)
    loading: str | None = None
    calibration_set: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "detected": self.detected,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "spec_source": self.spec_source,
            "not_applied": self.not_applied,
            "calibration": self.calibration,
            "calibration_set": self.calibration_set,
            "sizes": self.sizes,
            "source_model": self.source_model,
            "training_link": self.training_link,
            "training_metadata": self.training_metadata,
            "run_name": self.run_name,
            "run_name_error": self.run_name_error,
            "checks": self.checks,
            "loading": self.loading,
        }

    def format(self) -> str:
        return format_info(self)


def _spec_and_source(detected: Any, qmeta: dict[str, Any] | None) -> tuple[QuantizationSpec | None, str | None]:
    """The spec from the detection: awqkit's metadata when the detection used it, else the detected method,
    bits and group size (an awqkit method only; gptq, ... have no awqkit spec)."""
    if qmeta is not None and detected.source.startswith(QUANTIZATION_METADATA):
        spec = spec_from_metadata(qmeta)
        if spec is not None:
            return spec, QUANTIZATION_METADATA + ("" if "spec" in qmeta else " (method, bits, group size)")
    method, bits, group, source = detected.method, detected.bits, detected.group_size, detected.source
    try:
        m = QuantMethod.parse("none" if method == "fp" else method)
        if not m.quantizes:
            return QuantizationSpec(m, weights_bits=bits if bits in (16, 32) else 16, group_size=None), source
        if bits is not None and group is not None:
            return QuantizationSpec(m, weights_bits=bits, group_size=group), source
    except ValueError:
        return None, None
    return None, None


def describe_folder(path: str | Path, *, verify: bool = False) -> FolderInfo:
    """Describe the model folder ``path`` (sources in the module docstring).

    ``verify``: also re-hash the source weights named by the training link and compare (slow for big
    models); the copied ``training_metadata.json`` is always checked against the link's sha256.

    Raises:
        FileNotFoundError / NotADirectoryError: ``path`` is not a folder.
    """

    folder = Path(path).expanduser()
    detected = detect_quantization_method(folder)
    loading = describe_loader(detected, folder)
    folder = folder.resolve()
    qmeta = read_json_dict(folder / QUANTIZATION_METADATA)
    tmeta = read_json_dict(folder / TRAINING_METADATA)
    try:
        run_name, run_error = parse_run_name(folder.name).to_dict(), None
    except RunNameError as exc:
        run_name, run_error = None, str(exc)
    spec, spec_source = _spec_and_source(detected, qmeta)
    not_applied = (
        list(qmeta["not_applied"])
        if qmeta and isinstance(qmeta.get("not_applied"), list)
        else (spec.unapplied() if spec is not None else [])
    )
    link = qmeta.get("training") if qmeta and isinstance(qmeta.get("training"), dict) else None
    source_model = qmeta.get("source_model") if qmeta and isinstance(qmeta.get("source_model"), dict) else None
    sizes = _sizes(folder)
    checks: dict[str, Any] = {}
    src_path = (link or {}).get("source_path") or (source_model or {}).get("src")
    if src_path and Path(src_path).is_dir() and Path(src_path).resolve() != folder:
        src_sizes = _sizes(Path(src_path))
        sizes["source_weights_bytes"] = src_sizes["weights_bytes"]
        if src_sizes["weights_bytes"]:
            sizes["ratio_to_source"] = round(sizes["weights_bytes"] / src_sizes["weights_bytes"], 4)
    if link is not None:
        if tmeta is None:
            checks["training_metadata_file"] = "missing (the link names it but the folder has no copy)"
        else:
            same = sha256_file(folder / TRAINING_METADATA) == link.get("sha256")
            checks["training_metadata_file"] = "matches the link" if same else "differs from the linked sha256"
        if verify:
            checks["source_weights"] = _verify_source(link)
    return FolderInfo(
        folder,
        detected.to_dict(),
        spec,
        spec_source,
        not_applied,
        qmeta.get("calibration") if qmeta else None,
        sizes,
        source_model,
        link,
        tmeta,
        run_name,
        run_error,
        qmeta,
        checks,
        loading,
        _calibration_set(qmeta.get("calibration") if qmeta else None),
    )


def _calibration_set(cal: Any) -> dict[str, Any] | None:
    """:func:`read_calibration_meta` of the calibration file a folder was quantized with, when it is still there
    and has a meta file; ``same_file`` says whether its sha256 is the recorded one (None when none is)."""
    if not isinstance(cal, dict) or not cal.get("source") or cal.get("source") == "self":
        return None
    file = Path(str(cal["source"])).expanduser()
    if not file.is_file():
        return None
    found = read_calibration_meta(file)
    if found is not None:
        found["same_file"] = sha256_file(file) == cal["sha256"] if cal.get("sha256") else None
    return found


def _verify_source(link: dict[str, Any]) -> str:

    src = Path(str(link.get("source_path", "")))
    if not src.is_dir():
        return f"source folder {src} not found"
    files = _weight_files(src)
    if not files:
        return f"source folder {src} holds no weights"
    return (
        "matches the link"
        if sha256_named_files(files) == link.get("source_weights_sha256")
        else "differs from the linked sha256 (the source changed since quantization)"
    )


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _set_counts(cs: dict[str, Any]) -> str:
    drawn, rows = (cs.get(k) if cs.get(k) is not None else "?" for k in ("n_samples", "train_rows"))
    return f"{drawn} prompts drawn from {rows} training rows"


def format_calibration_file(cs: dict[str, Any]) -> str:
    """What ``awqkit info`` prints for a calibration file (``cs`` from :func:`read_calibration_meta`)."""
    seed = f" with seed {cs['seed']}" if cs.get("seed") is not None else ""
    lines = [
        f"calibration:  {cs['file']}",
        f"samples:      {_set_counts(cs)}{seed} (the number in the name is the training rows)",
        f"dataset:      {cs.get('dataset_name')} ({cs.get('dataset')})",
        f"meta:         {cs['meta_path']}",
    ]
    return "\n".join(lines)


def format_info(info: FolderInfo) -> str:
    """The human-readable report printed by ``awqkit info``."""
    d = info.detected
    lines = [f"path:         {info.path}"]
    if d["method"] == "fp" and d["bits"] is not None:
        what = f"fp (not quantized, {d['bits']}-bit weights)"
    elif d["method"] == "fp":
        what = "fp (not quantized)"
    else:
        group = {None: "unknown", -1: "per channel"}.get(d["group_size"], str(d["group_size"]))
        what = f"{d['method']}, {d['bits'] if d['bits'] is not None else '?'}-bit weights, group size {group}"
    fmt = f", format {d['format']}" if d.get("format") else ""
    origin = "no quantization config" if d["source"] == "none" else f"from {d['source']}"
    lines.append(f"method:       {what} ({origin}{fmt})")
    if info.loading:
        lines.append(f"loading:      {info.loading}")
    if info.spec is not None:
        origin = "no quantization config" if info.spec_source == "none" else f"from {info.spec_source}"
        lines.append(f"spec:         {info.spec.describe()} ({origin})")
    else:
        lines.append("spec:         unknown (no awqkit metadata and not an awqkit method)")
    lines.append(f"not applied:  {', '.join(info.not_applied) if info.not_applied else 'nothing'}")
    cal = info.calibration
    if cal:
        sha = str(cal.get("sha256") or "")[:12]
        lines.append(
            f"calibration:  {cal.get('source')} ({cal.get('n_samples')} blocks x {cal.get('seq_len')} tokens, "
            f"seed {cal.get('seed')}{', sha256 ' + sha if sha else ''})"
        )
    elif info.quantization_metadata is not None:
        lines.append("calibration:  none (data-free method)")
    if info.calibration_set is not None:
        cs = info.calibration_set
        changed = "; the file there now differs from the one used" if cs.get("same_file") is False else ""
        lines.append(f"calib set:    {_set_counts(cs)} ({Path(str(cs['meta_path'])).name}{changed})")
    s = info.sizes
    size = (
        f"weights {_mb(s['weights_bytes'])} in {s['weight_files']} file(s); folder {_mb(s['folder_bytes'])} "
        f"in {s['files']} file(s)"
    )
    if "source_weights_bytes" in s:
        size += f"; source weights {_mb(s['source_weights_bytes'])}"
        if "ratio_to_source" in s:
            size += f" (x{s['ratio_to_source']:.3f})"
    lines.append(f"sizes:        {size}")
    if info.source_model:
        sm = info.source_model
        lines.append(
            f"source:       {sm.get('src')} ({sm.get('kind')}, {', '.join(sm.get('architectures') or [])}, "
            f"weights sha256 {str(sm.get('weights_sha256') or '?')[:12]})"
        )
    if info.training_link:
        tl = info.training_link
        lines.append(
            f"training:     linked to {tl.get('source_path')} (weights sha256 "
            f"{str(tl.get('source_weights_sha256') or '?')[:12]}, {tl.get('file')} sha256 "
            f"{str(tl.get('sha256') or '?')[:12]}; run {tl.get('run_name')})"
        )
    for key, value in info.checks.items():
        lines.append(f"check:        {key}: {value}")
    if info.training_metadata is not None:
        lines.append(f"training_metadata.json ({len(info.training_metadata)} keys):")
        for key, value in list(info.training_metadata.items())[:20]:
            lines.append(f"  {key}: {_short(value)}")
        if len(info.training_metadata) > 20:
            lines.append(f"  ... {len(info.training_metadata) - 20} more")
    if info.run_name is not None:
        r = info.run_name
        parts = ", ".join(
            f"{k}={r[k] if r[k] is not None else '(none)'}"
            for k in ("base_model", "dataset", "method", "peft", "quant_tag")
        )
        lines.append(f"run name:     {parts}{' (quantized folder)' if r['quantized'] else ''}")
    else:
        lines.append("run name:     the folder name is not a run name")
    q = info.quantization_metadata
    if q:
        v = q.get("versions") or {}
        lines.append(
            f"awqkit:       {q.get('quantized_modules')} quantized linears, {len(q.get('kept_float') or {})} "
            f"kept float; awqkit {v.get('awqkit', '?')}, torch {v.get('torch', '?')}, "
            f"transformers {v.get('transformers', '?')}"
        )
    return "\n".join(lines)


__all__ = [
    "FolderInfo",
    "TRAINING_METADATA",
    "describe_folder",
    "format_calibration_file",
    "format_info",
    "training_link",
]
