"""The link from a quantized output to the training run it came from: ``training_metadata.json`` in the source
folder (written by the fine-tuning platform), recorded as ``quantization_metadata.json["training"]``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from awqkit.files import sha256_file, sha256_named_files
from awqkit.io.source import _weight_files
from awqkit.naming import RunNameError, parse_run_name

logger = logging.getLogger(__name__)

TRAINING_METADATA = "training_metadata.json"


def read_json_dict(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when absent; a warning (and None) when it is not a JSON object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("%s is not valid JSON (%s); ignoring it", path, exc)
        return None
    if not isinstance(data, dict):
        logger.warning("%s holds a %s, not a JSON object; ignoring it", path, type(data).__name__)
        return None
    return data


def training_link(source: Any) -> dict[str, Any] | None:
    """The ``"training"`` entry of ``quantization_metadata.json`` for a source with ``training_metadata.json``.

    ``source``: a :class:`~awqkit.io.source.SourceInfo` (``folder``, ``weights_sha256``) or a folder path
    (its weights are then hashed here). Returns None when the source folder has no training metadata::

        {"file": "training_metadata.json", "sha256": <of the file>, "source_path": <absolute folder>,
         "source_weights_sha256": <sha256 of the source weights>, "run_name": <its run name or null>}
    """
    if isinstance(source, (str, Path)):
        folder: Path | None = Path(source).expanduser()
        weights = None
    else:
        folder = getattr(source, "folder", None)
        weights = getattr(source, "weights_sha256", None)
    if folder is None or not (Path(folder) / TRAINING_METADATA).is_file():
        return None
    folder = Path(folder).resolve()
    if weights is None:
        files = _weight_files(folder)
        weights = sha256_named_files(files) if files else None
    tmeta = read_json_dict(folder / TRAINING_METADATA) or {}
    run_name = tmeta.get("run_name") if isinstance(tmeta.get("run_name"), str) else None
    if run_name is None:
        try:
            run_name = parse_run_name(folder.name).run_name
        except RunNameError:
            run_name = None
    return {
        "file": TRAINING_METADATA,
        "sha256": sha256_file(folder / TRAINING_METADATA),
        "source_path": str(folder),
        "source_weights_sha256": weights,
        "run_name": run_name,
    }


__all__ = ["TRAINING_METADATA", "read_json_dict", "training_link"]
