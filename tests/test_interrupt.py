"""Ctrl-C (SIGINT) in a CLI verb: exit status 130, one line on stderr, nothing half-written.

Each verb runs in a subprocess; SIGINT is sent while XLA compiles its first program (JAX logs "Compiling"
just before the compile starts), where the default handler's KeyboardInterrupt could land inside XLA's
C++ (a segmentation fault, or an interrupt swallowed and the run going on), or while a conversion writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import fixture_dir
from PIL import Image


def _start(args, env_extra=None):
    env = dict(os.environ, JAX_LOG_COMPILES="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "cogvlm_jax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _interrupt_when(proc, ready, timeout=300):
    """Send SIGINT once ``ready(stderr line)`` holds (or ``ready(None)`` while polling); -> (rc, stderr)."""
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if ready(line):
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not seen.is_set() and not ready(None):
        assert proc.poll() is None, f"exited {proc.returncode} before the interrupt:\n{''.join(lines)[-3000:]}"
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    reader.join(timeout=30)
    return rc, "".join(lines)


def _assert_interrupted(rc, err, verb):
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err and "Segmentation" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == f"cogvlm-jax {verb}: interrupted", err[-3000:]


def _compiling(name):
    return lambda line: line is not None and "Compiling" in line and name in line


def _temporaries(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")]


def test_train_interrupted_while_compiling_its_step(tmp_path):
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"image": "red.png", "query": "What color?", "answer": "red"}) + "\n")
    d = fixture_dir("cogvlm1")
    proc = _start(["train", "--data", str(data), "--model", os.path.join(d, "checkpoint"), "--tokenizer",
                   os.path.join(d, "tokenizer"), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "1",
                   "--quiet"])
    rc, err = _interrupt_when(proc, _compiling("_step_fn"))
    _assert_interrupted(rc, err, "train")
    out = tmp_path / "out"
    assert not _temporaries(out) and not os.path.exists(out / "checkpoints") and not os.path.exists(out / "model")
    assert (out / "log.jsonl").read_text() == ""  # no step finished, none logged
    assert not _temporaries(tmp_path)


@pytest.mark.parametrize("verb", ["generate", "serve"])
def test_generate_and_serve_interrupted_while_compiling(verb):
    args = ["generate", "--prompt", "What color is the circle?"] if verb == "generate" else ["serve", "--port", "0"]
    proc = _start(args)
    rc, err = _interrupt_when(proc, _compiling("jit"))
    _assert_interrupted(rc, err, verb)
    assert proc.stdout.read() == ""  # interrupted before an answer (or the server's announcement)


def test_convert_interrupted_while_writing_leaves_nothing(tmp_path):
    dst = tmp_path / "ours"
    proc = _start(["convert", os.path.join(fixture_dir("cogvlm2"), "checkpoint"), str(dst)])
    rc, err = _interrupt_when(proc, lambda line: line is None and bool(_temporaries(tmp_path)))
    _assert_interrupted(rc, err, "convert")
    assert os.listdir(tmp_path) == []  # neither the destination nor its temporary


def test_overwrite_interrupted_keeps_the_old_destination(tmp_path):
    """``--overwrite`` moves the old tree aside only once the new one is complete; an interrupt before that,
    or between the two renames, leaves the old destination in place."""
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    proc = _start(["convert", os.path.join(fixture_dir("cogvlm2"), "checkpoint"), str(dst), "--overwrite"])
    rc, err = _interrupt_when(proc, lambda line: line is None and bool(_temporaries(tmp_path)))
    _assert_interrupted(rc, err, "convert")
    assert os.listdir(tmp_path) == ["ours"] and os.listdir(dst) == ["old.txt"]
