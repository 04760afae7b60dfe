"""The persistent compilation cache (cogvlm_jax/parallel/compile_cache.py): what one process compiles, the
next reads back; off by ``$COGVLM_JAX_COMPILE_CACHE=0``; one directory per CPU; several processes at once;
and the compile events the compile-counting tests listen to fire for a program read back too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cogvlm_jax.parallel import compile_cache

# A child that sets the cache up as cli.main does, compiles one program, and prints what JAX reported.
CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
from cogvlm_jax.parallel import compile_cache
events = {"hits": 0, "compiles": 0}
jax.monitoring.register_event_listener(
    lambda e, **k: events.__setitem__("hits", events["hits"] + 1) if e == "/jax/compilation_cache/cache_hits" else None)
jax.monitoring.register_event_duration_secs_listener(
    lambda e, s, fun_name="", **k: events.__setitem__("compiles", events["compiles"] + 1)
    if e == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(program)" else None)
path = compile_cache.enable()
def program(x):
    return jnp.tanh(x @ x.T).sum(axis=0) * 3.0
jax.jit(program)(jnp.ones((8, 8), jnp.float32)).block_until_ready()
print(json.dumps({"path": path, **events}))
"""


def _child(cache, *, flags: str = "", background: bool = False):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    env.update(COGVLM_JAX_COMPILE_CACHE=str(cache), JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc if background else _result(proc)


def _result(proc) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]) | {"stderr": err}


def _entries(cache) -> list[str]:
    return sorted(name for _, _, names in os.walk(cache) for name in names if name.endswith("-cache"))


def test_a_second_process_reads_back_what_the_first_compiled(tmp_path):
    first, second = _child(tmp_path), _child(tmp_path)
    assert first["path"] == second["path"] == os.path.join(str(tmp_path), compile_cache.host_key())
    assert first["hits"] == 0 and second["hits"] >= 1, (first, second)
    # a program read back still reports its backend compile event: the compile counts of the tests hold
    assert first["compiles"] == second["compiles"] == 1
    assert _entries(tmp_path)


def test_the_environment_turns_it_off(tmp_path, monkeypatch):
    """Every spelling of off, through ``directory()`` (the one place ``enable()`` reads it from); then a process
    started with the cache off runs with none."""
    for value in ["0", "off", "No", "false", ""]:
        monkeypatch.setenv(compile_cache.ENV, value)
        assert compile_cache.directory() is None, value
    out = _child("0")
    assert out["path"] is None and out["hits"] == 0
    assert not os.path.exists(os.path.join(str(tmp_path), "0"))


def test_xla_flags_are_part_of_the_key(tmp_path):
    """A program compiled for a narrower instruction set (``--xla_cpu_max_isa``, as tests set) is not the
    one compiled for the whole CPU: each is compiled once, then found."""
    plain = _child(tmp_path)
    narrow = _child(tmp_path, flags="--xla_cpu_max_isa=SSE4_2")
    again = _child(tmp_path, flags="--xla_cpu_max_isa=SSE4_2")
    assert plain["hits"] == 0 and narrow["hits"] == 0 and again["hits"] >= 1
    assert len(_entries(tmp_path)) >= 2


def test_several_processes_at_once_share_one_directory(tmp_path):
    procs = [_child(tmp_path, background=True) for _ in range(3)]
    results = [_result(p) for p in procs]
    assert all(r["compiles"] == 1 for r in results), results
    assert "Error reading persistent compilation cache" not in "".join(r["stderr"] for r in results)
    assert _child(tmp_path)["hits"] >= 1


def test_an_unusable_directory_leaves_the_run_going(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = _child(blocker / "cache")
    assert out["path"] is None and out["compiles"] == 1
    assert f"compile cache off: cannot make {blocker / 'cache'}" in out["stderr"] and "COGVLM_JAX_COMPILE_CACHE" \
        in out["stderr"]


def test_one_directory_per_cpu(tmp_path):
    """JAX's key names the backend ("cpu") but not the CPU's features: the directory does."""
    def cpuinfo(name, flags):
        path = tmp_path / name
        path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
        return str(path)

    avx512 = compile_cache.host_key(cpuinfo("a", "fpu sse2 avx2 avx512f"))
    assert compile_cache.host_key(cpuinfo("b", "avx512f sse2 fpu avx2")) == avx512  # the same features
    assert compile_cache.host_key(cpuinfo("c", "fpu sse2 avx2")) != avx512
    assert compile_cache.host_key(str(tmp_path / "missing")) == compile_cache.host_key(str(tmp_path / "gone"))
    assert compile_cache.host_key().startswith(compile_cache.platform.machine())


def test_the_default_directory_is_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.directory() == os.path.join(str(tmp_path), "cogvlm-jax", "xla", compile_cache.host_key())
    monkeypatch.setenv(compile_cache.ENV, "~/elsewhere")
    assert compile_cache.directory() == os.path.join(os.path.expanduser("~/elsewhere"), compile_cache.host_key())


@pytest.mark.parametrize("verb", ["generate", "plan"])
def test_the_cli_turns_it_on_before_a_verb_runs(tmp_path, verb):
    """On for the verbs that run programs (here one refused for its input, after the cache is set up); off
    for ``plan`` and ``compile``, which report XLA's compile seconds for targets a cache could not load."""
    env = dict(os.environ, COGVLM_JAX_COMPILE_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    argv = {"generate": ["generate", "--image", str(tmp_path / "missing.png"), "--prompt", "hi"],
            "plan": ["plan", "--config", "cogvlm2-llama3-chat-19B"]}[verb]
    code = ("import jax, sys\nfrom cogvlm_jax import cli\n"
            f"rc = cli.main({argv!r})\n"
            "print(jax.config.jax_compilation_cache_dir, file=sys.stderr)\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == (2 if verb == "generate" else 0), r.stderr[-2000:]
    want = os.path.join(str(tmp_path), compile_cache.host_key()) if verb == "generate" else "None"
    assert r.stderr.strip().splitlines()[-1] == want


SAYS = r"""
import numpy as np, jax.numpy as jnp
from cogvlm_jax.parallel import compile_cache, compiles, program
compiles.SLOW_S = 0.0
compile_cache.enable()
program.jit(lambda x: jnp.cos(x) @ x.T, describe=lambda x: f"cos ({x.shape[0]} rows)")(np.ones((4, 4), np.float32))
"""


def test_a_program_read_from_the_cache_is_said_as_loaded_not_compiled(tmp_path):
    """The compile line tells a compile from a program JAX read back from the cache."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(COGVLM_JAX_COMPILE_CACHE=str(tmp_path), JAX_PLATFORMS="cpu", XLA_FLAGS="")

    def said():
        err = subprocess.run([sys.executable, "-c", SAYS], env=env, capture_output=True, text=True, check=True).stderr
        return [line.rsplit(" in ", 1)[0] for line in err.splitlines() if line.endswith(" s")]

    assert said() == ["compiled cos (4 rows)"]
    assert said() == ["loaded cos (4 rows) from the compile cache"]
