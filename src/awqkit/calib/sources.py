"""Read calibration files into a list of sample strings.

Accepted files:

* plain text (``.txt`` or any other extension): one prompt per line, empty lines skipped. If every
  non-empty line is a JSON object, the file is read as JSONL instead (so ``{"text": ...}`` lines may
  carry prompts with newlines whatever the extension). ``awqkit calib build`` writes this format
  (:mod:`awqkit.platform.calib_build`); each ``{"text": ...}`` is one sample, read back exactly.
* a training data set, read by :func:`awqkit.calib.rows.read_rows` exactly as ``awqkit calib build`` reads
  it: ``.jsonl`` / ``.json`` (JSON lines, a JSON array of rows, or an object holding one array of rows),
  ``.csv`` / ``.tsv``, ``.parquet`` / ``.pq``, or a folder written by ``datasets``' ``save_to_disk``
  (its ``train`` split): rows rendered through the tokenizer's chat template.

Row columns are chosen by :class:`~awqkit.config.CalibConfig` (``prompt_column``/``response_column``,
``messages_column``, ``text_column``) or detected, in this order: ``messages`` (a list of
``{role, content}``), a prompt/response pair among :data:`PAIR_COLUMNS` (``instruction`` also takes an
optional ``input`` column), ``text`` (used raw), and lastly a prompt column alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awqkit.calib.rows import (
    MESSAGES_COLUMN,
    ROW_SUFFIXES,
    is_hf_dataset_dir,
    jsonl_rows_or_none,
    read_rows,
    read_text,
)
from awqkit.config import CalibConfig

logger = logging.getLogger(__name__)

ACCEPTED_KINDS = (
    'a text file with one prompt per line, a JSONL/JSON file of rows ({"text": ...}, '
    '{"messages": [...]}, question/answer, instruction/output, prompt/response, ...), '
    "a CSV/TSV or Parquet file with such columns, a datasets save_to_disk folder, "
    'or "self" for data-free calibration'
)
#: (prompt, response) column names tried, in order, when no column is configured.
PAIR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("question", "answer"),
    ("instruction", "output"),
    ("prompt", "response"),
    ("prompt", "completion"),
    ("input", "output"),
)
TEXT_COLUMN = "text"
INSTRUCTION_INPUT_COLUMN = "input"
_COLUMN_FLAGS = "--prompt-column/--response-column, --messages-column or --text-column"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_samples(path: str | Path, tokenizer: Any, cfg: CalibConfig) -> list[str]:
    """Read a calibration file into sample strings (see the module docstring for accepted formats).

    Raises:
        ValueError: the file is missing, unreadable, malformed, has no usable sample, or its row
            columns cannot be matched (the message lists the columns found and the flags to pick them).
    """
    path = Path(path)
    if not (path.is_file() or is_hf_dataset_dir(path)):
        raise ValueError(f"calibration file {str(path)!r} does not exist or is not a file; expected {ACCEPTED_KINDS}")
    if path.suffix.lower() in ROW_SUFFIXES or path.is_dir():
        rows: list[Any] = read_rows(path)
    else:
        text = read_text(path)
        json_rows = jsonl_rows_or_none(text)
        if json_rows is None:
            samples = [line for line in text.splitlines() if line.strip()]
            if not samples:
                raise ValueError(f"calibration file {str(path)!r} has no non-empty line")
            logger.info("Read %d prompts (one per line) from %s", len(samples), path)
            return samples
        logger.info("%s: every line is a JSON object; reading it as JSONL", path)
        rows = json_rows

    if rows and all(isinstance(r, str) for r in rows):
        samples = [r for r in rows if r.strip()]
    else:
        samples = _render_rows(rows, path, tokenizer, cfg)
    if not samples:
        raise ValueError(f"calibration file {str(path)!r} has no usable sample (every row is empty)")
    return samples


# ------------------------------------------------------------------------------------ column layout
@dataclass(frozen=True)
class _Layout:
    """Which columns make a sample: kind is "messages", "pair", "prompt" or "text"."""

    kind: str
    column: str  # messages / text / prompt column
    response: str | None = None
    extra_input: str | None = None  # appended to the instruction (Alpaca "input")

    def describe(self) -> str:
        if self.kind == "pair":
            extra = f" (+ {self.extra_input!r})" if self.extra_input else ""
            return f"prompt {self.column!r}{extra} / response {self.response!r}"
        return f"{self.kind} {self.column!r}"


def _resolve(name: str, columns: dict[str, str], what: str, path: Path) -> str:
    """The actual column for a configured name (exact, then case-insensitive)."""
    if name in columns.values():
        return name
    if name.lower() in columns:
        return columns[name.lower()]
    raise ValueError(f"{path}: {what}={name!r} is not a column of the file; columns found: {sorted(columns.values())}")


def _detect_layout(columns: dict[str, str], cfg: CalibConfig, path: Path) -> _Layout:
    """Choose the columns from the config, else by the usual names. ``columns``: lower -> actual."""
    chosen = {k: getattr(cfg, k) for k in ("prompt_column", "response_column", "messages_column", "text_column")}
    n_kinds = sum(
        x is not None
        for x in (
            chosen["prompt_column"] or chosen["response_column"],
            chosen["messages_column"],
            chosen["text_column"],
        )
    )
    if n_kinds > 1:
        raise ValueError(
            f"{path}: set only one of prompt/response columns, messages_column or text_column; "
            f"got { ({k: v for k, v in chosen.items() if v is not None}) }"
        )
    if chosen["messages_column"] is not None:
        return _Layout("messages", _resolve(chosen["messages_column"], columns, "messages_column", path))
    if chosen["text_column"] is not None:
        return _Layout("text", _resolve(chosen["text_column"], columns, "text_column", path))
    if chosen["response_column"] is not None and chosen["prompt_column"] is None:
        raise ValueError(f"{path}: response_column={chosen['response_column']!r} needs a prompt_column too")
    if chosen["prompt_column"] is not None:
        prompt = _resolve(chosen["prompt_column"], columns, "prompt_column", path)
        if chosen["response_column"] is None:
            return _Layout("prompt", prompt)
        return _Layout("pair", prompt, _resolve(chosen["response_column"], columns, "response_column", path))

    if MESSAGES_COLUMN in columns:
        return _Layout("messages", columns[MESSAGES_COLUMN])
    for prompt, response in PAIR_COLUMNS:
        if prompt in columns and response in columns:
            extra = None
            if prompt == "instruction" and INSTRUCTION_INPUT_COLUMN in columns:
                extra = columns[INSTRUCTION_INPUT_COLUMN]
            return _Layout("pair", columns[prompt], columns[response], extra)
    if TEXT_COLUMN in columns:
        return _Layout("text", columns[TEXT_COLUMN])
    for prompt in dict.fromkeys(p for p, _ in PAIR_COLUMNS):
        if prompt in columns:
            return _Layout("prompt", columns[prompt])
    known = sorted({MESSAGES_COLUMN, TEXT_COLUMN} | {c for pair in PAIR_COLUMNS for c in pair})
    raise ValueError(
        f"{path}: cannot tell which columns hold the calibration text; columns found: "
        f"{sorted(columns.values())}. Choose them with {_COLUMN_FLAGS} (CalibConfig.prompt_column, "
        f"response_column, messages_column, text_column); recognised names are {known}"
    )


# ---------------------------------------------------------------------------------------- rendering
def _cell(row: dict[str, Any], column: str | None, path: Path, index: int) -> str | None:
    """A row's value as text; None when absent or empty."""
    if column is None:
        return None
    value = row.get(column)
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise ValueError(f"{path}: row {index}: column {column!r} holds a {type(value).__name__}, expected text")
    text = str(value)
    return text if text.strip() else None


def _messages(value: Any, path: Path, index: int) -> list[dict[str, Any]] | None:
    """Validate a messages cell (a list, or its JSON string in CSV); ShareGPT from/value is accepted."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: row {index}: the messages cell is not a JSON list ({e.msg})") from e
    if not isinstance(value, list):
        raise ValueError(
            f"{path}: row {index}: messages must be a list of {{role, content}}, got {type(value).__name__}"
        )
    out = []
    for m in value:
        if isinstance(m, dict) and "role" not in m and "from" in m and "value" in m:
            m = {"role": _SHAREGPT_ROLES.get(str(m["from"]).lower(), str(m["from"])), "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{path}: row {index}: every message needs 'role' and 'content' keys, got {m!r:.200}")
        out.append(m)
    return out or None


class _Renderer:
    """Turns conversations into text with the tokenizer's chat template, or plain text without one."""

    def __init__(self, tokenizer: Any, path: Path) -> None:
        self.tokenizer = tokenizer
        self.path = path
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.has_template:
            logger.warning(
                "The tokenizer has no chat template; rendering %s rows as plain 'prompt\\n\\nresponse' text", path
            )

    def render(self, messages: list[dict[str, Any]], index: int) -> str:
        add_generation_prompt = messages[-1].get("role") != "assistant"
        if not self.has_template:
            return "\n\n".join(str(m["content"]) for m in messages)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja raises TemplateError / its own exceptions
            raise ValueError(
                f"{self.path}: row {index}: the tokenizer's chat template failed on this row ({e}). "
                "If the template rejects a system turn, drop --system-prompt; otherwise fix the row or "
                "read a plain-text column with --text-column"
            ) from e
        if not isinstance(text, str):
            raise ValueError(f"{self.path}: apply_chat_template returned {type(text).__name__}, expected a str")
        return text


def _render_rows(rows: list[Any], path: Path, tokenizer: Any, cfg: CalibConfig) -> list[str]:
    """Render JSON/CSV rows to sample strings according to the detected or configured columns."""
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(
            f"{path}: row {bad} is a {type(rows[bad]).__name__}; expected every row to be an "
            "object with named columns (or every row to be a string)"
        )
    columns: dict[str, str] = {}
    for row in rows:
        for key in row:
            columns.setdefault(str(key).lower(), str(key))
    layout = _detect_layout(columns, cfg, path)
    renderer = None if layout.kind == "text" else _Renderer(tokenizer, path)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []

    samples: list[str] = []
    skipped = 0
    for i, row in enumerate(rows):
        if layout.kind == "text":
            text = _cell(row, layout.column, path, i)
            if text is None:
                skipped += 1
            else:
                samples.append(text)
            continue
        assert renderer is not None
        if layout.kind == "messages":
            messages = _messages(row.get(layout.column), path, i)
            if messages is None:
                skipped += 1
                continue
            if system and not any(m.get("role") == "system" for m in messages):
                messages = system + messages
        else:
            prompt = _cell(row, layout.column, path, i)
            if prompt is None:
                skipped += 1
                continue
            extra = _cell(row, layout.extra_input, path, i)
            if extra is not None:
                prompt = f"{prompt}\n\n{extra}"
            messages = system + [{"role": "user", "content": prompt}]
            response = _cell(row, layout.response, path, i)
            if response is not None:
                messages.append({"role": "assistant", "content": response})
        samples.append(renderer.render(messages, i))
    if skipped:
        logger.warning("%s: skipped %d of %d rows with an empty %s", path, skipped, len(rows), layout.describe())
    logger.info("Read %d samples from %s (%s)", len(samples), path, layout.describe())
    return samples
