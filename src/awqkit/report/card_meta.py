"""The metadata half of a model card: what goes into its YAML front matter, as ``huggingface_hub`` objects.

* ``base_model``: a Hugging Face Hub id (``owner/name``), never a local path (the Hub rejects one, and it
  would publish the machine's folder layout). :func:`check_base_model` refuses a given value that is not one;
  :func:`infer_base_model` finds one for a source model, or None.
* ``tags``: by what the method ran (:func:`card_tags`): ``awq`` only for methods that search AWQ scales,
  ``gptq`` for GPTQ rounding, the bit width, ``awqkit``, ``quantized``.
* ``model-index``: ``awqkit eval`` results as :class:`huggingface_hub.EvalResult` entries (:func:`eval_results`).
* ``license``: from the metadata, ``config.json`` or the source model's own card (:func:`license_fields`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from awqkit.errors import InputError
from awqkit.io.training import TRAINING_METADATA, read_json_dict

logger = logging.getLogger(__name__)

#: The methods that search AWQ scales and clipping ranges (the others only round).
AWQ_METHODS = ("awq", "awq-gptq", "awq-refine")
#: ``task -> (dataset_type, dataset_config, dataset_split, dataset_name)`` of the data ``awqkit eval`` reads
#: (:mod:`awqkit.eval.perplexity`, :mod:`awqkit.eval.tasks`).
_DATASETS = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "WikiText-2 (raw, test)"),
    "arc": ("allenai/ai2_arc", "ARC-Challenge", "test", "ARC-Challenge (test)"),
    "squad": ("rajpurkar/squad_v2", "squad_v2", "validation", "SQuAD 2.0 (dev)"),
    "gsm8k": ("openai/gsm8k", "main", "test", "GSM8K (test)"),
}
#: ``(task, metric) -> (metric_type, metric_name)`` for the model-index. KL and top-1 agreement are left out:
#: they measure the model against its baseline, not on the dataset (they stay in the results table).
_METRICS = {
    ("ppl", "ppl"): ("perplexity", "perplexity"),
    ("arc", "acc"): ("accuracy", "accuracy"),
    ("arc", "acc_norm"): ("accuracy", "accuracy (length-normalised)"),
    ("squad", "em"): ("exact_match", "exact match"),
    ("squad", "f1"): ("f1", "F1"),
    ("gsm8k", "em"): ("exact_match", "exact match (final number)"),
}


def is_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a Hugging Face Hub model id ``owner/name`` (the Hub's own rules:
    letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``; at most 96 characters)."""
    if value.count("/") != 1:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_base_model(value: str) -> str:
    """``value`` stripped, when it is a Hub id (``owner/name``); InputError naming it and the fix otherwise."""
    text = str(value).strip()
    if not is_hub_id(text):
        raise InputError(
            f"base model {value!r} is not a Hugging Face Hub id; pass the source model's id as owner/name "
            "(e.g. --base-model Qwen/Qwen3-0.6B), or leave it out (the card then names no base model)"
        )
    return text


def _hub_id_or_none(value: Any) -> str | None:
    """``value`` when it is a Hub id that is not also an existing local path (a stale or relative path such
    as ``models/tiny-llama`` has the same form), else None."""
    if not isinstance(value, str) or not is_hub_id(value.strip()):
        return None
    return None if Path(value.strip()).expanduser().exists() else value.strip()


def infer_base_model(src: str, kind: str, folder: Path | None) -> str | None:
    """The Hub id of the model quantized from ``src`` (a :class:`~awqkit.io.source.SourceInfo`'s ``src``,
    ``kind`` and ``folder``), or None when none is known. In order: ``src`` itself for a hub source; the
    ``base_model`` key of the source folder's ``training_metadata.json``; the ``_name_or_path`` of its
    ``config.json`` when that is a Hub id and not a local path. A GGUF's folder is not read (it may hold
    anything)."""
    if kind == "hub":
        return _hub_id_or_none(src)
    if kind != "folder" or folder is None:
        return None
    training = read_json_dict(Path(folder) / TRAINING_METADATA) or {}
    config = read_json_dict(Path(folder) / "config.json") or {}
    return _hub_id_or_none(training.get("base_model")) or _hub_id_or_none(config.get("_name_or_path"))


def card_tags(method: str, bits: int, quant_method: str | None, search: dict[str, Any] | None) -> list[str]:
    """The card's tags: ``awq`` for :data:`AWQ_METHODS`, ``gptq`` for GPTQ rounding (``gptq``, ``awq-gptq``,
    or ``awq`` with ``rounding="gptq"``), ``<bits>-bit``, ``awqkit``, ``quantized``, the method's own name
    when it is another (``rtn``, ``adaround``, ``awq-refine``, ...), ``compressed-tensors`` for that format."""
    rounding = (search or {}).get("rounding")
    tags = ["awq"] if method in AWQ_METHODS else []
    if method in ("gptq", "awq-gptq") or rounding == "gptq":
        tags.append("gptq")
    tags += [f"{bits}-bit", "awqkit", "quantized"]
    if method not in tags:
        tags.append(method)
    if quant_method == "compressed-tensors":
        tags.append("compressed-tensors")
    return tags


def _rounded(value: float) -> float:
    """4 decimals (the table shows 4 significant digits); enough for a leaderboard, stable in YAML."""
    return round(float(value), 4)


def eval_results(results: dict[str, Any]) -> list[EvalResult]:
    """``model-index`` entries for :func:`awqkit.eval.runner.evaluate_model` ``results``: one per metric of
    :data:`_METRICS` the model has a finite value for, with the dataset it was measured on and how much of it
    (``metric_name`` says "200 items" or "16 windows × 2048 tokens"). Perplexity on a user's own text
    is recorded as dataset type ``text`` named by the file's name."""
    settings = results.get("settings") or {}
    out: list[EvalResult] = []
    for row in results.get("metrics") or []:
        task, metric, value, n = row.get("task"), row.get("metric"), row.get("model"), row.get("n")
        kind = _METRICS.get((task, metric))
        if kind is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if task == "ppl":
            text = (results.get("data") or {}).get("text") or {}
            if text.get("read_as") == "wikitext":
                dtype, config, split, dname = _DATASETS["wikitext"]
            else:
                dtype, config, split, dname = "text", None, None, Path(str(text.get("path", "text"))).name
            part = f"{text.get('n_windows', '?')} windows × {text.get('seq_len', settings.get('seq_len'))} tokens"
        else:
            dtype, config, split, dname = _DATASETS[str(task)]
            part = f"{n} items" if n is not None else "all items"
            shots = ((settings.get("task_options") or {}).get(task) or {}).get("num_fewshot")
            part += f", {shots}-shot" if shots else ""
        out.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dtype,
                dataset_name=dname,
                dataset_config=config,
                dataset_split=split,
                metric_type=kind[0],
                metric_name=f"{kind[1]} ({part})",
                metric_value=_rounded(value),
            )
        )
    return out


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card's text as a dict (empty when it has none or it does not parse)."""
    if not text.lstrip().startswith("---"):
        return {}
    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except ValueError:  # the block is YAML but not a mapping
        return {}
    except Exception as exc:  # noqa: BLE001 - yaml's ScannerError and friends: a foreign card may hold anything
        logger.debug("unreadable front matter (%s: %s)", type(exc).__name__, exc)
        return {}


def license_fields(folder: Path, metadata: dict[str, Any]) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link``) from the metadata, the folder's config.json, or
    the source model's card (``metadata["source_model"]["src"]``); empty when none says."""
    if isinstance(metadata.get("license"), str):
        return {"license": metadata["license"]}
    config = read_json_dict(folder / "config.json") or {}
    if isinstance(config.get("license"), str):
        return {"license": config["license"]}
    src = (metadata.get("source_model") or {}).get("src")
    if isinstance(src, str) and src:
        src_path = Path(src).expanduser()
        card = (src_path if src_path.is_dir() else src_path.parent) / "README.md"
        if card.is_file():
            fm = front_matter(card.read_text(encoding="utf-8", errors="replace"))
            if isinstance(fm.get("license"), str):
                return {k: str(fm[k]) for k in ("license", "license_name", "license_link") if k in fm}
    return {}


__all__ = [
    "AWQ_METHODS",
    "card_tags",
    "check_base_model",
    "eval_results",
    "front_matter",
    "infer_base_model",
    "is_hub_id",
    "license_fields",
]
