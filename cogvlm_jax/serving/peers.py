"""A multi-process server whose peer is lost: process 0 refuses with a 503 naming it and exits.

Every process of ``cogvlm-jax serve`` on several processes runs a ``heartbeat.Heartbeat``. When process 0
loses a follower (killed, crashed, hung) its engine's serving thread may be waiting in a collective the
follower will never join; the heartbeat thread then fails the engine instead (:meth:`Engine.fail`): the
running requests end with a 503 ``engine_failed`` error naming the lost process, and so does every new
request and ``/health``, for ``grace`` seconds, so that those answers reach their clients; then the
process prints the same message on stderr and exits with ``EXIT_PEER_LOST``. A follower that loses
process 0 prints it and exits at once (it has no clients). All within the heartbeat timeout plus ``grace``.
"""

from __future__ import annotations

import os
import sys
import time

from cogvlm_jax.parallel import multihost
from cogvlm_jax.parallel.heartbeat import EXIT_PEER_LOST, Heartbeat

GRACE_S = 2.0  # process 0: seconds the 503s are served before the exit


class PeerWatch:
    """This process's heartbeat while it serves on several processes (see the module docstring). Start it
    right after joining the cluster, so a peer lost while the model loads is noticed too; set ``engine``
    once there is one; ``stop()`` it once the engine has stopped, before the process exits."""

    def __init__(self, timeout: float, grace: float = GRACE_S):
        self._engine = None
        self.grace = grace
        self.heartbeat = Heartbeat(self._lost, timeout=timeout, scope="serve").start()

    @property
    def engine(self):
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:
        """Watch for ``engine``: a collective of its that fails (gloo notices a dead peer's closed socket
        before the heartbeat does) waits for the heartbeat's verdict, so its requests' 503 names the peer."""
        self._engine = engine
        hb = self.heartbeat
        engine.explain_failure = lambda: hb.wait_lost(hb.timeout + 2 * hb.interval)

    def _lost(self, process: int, message: str) -> None:
        text = f"lost process {process}: {message}"
        if multihost.is_main_process() and self._engine is not None:
            self._engine.fail(text)
            time.sleep(self.grace)
        sys.stderr.write(f"cogvlm-jax serve: error: {text}; exiting with status {EXIT_PEER_LOST}\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)  # the serving thread may be waiting in a collective: it cannot be joined

    def stop(self) -> None:
        self.heartbeat.stop()
