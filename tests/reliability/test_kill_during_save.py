"""Crash safety of the output's replacement (awqkit.io.destination): a process killed (SIGKILL) at any step of
writing or committing leaves, at that instant, the old or the new complete output under ``--dst`` or a named
folder beside it; the next run with the same ``--dst`` finishes or rolls back and leaves nothing behind.

The kill points are exact: a forked child stages and commits a prepared output with every file-system step of
the commit counted, and kills itself before step k (no torch work in the child). Two real ``awqkit``
processes check the whole command: SIGKILL during the save, then a rerun; and SIGTERM, handled like Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_harness import run
from conftest import save_tiny_llama

from awqkit.io import destination as d
from awqkit.io.save import verify_files

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny source and two complete awqkit outputs of it (4 and 8 bits): the 'old' and the 'new' one."""
    root = tmp_path_factory.mktemp("kill")
    save_tiny_llama(root / "src")
    for name, bits in (("old", "4"), ("new", "8")):
        result = run(
            "quantize",
            "--method",
            "rtn",
            "--src",
            root / "src",
            "--dst",
            root / name,
            "--bits",
            bits,
            "--group-size",
            "32",
        )
        assert result.rc == 0, result.err
    return {"root": root, "src": root / "src", "old": root / "old", "new": root / "new"}


def bits_of(folder: Path) -> int | None:
    """The bits of a complete awqkit output (its files verify against its metadata), else None."""
    try:
        meta = json.loads((folder / "quantization_metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return meta["bits"] if verify_files(folder, meta) is None else None


def _complete_outputs(dst: Path) -> dict[str, int]:
    """``{folder name: bits}`` of the complete outputs under ``dst`` and its hidden siblings."""
    found = {}
    for p in [dst, *dst.parent.glob(f".{dst.name}.*")]:
        if p.is_dir() and (bits := bits_of(p)) is not None:
            found[p.name] = bits
    return found


def _commit_in_child(new: Path, dst: Path, kill_at: int, exchange: bool) -> int:
    """Fork: the child stages a copy of ``new`` for ``dst`` and commits it, SIGKILLed before file-system step
    ``kill_at`` of the commit (0: during staging, after one file). Returns how many steps the commit took."""
    pid = os.fork()
    if pid == 0:  # child
        steps = [0]

        def step() -> None:
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def counted(fn: Any) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                step()
                return fn(*a, **k)

            return wrapper

        try:
            if not exchange:
                d._exchange = lambda a, b: False  # type: ignore[assignment]
            with d.staging(dst) as tmp:
                for i, f in enumerate(sorted(new.iterdir())):
                    shutil.copy2(f, tmp / f.name)
                    if kill_at == 0 and i == 1:
                        os.kill(os.getpid(), signal.SIGKILL)
                os.replace, Path.unlink, Path.rename = (
                    counted(os.replace),
                    counted(Path.unlink),  # type: ignore
                    counted(Path.rename),
                )
                d._exchange, shutil.rmtree = counted(d._exchange), counted(shutil.rmtree)  # type: ignore
                d.commit(tmp, dst)
            os._exit(100 + steps[0])
        except BaseException:  # noqa: BLE001 - never return into pytest from the child
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return -1
    code = os.WEXITSTATUS(status)
    assert code >= 100, f"child failed with {code}"
    return code - 100


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
@pytest.mark.parametrize("with_old", [True, False], ids=["replace", "fresh"])
def test_kill_at_every_step_keeps_a_complete_output(
    outputs: dict[str, Path], tmp_path: Path, exchange: bool, with_old: bool
) -> None:
    steps = None
    kill_at = 0
    while steps is None or kill_at <= steps:
        dst = tmp_path / f"k{kill_at}" / "model-q"
        dst.parent.mkdir()
        if with_old:
            shutil.copytree(outputs["old"], dst)
        taken = _commit_in_child(outputs["new"], dst, kill_at, exchange)
        if taken >= 0:  # the commit finished: kill_at was past its last step
            steps = taken
        found = _complete_outputs(dst)
        if with_old or kill_at > 1:  # there is an old output, or the new one was complete: it is whole somewhere
            assert set(found.values()) & {4, 8}, (kill_at, found)
        if not with_old:
            assert 4 not in found.values()
        d.recover(dst)  # what the next run does first
        leftovers = sorted(p.name for p in dst.parent.iterdir() if p.name != dst.name)
        assert leftovers == [], (kill_at, leftovers)
        if dst.exists():
            assert bits_of(dst) in (4, 8), kill_at
            if kill_at > 1:  # the journal was written: the new output is complete, so it is put in place
                assert bits_of(dst) == 8, kill_at
        else:
            assert not with_old and kill_at <= 1, kill_at  # nothing was committed yet: nothing to keep
        kill_at += 1
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    swaps = exchange and d._exchange(a, b)  # renameat2 works on this file system
    # journal, marker, exchange (or: the exchange attempt + two renames), delete the old output, journal
    assert steps == (4 if not with_old else 5 if swaps else 7), steps


def _cli(*args: Any) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from awqkit.cli import main; sys.exit(main(sys.argv[1:]))",
        *map(str, args),
    ]


@pytest.mark.slow  # subprocesses; CI runs it once with `pytest -m slow`
def test_real_kill_and_sigterm(outputs: dict[str, Path], tmp_path: Path) -> None:
    """A real ``awqkit quantize --overwrite`` SIGKILLed while it writes, then SIGTERMed: the old output survives
    both; the same command afterwards replaces it and leaves nothing else."""
    dst = tmp_path / "model-q"
    shutil.copytree(outputs["old"], dst)
    cmd = _cli(
        "quantize",
        "--method",
        "rtn",
        "--src",
        outputs["src"],
        "--dst",
        dst,
        "--bits",
        "8",
        "--group-size",
        "32",
        "--overwrite",
    )
    hook = tmp_path / "hook"
    hook.mkdir()
    # sitecustomize makes the child signal itself while it writes the first tensor of the output
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "sig = os.environ.get('AWQKIT_TEST_SIGNAL')\n"
        "if sig:\n"
        "    from awqkit.io.shards import ShardWriter\n"
        "    real = ShardWriter.write\n"
        "    def write(self, *a, **k):\n"
        "        real(self, *a, **k)\n"
        "        os.kill(os.getpid(), getattr(signal, sig))\n"
        "        import time; time.sleep(5)\n"
        "    ShardWriter.write = write\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    for sig, rc in (("SIGKILL", -signal.SIGKILL), ("SIGTERM", 130)):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env={**env, "AWQKIT_TEST_SIGNAL": sig}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == rc, (sig, proc.returncode, proc.stderr[-2000:], time.perf_counter() - t0)
        assert bits_of(dst) == 4  # the old output is untouched
        if sig == "SIGTERM":
            assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr
            assert not list(tmp_path.glob(f".{dst.name}.*"))  # cleaned up on the way out
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert bits_of(dst) == 8 and not list(tmp_path.glob(f".{dst.name}.*"))
