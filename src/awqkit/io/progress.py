"""The resumable state of a quantization run, kept inside its staged output folder (issue 13: resume).

A run writes its output into a staged folder beside ``--dst`` (:mod:`awqkit.io.destination`) layer by layer.
After each finished layer it records, in ``<staged>/awqkit_progress/``:

* ``layer-<i>/``: that layer's search results (:class:`~awqkit.algo.results.AWQResults` holding only its
  entries, written by :meth:`AWQResults.save`);
* ``inputs-<i+1>.safetensors``: the next layer's inputs (``batch.<b>`` tensors, float32, exactly as the
  pipeline passes them on), so the next run computes layer ``i+1`` on the same numbers;
* ``progress.json`` (written atomically, last): ``{"format": 1, "key": <run key>, "layers_done": i+1,
  "inputs": "inputs-<i+1>.safetensors", "extra": {...}}``. It is the commit point: the files it names are
  complete before it names them, and the previous inputs file is deleted only after.

A run killed at any instant therefore leaves a consistent record of its finished layers. The next run with the
same command (the same :func:`run_key`: source weights, method, settings, calibration) continues after the last
finished layer and writes a checkpoint bit-identical to an uninterrupted run; with another key it starts afresh.
The folder is removed before the output is put in place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from awqkit.algo.results import AWQResults
from awqkit.files import write_json_atomic

FOLDER = "awqkit_progress"
FILE = "progress.json"
FORMAT = 1


def run_key(parts: dict[str, Any]) -> str:
    """sha256 of ``parts`` (JSON-ready: source hash, method, settings, calibration hash, versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def has_progress(staged: Path) -> bool:
    """Whether a staged folder records at least one finished layer (a run can continue from it)."""
    try:
        data = json.loads((staged / FOLDER / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT and int(data.get("layers_done") or 0) > 0


class RunProgress:
    """The progress record of the run writing into ``staged`` (see the module docstring)."""

    def __init__(self, staged: Path, key: str) -> None:
        self.folder = staged / FOLDER
        self.key = key

    @staticmethod
    def read_key(staged: Path) -> str | None:
        """The run key a staged folder's progress was recorded under, None when it has none or it is unreadable."""
        try:
            data = json.loads((staged / FOLDER / FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data.get("key") if isinstance(data, dict) and data.get("format") == FORMAT else None

    def state(self) -> dict[str, Any] | None:
        """The recorded progress when it was recorded under this run's key, else None."""
        try:
            data = json.loads((self.folder / FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        ok = isinstance(data, dict) and data.get("format") == FORMAT and data.get("key") == self.key
        return data if ok else None

    def start(self, extra: dict[str, Any]) -> None:
        """Begin a fresh record (no layer done) holding ``extra`` (e.g. the output layout)."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        write_json_atomic(
            self.folder / FILE,
            {"format": FORMAT, "key": self.key, "layers_done": 0, "inputs": None, "extra": extra},
            indent=None,
            durable=True,
        )

    def record_layer(self, index: int, results: AWQResults | None, inputs: list[Tensor] | None) -> None:
        """Layer ``index`` is written: keep its results and the next layer's inputs, then commit the record."""
        state = self.state() or {"extra": {}}
        if results is not None:
            _layer_results(results, index).save(self.folder / f"layer-{index:05d}")
        name = None
        if inputs is not None:
            name = f"inputs-{index + 1:05d}.safetensors"
            save_file({f"batch.{b}": t.contiguous() for b, t in enumerate(inputs)}, str(self.folder / name))
        previous = state.get("inputs")
        record = {
            "format": FORMAT,
            "key": self.key,
            "layers_done": index + 1,
            "inputs": name,
            "extra": state.get("extra", {}),
        }
        write_json_atomic(self.folder / FILE, record, indent=None, durable=True)
        if previous and previous != name:
            (self.folder / previous).unlink(missing_ok=True)

    def resume(self, norm_offset: float) -> tuple[int, list[Tensor] | None, AWQResults]:
        """``(layers done, the next layer's inputs, the results of the layers done)`` from the record."""
        state = self.state()
        if state is None:
            raise ValueError(f"{self.folder} holds no progress recorded under this run's key")
        done = int(state["layers_done"])
        inputs = None
        if state.get("inputs"):
            t = load_file(str(self.folder / state["inputs"]))
            inputs = [t[f"batch.{b}"] for b in range(len(t))]
        results = AWQResults(norm_offset=norm_offset)
        for i in range(done):
            part = self.folder / f"layer-{i:05d}"
            if part.is_dir():
                results.extend(AWQResults.load(part))
        return done, inputs, results

    def remove(self) -> None:
        """Delete the record (before the output is put in place)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _layer_results(results: AWQResults, index: int) -> AWQResults:
    return results.for_layer(index, results.layer_seconds[-1:] if results.layer_seconds else [])


__all__ = ["FOLDER", "RunProgress", "has_progress", "run_key"]
