"""GitHub-flavoured markdown tables and in-place updates of ``## `` sections in markdown files."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from awqkit.files import write_atomic

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,2})(\s|$)")


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _default_float(value: float) -> str:
    """4 significant digits; values of 10,000 and more keep one decimal instead of e-notation."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _format_cell(value: Any, spec: str | None, column: str) -> str:
    if value is None:
        text = ""
    elif spec is not None and _is_number(value):
        try:
            text = spec.format(value) if "{" in spec else format(value, spec)
        except (ValueError, IndexError, KeyError) as err:
            raise ValueError(f"floatfmt {spec!r} of column {column!r} cannot format {value!r}: {err}") from err
    elif isinstance(value, float):
        text = _default_float(value)
    else:
        text = str(value)
    # Keep the cell on one line and its pipes literal.
    return text.replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def markdown_table(
    rows: Sequence[dict[str, Any]],
    columns: list[str] | None = None,
    floatfmt: dict[str, str] | None = None,
) -> str:
    """Render ``rows`` as a GitHub markdown table (no trailing newline).

    Args:
        rows: one dict per row; missing keys and ``None`` give empty cells.
        columns: column order; ``None`` uses every key in first-seen order across the rows.
        floatfmt: per-column format of numeric cells, either a format spec (``".3f"``, ``",d"``)
            or a ``str.format`` template (``"{:.2%}"``). Unlisted float cells use 4 significant
            digits; ints and other values use ``str``.
    Numeric columns (every filled cell a number) are right-aligned, the others left-aligned.

    Raises:
        ValueError: no columns, a column absent from every row, or a ``floatfmt`` key that is not
            a column / a spec that cannot format its cells.
    """
    floatfmt = dict(floatfmt or {})
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    else:
        columns = list(columns)
        if len(set(columns)) != len(columns):
            raise ValueError(f"duplicate column names in {columns}")
        if rows:
            present = {k for row in rows for k in row}
            missing = [c for c in columns if c not in present]
            if missing:
                raise ValueError(f"columns {missing} appear in none of the rows")
    if not columns:
        raise ValueError("markdown_table needs at least one column (rows are empty)")
    unknown = [k for k in floatfmt if k not in columns]
    if unknown:
        raise ValueError(f"floatfmt names columns {unknown} that are not in {columns}")

    body = [[_format_cell(row.get(c), floatfmt.get(c), c) for c in columns] for row in rows]
    header = [str(c).replace("|", "\\|") for c in columns]
    numeric = [
        bool(vals) and all(_is_number(v) for v in vals)
        for vals in ([row.get(c) for row in rows if row.get(c) is not None] for c in columns)
    ]
    widths = [max(3, len(header[i]), *(len(r[i]) for r in body)) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        padded = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(cells, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "| "
        + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric, strict=True))
        + " |"
    )
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _section_spans(lines: list[str]) -> list[tuple[int, int, str]]:
    """``(start, end, title)`` for every ``## `` section; ``end`` is the next level-1/2 heading."""
    headings: list[tuple[int, int, str]] = []  # (line index, level, title)
    fence: str | None = None
    for i, text in enumerate(lines):
        m = _FENCE.match(text)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is not None:
            continue
        h = _HEADING.match(text)
        if h:
            level = len(h.group(1))
            title = re.sub(r"\s+#+\s*$", "", " " + text.strip()[level:]).strip()
            headings.append((i, level, title))
    spans = []
    for k, (i, level, title) in enumerate(headings):
        if level != 2:
            continue
        end = headings[k + 1][0] if k + 1 < len(headings) else len(lines)
        spans.append((i, end, title))
    return spans


def metrics_table(rows: list[dict[str, Any]], baseline: bool) -> str:
    """Markdown table of metric rows (``task, metric, higher_is_better, model, baseline, ratio, retention, n``, as
    :func:`awqkit.eval.runner.metric_rows` makes them); with ``baseline``, ratio and retention columns; then a
    legend."""
    table_rows = [
        {
            "task": r["task"],
            "metric": f"{r['metric']} {'↑' if r['higher_is_better'] else '↓'}",
            "model": r["model"],
            "baseline": r["baseline"],
            "model / baseline": r["ratio"],
            "retention (1.0 = baseline, ↑)": r["retention"],
            "n": r["n"],
        }
        for r in rows
    ]
    cols = ["task", "metric", "model"]
    if baseline:
        cols += ["baseline", "model / baseline", "retention (1.0 = baseline, ↑)"]
    cols.append("n")
    fmt = {"model / baseline": ".4f", "retention (1.0 = baseline, ↑)": ".4f"} if baseline else {}
    table = markdown_table(table_rows, cols, fmt)  # other floats: 4 significant digits
    legend = "↑ higher is better, ↓ lower is better. n: predicted tokens (ppl, kl) or items (tasks)."
    if baseline:
        legend += (
            " retention = model / baseline for ↑ metrics and baseline / model for ↓ metrics (ppl), "
            "so below 1.0 is worse in every row; kl has none (the baseline's own KL is 0)."
        )
    return f"{table}\n\n{legend}"


def write_benchmarks_section(path: Path | str, section_title: str, body: str) -> None:
    """Replace the ``## section_title`` section of a markdown file, or append it if absent.

    The section runs from its heading to the next level-1 or level-2 heading (headings inside fenced
    code blocks are ignored); deeper headings (``###``) inside it belong to it and are replaced too.
    Everything else in the file is kept byte for byte. A missing file is created. When the title
    occurs more than once, the first occurrence is replaced (with a warning). The file is written
    atomically.

    Raises:
        ValueError: empty title or one spanning several lines.
    """
    title = section_title.strip()
    if not title or "\n" in title or "\r" in title:
        raise ValueError(f"section_title must be one non-empty line, got {section_title!r}")
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() else ""
    lines = text.splitlines(keepends=True)
    block = f"## {title}\n\n{body.strip(chr(10))}\n"

    spans = _section_spans([ln.rstrip("\r\n") for ln in lines])
    matches = [(s, e) for s, e, t in spans if t == title]
    if len(matches) > 1:
        logger.warning("%s has %d sections titled %r; replacing the first", p, len(matches), title)
    if matches:
        start, end = matches[0]
        tail = lines[end:]
        new = "".join(lines[:start]) + block + ("\n" if tail else "") + "".join(tail)
    else:
        head = text.rstrip("\n")
        new = (head + "\n\n" if head else "") + block
    write_atomic(p, new)
    logger.info("wrote section %r of %s", title, p)
