"""lm-evaluation-harness adapter: evaluate float and quantized folders on any lm-eval task.

The folder is loaded by :func:`awqkit.eval.runner_load.load_for_eval` (float HF folders, awqkit,
AutoAWQ GEMM and compressed-tensors checkpoints, with a kernel ``backend``) and the ready model and
tokenizer are wrapped in lm-eval's ``HFLM`` (:class:`AwqkitLM`, a subclass), so every lm-eval request
type (log-likelihood, rolling log-likelihood, generation) runs through awqkit's kernels.

* :func:`load_lm_eval_model` returns that ``HFLM`` instance, for ``lm_eval.simple_evaluate(model=lm, ...)``.
* lm-eval's model name ``"awqkit"`` is registered (lazily: a placeholder pointing at :class:`AwqkitLM`)
  when this module is imported and lm-eval is installed, so
  ``lm_eval.simple_evaluate(model="awqkit", model_args="pretrained=PATH,backend=torch")`` works.
  ``backend`` there is awqkit's kernel backend, not HFLM's causal/seq2seq switch (always causal).
* :func:`run_lm_eval` runs ``simple_evaluate`` with the adapter and returns (and optionally writes) the results.

lm-eval is an optional extra (``pip install "awqkit[lm-eval]"``); importing :mod:`awqkit` never imports it.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from awqkit.eval.runner_load import load_for_eval

logger = logging.getLogger(__name__)

#: The model name this adapter registers with lm-eval.
MODEL_NAME = "awqkit"
_INSTALL_HINT = 'lm-evaluation-harness is not installed; install it with: pip install "awqkit[lm-eval]"'


def _require_lm_eval() -> ModuleType:
    """The ``lm_eval`` module; ImportError with the install command when it is missing."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc


@lru_cache(maxsize=1)
def _adapter_class() -> type:
    """Build :class:`AwqkitLM` (an ``HFLM`` subclass) once lm-eval is known to be importable."""
    from lm_eval.models.huggingface import HFLM

    class AwqkitLM(HFLM):
        """lm-eval ``HFLM`` over a folder loaded by awqkit (float or quantized).

        Args:
            pretrained: the model folder.
            backend: awqkit kernel backend for quantized folders (``auto``, ``torch``, ``cpu-avx2``, ``cpu-int4``, ...).
            device: where the model is loaded and run.
            batch_size: requests per forward pass (an int, or lm-eval's ``"auto"``).
            trust_remote_code: allow custom model code.
            max_length: context length for lm-eval (default: from the model config).
            **kwargs: other ``HFLM`` arguments (``add_bos_token``, ``softmax_dtype``, ...).
        """

        def __init__(
            self,
            pretrained: str,
            backend: str = "auto",
            device: str = "cpu",
            batch_size: int | str = 1,
            trust_remote_code: bool = False,
            max_length: int | None = None,
            **kwargs: Any,
        ) -> None:
            loaded = load_for_eval(
                pretrained, backend=str(backend), device=device, trust_remote_code=bool(trust_remote_code)
            )
            for ignored in ("tokenizer", "dtype", "parallelize", "revision"):
                if kwargs.pop(ignored, None) is not None:
                    logger.warning("lm-eval argument %r is ignored: awqkit loads the folder itself", ignored)
            # HFLM warns that a pre-built model makes it skip its own loading and distributed set-up: intended here
            hf_logger = logging.getLogger(HFLM.__module__)
            level = hf_logger.level
            hf_logger.setLevel(max(level, logging.ERROR))
            try:
                super().__init__(
                    pretrained=loaded.model,
                    tokenizer=loaded.tokenizer,
                    backend="causal",
                    batch_size=batch_size,
                    max_length=None if max_length is None else int(max_length),
                    trust_remote_code=bool(trust_remote_code),
                    **kwargs,
                )
            finally:
                hf_logger.setLevel(level)
            self.pretrained = str(loaded.path)  # for lm-eval's result config, instead of the model object
            self.awqkit_load = loaded.describe()

        def get_model_info(self) -> dict[str, Any]:
            """Parameter count, dtype and awqkit's load description (no hub look-up)."""
            return {
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(getattr(self.model, "dtype", "")),
                "awqkit": self.awqkit_load,
            }

    AwqkitLM.__qualname__ = "AwqkitLM"
    AwqkitLM.__module__ = __name__
    return AwqkitLM


def register_with_lm_eval() -> bool:
    """Register the model name ``"awqkit"`` with lm-eval (idempotent); False when lm-eval is missing.

    With lm-eval's lazy registry the entry is a placeholder (``"awqkit.eval.lm_eval_adapter:AwqkitLM"``), so
    lm-eval's HF model code is imported only when the name is first used; with the older plain-dict
    registry (lm-eval 0.4.9) the class itself is built and registered.
    """
    try:
        from lm_eval.api import registry
    except ImportError:
        return False
    try:
        if hasattr(registry, "model_registry"):
            registry.model_registry.register(MODEL_NAME, target=f"{__name__}:AwqkitLM")
        elif registry.MODEL_REGISTRY.get(MODEL_NAME) is not _adapter_class():
            registry.register_model(MODEL_NAME)(_adapter_class())
    except (ValueError, TypeError, AssertionError):  # resolved to our class already, or taken by another package
        current = registry.get_model(MODEL_NAME)
        if getattr(current, "__module__", None) != __name__:
            logger.warning("lm-eval model name %r is already registered to %r", MODEL_NAME, current)
            return False
    return True


def __getattr__(name: str) -> Any:
    if name == "AwqkitLM":
        _require_lm_eval()
        return _adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_lm_eval_model(
    path: str | Path,
    *,
    backend: str = "auto",
    device: str = "cpu",
    batch_size: int | str = 1,
    trust_remote_code: bool = False,
    max_length: int | None = None,
    **hflm_kwargs: Any,
) -> Any:
    """Load the folder ``path`` with awqkit's loader and wrap it as an lm-eval ``HFLM`` (:class:`AwqkitLM`).

    Raises:
        ImportError: lm-eval is not installed (the message gives the pip command).
        FileNotFoundError / ValueError: as :func:`~awqkit.eval.runner_load.load_for_eval`.
    """
    _require_lm_eval()
    register_with_lm_eval()
    return _adapter_class()(
        str(path),
        backend=backend,
        device=device,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        max_length=max_length,
        **hflm_kwargs,
    )


def parse_lm_eval_tasks(tasks: str | Sequence[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
    """``"a,b"`` or a sequence of names / task-config dicts as a list; ValueError when empty."""
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    items = [t for t in items if not (isinstance(t, str) and not t)]
    if not items:
        raise ValueError("no lm-eval task given; pass task names such as arc_challenge,hellaswag")
    return items


def _task_manager(path: str | Path, include_path: str | Path | None, include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=include_defaults,
        metadata={"pretrained": str(path)},
    )


def _check_task_names(manager: Any, tasks: Sequence[str | dict[str, Any]]) -> None:
    """ValueError naming the unknown task names (with close matches) before any model is loaded."""
    import difflib

    known = manager.all_tasks
    unknown = [t for t in tasks if isinstance(t, str) and not manager.match_tasks([t])]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        detail = "; ".join(f"{t!r} (close: {', '.join(h) or 'none'})" for t, h in hints.items())
        raise ValueError(
            f"unknown lm-eval task(s): {detail}; `lm-eval ls tasks` lists them "
            "(or pass --include-path for task YAMLs of your own)"
        )


def run_lm_eval(
    path: str | Path,
    tasks: str | Sequence[str | dict[str, Any]],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    backend: str = "auto",
    batch_size: int | str = 1,
    device: str = "cpu",
    output: str | Path | None = None,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate the folder ``path`` on lm-eval ``tasks`` and return lm-eval's results dict.

    Args:
        tasks: task names (``"arc_challenge,hellaswag"`` or a list; globs allowed), or task-config dicts.
        limit: items per task (an int), or a fraction of each task when below 1.0.
        num_fewshot: few-shot examples (default: each task's own setting).
        output: write the results as JSON to this file.
        include_path: a folder of extra lm-eval task YAML files (e.g. tasks over local data).
        include_defaults: also index lm-eval's built-in tasks (indexing them takes seconds).
    Returns:
        ``simple_evaluate``'s dict (``results``, ``configs``, ``versions``, ``n-shot``, ``config``, ...)
        with ``config["awqkit"]`` describing how the folder was loaded.
    Raises:
        ImportError: lm-eval is missing. ValueError: no task, or an unknown task name (before loading).
    """
    task_list = parse_lm_eval_tasks(tasks)
    if not include_defaults and include_path is None:
        raise ValueError("without lm-eval's built-in tasks (include_defaults=False) pass include_path")
    lm_eval = _require_lm_eval()
    manager = _task_manager(path, include_path, include_defaults)
    _check_task_names(manager, task_list)
    lm = load_lm_eval_model(
        path, backend=backend, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code
    )
    logger.info("lm-eval: %s on %s (limit %s, num_fewshot %s)", path, task_list, limit, num_fewshot)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_list,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    results = dict(results)
    results.setdefault("config", {})["awqkit"] = lm.awqkit_load
    if output is not None:
        from lm_eval.utils import handle_non_serializable

        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
        logger.info("wrote %s", out)
    return results


register_with_lm_eval()

__all__ = ["MODEL_NAME", "load_lm_eval_model", "parse_lm_eval_tasks", "register_with_lm_eval", "run_lm_eval"]
