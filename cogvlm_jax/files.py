"""Writing files and directories atomically: a reader sees the old content or the new, never a part.

Every write the project makes to a user's disk goes through here: a directory is built in a temporary
directory beside its destination and renamed into place (``atomic_directory``); a single file is written
to a temporary name beside it and renamed over it (``atomic_file``). An interrupted run (an error,
KeyboardInterrupt, a killed process) leaves the destination as it was.

A writer holds an exclusive ``flock`` on its temporary (directory or file) until it is renamed into place;
the kernel drops the lock when the writer process ends, however it ends. So the temporaries beside a
destination that nobody holds locked are those of writers that were killed (``kill -9``, a crash, a lost
machine): every write to a destination first removes them (:func:`remove_stale`), and a directory moved
aside to be overwritten is put back if the new one never made it into place. ``abandon_writes`` undoes this
process's writes in flight at once, for an exit that cannot unwind (the CLI's Ctrl-C, see ``cli.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterable, Iterator


class CheckpointError(ValueError):
    """A checkpoint (or a file beside it) we cannot read or write; the message names the key, file or directory."""


class DestinationError(CheckpointError):
    """A destination we refuse to write: not a directory, or not empty without ``overwrite``."""


def check_destination(out_dir: str, overwrite: bool = False) -> None:
    """Refuse a destination that is a file, or a non-empty directory unless ``overwrite``."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise DestinationError(f"destination {out_dir} exists and is not a directory")
    if os.listdir(out_dir) and not overwrite:
        raise DestinationError(f"destination {out_dir} exists and is not empty; "
                               "pass overwrite=True (CLI: --overwrite) to replace it")


_TMP, _OLD = ".tmp-", ".old-"  # name parts: .BASE.tmp-TOKEN (being written), .BASE.old-TOKEN (moved aside)
# This process's writes in flight: temporary path -> (destination, the path it moves the destination aside to).
_IN_FLIGHT: dict[str, tuple[str, str | None]] = {}


def _locked_temporary(parent: str, base: str, directory: bool) -> tuple[str, int]:
    """A new temporary ``.BASE.tmp-TOKEN`` in ``parent`` and an open descriptor holding its exclusive lock.

    Between its creation and the lock another writer's :func:`remove_stale` may take it for a dead one's and
    remove it: then it is made again (the lock is checked to be on the path that is still there).
    """
    while True:
        if directory:
            path = tempfile.mkdtemp(prefix=f".{base}{_TMP}", dir=parent)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd, path = tempfile.mkstemp(prefix=f".{base}{_TMP}", dir=parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except (BlockingIOError, FileNotFoundError):
            pass
        except OSError:  # a file system without locks: the write goes on unlocked (and is never taken for stale)
            return path, fd
        os.close(fd)


def _held(path: str) -> bool:
    """Whether a live writer holds ``path`` locked (a path that is gone is held by nobody)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:  # not ours to open (another user's): leave it
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a live writer's; any other: a file system without locks, so nobody can tell
        return True
    finally:
        os.close(fd)
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_stale(dest: str) -> list[str]:
    """Remove the temporaries beside ``dest`` that no live writer holds (their writers were killed); a
    destination moved aside by such a writer and not replaced is renamed back first. Returns what it removed."""
    dest = os.path.abspath(dest)
    parent, base = os.path.split(dest)
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    removed = []
    for name in sorted(names):
        if not name.startswith(f".{base}{_TMP}"):
            continue
        tmp = os.path.join(parent, name)
        if _held(tmp):
            continue
        old = os.path.join(parent, f".{base}{_OLD}{name[len(base) + 1 + len(_TMP):]}")
        if os.path.lexists(old) and not os.path.lexists(dest):  # killed between its two renames
            with contextlib.suppress(FileNotFoundError):  # another writer cleaning up at the same time
                os.rename(old, dest)
        _remove(tmp)
        removed.append(tmp)
    for name in sorted(names):  # moved aside by a writer that got its new tree in place, then was killed
        if name.startswith(f".{base}{_OLD}"):
            tmp = os.path.join(parent, f".{base}{_TMP}{name[len(base) + 1 + len(_OLD):]}")
            if not os.path.lexists(tmp) and os.path.lexists(dest):
                _remove(os.path.join(parent, name))
                removed.append(os.path.join(parent, name))
    return removed


def abandon_writes() -> None:
    """Undo this process's writes in flight now: remove their temporaries, and put back a destination one
    had moved aside. For an exit that skips the ``finally`` blocks (``os._exit``)."""
    for tmp, (dest, old) in list(_IN_FLIGHT.items()):
        if old is not None and os.path.lexists(old) and not os.path.lexists(dest):
            with contextlib.suppress(OSError):
                os.rename(old, dest)
        _remove(tmp)
        _IN_FLIGHT.pop(tmp, None)


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it becomes ``out_dir``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``out_dir`` is
    left as it was. With ``overwrite`` an existing ``out_dir`` is moved aside, the new one renamed in,
    and the old one deleted (two renames: the old tree is never deleted before the new one is in place).
    Temporaries of killed writers of ``out_dir`` are removed first (:func:`remove_stale`).
    """
    out_dir = os.path.abspath(out_dir)
    remove_stale(out_dir)
    check_destination(out_dir, overwrite)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp, lock = _locked_temporary(parent, base, directory=True)
    old = os.path.join(parent, f".{base}{_OLD}{os.path.basename(tmp)[len(base) + 1 + len(_TMP):]}")
    _IN_FLIGHT[tmp] = (out_dir, old)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint should be readable like any directory
        yield tmp
        check_destination(out_dir, overwrite)  # something may have appeared there meanwhile
        moved = os.path.lexists(out_dir)
        if moved:
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if moved:
                os.rename(old, out_dir)
            raise
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _IN_FLIGHT.pop(tmp, None)
        os.close(lock)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """An open file that replaces ``path`` when the block ends without an error (else it is removed).
    Temporaries of killed writers of ``path`` are removed first (:func:`remove_stale`)."""
    path = os.path.abspath(path)
    remove_stale(path)
    parent = os.path.dirname(path)
    tmp, fd = _locked_temporary(parent, os.path.basename(path), directory=False)
    lock = os.dup(fd)  # the lock lasts until every descriptor of the file is closed: past the rename
    _IN_FLIGHT[tmp] = (path, None)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _IN_FLIGHT.pop(tmp, None)
        os.close(lock)


def write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically."""
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    """JSON the way Hugging Face writes its files (indent 2, sorted keys, trailing newline), atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_files(paths: Iterable[str], out_dir: str) -> list[str]:
    """Copy each existing file into ``out_dir`` under its base name; returns the names copied."""
    names = []
    for p in paths:
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(out_dir, os.path.basename(p)))
            names.append(os.path.basename(p))
    return names
