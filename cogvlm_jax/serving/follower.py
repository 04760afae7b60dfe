"""Serving across several processes: process 0's engine schedules, every process runs its device programs.

On a mesh over several processes a jitted program runs only when every process runs it, with the same
inputs. Process 0's engine decides what runs: before each device program it sends the program's name and
host inputs (numpy arrays or None) to the others (:func:`send`, over ``multihost.broadcast_bytes``). Each
of the others receives them in the same order in :func:`follow` and runs the same program, until process 0
sends ``STOP``. The names are the keys of the engine's op table (``Engine._ops``): ``noop`` (a heartbeat),
``empty``, ``insert``, ``decode``, ``mix``.
"""

from __future__ import annotations

import io
import sys
from typing import Callable

import numpy as np

from cogvlm_jax.parallel import multihost

STOP = "stop"  # ends follow(); every other op names a device program


def encode_op(op: str, args: tuple) -> bytes:
    """A device program's name and host inputs (numpy or None) as bytes, for the other processes."""
    buf = io.BytesIO()
    np.savez(buf, op=np.array(op), n=np.array(len(args)),
             **{f"a{i}": np.asarray(a) for i, a in enumerate(args) if a is not None})
    return buf.getvalue()


def decode_op(data: bytes) -> tuple[str, tuple]:
    """``encode_op``'s bytes -> (name, host inputs)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return str(z["op"]), tuple(z[f"a{i}"] if f"a{i}" in z.files else None for i in range(int(z["n"])))


def send(op: str, args: tuple = ()) -> None:
    """On process 0: tell every other process to run ``op`` with ``args`` (each is in :func:`follow`)."""
    multihost.broadcast_bytes(encode_op(op, args))


def follow(apply: Callable[[str, tuple], object]) -> None:
    """On every process but 0: ``apply(op, args)`` for each op process 0 sends, in its order, until ``STOP``.

    An op that fails is reported and the next one awaited: process 0 meets the same failure, fails its
    requests and sends ``empty``."""
    while True:
        op, args = decode_op(multihost.broadcast_bytes(None))
        if op == STOP:
            return
        try:
            apply(op, args)
        except Exception as e:
            print(f"cogvlm-jax engine: {op} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
