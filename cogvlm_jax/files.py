"""Writing files and directories atomically: a reader sees the old content or the new, never a part.

Every write the project makes to a user's disk goes through here: a directory is built in a temporary
directory beside its destination and renamed into place (``atomic_directory``); a single file is written
to a temporary name beside it and renamed over it (``atomic_file``). An interrupted run (an error,
KeyboardInterrupt, a killed process) leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
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


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it becomes ``out_dir``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``out_dir`` is
    left as it was. With ``overwrite`` an existing ``out_dir`` is moved aside, the new one renamed in,
    and the old one deleted (two renames: the old tree is never deleted before the new one is in place).
    """
    out_dir = os.path.abspath(out_dir)
    check_destination(out_dir, overwrite)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint should be readable like any directory
        yield tmp
        check_destination(out_dir, overwrite)  # something may have appeared there meanwhile
        old = None
        if os.path.lexists(out_dir):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """An open file that replaces ``path`` when the block ends without an error (else it is removed)."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
