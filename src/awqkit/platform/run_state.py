"""The state file and the lock of a campaign's output folder (``awqkit batch``, ``awqkit orchestrate``); what
they hold and mean: :mod:`awqkit.platform.batch`. Only the process that runs the campaign writes them (cells run
by other processes, :mod:`awqkit.platform.executors`, return their results to it)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from awqkit.files import write_json_atomic
from awqkit.io.destination import pid_alive

logger = logging.getLogger(__name__)

STATE_FILE = "awqkit_state.json"
LOCK_FILE = ".awqkit.lock"
STATE_VERSION = 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunState:
    """The state file of an output folder (see the module docstring); :meth:`record` saves at once."""

    def __init__(self, path: Path, plan_source: Path | None = None) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "format_version": STATE_VERSION,
            "plan": None,
            "updated": None,
            "quantize": {},
            "evaluate": {},
        }
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(loaded, dict):
                    raise ValueError("not a JSON object")
                for section in ("quantize", "evaluate"):
                    if not isinstance(loaded.get(section, {}), dict):
                        raise ValueError(f"'{section}' is not an object")
                self.data.update(loaded)
            except (OSError, ValueError) as exc:
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                logger.warning(
                    "state file %s is unreadable (%s); moved it to %s and starting a new one "
                    "(finished folders are still found on disk)",
                    path,
                    exc,
                    aside,
                )
                path.replace(aside)
        if plan_source is not None:
            self.data["plan"] = str(plan_source)

    def get(self, section: str, name: str) -> dict[str, Any] | None:
        return self.data.setdefault(section, {}).get(name)

    def record(self, section: str, name: str, **entry: Any) -> None:
        entry["finished"] = _now()
        self.data.setdefault(section, {})[name] = entry
        self.data["updated"] = entry["finished"]
        write_json_atomic(self.path, self.data)


@contextlib.contextmanager
def run_lock(output_dir: Path) -> Iterator[Path]:
    """Hold ``output_dir/.awqkit.lock`` for the duration (see the module docstring).

    Raises:
        FileExistsError: another live run holds the lock.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            pid, lock_host = info.get("pid"), info.get("host")
            if not info or (isinstance(pid, int) and lock_host == host and not pid_alive(pid)):
                logger.warning("removing stale lock %s (process %s is not running)", path, pid)
                path.unlink(missing_ok=True)
                continue
            raise FileExistsError(
                f"{output_dir} is in use by process {pid} on {lock_host} (lock file {path}); "
                "wait for that run to finish, or delete the lock if it is gone"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"pid": os.getpid(), "host": host, "started": _now()}, fh)
        break
    else:  # pragma: no cover - the lock reappeared between unlink and open
        raise FileExistsError(f"could not take the lock {path}; another run is starting on {output_dir}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


__all__ = ["LOCK_FILE", "STATE_FILE", "STATE_VERSION", "RunState", "run_lock"]
