"""Plan files shared by ``awqkit batch`` and ``awqkit orchestrate``: parsing and up-front validation.

A plan is a TOML file (read with the standard library's ``tomllib``) or a YAML file (``.yaml`` / ``.yml``,
read with PyYAML when it is installed; a clear error otherwise)::

    output_dir = "runs"            # quantized folders, state and results (relative paths: to the plan file)
    device = "cpu"                 # optional: compute device for quantization and evaluation
    trust_remote_code = false      # optional

    [defaults]                     # optional: CalibConfig and SearchConfig keys shared by every quantization
    calib = "calibration_{dataset}_128samples.txt"   # alias of CalibConfig.source; "self" = data-free
    n_samples = 128
    seq_len = 512
    n_grid = 20

    [[models]]                     # one entry per model folder ...
    path = "models/Qwen3-0.6B-openmath_SFT_NoPeft"
    base_model = "Qwen/Qwen3-0.6B" # optional naming parts (see below); a Hub id also names the card's base model
    dataset = "openmath"
    method = "SFT"
    peft = "NoPeft"
    calib = "other_calibration.txt"                  # optional: any CalibConfig key overrides [defaults]

    [[models]]                     # ... or every model folder below a folder
    scan = "models/"
    exclude = ["*-draft"]          # optional fnmatch patterns on folder names

    [[specs]]                      # what to produce: resolve_quantization_spec keys
    method = "awq"                 # awq, rtn, gptq, adaround, awq-gptq, awq-refine, or fp (the float model)
    bits = [3, 4]                  # method, bits and group_size may be lists: every combination is made
    group_size = 128

    [eval]                         # orchestrate only (batch ignores it)
    tasks = ["ppl", "kl", "arc"]   # or "ppl,kl,arc"; default ["ppl", "kl"]
    limit = 200                    # items per arc/squad/gsm8k task (default: all)
    windows = 16                   # ppl/kl windows, or "all"
    seq_len = 2048
    text = "wiki.test.raw"         # optional ppl/kl text (default: WikiText-2 test in the data folder)
    data_dir = "data"              # optional data folder for the tasks
    batch_size = 1
    backend = "auto"
    task_options = { gsm8k = { num_fewshot = 5 } }

Rules:

* Every key is checked before anything runs; an unknown key (a typo) is an error that names the file, the key
  (``specs[1].group_szie``) and the closest valid key. All problems are reported together
  (:class:`PlanError`, a ``ValueError``).
* Relative paths (``output_dir``, ``path``, ``scan``, ``calib``, ``text``, ``data_dir``) are relative to the
  folder of the plan file; ``~`` is expanded.
* ``[[models]]``: exactly one of ``path`` (a local Hugging Face folder with ``config.json`` and weights, not
  already quantized) or ``scan`` (every such folder below it, recursively; hidden folders, quantized folders
  and ``output_dir`` are skipped, a model folder is not searched further). Naming keys are not allowed with
  ``scan``. A folder found twice is used once; two folders with the same run name are an error.
* Naming (:mod:`awqkit.naming`): each of ``base_model``, ``dataset``, ``method``, ``peft`` comes from,
  in this order, the plan entry, the keys of the folder's ``training_metadata.json`` (a ``base_model`` Hub
  id loses its organisation in the name: ``Qwen/Qwen3-0.6B`` → ``Qwen3-0.6B``), that file's ``run_name``,
  then the folder name parsed as a run name. A part found nowhere is an error naming the entry.
* Model cards: an entry's ``base_model`` given as a Hub id (``Qwen/Qwen3-0.6B``) is the card's ``base_model``
  (:func:`awqkit.api.quantize`); otherwise the card takes the one the folder names, if any.
* ``calib`` may hold ``{base_model}``, ``{dataset}``, ``{method}``, ``{peft}``: filled per model. When a spec
  uses AWQ, every model's calibration file must exist (checked up front).
* ``[[specs]]`` keys: ``method``, ``bits`` (or ``weights_bits``), ``group_size``, ``zero_point``,
  ``modules_to_not_convert``, ``keep_unaligned_fp16``, ``activations_bits``, ``kv_cache_bits``,
  ``lm_head_dtype``, ``format`` (the storage format; the old key ``backend`` is read too), ``extras`` (see
  :func:`awqkit.spec.resolve_quantization_spec`). ``[eval] backend`` is the kernel that runs quantized layers.
  Two specs giving the same quant tag (the same output name) are an error. A ``fp`` spec is the float
  source model: batch skips it; orchestrate always evaluates it as the baseline of each model anyway.
* Output names: ``<output_dir>/<run name>_quantized`` with the run name
  ``{base_model}-{dataset}_{method}_{peft}_{quant_tag}`` (:func:`~awqkit.naming.make_run_name`).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import itertools
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from awqkit.config import CalibConfig, EvalConfig, SearchConfig, to_dict
from awqkit.errors import InputError
from awqkit.eval.runner import parse_tasks
from awqkit.io.detect import is_quantized_folder
from awqkit.naming import (
    RunNameError,
    base_model_name,
    make_run_name,
    parse_run_name,
    quant_tag,
    quantized_folder_name,
)
from awqkit.preflight import check_device
from awqkit.report.card_meta import is_hub_id
from awqkit.spec import APPLIED_EXTRAS, QuantizationSpec, resolve_quantization_spec

logger = logging.getLogger(__name__)

NAME_PARTS = ("base_model", "dataset", "method", "peft")
PLAN_KEYS = ("output_dir", "device", "trust_remote_code", "defaults", "models", "specs", "eval")
_CALIB_FIELDS = tuple(f.name for f in dataclasses.fields(CalibConfig))
_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))
_CALIB_KEYS = ("calib", *_CALIB_FIELDS)  # "calib" is the plan's name for CalibConfig.source
DEFAULTS_KEYS = _CALIB_KEYS + _SEARCH_FIELDS
MODEL_KEYS = ("path", "scan", "exclude", *NAME_PARTS, *_CALIB_KEYS)
SPEC_KEYS = (
    "method",
    "bits",
    "weights_bits",
    "group_size",
    "activations_bits",
    "kv_cache_bits",
    "lm_head_dtype",
    "format",
    "backend",  # the old name of "format" (awqkit.spec.SPEC_KEY_ALIASES)
    "extras",
    *APPLIED_EXTRAS,
)
_SPEC_LIST_KEYS = ("method", "bits", "weights_bits", "group_size")
EVAL_KEYS = ("tasks", "limit", "windows", "seq_len", "batch_size", "text", "data_dir", "backend", "task_options")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


class PlanError(InputError):
    """The plan file is unreadable or invalid; the message names the file and every bad key."""


@dataclass(frozen=True)
class PlanModel:
    """One source model of a plan: its folder, naming parts and calibration settings."""

    path: Path
    base_model: str
    dataset: str
    method: str
    peft: str
    calib: CalibConfig
    where: str  # e.g. "models[0]", for messages
    base_model_id: str | None = None  # the entry's base_model if it is a Hub id (owner/name), for the model card

    @property
    def run_name(self) -> str:
        """``{base_model}-{dataset}_{method}_{peft}`` (no quant tag): the model's identity in a plan."""
        return make_run_name(self.base_model, self.dataset, self.method, self.peft)

    def cell_name(self, spec: QuantizationSpec) -> str:
        """The run name of this model under ``spec`` (``..._AWQ_w4_g128_headfp16``, ``..._FP16``)."""
        return make_run_name(self.base_model, self.dataset, self.method, self.peft, quant_tag(spec))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "run_name": self.run_name,
            **{k: getattr(self, k) for k in NAME_PARTS},
            "calib": to_dict(self.calib),
        }


@dataclass(frozen=True)
class Cell:
    """One quantization a plan asks for: ``model`` under ``spec``, written to ``folder``."""

    model: PlanModel
    spec: QuantizationSpec
    name: str  # run name with quant tag
    folder: Path  # <output_dir>/<name>_quantized


@dataclass(frozen=True)
class PlanEval:
    """The ``[eval]`` table (used by orchestrate): arguments of :func:`awqkit.eval.runner.evaluate_model`."""

    tasks: tuple[str, ...] = ("ppl", "kl")  # a campaign compares each output with its float source
    limit: int | None = EvalConfig.limit
    windows: int | None = EvalConfig.windows
    seq_len: int = EvalConfig.seq_len
    batch_size: int = EvalConfig.batch_size
    text: Path | None = None
    data_dir: Path | None = None
    backend: str = EvalConfig.backend
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        out["text"] = str(self.text) if self.text is not None else None
        out["data_dir"] = str(self.data_dir) if self.data_dir is not None else None
        return out


@dataclass(frozen=True)
class Plan:
    """A validated plan (see the module docstring). Build it with :func:`load_plan` or :func:`plan_from_dict`."""

    source: Path | None
    output_dir: Path
    models: tuple[PlanModel, ...]
    specs: tuple[QuantizationSpec, ...]
    search: SearchConfig
    eval: PlanEval
    device: str = "cpu"
    trust_remote_code: bool = False

    @property
    def quantize_specs(self) -> tuple[QuantizationSpec, ...]:
        """The specs that quantize (``fp`` specs left out)."""
        return tuple(s for s in self.specs if s.method.quantizes)

    def cells(self) -> list[Cell]:
        """Every (model, quantizing spec) pair, model by model, specs in plan order."""
        return [
            Cell(m, s, m.cell_name(s), self.output_dir / quantized_folder_name(m.cell_name(s)))
            for m in self.models
            for s in self.quantize_specs
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source) if self.source else None,
            "output_dir": str(self.output_dir),
            "device": self.device,
            "trust_remote_code": self.trust_remote_code,
            "models": [m.to_dict() for m in self.models],
            "specs": [s.to_dict() for s in self.specs],
            "search": to_dict(self.search),
            "eval": self.eval.to_dict(),
        }


# ------------------------------------------------------------------------------------------- validation helpers
class _Errors:
    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}" if key else message)

    def check(self) -> None:
        if len(self.items) == 1:
            raise PlanError(f"plan {self.file}: {self.items[0]}")
        if self.items:
            raise PlanError(
                f"plan {self.file} has {len(self.items)} problems:\n" + "\n".join(f"  - {m}" for m in self.items)
            )


def _unknown_keys(table: dict[str, Any], valid: tuple[str, ...], where: str, errors: _Errors) -> None:
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.add(f"{where}{'.' if where else ''}{key}", f"unknown key{hint} (valid: {', '.join(valid)})")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    return True


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(
        hint, str(hint)
    )


def _build_config(cls: type, values: dict[str, Any], where: str, errors: _Errors) -> Any:
    """``cls(**values)`` with each value type-checked against the dataclass; errors name ``where.key``."""
    hints = typing.get_type_hints(cls)
    ok = True
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            shown = "calib" if cls is CalibConfig and key == "source" else key
            errors.add(f"{where}.{shown}", f"{value!r} is not {_type_name(hints[key])}")
            ok = False
    if not ok:
        return None
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        errors.add(where, str(exc))
        return None


def _path(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _calib_values(table: dict[str, Any], where: str, errors: _Errors) -> dict[str, Any]:
    """The CalibConfig keys of ``table`` (``calib`` renamed to ``source``)."""
    out = {k: table[k] for k in _CALIB_FIELDS if k in table}
    if "calib" in table:
        if "source" in table:
            errors.add(f"{where}.calib", "give the calibration file as 'calib' or 'source', not both")
        out["source"] = table["calib"]
    return out


def _read_json_dict(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _has_weights(folder: Path) -> bool:
    return any(p.is_file() for pat in _WEIGHT_GLOBS for p in folder.glob(pat))


def name_parts(folder: Path, given: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The naming parts of a model folder (order of sources in the module docstring) and the missing ones."""
    parts: dict[str, str] = {k: str(given[k]) for k in NAME_PARTS if k in given}
    if is_hub_id(parts.get("base_model", "")):  # Qwen/Qwen3-0.6B: the run is named Qwen3-0.6B
        parts["base_model"] = base_model_name(parts["base_model"])
    tmeta = _read_json_dict(folder / "training_metadata.json")
    for key in NAME_PARTS:
        value = tmeta.get(key)
        if key not in parts and isinstance(value, str) and value.strip():
            parts[key] = base_model_name(value.strip()) if key == "base_model" else value.strip()
    for name in (tmeta.get("run_name"), folder.name):
        if not isinstance(name, str):
            continue
        try:
            parsed = parse_run_name(name)
        except RunNameError:
            continue
        for key in NAME_PARTS:
            parts.setdefault(key, getattr(parsed, key))
    return parts, [k for k in NAME_PARTS if k not in parts]


def _scan(root: Path, exclude: list[str], skip: Path) -> list[Path]:
    found: list[Path] = []
    skip = skip.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        if d.resolve() == skip:
            dirnames[:] = []
            continue
        if "config.json" not in filenames:
            continue
        dirnames[:] = []  # a model folder is not searched further
        if any(fnmatch.fnmatch(d.name, pat) for pat in exclude):
            logger.debug("scan: %s excluded", d)
        elif is_quantized_folder(d):
            logger.debug("scan: %s is quantized; skipped", d)
        elif not _has_weights(d):
            logger.debug("scan: %s has no weights; skipped", d)
        else:
            found.append(d)
    return found


# ------------------------------------------------------------------------------------------- sections
def _parse_specs(raw: Any, errors: _Errors) -> list[QuantizationSpec]:
    if not isinstance(raw, list) or not raw or not all(isinstance(e, dict) for e in raw):
        errors.add("specs", "must be a non-empty list of tables ([[specs]] entries with method, bits, group_size)")
        return []
    specs: list[QuantizationSpec] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(raw):
        where = f"specs[{i}]"
        _unknown_keys(entry, SPEC_KEYS, where, errors)
        if "method" not in entry:
            errors.add(where, "needs a 'method' (awq, rtn, gptq, adaround, awq-gptq, awq-refine or fp)")
            continue
        entry = {k: v for k, v in entry.items() if k in SPEC_KEYS}
        lists = {k: (entry[k] if isinstance(entry[k], list) else [entry[k]]) for k in _SPEC_LIST_KEYS if k in entry}
        if any(not v for v in lists.values()):
            errors.add(where, "a list of methods, bits or group sizes must not be empty")
            continue
        fixed = {k: v for k, v in entry.items() if k not in lists}
        for combo in itertools.product(*lists.values()):
            values = dict(zip(lists, combo, strict=True))
            method = values.pop("method")
            if not isinstance(method, str):
                errors.add(f"{where}.method", f"{method!r} is not a string (awq, rtn, awq-refine, ... or fp)")
                continue
            try:
                spec = resolve_quantization_spec(method, **values, **fixed)
            except (TypeError, ValueError) as exc:
                errors.add(where, str(exc))
                continue
            tag = quant_tag(spec)
            if tag in seen:
                errors.add(
                    where,
                    f"gives the output tag {tag} again (already from {seen[tag]}); each spec must "
                    "produce a different output",
                )
                continue
            seen[tag] = where
            specs.append(spec)
    return specs


def _parse_eval(raw: Any, base: Path, errors: _Errors) -> PlanEval:

    if raw is None:
        return PlanEval()
    if not isinstance(raw, dict):
        errors.add("eval", "must be a table ([eval])")
        return PlanEval()
    _unknown_keys(raw, EVAL_KEYS, "eval", errors)
    kw: dict[str, Any] = {}
    if "tasks" in raw:
        tasks = raw["tasks"]
        if not (isinstance(tasks, str) or isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
            errors.add("eval.tasks", f"{tasks!r} is not a list of task names or a comma-separated string")
        else:
            try:
                kw["tasks"] = parse_tasks(tasks)
            except ValueError as exc:
                errors.add("eval.tasks", str(exc))
    for key, low in (("limit", 1), ("seq_len", 2), ("batch_size", 1)):
        if key in raw:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                errors.add(f"eval.{key}", f"{v!r} is not an integer >= {low}")
            else:
                kw[key] = v
    if "windows" in raw:
        v = raw["windows"]
        if isinstance(v, str) and v.lower() == "all":
            kw["windows"] = None
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            errors.add("eval.windows", f"{v!r} is not a positive integer or 'all'")
        else:
            kw["windows"] = v
    for key in ("text", "data_dir"):
        if key in raw:
            if not isinstance(raw[key], str):
                errors.add(f"eval.{key}", f"{raw[key]!r} is not a path string")
                continue
            p = _path(raw[key], base)
            if not p.exists():
                errors.add(f"eval.{key}", f"{p} does not exist")
            kw[key] = p
    if "backend" in raw:
        if not isinstance(raw["backend"], str):
            errors.add("eval.backend", f"{raw['backend']!r} is not a string")
        else:
            kw["backend"] = raw["backend"]
    if "task_options" in raw:
        opts = raw["task_options"]
        if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
            errors.add("eval.task_options", "must be a table of tables, e.g. { gsm8k = { num_fewshot = 5 } }")
        else:
            bad = [k for k in opts if k not in ("arc", "squad", "gsm8k")]
            if bad:
                errors.add("eval.task_options", f"names {bad}; only arc, squad and gsm8k take options")
            kw["task_options"] = {k: dict(v) for k, v in opts.items()}
    return PlanEval(**kw)


def _parse_models(
    raw: Any,
    defaults_calib: dict[str, Any],
    base: Path,
    output_dir: Path | None,
    needs_calib_file: bool,
    errors: _Errors,
) -> list[PlanModel]:
    """The models; a bad [defaults] calibration value (already reported) is not reported again per model."""
    defaults_ok = _build_config(CalibConfig, defaults_calib, "defaults", errors) is not None
    if not isinstance(raw, list) or not raw or not all(isinstance(e, dict) for e in raw):
        errors.add("models", "must be a non-empty list of tables ([[models]] entries with path or scan)")
        return []
    models: list[PlanModel] = []
    by_path: dict[Path, str] = {}
    by_name: dict[str, tuple[str, Path]] = {}
    for i, entry in enumerate(raw):
        where = f"models[{i}]"
        _unknown_keys(entry, MODEL_KEYS, where, errors)
        if ("path" in entry) == ("scan" in entry):
            errors.add(where, "needs exactly one of 'path' (a model folder) or 'scan' (a folder of model folders)")
            continue
        for key in ("path", "scan", *NAME_PARTS):
            if key in entry and not isinstance(entry[key], str):
                errors.add(f"{where}.{key}", f"{entry[key]!r} is not a string")
        exclude = entry.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
            errors.add(f"{where}.exclude", "must be a list of folder-name patterns")
            exclude = []
        if "exclude" in entry and "scan" not in entry:
            errors.add(f"{where}.exclude", "only applies to 'scan' entries")
        calib_values = {**defaults_calib, **_calib_values(entry, where, errors)}
        if "scan" in entry:
            named = [k for k in NAME_PARTS if k in entry]
            if named:
                errors.add(
                    where,
                    f"{named} cannot be set for a scan (each folder found is named from its "
                    "training_metadata.json or its folder name); list such models with 'path'",
                )
            root = _path(entry["scan"], base)
            if not root.is_dir():
                errors.add(f"{where}.scan", f"{root} is not a folder")
                continue
            folders = _scan(root, exclude, output_dir or root / ".none")
            if not folders:
                errors.add(f"{where}.scan", f"no model folder (config.json and weights, not quantized) below {root}")
            located = [(f, f"{where} (scan: {f.name})") for f in folders]
        else:
            folder = _path(entry["path"], base)
            if not folder.is_dir():
                errors.add(f"{where}.path", f"{folder} is not a folder (a local Hugging Face model folder)")
                continue
            if not (folder / "config.json").is_file():
                errors.add(f"{where}.path", f"{folder} has no config.json")
                continue
            if is_quantized_folder(folder):
                errors.add(f"{where}.path", f"{folder} is already quantized; list the float source model")
                continue
            if not _has_weights(folder):
                errors.add(f"{where}.path", f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
                continue
            located = [(folder, where)]
        for folder, label in located:
            resolved = folder.resolve()
            if resolved in by_path:
                logger.info("%s is listed by %s and %s; using it once", folder, by_path[resolved], label)
                continue
            by_path[resolved] = label
            model = _make_model(folder, entry, calib_values, label, needs_calib_file, base, errors, defaults_ok)
            if model is None:
                continue
            if model.run_name in by_name:
                other, other_path = by_name[model.run_name]
                errors.add(
                    label,
                    f"run name {model.run_name} is also that of {other} ({other_path}); set "
                    "base_model/dataset/method/peft so that each model has its own",
                )
                continue
            by_name[model.run_name] = (label, folder)
            models.append(model)
    return models


def _make_model(
    folder: Path,
    entry: dict[str, Any],
    calib_values: dict[str, Any],
    where: str,
    needs_calib_file: bool,
    base: Path,
    errors: _Errors,
    defaults_ok: bool = True,
) -> PlanModel | None:
    given = {k: entry[k] for k in NAME_PARTS if isinstance(entry.get(k), str)}
    parts, missing = name_parts(folder, given)
    if missing:
        errors.add(
            where,
            f"cannot name {folder}: {', '.join(missing)} not found (set them in the [[models]] entry, "
            "in training_metadata.json, or name the folder {base_model}-{dataset}_{method}_{peft})",
        )
        return None
    try:
        make_run_name(parts["base_model"], parts["dataset"], parts["method"], parts["peft"])
    except RunNameError as exc:
        errors.add(where, f"{exc} (set it in the [[models]] entry)")
        return None
    values = dict(calib_values)
    source = values.get("source", "self")
    if isinstance(source, str) and source != "self":
        try:
            source = source.format(**parts)
        except (KeyError, IndexError, ValueError) as exc:
            errors.add(
                f"{where}.calib",
                f"{source!r}: bad placeholder {exc}; use {{base_model}}, {{dataset}}, {{method}} or {{peft}}",
            )
            return None
        path = _path(source, base)
        if needs_calib_file and not path.is_file():
            errors.add(
                f"{where}.calib",
                f"calibration file {path} does not exist (AWQ specs need it; 'self' "
                "samples calibration text from the model)",
            )
        values["source"] = str(path)
    # a bad [defaults] value was reported once already; do not repeat it for every model
    calib = _build_config(CalibConfig, values, where, errors if defaults_ok else _Errors(errors.file))
    if calib is None:
        return None
    raw = str(entry.get("base_model", "")).strip()
    hub_id = raw if is_hub_id(raw) else None
    return PlanModel(
        folder, parts["base_model"], parts["dataset"], parts["method"], parts["peft"], calib, where, hub_id
    )


# ------------------------------------------------------------------------------------------- entry points
def read_plan_file(path: str | Path) -> dict[str, Any]:
    """The plan file's contents as a dict (TOML, or YAML when PyYAML is installed).

    Raises:
        FileNotFoundError: no such file. PlanError: unknown extension, syntax error, not a table.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"plan file {p} does not exist")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8-sig")
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise PlanError(f"reading {p} needs Python 3.11+ (tomllib) or the tomli package") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PlanError(f"plan {p} is not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise PlanError(
                f"plan {p} is YAML but PyYAML is not installed: pip install pyyaml, or write the plan as TOML (.toml)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlanError(f"plan {p} is not valid YAML: {exc}") from None
    else:
        raise PlanError(f"plan {p}: the file must end in .toml, .yaml or .yml (got {suffix or 'no extension'!r})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlanError(
            f"plan {p} must hold a table of keys (output_dir, models, specs, ...), not a {type(data).__name__}"
        )
    return data


def plan_from_dict(
    data: dict[str, Any],
    *,
    base_dir: str | Path = ".",
    source: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> Plan:
    """Validate a plan given as a dict (relative paths against ``base_dir``).

    ``output_dir`` overrides the plan's ``output_dir`` (then the plan need not set one).

    Raises:
        PlanError: every problem found, each naming its key.
    """
    base = Path(base_dir).expanduser().absolute()
    errors = _Errors(str(source) if source is not None else "<dict>")
    if not isinstance(data, dict):
        errors.add("", f"a plan is a table of keys, not a {type(data).__name__}")
        errors.check()
    _unknown_keys(data, PLAN_KEYS, "", errors)
    out: Path | None = None
    if output_dir is not None:
        out = _path(output_dir, Path.cwd())
    elif "output_dir" not in data:
        errors.add("output_dir", "missing: the folder for the quantized models, state and results")
    elif not isinstance(data["output_dir"], str) or not data["output_dir"].strip():
        errors.add("output_dir", f"{data['output_dir']!r} is not a folder path")
    else:
        out = _path(data["output_dir"], base)
    if out is not None and out.exists() and not out.is_dir():
        errors.add("output_dir", f"{out} exists and is not a folder")
    device = data.get("device", "cpu")
    if not isinstance(device, str):
        errors.add("device", f"{device!r} is not a device name such as 'cpu' or 'cuda'")
    else:
        try:
            check_device(device)
        except (ValueError, RuntimeError) as exc:
            errors.add("device", str(exc).replace("--device ", "", 1))
    trust = data.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        errors.add("trust_remote_code", f"{trust!r} is not true or false")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        errors.add("defaults", "must be a table ([defaults])")
        defaults = {}
    _unknown_keys(defaults, DEFAULTS_KEYS, "defaults", errors)
    search = (
        _build_config(SearchConfig, {k: defaults[k] for k in _SEARCH_FIELDS if k in defaults}, "defaults", errors)
        or SearchConfig()
    )
    specs = _parse_specs(data.get("specs"), errors)
    needs_calib_file = any(s.method.calibrates for s in specs)
    models = _parse_models(
        data.get("models"), _calib_values(defaults, "defaults", errors), base, out, needs_calib_file, errors
    )
    ev = _parse_eval(data.get("eval"), base, errors)
    errors.check()
    assert out is not None
    return Plan(
        Path(source).absolute() if source is not None else None,
        out.absolute(),
        tuple(models),
        tuple(specs),
        search,
        ev,
        device,
        trust,
    )


def load_plan(path: str | Path, *, output_dir: str | Path | None = None) -> Plan:
    """Read and validate the plan file ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: no such file. PlanError (a ValueError): unreadable or invalid, naming every bad key.
    """
    p = Path(path).expanduser()
    data = read_plan_file(p)
    return plan_from_dict(data, base_dir=p.absolute().parent, source=p, output_dir=output_dir)


__all__ = [
    "Cell",
    "Plan",
    "PlanError",
    "PlanEval",
    "PlanModel",
    "load_plan",
    "name_parts",
    "plan_from_dict",
    "read_plan_file",
]
