"""Read a training data set's rows: the one reader behind ``--calib`` and ``awqkit calib build``.

Accepted inputs (:func:`read_rows`):

* ``.csv`` / ``.tsv``: a header row names the columns;
* ``.jsonl`` / ``.json``: JSON lines, a JSON array of rows, or an object holding one array of rows;
* ``.parquet`` / ``.pq``: needs ``pyarrow`` (or ``pandas`` with a Parquet engine);
* a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: needs ``datasets``;
  a DatasetDict uses ``split`` (default ``train``, or its only split).

A missing optional package is a :class:`MissingDependencyError` naming what to install. Rows are returned as
read (objects for the tabular formats; a JSON file may also hold plain strings, which callers accept as
prompts).
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from awqkit.errors import InputError

logger = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
ROW_SUFFIXES = CSV_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
MESSAGES_COLUMN = "messages"
ACCEPTED = "a CSV/TSV, JSONL/JSON or Parquet file, or a folder written by datasets' save_to_disk"


class MissingDependencyError(ImportError, InputError):
    """An optional package is needed for this input (the message says which and how to install it)."""


def is_hf_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def is_row_source(path: Path) -> bool:
    """Whether :func:`read_rows` reads ``path`` as a data set (by extension, or a saved dataset folder)."""
    return path.suffix.lower() in ROW_SUFFIXES or is_hf_dataset_dir(path)


def read_rows(path: str | Path, *, split: str | None = None) -> list[Any]:
    """The rows of a data set (see the module docstring for the accepted inputs).

    Raises:
        MissingDependencyError: Parquet without pyarrow/pandas, a saved dataset without ``datasets``.
        InputError: a missing path, an unsupported extension, or a malformed file.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        if not is_hf_dataset_dir(path):
            raise InputError(
                f"{path} is a folder but not a Hugging Face dataset saved with save_to_disk (no "
                f"dataset_dict.json / state.json); expected {ACCEPTED}"
            )
        return read_hf_dir(path, split)
    if not path.is_file():
        raise InputError(f"dataset {str(path)!r} does not exist; expected {ACCEPTED}")
    if suffix in CSV_SUFFIXES:
        return read_csv_rows(path, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in JSON_SUFFIXES:
        return read_json_rows(path)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet_rows(path)
    raise InputError(f"dataset {str(path)!r} has an unsupported extension {suffix or '(none)'!r}; expected {ACCEPTED}")


# ------------------------------------------------------------------------------------------ readers
def read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading BOM dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"calibration file {str(path)!r} is not valid UTF-8 ({e}); re-save it as UTF-8") from e


def jsonl_rows_or_none(text: str) -> list[dict[str, Any]] | None:
    """Rows if every non-empty line of ``text`` is a JSON object, else None (the text is not JSONL)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].lstrip().startswith("{"):
        return None
    rows = []
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        rows.append(obj)
    return rows


def read_json_rows(path: Path) -> list[Any]:
    """A JSON array / object-with-one-array / JSON-lines file as a list of rows."""
    text = read_text(path)
    if not text.strip():
        raise InputError(f"calibration file {str(path)!r} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # most likely JSON lines
    else:
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            if len(lists) == 1 and MESSAGES_COLUMN not in data:
                return list(lists[0])
            return [data]
        raise InputError(f"{path}: expected JSON rows (objects), got a top-level {type(data).__name__}")
    rows: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}:{lineno}: invalid JSON ({e.msg}); expected one JSON object per line "
                "(JSONL) or a single JSON array"
            ) from e
    return rows


def read_csv_rows(path: Path, delimiter: str) -> list[dict[str, Any]]:
    """A CSV/TSV file with a header row as a list of ``{column: cell}``."""
    text = read_text(path)
    old_limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts in one cell
    try:
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
        if not reader.fieldnames:
            raise InputError(f"CSV file {str(path)!r} has no header row; the first row must name the columns")
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as e:
        raise InputError(f"{path}: malformed CSV ({e})") from e
    finally:
        csv.field_size_limit(old_limit)
    return rows


def _optional(module: str, purpose: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the '{module.split('.')[0]}' package, which is not installed "
            f"({exc}); install it with: {install}"
        ) from None


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """A Parquet file's rows, through pyarrow (else pandas with a Parquet engine)."""
    try:
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        pq = None
    if pq is not None:
        return list(pq.read_table(str(path)).to_pylist())
    try:
        pd = importlib.import_module("pandas")
    except ImportError:
        raise MissingDependencyError(
            f"reading the Parquet file {path} needs 'pyarrow' (or 'pandas' with a "
            "Parquet engine), and neither is installed; install it with: "
            "pip install pyarrow"
        ) from None
    try:
        frame = pd.read_parquet(path)
    except ImportError as exc:
        raise MissingDependencyError(
            f"pandas cannot read Parquet without an engine ({exc}); install it with: pip install pyarrow"
        ) from None
    return list(frame.to_dict("records"))


def read_hf_dir(path: Path, split: str | None) -> list[dict[str, Any]]:
    """The rows of a ``save_to_disk`` folder (a DatasetDict's ``split``: default ``train`` or its only one)."""
    datasets = _optional("datasets", f"reading the Hugging Face dataset folder {path}", "pip install datasets")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, dict):  # a DatasetDict (a dict of split -> Dataset)
        splits = list(ds.keys())
        chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
        if chosen not in splits:
            raise InputError(f"{path} is a DatasetDict with splits {splits}; choose one with --split (split={split!r})")
        ds = ds[chosen]
    elif split is not None:
        logger.warning("%s holds a single dataset; ignoring split=%r", path, split)
    return [dict(r) for r in ds]


__all__ = [
    "ACCEPTED",
    "CSV_SUFFIXES",
    "JSON_SUFFIXES",
    "PARQUET_SUFFIXES",
    "ROW_SUFFIXES",
    "MissingDependencyError",
    "is_hf_dataset_dir",
    "is_row_source",
    "jsonl_rows_or_none",
    "read_csv_rows",
    "read_hf_dir",
    "read_json_rows",
    "read_parquet_rows",
    "read_rows",
    "read_text",
]
