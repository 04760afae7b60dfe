"""JAX's persistent compilation cache, on for every ``cogvlm-jax`` verb: compiled programs written to disk and
read back by the next process that compiles the same program, so a second ``generate`` or ``serve`` start
skips XLA.

Where: ``$COGVLM_JAX_COMPILE_CACHE`` if set (a directory; ``0``, ``off``, ``no``, ``false`` or the empty
string turn the cache off), else ``$XDG_CACHE_HOME/cogvlm-jax/xla`` (``~/.cache/cogvlm-jax/xla``). Inside
it, one subdirectory per host CPU (:func:`host_key`): XLA:CPU compiles for the instruction set of the CPU
it runs on, and JAX's cache key names the backend ("cpu"), the jaxlib version, the program, the compile
options and ``XLA_FLAGS`` (``--xla_cpu_max_isa`` included) but not the CPU's features, so a directory
shared between machines (a home directory on NFS) would otherwise hand an AVX-512 program to a CPU without
AVX-512.

How big: at most ``MAX_BYTES``; past it JAX drops the least recently used entries. That bound also turns on
JAX's file lock (``filelock``) around every read and write of the directory, which is what makes it safe
for several processes at once (the processes of a multi-host run, a server and a ``generate`` side by side);
in a run over several processes only process 0 writes.

Every compile is kept (``jax_persistent_cache_min_compile_time_secs`` 0): the default model's programs
compile in well under JAX's default threshold of one second each, and together they are most of a
``generate``'s wall time.

:func:`enable` is called by ``cli.main`` before a verb runs, that is before the process compiles anything:
JAX decides once per process, at its first compile, whether the cache is used, and the setting is process
wide. ``cogvlm_jax.load`` does not call it: in a library, the caller's process and JAX settings are the
caller's, and a call made after the caller's first compile would have no effect. A program of one's own
calls :func:`enable` at its start (or sets JAX's ``jax_compilation_cache_dir`` itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
from typing import Optional

import jax

ENV = "COGVLM_JAX_COMPILE_CACHE"
OFF = ("0", "off", "no", "false", "")
_held = {"depth": 0, "min_seconds": 0.0}
_held_lock = threading.Lock()
MAX_BYTES = 2 << 30  # 2 GiB: the default model's programs take a few MB; a 19B model's, tens of MB each


def host_key(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``{machine}-{12 hex digits}``: the processor's architecture and a hash of its model name and feature
    flags (Linux's ``cpuinfo``; where it is missing, the architecture and ``platform.processor()``)."""
    machine = platform.machine() or "unknown"
    described = [machine, platform.processor()]
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
                    described.append(f"{key.strip()}={' '.join(sorted(value.split()))}")
                if not line.strip() and len(described) > 2:
                    break  # the first processor's block: every core of one machine has the same features
    except OSError:
        pass
    return f"{machine}-{hashlib.sha256(chr(10).join(described).encode()).hexdigest()[:12]}"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cogvlm-jax", "xla")


def directory() -> Optional[str]:
    """The cache directory this process uses: ``None`` when ``$COGVLM_JAX_COMPILE_CACHE`` turns it off."""
    chosen = os.environ.get(ENV)
    if chosen is not None and chosen.strip().lower() in OFF:
        return None
    return os.path.join(os.path.expanduser(chosen) if chosen is not None else default_dir(), host_key())


def enable() -> Optional[str]:
    """Point JAX's persistent compilation cache at :func:`directory`; -> the directory, or ``None`` (off by
    ``$COGVLM_JAX_COMPILE_CACHE``, or JAX already configured by the caller: ``jax_compilation_cache_dir``
    set, e.g. by ``$JAX_COMPILATION_CACHE_DIR``, or ``jax_enable_compilation_cache`` false; those win).
    A directory that cannot be made leaves the cache off: a cache must never stop a run."""
    path = directory()
    if path is None or jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"cogvlm-jax: compile cache off: cannot make {path} ({e.strerror}); set {ENV} to a writable "
              f"directory, or to 0", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@contextlib.contextmanager
def kept_out():
    """Nothing compiled inside is written to the cache (so nothing of it is read back either): for the
    programs of a compile-only backend (``cogvlm_jax.aot``), which JAX can write but not load back (a
    compile-only client cannot deserialize), and whose compile seconds are what ``aot`` reports. Nests,
    and holds across threads until the last one leaves."""
    with _held_lock:
        if _held["depth"] == 0:
            _held["min_seconds"] = jax.config.jax_persistent_cache_min_compile_time_secs
            jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
        _held["depth"] += 1
    try:
        yield
    finally:
        with _held_lock:
            _held["depth"] -= 1
            if _held["depth"] == 0:
                jax.config.update("jax_persistent_cache_min_compile_time_secs", _held["min_seconds"])
