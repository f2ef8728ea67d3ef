"""The output folder's life cycle: is ``dst`` safe to (re)write, stage the new output, replace atomically, and
finish or roll back what a killed run left.

Safety (:func:`check_destination`, before any work): an existing ``dst`` is replaced only with ``overwrite``
and only when it is a folder awqkit wrote (it holds ``quantization_metadata.json``) or an empty folder; never
the source, a folder that contains the source, the working directory, the home folder, a folder containing
either of them, the file-system root or a symbolic link (paths are compared after resolving symlinks).

Staging (:func:`staging`): the output is written into a hidden sibling ``.<name>.tmp-<token>`` holding a
marker file :data:`MARKER` (pid, host, start time) for as long as it is incomplete. An exception (Ctrl-C,
SIGTERM turned into KeyboardInterrupt by the CLI) removes it; SIGKILL leaves it for :func:`recover`.

Replacement (:func:`commit`), journaled so that at every instant the old or the new complete output exists
under ``dst`` or under a named folder:

1. the journal ``.<name>.awqkit-commit.json`` is written (atomically), naming the staged folder, the
   recovery folder ``.<name>.old-<token>`` and the staged folder's inode;
2. the marker is removed from the staged folder (it is complete);
3. the staged folder takes ``dst``'s place: one ``renameat2(RENAME_EXCHANGE)`` where the kernel and file
   system have it (``dst`` never disappears; the old output lands under the staged name), else two renames
   (``dst`` -> recovery folder, staged -> ``dst``);
4. the old output is deleted, then the journal.

:func:`recover` (run before a new write to the same ``dst``) reads a journal left by a killed run: when
``dst`` already has the staged inode the replacement happened and only the old output is deleted; when the
staged folder is still there it is complete (the journal is written only then), so the replacement is
finished; otherwise the recovery folder is moved back. Staged folders whose marker names a process of this
host that is gone are deleted; so are markerless ones from older awqkit versions that hold only files
awqkit writes, and recovery folders without a journal once ``dst`` exists (before that they are moved back).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from awqkit.errors import DestinationError
from awqkit.files import partial_files, write_json_atomic

logger = logging.getLogger(__name__)

METADATA = "quantization_metadata.json"
MARKER = ".awqkit-partial.json"
_AWQKIT_FILES = (  # what an awqkit output folder holds (for markerless staged folders of older versions)
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "README.md",
)


# ------------------------------------------------------------------------------------------ naming
def staged_prefix(dst: Path) -> str:
    return f".{dst.name}.tmp-"


def recovery_prefix(dst: Path) -> str:
    return f".{dst.name}.old-"


def journal_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.awqkit-commit.json"


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


# ------------------------------------------------------------------------------------------ safety
def _contains(folder: Path, other: Path) -> bool:
    """``other`` is ``folder`` or lies inside it (both already resolved)."""
    return other == folder or folder in other.parents


def check_destination(dst: str | Path, *, overwrite: bool, src: str | Path | None = None) -> Path:
    """The absolute ``dst`` when it may be written (see the module docstring); raises DestinationError.

    A ``dst`` that does not exist is always fine (its parent is created later); an existing one needs
    ``overwrite`` and must be a replaceable folder.
    """
    path = _absolute(dst)
    if path.is_symlink():
        raise DestinationError(f"--dst {path} is a symbolic link; pass the folder it points to, or another path")
    real = path.resolve()
    protected: list[tuple[Path, str]] = [(Path(real.anchor), "the file-system root")]
    if src is not None and _absolute(src).exists():
        protected.append((_absolute(src).resolve(), "the source model --src"))
    protected += [(Path.cwd().resolve(), "the working directory"), (Path.home().resolve(), "the home folder")]
    for place, what in protected:
        if _contains(real, place):
            how = "is" if real == place else "contains"
            raise DestinationError(
                f"--dst {path} {how} {what} ({place}); awqkit never replaces it. Choose a new folder for the output"
            )
    if not path.exists():
        return path
    if not path.is_dir():
        raise DestinationError(f"--dst {path} exists and is a file; choose a folder path for the output")
    if not overwrite:
        raise DestinationError(
            f"--dst {path} already exists; pass --overwrite (overwrite=True) to replace it "
            "(only a folder awqkit wrote is replaced) or choose another --dst"
        )
    if not (path / METADATA).is_file() and any(path.iterdir()):
        raise DestinationError(
            f"--dst {path} is not an awqkit output (no {METADATA}) and not empty; "
            "--overwrite replaces only folders awqkit wrote. Choose another --dst"
        )
    return path


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the folder the output's missing parents would go in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(parent: Path) -> None:
    """Prove a file can be written where ``parent`` is (or would be created) without leaving anything behind:
    a probe file in ``parent``'s nearest existing ancestor. Raises DestinationError."""
    base = _existing_ancestor(parent)
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(base))
        fd, probe = tempfile.mkstemp(prefix=".awqkit-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DestinationError(
            f"cannot write into {parent} ({exc.strerror or exc}"
            f"{': ' + str(exc.filename) if exc.filename else ''}); choose a --dst on a "
            "writable disk or fix the folder's permissions"
        ) from None


def check_free_space(parent: Path, needed: int) -> None:
    """``needed`` bytes must be free on the file system ``parent`` is (or would be) on; raises DestinationError."""
    free = shutil.disk_usage(_existing_ancestor(parent)).free
    if free < needed:
        raise DestinationError(
            f"not enough disk space for the output in {parent}: about {needed / 1e9:.2f} GB "
            f"needed, {free / 1e9:.2f} GB free; free some space or choose a --dst on another disk"
        )


# ------------------------------------------------------------------------------------------ staging
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _owner_gone(info: object) -> bool:
    """True when ``info`` (a marker's or journal's owner) is a process of this host that no longer runs."""
    if not isinstance(info, dict):
        return True
    pid, host = info.get("pid"), info.get("host")
    return isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid)


@contextlib.contextmanager
def staging(
    dst: Path, *, adopt: Path | None = None, keep_on_interrupt: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """A staged folder for ``dst`` (see the module docstring): a new one, or ``adopt``, the staged folder a
    killed run of the same command left (its marker now names this process). It is removed if the block
    raises, except on an interrupt (Ctrl-C, SIGTERM) when ``keep_on_interrupt(folder)`` says it holds progress
    the next run can continue from."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = adopt if adopt is not None else Path(tempfile.mkdtemp(prefix=staged_prefix(dst), dir=dst.parent))
    try:
        write_json_atomic(tmp / MARKER, indent=None, durable=True, data={**_owner(), "dst": str(dst)})
        yield tmp
    except KeyboardInterrupt:
        if keep_on_interrupt is None or not keep_on_interrupt(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            logger.warning("kept %s: run the same command again to continue from its last finished layer", tmp)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resumable(dst: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """The staged folders of ``dst`` whose owner is gone (a killed run of this host) and for which ``keep`` is
    true (they hold progress a run can continue from), newest first."""
    found = []
    for staged in dst.parent.glob(f"{staged_prefix(dst)}*") if dst.parent.is_dir() else []:
        try:
            owner = json.loads((staged / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if staged.is_dir() and not staged.is_symlink() and _owner_gone(owner) and keep(staged):
            found.append(staged)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


# ------------------------------------------------------------------------------------------ commit
def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit(staged: Path, dst: Path) -> None:
    """Put the complete ``staged`` folder in ``dst``'s place (journaled; see the module docstring)."""
    journal = journal_path(dst)
    old = dst.parent / f"{recovery_prefix(dst)}{uuid.uuid4().hex[:8]}"
    write_json_atomic(
        journal,
        indent=None,
        durable=True,
        data={**_owner(), "staged": staged.name, "recovery": old.name, "staged_inode": staged.stat().st_ino},
    )
    (staged / MARKER).unlink(missing_ok=True)
    if not dst.exists():
        staged.rename(dst)
    elif _exchange(staged, dst):
        logger.debug("swapped %s into place; the old output is in %s until deleted", dst, staged)
        shutil.rmtree(staged)
    else:
        dst.rename(old)
        logger.debug("moved the old %s to %s (recovery folder) for the replacement", dst, old)
        staged.rename(dst)
        shutil.rmtree(old)
    journal.unlink()


# ------------------------------------------------------------------------------------------ recovery
def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino if path.is_dir() and not path.is_symlink() else None
    except OSError:
        return None


def _finish_journal(dst: Path, journal: Path) -> str:
    try:
        info = json.loads(journal.read_text(encoding="utf-8"))
        staged, old = dst.parent / str(info["staged"]), dst.parent / str(info["recovery"])
        staged_inode = int(info["staged_inode"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DestinationError(
            f"the replacement journal {journal} is unreadable ({exc}); check {dst} and the "
            f"folders {dst.parent}/.{dst.name}.* by hand, then delete the journal"
        ) from None
    if not _owner_gone(info):
        raise DestinationError(
            f"{dst} is being replaced by process {info.get('pid')} on {info.get('host')} "
            f"(journal {journal}); wait for it to finish, or delete the journal if it is gone"
        )
    if _inode(dst) == staged_inode:  # the new output is in place: only the old one is left to delete
        for leftover in (staged, old):
            if leftover.exists() and _inode(leftover) != staged_inode:
                shutil.rmtree(leftover)
        action = "finished"
    elif _inode(staged) == staged_inode:  # the complete new output waits under the staged name
        (staged / MARKER).unlink(missing_ok=True)
        if dst.exists():
            dst.rename(old)
        staged.rename(dst)
        if old.exists():
            shutil.rmtree(old)
        action = "finished"
    else:  # the new output is gone: put the old one back
        if not dst.exists() and old.is_dir():
            old.rename(dst)
        action = "rolled back"
    journal.unlink()
    return f"{action} the replacement of {dst} that an interrupted run left"


def _only_awqkit_files(folder: Path) -> bool:
    return all(p.is_file() and any(p.match(pat) for pat in _AWQKIT_FILES) for p in folder.iterdir())


def recover(dst: str | Path, *, keep: Callable[[Path], bool] | None = None) -> list[str]:
    """Finish or roll back what killed runs left for ``dst`` (see the module docstring); returns what was done.

    ``keep(staged)``: staged folders of dead owners for which it is true are left in place (a resumable run's).
    Raises DestinationError when another live process is replacing ``dst`` or a journal is unreadable.
    """
    dst = _absolute(dst)
    parent = dst.parent
    done: list[str] = []
    if not parent.is_dir():
        return done
    journal = journal_path(dst)
    # a journal whose write was cut is never acted on (awqkit <= 0.1.0 named it NAME.*.part, now .NAME.*.part)
    for partial in [*partial_files(journal), *parent.glob(f"{journal.name}.*.part")]:
        partial.unlink(missing_ok=True)
    if journal.is_file():
        done.append(_finish_journal(dst, journal))
    for staged in sorted(parent.glob(f"{staged_prefix(dst)}*")):
        if not staged.is_dir() or staged.is_symlink():
            continue
        marker = staged / MARKER
        if marker.is_file():
            try:
                owner = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                owner = None
            if not _owner_gone(owner) or (keep is not None and keep(staged)):
                continue  # a live run is writing it, or a killed run's progress the caller may continue
        elif not _only_awqkit_files(staged):
            logger.warning("leaving %s alone: it holds files awqkit does not write", staged)
            continue
        shutil.rmtree(staged)
        done.append(f"removed {staged}, the unfinished output of an interrupted run")
    for old in sorted(parent.glob(f"{recovery_prefix(dst)}*")):
        if not old.is_dir() or old.is_symlink():
            continue
        complete = (old / METADATA).is_file()
        if not complete and not _only_awqkit_files(old):
            logger.warning("leaving %s alone: it holds files awqkit does not write", old)
            continue
        if dst.exists() or not complete:
            shutil.rmtree(old)
            done.append(f"removed {old}, an old output an interrupted run had replaced")
        else:
            old.rename(dst)
            done.append(f"moved {old} back to {dst} (an interrupted run had moved it aside)")
    for line in done:
        logger.warning("%s", line)
    return done


__all__ = [
    "MARKER",
    "check_destination",
    "check_free_space",
    "check_writable",
    "commit",
    "journal_path",
    "pid_alive",
    "recover",
    "resumable",
    "recovery_prefix",
    "staged_prefix",
    "staging",
]
