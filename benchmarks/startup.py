"""Time to an answer from a cold process, with the persistent compilation cache empty, then filled.

    python -m benchmarks.startup [--repeats 2] [--cache DIR]

``generate``: the wall time of ``cogvlm-jax generate`` on the default model (the README's first answer,
Python start-up included), with the cache off, then a first run into an empty cache directory and
``--repeats`` runs more reading it. ``serve``: from starting ``cogvlm-jax serve`` to its first answer
(``/v1/chat/completions`` polled until it answers), a first start into an empty cache, then second starts.
One JSON line per run; the numbers in docs/benchmarks.md come from this.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from benchmarks.common import emit, machine, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "cogvlm_jax", "default_model", "example.png")
CLI = [sys.executable, "-m", "cogvlm_jax.cli"]


def _env(cache: str) -> dict:
    env = dict(os.environ, COGVLM_JAX_COMPILE_CACHE=cache, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def generate_seconds(cache: str) -> float:
    start = time.perf_counter()
    r = subprocess.run([*CLI, "generate", "--image", IMAGE, "--prompt", "What color is the circle?"],
                       env=_env(cache), capture_output=True, text=True, cwd=ROOT, timeout=600)
    seconds = time.perf_counter() - start
    if r.returncode != 0 or r.stdout.strip() != "red":
        raise RuntimeError(f"generate failed ({r.returncode}): {r.stdout!r} {r.stderr[-2000:]}")
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_seconds(cache: str) -> float:
    """Seconds from starting ``cogvlm-jax serve`` to its first chat answer."""
    port = _free_port()
    body = json.dumps({"max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": "What color is the circle?"}]}).encode()
    start = time.perf_counter()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--drain-seconds", "0"], env=_env(cache), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            if time.perf_counter() - start > 600:
                raise RuntimeError("serve gave no answer in 600 s")
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as resp:
                    if json.load(resp)["choices"][0]["message"]["content"]:
                        return time.perf_counter() - start
                    raise RuntimeError("serve answered with no text")
            except urllib.error.HTTPError as e:  # the server is up and refused the request
                raise RuntimeError(f"serve answered {e.code}: {e.read()[:500]!r}") from None
            except (urllib.error.URLError, ConnectionError, OSError):  # not listening yet
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(repeats: int = 2, only=None, cache=None, cache_off: bool = True, out=None) -> list[dict]:
    """The records: for ``generate`` and ``serve`` (``only``: one of them), a run with the cache off
    (``cache_off``), a first run into an empty cache directory (``cache``, emptied first; default a temporary
    one), then ``repeats`` runs reading it. ``benchmarks.run --only startup --quick``: generate only, no
    cache-off run, one repeat. ``out``: called with each record as it is made."""
    recs = []
    for what, measure in (("generate", generate_seconds), ("serve", serve_seconds)):
        if only not in (None, what):
            continue
        where = cache or tempfile.mkdtemp(prefix="cogvlm-jax-bench-xla-")
        shutil.rmtree(where, ignore_errors=True)
        runs = ([("cache off", "0")] if cache_off else []) + [("first, empty cache", where)] + \
            [("cache filled", where)] * repeats
        try:
            for i, (label, directory) in enumerate(runs):
                seconds = measure(directory)
                recs.append(record(f"startup_{what}", seconds, "s", config="default_model", run=i, cache=label))
                if out is not None:
                    out(recs[-1])
        finally:
            if not cache:
                shutil.rmtree(where, ignore_errors=True)
    return recs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="runs (and server starts) after the first, cache filled")
    p.add_argument("--cache", help="cache directory to use, emptied first (default: a temporary one)")
    p.add_argument("--only", choices=("generate", "serve"), help="one of the two (default: both)")
    args = p.parse_args(argv)
    print(f"machine: {machine()}", file=sys.stderr)
    run(args.repeats, args.only, args.cache, out=emit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
