"""Hugging Face model card (``README.md``) for a folder written by awqkit.

The card has YAML front matter (``base_model``, ``base_model_relation: quantized``, ``tags``,
``library_name``, ``pipeline_tag`` and ``license`` when one is known), a description of the quantization
(method, bits, group size, zero point, storage format, calibration), how to load the folder with awqkit
and with transformers / AutoAWQ (or vLLM for compressed-tensors), and, given ``awqkit eval`` results, a
metrics table with retention between the marker comments :data:`RESULTS_START` / :data:`RESULTS_END`.
:func:`update_model_card_results` replaces just that block, so it can run any number of times.

The text depends only on its inputs (no dates), so writing the same card twice gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from awqkit.io.detect import detect_quantization_method
from awqkit.report.table import metrics_table

logger = logging.getLogger(__name__)

CARD_MARKER = "<!-- awqkit:model-card -->"
RESULTS_START = "<!-- awqkit:results:start -->"
RESULTS_END = "<!-- awqkit:results:end -->"
_SAFE_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/+]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}
_YAML_NUMBER_OR_DATE = re.compile(
    r"^[-+]?(?:[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|0x[0-9a-fA-F_]+|0o?[0-7_]+|\.inf|\.nan)$|^\d{4}-\d\d?-\d\d?",
    re.IGNORECASE,
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _yaml_scalar(value: Any) -> str:
    """A YAML scalar: plain when unambiguous, else a double-quoted (JSON) string."""
    text = str(value)
    if _SAFE_PLAIN.match(text) and text.lower() not in _YAML_WORDS and not _YAML_NUMBER_OR_DATE.match(text):
        return text
    return json.dumps(text)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def front_matter(text: str) -> dict[str, str]:
    """Top-level ``key: value`` scalars of a card's YAML front matter (lists and nesting are skipped)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out: dict[str, str] = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        m = re.match(r"^([A-Za-z_][\w\-]*):\s*(.*?)\s*$", line)
        if m and m.group(2):
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            out[m.group(1)] = value
    return out


def _license(folder: Path, metadata: dict[str, Any]) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link``) from the metadata, config.json or the source card."""
    for key in ("license",):
        if isinstance(metadata.get(key), str):
            return {"license": metadata[key]}
    config = _read_json(folder / "config.json")
    if isinstance(config.get("license"), str):
        return {"license": config["license"]}
    src = (metadata.get("source_model") or {}).get("src")
    if isinstance(src, str) and src:
        src_path = Path(src).expanduser()
        card = (src_path if src_path.is_dir() else src_path.parent) / "README.md"
        if card.is_file():
            fm = front_matter(card.read_text(encoding="utf-8", errors="replace"))
            if "license" in fm:
                return {k: fm[k] for k in ("license", "license_name", "license_link") if k in fm}
    return {}


def _settings(folder: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """method, bits, group_size, zero_point, format from the metadata, completed from config.json."""
    info = detect_quantization_method(folder)
    qc = _read_json(folder / "config.json").get("quantization_config") or {}
    fmt = "unknown"
    zero_point = metadata.get("zero_point")
    if qc.get("quant_method") == "awq":
        fmt = f"AutoAWQ {str(qc.get('version', 'gemm')).upper()} (`quant_method: awq`)"
        zero_point = qc.get("zero_point", zero_point)
    elif qc.get("quant_method") == "compressed-tensors":
        fmt = "compressed-tensors pack-quantized"
        if zero_point is None:
            groups = list((qc.get("config_groups") or {}).values())
            weights = (groups[0].get("weights") or {}) if groups else {}
            zero_point = not weights.get("symmetric", True) if weights else None
    method = metadata.get("method") or info.method
    bits = metadata.get("bits") or info.bits
    group_size = metadata.get("group_size", info.group_size)
    if method in (None, "fp") or bits is None:
        raise ValueError(f"{folder} is not a quantized folder (no quantization_metadata.json or quantization_config)")
    return {
        "method": str(method).lower(),
        "bits": int(bits),
        "group_size": group_size,
        "zero_point": zero_point,
        "format": fmt,
        "quant_method": qc.get("quant_method"),
    }


def _calibration_text(metadata: dict[str, Any], method: str) -> str:
    calib = metadata.get("calibration")
    if not calib:
        return "none (round-to-nearest needs no data)" if method == "rtn" else "not recorded"
    source = str(calib.get("source", "?"))
    what = "self-generated by the model (data-free)" if source == "self" else f"`{Path(source).name}`"
    sha = f", sha256 `{calib['sha256'][:12]}…`" if calib.get("sha256") else ""
    return (
        f"{what}: {calib.get('n_samples', '?')} samples × {calib.get('seq_len', '?')} tokens, "
        f"seed {calib.get('seed', '?')}{sha}"
    )


def _method_text(method: str, metadata: dict[str, Any]) -> str:
    if method == "awq":
        search = metadata.get("search_config") or {}
        clip = " and a weight-clipping search" if search.get("clip", True) else ""
        return (
            "AWQ (activation-aware weight quantization): per-input-channel scales searched on calibration "
            f"activations{clip}, folded into the previous layer"
        )
    if method == "rtn":
        return "round-to-nearest (RTN), no calibration"
    return _OTHER_METHODS.get(method, method.upper())


_OTHER_METHODS = {
    "gptq": "GPTQ: each linear's integers chosen column by column through the inverse Hessian of its calibration "
    "inputs, the rounding error pushed onto the columns not yet quantized",
    "adaround": "AdaRound: each weight's rounding up or down learned to reconstruct the linear's output on "
    "calibration inputs",
    "awq-gptq": "AWQ (activation-aware scales and clipping, searched on calibration activations), then GPTQ "
    "rounding of each linear",
    "awq-refine": "AWQ (activation-aware scales and clipping), then block-wise refinement: every decoder layer's "
    "rounding and clipping range learned by signed gradient descent against the float layer's output",
}


def _usage(name: str, s: dict[str, Any]) -> list[str]:
    repo = f"<user>/{name}"
    lines = [
        "## Usage",
        "",
        'With awqkit (CPU; `backend="auto"` runs PyTorch\'s bf16 int4 kernel where a layer fits it, '
        '`backend="torch"` the fp32 reference):',
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from transformers import AutoTokenizer",
        "from awqkit import load_quantized",
        "",
        f'path = snapshot_download("{repo}")  # or a local folder',
        "model = load_quantized(path)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
        'or `awqkit generate PATH --prompt "Hello"`.',
        "",
    ]
    if s["quant_method"] == "awq":
        lines += [
            "With transformers (its AWQ integration needs an AWQ kernel package such as `autoawq`, usually on a "
            "GPU) or AutoAWQ:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
            "",
            "from awq import AutoAWQForCausalLM",
            "",
            f'model = AutoAWQForCausalLM.from_quantized("{repo}")',
            "```",
            "",
        ]
    elif s["quant_method"] == "compressed-tensors":
        lines += [
            "With transformers (needs the `compressed-tensors` package) or vLLM:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
            "```",
            "",
            f"`vllm serve {repo}`",
            "",
        ]
    return lines


def _results_block(results: dict[str, Any]) -> str:
    if not results.get("metrics"):
        raise ValueError("the eval results for the model card hold no metric rows (results['metrics'])")
    s = results.get("settings", {})
    v = results.get("versions", {})
    parts = [f"tasks {', '.join(s.get('tasks', []))}"]
    if s.get("tasks") and any(t in ("ppl", "kl") for t in s["tasks"]):
        text = (results.get("data") or {}).get("text") or {}
        sha = f" (sha256 `{text['sha256'][:12]}…`)" if text.get("sha256") else ""
        name = Path(str(text.get("path", "?"))).name
        parts.append(f"{s.get('windows') or 'all'} windows × {s.get('seq_len')} tokens of `{name}`{sha}")
    if s.get("limit") is not None:
        parts.append(f"limit {s['limit']} items per task")
    kernels = (results.get("model") or {}).get("kernels") or {}
    if kernels.get("layers"):
        layers = ", ".join(f"{k}: {n}" for k, n in kernels["layers"].items())
        parts.append(f"backend {kernels.get('backend')} ({layers} layers)")
    base = results.get("baseline")
    if base:
        parts.append(f"baseline `{Path(base['path']).name}` ({base['detection']['method']})")
    versions = ", ".join(f"{k} {v[k]}" for k in ("awqkit", "torch", "transformers") if k in v)
    head = f"Measured with `awqkit eval` ({versions}): {'; '.join(parts)}."
    table = metrics_table(results["metrics"], baseline=results.get("baseline") is not None)
    return f"{RESULTS_START}\n{head}\n\n{table}\n{RESULTS_END}"


def _evaluation_section(results: dict[str, Any]) -> str:
    return f"## Evaluation\n\n{_results_block(results)}\n"


def write_model_card(
    folder: str | Path,
    *,
    base_model: str,
    metadata: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``folder/README.md`` (overwriting it) and return its path; see the module docstring.

    Args:
        base_model: the source model's hub id (or name), written as ``base_model``.
        metadata: the ``quantization_metadata.json`` dict; ``None`` reads it from ``folder``.
        results: :func:`awqkit.eval.runner.evaluate_model` results for an Evaluation table.
        name: the model's name for the title and the usage snippets; default the folder's name (pass the
            final name when writing into a temporary folder that is renamed afterwards).
    Raises:
        FileNotFoundError: ``folder`` is not a folder. ValueError: empty ``base_model`` or not a quantized folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the quantized model folder")
    if not base_model or not str(base_model).strip():
        raise ValueError("base_model must name the source model (a hub id such as 'Qwen/Qwen3-0.6B')")
    base_model = str(base_model).strip()
    title = name or folder.resolve().name
    meta = metadata if metadata is not None else _read_json(folder / "quantization_metadata.json")
    s = _settings(folder, meta)
    tags = ["awq", f"{s['bits']}-bit", "awqkit", "quantized"]
    if s["method"] not in tags:
        tags.append(s["method"])
    if s["quant_method"] == "compressed-tensors":
        tags.append("compressed-tensors")
    fm = [
        f"base_model: {_yaml_scalar(base_model)}",
        "base_model_relation: quantized",
        "tags:",
        *(f"- {_yaml_scalar(t)}" for t in tags),
        "library_name: transformers",
        "pipeline_tag: text-generation",
    ]
    fm += [f"{k}: {_yaml_scalar(v)}" for k, v in _license(folder, meta).items()]
    link = (
        f"[{base_model}](https://huggingface.co/{base_model})"
        if _HUB_ID.match(base_model) and not Path(base_model).exists()
        else f"`{base_model}`"
    )
    group = "per output row" if s["group_size"] == -1 else str(s["group_size"])
    zp = {True: "yes (asymmetric)", False: "no (symmetric)"}.get(s["zero_point"], "unknown")
    kept = meta.get("kept_float") or {}
    version = (meta.get("versions") or {}).get("awqkit")
    rows = [
        ("method", _method_text(s["method"], meta)),
        ("weight bits", str(s["bits"])),
        ("group size", group),
        ("zero point", zp),
        ("storage format", s["format"]),
        ("calibration", _calibration_text(meta, s["method"])),
    ]
    if meta.get("quantized_modules") is not None:
        rows.append(
            (
                "quantized linears",
                f"{meta['quantized_modules']} (embeddings and LM head stay fp16"
                f"{f', plus {len(kept)} other linears' if kept else ''})",
            )
        )
    if version:
        rows.append(("awqkit version", str(version)))
    body = [
        "---",
        *fm,
        "---",
        "",
        CARD_MARKER,
        f"# {title}",
        "",
        f"{s['bits']}-bit weight-only {s['method'].upper()} quantization of {link}, made with "
        "awqkit (activation-aware weight quantization for Hugging Face causal LMs).",
        "",
        "## Quantization",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {k} | {v.replace('|', '/')} |" for k, v in rows),
        "",
        *_usage(title, s),
    ]
    text = "\n".join(body).rstrip("\n") + "\n"
    if results is not None:
        text += "\n" + _evaluation_section(results)
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    logger.info("wrote model card %s", path)
    return path


def update_model_card_results(folder: str | Path, results: dict[str, Any]) -> Path:
    """Replace the results table of ``folder/README.md`` (a card written by :func:`write_model_card`).

    The block between :data:`RESULTS_START` and :data:`RESULTS_END` is replaced; a card without one gets
    an ``## Evaluation`` section appended. Running it again with the same results changes nothing.

    Raises:
        FileNotFoundError: no README.md. ValueError: the card was not written by awqkit, or its markers are broken.
    """
    path = Path(folder) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write the card first (write_model_card)")
    text = path.read_text(encoding="utf-8")
    if CARD_MARKER not in text:
        raise ValueError(f"{path} was not written by awqkit (no {CARD_MARKER} marker); refusing to edit it")
    n_start, n_end = text.count(RESULTS_START), text.count(RESULTS_END)
    if n_start != n_end or n_start > 1:
        raise ValueError(f"{path} has {n_start} results start and {n_end} end markers; fix the card by hand")
    if n_start:
        i, j = text.index(RESULTS_START), text.index(RESULTS_END)
        if j < i:
            raise ValueError(f"{path}: the results end marker comes before the start marker")
        new = text[:i] + _results_block(results) + text[j + len(RESULTS_END) :]
    else:
        new = text.rstrip("\n") + "\n\n" + _evaluation_section(results)
    if new != text:
        path.write_text(new, encoding="utf-8")
    logger.info("updated the results of model card %s", path)
    return path


__all__ = [
    "CARD_MARKER",
    "RESULTS_END",
    "RESULTS_START",
    "front_matter",
    "update_model_card_results",
    "write_model_card",
]
