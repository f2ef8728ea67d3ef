"""Build a calibration set from training data: ``awqkit calib build`` / :func:`build_calibration_set`.

1. Read the dataset: CSV/TSV, JSONL/JSON, Parquet (needs ``pyarrow``, or ``pandas`` with a Parquet engine),
   or a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (needs
   ``datasets``; a DatasetDict uses ``split``, default ``train``). A missing package is a clear error
   naming what to install.
2. Sample ``min(max_samples, max(min_samples, int(fraction * rows)))`` rows (defaults 128, 8, 0.15;
   never more than the rows there are) with ``random.Random(seed)`` (default seed 42), kept in dataset
   order. Rows whose prompt column is empty are left out before sampling (counted, with a warning).
3. Render each sampled row as a chat the way training rendered it: an optional system turn, then the
   user turn from ``column`` (default ``question``), through the model's own chat template with
   ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)``.
4. Write ``calibration_<dataset>_<train_rows>samples.txt`` in the calibration format below (atomically), plus
   ``calibration_<dataset>_<train_rows>samples.meta.json`` recording how it was built (dataset and its sha256,
   ``n_samples`` drawn and ``train_rows``, seed, row indices, tokenizer, token counts;
   :func:`read_calibration_meta` reads it back). The number in the name is the platform's convention
   ``train_size = len(df)``: the rows of the training data set read (empty prompts included), not the
   prompts drawn, so GSM8K's 1319-row test set sampled at 128 gives ``calibration_gsm8k_1319samples.txt``.
5. Report token counts, and warn when the set holds fewer tokens than ``n_blocks × seq_len`` (the
   calibration blocks quantization will ask for; :func:`awqkit.calib.blocks.build_blocks` then uses
   fewer blocks).

Calibration file format (read back by ``--calib`` / :func:`awqkit.calib.sources.read_samples`):
one JSON object per line, ``{"text": "<prompt>"}``, UTF-8. Newlines and other line breaks inside a
prompt are JSON escapes (``\\n``, ``\\r``, ``\\u2028``, ...), so every line is one prompt and the text
round-trips exactly. ``--calib`` reads a file whose every non-empty line is a JSON object as such
records whatever its extension; any other text file is still read as one prompt per line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from awqkit.calib.blocks import separator_ids, tokenize_samples
from awqkit.calib.rows import MissingDependencyError, read_rows
from awqkit.calib.sources import read_samples
from awqkit.config import CalibConfig
from awqkit.errors import DestinationError, InputError
from awqkit.files import sha256_tree, write_atomic

logger = logging.getLogger(__name__)

DEFAULT_COLUMN = "question"
DEFAULT_SEED = 42
DEFAULT_FRACTION = 0.15
DEFAULT_MIN_SAMPLES = 8
DEFAULT_MAX_SAMPLES = 128
#: Calibration blocks × tokens the default ``awqkit quantize`` asks for (CalibConfig defaults).
DEFAULT_N_BLOCKS = CalibConfig.n_samples
DEFAULT_SEQ_LEN = CalibConfig.seq_len
FORMAT = "awqkit-calibration-jsonl/1"
TEXT_KEY = "text"
# str.splitlines() also breaks at these; json.dumps(ensure_ascii=False) leaves them raw.
_LINE_BREAKS_JSON_KEEPS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


# ------------------------------------------------------------------------------------------ sampling
def calibration_sample_size(
    n_rows: int,
    *,
    fraction: float = DEFAULT_FRACTION,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> int:
    """``min(max_samples, max(min_samples, int(fraction × n_rows)))``, capped at ``n_rows``.

    ``fraction × n_rows`` is computed exactly on the decimal value of ``fraction`` (0.15 × 100 is 15).
    10 rows → 8, 100 → 15, 2000 → 128 with the defaults.
    """
    if n_rows < 0:
        raise ValueError(f"n_rows={n_rows} must be >= 0")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    if not 1 <= min_samples <= max_samples:
        raise ValueError(f"need 1 <= min_samples ({min_samples}) <= max_samples ({max_samples})")
    wanted = min(max_samples, max(min_samples, math.floor(Fraction(str(fraction)) * n_rows)))
    return min(wanted, n_rows)


def sample_rows(n_rows: int, k: int, seed: int = DEFAULT_SEED) -> list[int]:
    """``k`` distinct row indices of ``range(n_rows)`` drawn with ``random.Random(seed)``, sorted."""
    if not 0 <= k <= n_rows:
        raise ValueError(f"cannot draw {k} rows from {n_rows}")
    return sorted(random.Random(seed).sample(range(n_rows), k))


# ------------------------------------------------------------------------------------------ reading
def read_dataset(path: str | Path, *, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a training dataset (:func:`awqkit.calib.rows.read_rows`, the reader ``--calib`` uses too),
    each an object with named columns.

    Raises:
        MissingDependencyError: Parquet without pyarrow/pandas, a saved dataset without ``datasets``.
        ValueError: a missing or unsupported path, or rows that are not objects with named columns.
    """
    path = Path(path).expanduser()
    rows = read_rows(path, split=split)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise InputError(f"{path}: row {bad} is a {type(rows[bad]).__name__}; expected rows with named columns")
    if not rows:
        raise InputError(f"dataset {path} has no rows")
    return rows


def _column(rows: list[dict[str, Any]], column: str, path: Path | str) -> str:
    names: dict[str, str] = {}
    for row in rows:
        for key in row:
            names.setdefault(str(key), str(key))
    if column in names:
        return column
    folded = {k.lower(): k for k in names}
    if column.lower() in folded:
        return folded[column.lower()]
    raise ValueError(
        f"{path}: column {column!r} (the user turn) is not in the dataset; columns found: "
        f"{sorted(names)}. Choose it with --column"
    )


def _cell_text(value: Any, column: str, index: int, path: Path | str) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # missing / NaN
        return None
    if isinstance(value, (dict, list, tuple)):
        raise ValueError(f"{path}: row {index}: column {column!r} holds a {type(value).__name__}, expected text")
    text = str(value)
    return text if text.strip() else None


# ---------------------------------------------------------------------------------------- rendering
def load_tokenizer(model: Any, *, trust_remote_code: bool = False) -> Any:
    """``model`` itself when it is a tokenizer, else ``AutoTokenizer.from_pretrained(model)``."""
    if hasattr(model, "apply_chat_template"):
        return model
    from transformers import AutoTokenizer

    local = Path(str(model)).expanduser()
    return AutoTokenizer.from_pretrained(
        str(local) if local.exists() else str(model), trust_remote_code=trust_remote_code
    )


def render_prompt(
    tokenizer: Any, user: str, system_prompt: str | None = None, chat_template_kwargs: dict[str, Any] | None = None
) -> str:
    """``[system?, user]`` through the tokenizer's chat template with the generation prompt added.

    Raises:
        ValueError: the tokenizer has no chat template, or the template fails on this conversation.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template, so prompts cannot be rendered as training rendered "
            "them; pass the fine-tuned model's folder (with its chat template) as --model"
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}
    ]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
    except Exception as exc:  # jinja raises its own exception types
        raise ValueError(
            f"the chat template failed ({exc}); if it rejects a system turn, drop --system-prompt"
        ) from exc
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template returned {type(text).__name__}, expected a str")
    return text


# ------------------------------------------------------------------------------------ calibration file
def calibration_file_name(dataset_name: str, train_rows: int) -> str:
    """``calibration_<dataset>_<train_rows>samples.txt``, the platform's name for a calibration set.

    ``train_rows`` is the number of rows of the training data set read (the platform's ``len(df)``), not the
    number of prompts drawn from it; ``dataset_name`` is slugged to letters, digits, ``.`` and ``-``.
    """
    return f"calibration_{dataset_slug(dataset_name)}_{train_rows}samples.txt"


def dataset_slug(name: str) -> str:
    """``name`` with every run of characters other than letters, digits, ``.`` and ``-`` turned into ``-``."""
    slug = re.sub(r"[^A-Za-z0-9.\-]+", "-", str(name)).strip("-.")
    return slug or "dataset"


def _record(text: str) -> str:
    line = json.dumps({TEXT_KEY: text}, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS_JSON_KEEPS.items():
        line = line.replace(raw, escaped)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep them as JSON escapes
        line = json.dumps({TEXT_KEY: text}, ensure_ascii=True)
    return line


def write_calibration_file(prompts: list[str], path: str | Path) -> Path:
    """Write ``prompts`` in the calibration format (module docstring), atomically; returns the path.

    Raises:
        ValueError: no prompts, a prompt that is not a str, or one that is only whitespace (which
            ``--calib`` would skip).
    """
    if not prompts:
        raise ValueError("no prompts to write")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(
                f"prompt {i} is {'empty' if isinstance(p, str) else type(p).__name__}; every "
                "prompt must be non-empty text"
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(_record(p) + "\n" for p in prompts)
    write_atomic(path, body)
    return path


def read_calibration_file(path: str | Path) -> list[str]:
    """Prompts from a calibration file exactly as ``--calib`` reads them (either format)."""

    return read_samples(path, None, CalibConfig())


def read_calibration_meta(path: str | Path) -> dict[str, Any] | None:
    """What the ``.meta.json`` beside the calibration file ``path`` says about the set, or None without one.

    Returns ``{"file", "meta_path", "n_samples", "train_rows", "dataset", "dataset_name", "seed"}``:
    ``n_samples`` is the number of prompts drawn, ``train_rows`` the rows of the training data set (the number
    in the file name). Meta files written before ``train_rows`` was a top-level key give the values under
    ``sampling``. A meta file that is not JSON, or not :data:`FORMAT`, gives None (with a warning).
    """
    file = Path(path).expanduser()
    meta_path = file.with_suffix(".meta.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s is not readable JSON (%s); ignoring it", meta_path, exc)
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        logger.warning("%s is not an awqkit calibration meta file (format %r); ignoring it", meta_path, FORMAT)
        return None
    sampling = meta.get("sampling")
    if not isinstance(sampling, dict):
        sampling = {}
    return {
        "file": str(file),
        "meta_path": str(meta_path),
        "n_samples": meta.get("n_samples", sampling.get("n_samples")),
        "train_rows": meta.get("train_rows", sampling.get("rows")),
        "dataset": meta.get("dataset"),
        "dataset_name": meta.get("dataset_name"),
        "seed": sampling.get("seed"),
    }


# ---------------------------------------------------------------------------------------------- build
@dataclass
class CalibrationSet:
    """What :func:`build_calibration_set` wrote and measured."""

    path: Path
    meta_path: Path
    dataset: str
    dataset_name: str
    n_rows: int
    n_usable_rows: int
    n_samples: int
    seed: int
    row_indices: list[int]
    token_counts: list[int]
    stream_tokens: int
    n_blocks: int
    seq_len: int
    blocks_available: int
    warnings: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def train_rows(self) -> int:
        """Rows of the training data set read (``n_rows``): the number in the file name."""
        return self.n_rows

    def summary(self) -> str:
        """Human-readable lines: file, sampling, token counts, warnings."""
        tc = self.token_counts
        lines = [
            f"wrote {self.path} ({self.n_samples} prompts drawn from {self.n_rows} training rows)",
            f"dataset {self.dataset}: {self.n_rows} rows ({self.n_usable_rows} with a prompt), sampled "
            f"{self.n_samples} with seed {self.seed}",
            f"tokens: {self.total_tokens} total, per prompt min {min(tc)} / mean {self.total_tokens / len(tc):.1f} "
            f"/ max {max(tc)}",
            f"calibration blocks of {self.seq_len} tokens available: {self.blocks_available} "
            f"(requested {self.n_blocks}, i.e. {self.n_blocks * self.seq_len} tokens)",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"], out["meta_path"] = str(self.path), str(self.meta_path)
        out["total_tokens"] = self.total_tokens
        return out


def _count_blocks(
    prompts: list[str], tokenizer: Any, src: Path, n_blocks: int, seq_len: int, warnings: list[str]
) -> tuple[list[int], int, int]:
    """Tokens per prompt, tokens in the joined stream (with separators) and the ``seq_len`` blocks it holds;
    an error when it holds none, a warning (appended) when fewer than ``n_blocks``."""

    counts = [len(ids) for ids in tokenize_samples(prompts, tokenizer)]
    stream = sum(counts) + max(0, len(counts) - 1) * len(separator_ids(tokenizer))
    available = stream // seq_len
    if available == 0:
        raise InputError(
            f"{src}: the {len(prompts)} sampled prompts hold {stream} tokens, not enough for one "
            f"calibration block of {seq_len} tokens; use more rows (--min-samples, --fraction), longer "
            "prompts, or a smaller --seq-len"
        )
    if available < n_blocks:
        warnings.append(
            f"the set holds {stream} tokens (with separators), enough for {available} calibration blocks of "
            f"{seq_len} tokens, fewer than the {n_blocks} requested ({n_blocks * seq_len} tokens); quantization "
            f"will use {available} blocks: lower --n-samples/--seq-len, or raise --max-samples/--fraction"
        )
    return counts, stream, available


def _tokenizer_record(model: Any, tokenizer: Any) -> dict[str, Any]:
    """What rendered the prompts: the tokenizer's source and the sha256 of its chat template."""
    template = getattr(tokenizer, "chat_template", None)
    source = (
        str(model)
        if not hasattr(model, "apply_chat_template")
        else str(getattr(model, "name_or_path", "") or type(model).__name__)
    )
    return {
        "tokenizer": source,
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest() if template else None,
    }


def _sample(
    rows: list[dict[str, Any]],
    column: str,
    src: Path,
    seed: int,
    fraction: float,
    min_samples: int,
    max_samples: int,
    warnings: list[str],
) -> tuple[str, list[tuple[int, str]], list[int]]:
    """Step 2: the column used, the usable ``(row index, prompt)`` pairs and the positions among them sampled
    (:func:`calibration_sample_size` of them, :func:`sample_rows`); what was left out is added to ``warnings``."""
    col = _column(rows, column, src)
    usable = [(i, t) for i, r in enumerate(rows) if (t := _cell_text(r.get(col), col, i, src)) is not None]
    if len(usable) < len(rows):
        warnings.append(f"{len(rows) - len(usable)} of {len(rows)} rows have an empty {col!r} and were left out")
    if not usable:
        raise ValueError(f"{src}: every row has an empty {col!r}; nothing to calibrate on")
    k = calibration_sample_size(len(usable), fraction=fraction, min_samples=min_samples, max_samples=max_samples)
    if k < min_samples:
        warnings.append(f"only {len(usable)} usable rows, fewer than min_samples={min_samples}; using all of them")
    return col, usable, sample_rows(len(usable), k, seed)


def _refuse_existing(target: Path) -> None:
    """A calibration file (or its ``.meta.json``) already there is replaced only with ``overwrite``."""
    for existing in (target, target.with_suffix(".meta.json")):
        if existing.exists():
            raise DestinationError(
                f"{existing} already exists; pass --overwrite (overwrite=True) to replace it, "
                "or choose another --out or --dataset-name"
            )


def _meta_record(
    path: Path,
    src: Path,
    name: str,
    split: str | None,
    col: str,
    system_prompt: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    model: Any,
    tokenizer: Any,
    warnings: list[str],
    *,
    sampling: dict[str, Any],
    tokens: dict[str, Any],
) -> dict[str, Any]:
    """The ``.meta.json`` beside a calibration file: how it was built, enough to build it again.

    ``n_samples`` (prompts drawn) and ``train_rows`` (rows of the data set read, the number in the file name)
    are top-level keys, copied from ``sampling``."""
    return {
        "format": FORMAT,
        "file": path.name,
        "n_samples": sampling["n_samples"],
        "train_rows": sampling["rows"],
        "dataset": str(src.resolve()),
        "dataset_sha256": sha256_tree(src),
        "dataset_name": name,
        "split": split,
        "column": col,
        "system_prompt": system_prompt,
        "chat_template_kwargs": chat_template_kwargs or {},
        **_tokenizer_record(model, tokenizer),
        "sampling": sampling,
        "tokens": tokens,
        "warnings": warnings,
    }


def build_calibration_set(
    dataset: str | Path,
    model: Any,
    *,
    dataset_name: str | None = None,
    out_dir: str | Path = ".",
    column: str = DEFAULT_COLUMN,
    system_prompt: str | None = None,
    seed: int = DEFAULT_SEED,
    fraction: float = DEFAULT_FRACTION,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    split: str | None = None,
    n_blocks: int = DEFAULT_N_BLOCKS,
    seq_len: int = DEFAULT_SEQ_LEN,
    chat_template_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> CalibrationSet:
    """Sample, render and write a calibration set from training data (steps in the module docstring).

    Args:
        dataset: CSV/TSV, JSONL/JSON, Parquet file, or a ``save_to_disk`` folder.
        model: the model folder / hub id whose tokenizer (and chat template) renders the prompts, or a
            tokenizer object.
        dataset_name: name in the output file (default: the dataset's file or folder name).
        out_dir: folder for the calibration file (created if needed).
        column: the column holding the user turn. system_prompt: optional system turn.
        seed, fraction, min_samples, max_samples: the sampling rule (:func:`calibration_sample_size`).
        split: the split of a saved DatasetDict (default ``train``).
        n_blocks, seq_len: the calibration blocks quantization will ask for (warning when short; an error
            when the set holds less than one block).
        overwrite: replace an existing calibration file (and its ``.meta.json``) of the same name.
        chat_template_kwargs: extra template variables training used (e.g. ``{"enable_thinking": False}``).
    Raises:
        ValueError: bad input, missing column, no usable rows, no chat template (see the readers), fewer
            tokens than one block.
        DestinationError: the output file exists and ``overwrite`` is False (checked before any work).
        MissingDependencyError: Parquet / saved datasets without the package that reads them.
    """
    if n_blocks < 1 or seq_len < 1:
        raise ValueError(f"n_blocks={n_blocks} and seq_len={seq_len} must be >= 1")
    src = Path(dataset).expanduser()
    rows = read_dataset(src, split=split)
    warnings: list[str] = []
    col, usable, picked = _sample(rows, column, src, seed, fraction, min_samples, max_samples, warnings)
    k = len(picked)
    indices = [usable[j][0] for j in picked]
    name = dataset_slug(dataset_name if dataset_name is not None else (src.stem if src.is_file() else src.name))
    target = Path(out_dir).expanduser() / calibration_file_name(name, len(rows))
    if not overwrite:
        _refuse_existing(target)

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    prompts = [render_prompt(tokenizer, usable[j][1], system_prompt, chat_template_kwargs) for j in picked]
    counts, stream, available = _count_blocks(prompts, tokenizer, src, n_blocks, seq_len, warnings)
    if dataset_name is not None and name != dataset_name:
        logger.info("dataset name %r written as %r in the file name", dataset_name, name)
    path = write_calibration_file(prompts, target)
    meta_path = path.with_suffix(".meta.json")
    meta = _meta_record(
        path,
        src,
        name,
        split,
        col,
        system_prompt,
        chat_template_kwargs,
        model,
        tokenizer,
        warnings,
        sampling={
            "rule": "min(max_samples, max(min_samples, int(fraction * rows)))",
            "fraction": fraction,
            "min_samples": min_samples,
            "max_samples": max_samples,
            "seed": seed,
            "rows": len(rows),
            "usable_rows": len(usable),
            "n_samples": k,
            "row_indices": indices,
        },
        tokens={
            "total": sum(counts),
            "per_prompt": counts,
            "stream_with_separators": stream,
            "seq_len": seq_len,
            "blocks_available": available,
            "blocks_requested": n_blocks,
        },
    )
    write_atomic(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    for w in warnings:
        logger.warning("%s", w)
    logger.info("calibration set: %d prompts, %d tokens -> %s", k, sum(counts), path)
    return CalibrationSet(
        path,
        meta_path,
        str(src),
        name,
        len(rows),
        len(usable),
        k,
        seed,
        indices,
        counts,
        stream,
        n_blocks,
        seq_len,
        available,
        warnings,
    )


__all__ = [
    "CalibrationSet",
    "MissingDependencyError",
    "build_calibration_set",
    "calibration_file_name",
    "calibration_sample_size",
    "dataset_slug",
    "load_tokenizer",
    "read_calibration_file",
    "read_calibration_meta",
    "read_dataset",
    "render_prompt",
    "sample_rows",
    "write_calibration_file",
]
