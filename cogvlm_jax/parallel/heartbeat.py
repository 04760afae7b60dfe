"""Noticing that another process of a multi-process job is gone, without a collective.

A collective whose peer has died waits for it (gloo, over TCP), so a process cannot learn from its own
device programs that a peer is lost. Instead each process runs a :class:`Heartbeat` thread: every
``interval`` seconds it bumps its own counter in the JAX coordination service's key-value store (hosted by
process 0, reached over the connection every process already holds) and reads the counters of the
processes it watches: process 0 watches every other one, the others watch process 0. A watched counter
that has not moved for ``timeout`` seconds, or a store that cannot be reached (process 0, which hosts it,
is gone), is a lost peer: ``on_lost(process, message)`` runs once on the heartbeat thread, and the
heartbeat stops.

JAX's own reaction to a dead peer is to abort every other process with a stack trace; a job that uses
heartbeats joins its cluster with ``multihost.initialize(recoverable=True)``, so that the process that
noticed decides what to do (the server: answer 503 and exit naming the peer).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Optional

import jax

DEFAULT_TIMEOUT_S = 30.0  # a counter standing still this long is a lost process
EXIT_PEER_LOST = 4  # the exit status of a process that lost a peer


def _store():
    """The coordination service's client (JAX's private module: it has no public key-value API)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("heartbeats need a multi-process job: call multihost.initialize first")
    return client


def _key(scope: str, process: int) -> str:
    return f"cogvlm-jax/heartbeat/{scope}/{process}"


class Heartbeat:
    """This process's heartbeat and its watch over the others (see the module docstring).

    ``scope`` names the job's heartbeats (the same on every process). ``timeout``: seconds a watched
    process may stay silent, from when the watch starts (a process still loading its model counts as
    alive: the thread beats on its own). ``interval``: seconds between beats (default a tenth of the
    timeout, at most 1 s)."""

    def __init__(self, on_lost: Callable[[int, str], None], timeout: float = DEFAULT_TIMEOUT_S,
                 scope: str = "job", interval: Optional[float] = None):
        if not timeout > 0:
            raise ValueError(f"the heartbeat timeout must be > 0 seconds, got {timeout}")
        self.on_lost, self.timeout, self.scope = on_lost, float(timeout), scope
        self.interval = float(interval) if interval is not None else min(1.0, self.timeout / 10)
        self.me, n = jax.process_index(), jax.process_count()
        self.watched = [p for p in range(n) if p != self.me] if self.me == 0 else [0]
        self.lost: Optional[int] = None
        self.lost_message: Optional[str] = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cogvlm-jax-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        store = _store()
        seen = {p: (None, time.monotonic()) for p in self.watched}  # process -> (its counter, when it moved)
        while not self._stop.is_set():
            try:
                store.key_value_increment(_key(self.scope, self.me), 1)
                now = time.monotonic()
                for p in self.watched:
                    try:
                        count = store.key_value_try_get(_key(self.scope, p))
                    except Exception as e:  # not written yet: counts as standing still
                        if "NOT_FOUND" not in str(e) and "not found" not in str(e).lower():
                            raise
                        count = None
                    if count != seen[p][0]:
                        seen[p] = (count, now)
                    elif now - seen[p][1] > self.timeout:
                        self._lose(p, f"process {p} of {jax.process_count()} sent no heartbeat for "
                                      f"{now - seen[p][1]:.1f} s (timeout {self.timeout:g} s): it has exited or hangs")
                        return
            except Exception as e:
                if self._stop.is_set():  # stopped while a read was under way: the job is ending
                    return
                if self.me == 0:  # the store is this process's own: a failure here says nothing of the others
                    print(f"cogvlm-jax: the heartbeat stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                else:  # the store is gone with the process that hosts it
                    self._lose(0, f"process 0 of {jax.process_count()}, which hosts the JAX coordination service, "
                                  f"cannot be reached: {type(e).__name__}: {e}")
                return
            self._stop.wait(self.interval)

    def wait_lost(self, seconds: float) -> Optional[str]:
        """Wait up to ``seconds`` for a lost peer; -> its message, or None if every watched one is alive."""
        self._lost.wait(seconds)
        return self.lost_message

    def _lose(self, process: int, message: str) -> None:
        self.lost, self.lost_message = process, message
        self._lost.set()
        self.on_lost(process, message)
