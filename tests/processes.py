"""Running the processes of a multi-process test together, each stopped at a deadline (not a test module).

Used by tests/test_multihost.py and tests/test_multihost_train.py: every child gets 4 CPU devices and gloo
collectives (set in its environment before it imports jax), and none can outlive the deadline, so a test
can fail but never hang.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_DEVICES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    # read when the child imports jax; the caller's other XLA flags (e.g. --xla_cpu_max_isa) reach the child too
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def python(*args: str) -> list[str]:
    """A command line running this Python."""
    return [sys.executable, *args]


def start(commands: dict[str, list[str]], workdir: str, env: dict | None = None) -> dict:
    """Start every command at once (stdout/stderr to ``workdir/NAME.out|err``); :func:`finish` waits for them."""
    env = child_env() if env is None else env
    children = {"t0": time.monotonic(), "cpu0": resource.getrusage(resource.RUSAGE_CHILDREN), "procs": {},
                "files": {}, "commands": commands}
    for name, cmd in commands.items():
        children["files"][name] = tuple(open(os.path.join(workdir, f"{name}.{s}"), "w+") for s in ("out", "err"))
        children["procs"][name] = subprocess.Popen(cmd, stdout=children["files"][name][0],
                                                   stderr=children["files"][name][1], env=env, cwd=ROOT)
    return children


def finish(children: dict, deadline_s: float) -> dict:
    """Wait for the children of :func:`start`, killing any still running ``deadline_s`` seconds after the
    start. -> {name: {rc, seconds (None if killed), stdout, stderr (gloo's connection chatter dropped),
    command}}; prints every child's wall time and the CPU time of them all."""
    procs, t0, ended = children["procs"], children["t0"], {}
    while len(ended) < len(procs) and time.monotonic() - t0 < deadline_s:
        for name, p in procs.items():
            if name not in ended and p.poll() is not None:
                ended[name] = time.monotonic() - t0
        time.sleep(0.2)
    results = {}
    for name, p in procs.items():
        if name not in ended:  # past the deadline: stop it; the test reports it as a failure
            p.kill()
            p.wait()
        out, err = children["files"][name]
        out.seek(0)
        err.seek(0)
        results[name] = {"rc": p.returncode, "seconds": ended.get(name), "stdout": out.read(),
                         "command": children["commands"][name],
                         "stderr": "\n".join(ln for ln in err.read().splitlines() if not ln.startswith("[Gloo]"))}
        out.close()
        err.close()
    cpu0, cpu1 = children["cpu0"], resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print("\nchild wall times (s): " + ", ".join(f"{k} {v['seconds'] and round(v['seconds'], 1)}"
                                                 for k, v in results.items())
          + f"; CPU time of all children {cpu:.0f} s (about {cpu / 2:.0f} s of wall time on 2 idle cores)")
    return results


def run_together(commands: dict[str, list[str]], workdir: str, deadline_s: float, env: dict | None = None) -> dict:
    """:func:`start` then :func:`finish`."""
    return finish(start(commands, workdir, env), deadline_s)
