"""Slow compiles, said: one line for each compile of a model program that takes longer than ``SLOW_S``.

XLA compiles a program the first time it is called at a new shape (a prompt bucket, a row count, a cache
length): seconds to a minute for a real model on CPU, with nothing on the screen meanwhile. Every model
program is built by ``program.jit``, which runs each of its calls inside :func:`timed`. JAX reports the
seconds of every trace, lowering and XLA compile (``jax.monitoring``, events under ``/jax/core/compile/``);
those that happen during the call, on its thread, are summed. At ``SLOW_S`` or more, one line goes to
stderr, through ``tqdm.write`` so that it lands above a progress bar: what compiled, with its shapes,
and how long it took, e.g. ``compiled prefill (1 x 64 tokens, images, cache 320) in 12.3 s``. A program
that XLA did not compile because JAX read it from the persistent compilation cache (``compile_cache.py``)
is said as such, ``loaded prefill (...) from the compile cache in 1.4 s``: its seconds are the tracing and
lowering JAX does before it can look a program up, and the read. A call that finds its program compiled
already reports nothing. With several processes only process 0 speaks.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable

import jax
from tqdm import tqdm

SLOW_S = 1.0  # a compile this long or longer is said
_EVENTS = "/jax/core/compile/"
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_frames = threading.local()  # per thread: a stack of [seconds, cache hits, cache misses], one per call timed


def _on_duration(event: str, seconds: float, **_kw) -> None:
    stack = getattr(_frames, "stack", None)
    if stack and event.startswith(_EVENTS):
        stack[-1][0] += seconds


def _on_event(event: str, **_kw) -> None:
    stack = getattr(_frames, "stack", None)
    if stack and event in (_HIT, _MISS):
        stack[-1][1 if event == _HIT else 2] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def say(line: str) -> None:
    """``line`` on stderr (above any tqdm bar), from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(line, file=sys.stderr)
        sys.stderr.flush()


@contextlib.contextmanager
def timed(describe: Callable[[], str]):
    """Sum the compile time of the block (this thread's); at ``SLOW_S`` or more, say
    ``compiled {describe()} in S s`` (``loaded ... from the compile cache in S s`` when every program the
    block needed was read from the persistent cache). A block inside another counts for itself only."""
    stack = _frames.__dict__.setdefault("stack", [])
    frame = [0.0, 0, 0]
    stack.append(frame)
    try:
        yield
    finally:
        stack.pop()
        if frame[0] > 0 and frame[0] >= SLOW_S:  # 0: nothing was traced or compiled
            try:
                what = describe()
            except Exception as e:  # noqa: BLE001 - a description must never fail the call it describes
                what = f"a program (not described: {type(e).__name__}: {e})"
            cached = frame[1] > 0 and frame[2] == 0
            say(f"loaded {what} from the compile cache in {frame[0]:.1f} s" if cached
                else f"compiled {what} in {frame[0]:.1f} s")
