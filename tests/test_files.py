"""Atomic writes (cogvlm_jax/files.py): temporaries of killed writers are removed by the next write to the
destination, a live writer's are left alone, and a destination a killed writer moved aside is put back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from cogvlm_jax import files

# A writer that dies (SIGKILL: no finally block runs) inside the write, after writing part of it.
KILLED = textwrap.dedent("""
    import os, signal, sys
    from cogvlm_jax import files
    dest, kind = sys.argv[1], sys.argv[2]
    writing = files.atomic_directory(dest, overwrite=True) if kind == "dir" else files.atomic_file(dest)
    entered = writing.__enter__()
    if kind == "dir":
        open(os.path.join(entered, "part"), "w").write("half")
    else:
        entered.write("half")
    os.kill(os.getpid(), signal.SIGKILL)
""")
# A writer that stays inside its write until its stdin closes.
WAITING = textwrap.dedent("""
    import sys
    from cogvlm_jax import files
    with files.atomic_directory(sys.argv[1]) as tmp:
        print(tmp, flush=True)
        sys.stdin.read()
""")


def _dot_entries(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def _killed_writer(dest, kind):
    r = subprocess.run([sys.executable, "-c", KILLED, str(dest), kind], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr


def test_a_killed_writers_directory_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "ckpt"
    _killed_writer(dest, "dir")
    first = _dot_entries(tmp_path)
    _killed_writer(dest, "dir")  # the second writer removed the first one's temporary before making its own
    assert len(first) == 1 and len(_dot_entries(tmp_path)) == 1 and _dot_entries(tmp_path) != first
    assert not dest.exists()
    with files.atomic_directory(str(dest)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("whole")
    assert _dot_entries(tmp_path) == [] and os.listdir(dest) == ["a"]
    # another destination's temporaries in the same folder are not this write's business
    _killed_writer(tmp_path / "other", "dir")
    files.write_text(str(tmp_path / "note.txt"), "x")
    assert len(_dot_entries(tmp_path)) == 1 and _dot_entries(tmp_path)[0].startswith(".other.tmp-")


def test_a_killed_writers_file_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "run.json"
    _killed_writer(dest, "file")
    assert len(_dot_entries(tmp_path)) == 1 and not dest.exists()
    files.write_json(str(dest), {"a": 1})
    assert _dot_entries(tmp_path) == [] and dest.read_text() == '{\n  "a": 1\n}\n'


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    dest = tmp_path / "ckpt"
    writer = subprocess.Popen([sys.executable, "-c", WAITING, str(dest)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        theirs = writer.stdout.readline().strip()
        assert os.path.isdir(theirs)
        assert files.remove_stale(str(dest)) == [] and os.path.isdir(theirs)
        files.write_text(str(tmp_path / "note.txt"), "x")  # nor does a write beside it
        assert os.path.isdir(theirs)
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert writer.returncode == 0 and _dot_entries(tmp_path) == [] and dest.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "note.txt"]


def test_a_destination_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """Killed between its two renames: the old tree is aside, the new one not in place; the next write to
    the destination (here: looking for stale temporaries) renames the old one back first."""
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    _killed_writer(dest, "dir")
    tmp = next(n for n in _dot_entries(tmp_path) if ".tmp-" in n)
    os.rename(dest, tmp_path / tmp.replace(".tmp-", ".old-"))  # the writer's first rename, then it died
    assert files.remove_stale(str(dest))
    assert _dot_entries(tmp_path) == [] and os.listdir(dest) == ["old.txt"]
    # killed after both renames, before deleting the old tree: the old tree goes, the new one stays
    old = tmp_path / ".ckpt.old-abc"
    old.mkdir()
    files.remove_stale(str(dest))
    assert _dot_entries(tmp_path) == [] and os.listdir(dest) == ["old.txt"]


def test_abandon_writes_undoes_the_writes_in_flight(tmp_path):
    """What the CLI's Ctrl-C runs before it exits without unwinding: every temporary goes, and a destination
    moved aside (interrupted between the two renames of an overwrite) is put back."""
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    writes = [files.atomic_directory(str(dest), overwrite=True), files.atomic_file(str(tmp_path / "log.json"))]
    tmp, f = (w.__enter__() for w in writes)
    open(os.path.join(tmp, "new.txt"), "w").close()
    f.write("{")
    assert len(_dot_entries(tmp_path)) == 2
    os.rename(dest, files._IN_FLIGHT[tmp][1])  # the overwrite's first rename
    files.abandon_writes()
    assert _dot_entries(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert os.listdir(dest) == ["old.txt"]
