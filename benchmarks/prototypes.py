"""Measured prototypes of the decode fixes proposed in the benchmark report (nothing here changes the
model code: each prototype patches or re-implements a piece inside this process only).

* ``kernel_out_in``: the decoder layers' ``Dense`` kernels stored ``[out, in]`` (PyTorch's layout)
  instead of ``[in, out]``, so a one-row matmul contracts along contiguous memory (the lm_head is
  left ``[in, out]``, which XLA:CPU runs faster for its wide output). Implemented by swapping the
  ``Dense`` class ``cogvlm_jax.decoder`` uses for a subclass with the transposed kernel, then running
  the real decode benchmark (``benchmarks.decode``) with and without it.
* ``attention``: one decode step's attention reads over a long KV cache, for 8 layers, in the current
  cache layout ``[B, T, K, E]`` (through ``cogvlm_jax.attention.attend``, as the model does) and in
  a heads-major layout ``[B, K, T, E]`` whose einsums read the cache without transposing it.

Axis legend: B batch, T cache length, K kv heads, G query heads per kv head, E head dim, D in, F out.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, record

# Only the decoder layers: the lm_head ([D, V], V large) is faster as it is on XLA:CPU (see the report).
_PATCHED_MODULES = ("cogvlm_jax.decoder",)


def _dense_out_in():
    from cogvlm_jax.layers import Dense, _init, precision_for

    class DenseOutIn(Dense):
        """``layers.Dense`` with ``kernel [out, in]``: ``y = x @ kernel.T``."""

        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.with_logical_partitioning(_init, self.axes[::-1]),
                                (self.features, x.shape[-1]))
            y = jnp.einsum("...d,fd->...f", x.astype(self.dtype), kernel.astype(self.dtype),
                           precision=precision_for(self.dtype), preferred_element_type=jnp.float32)
            if self.use_bias:
                bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                                  (self.features,))
                y = y + bias.astype(y.dtype)
            return y

    return DenseOutIn


@contextlib.contextmanager
def kernel_out_in():
    """Within the block, the decoder layers of models built from ``cogvlm_jax`` use ``[out, in]`` kernels."""
    import importlib

    patched = _dense_out_in()
    mods = [importlib.import_module(m) for m in _PATCHED_MODULES]
    saved = [m.Dense for m in mods]
    try:
        for m in mods:
            m.Dense = patched
        yield
    finally:
        for m, d in zip(mods, saved):
            m.Dense = d


def decode_kernel_layouts(probe_gb_s: float, quick: bool = False, cases=(("float32", 1), ("float32", 8),
                                                                          ("bfloat16", 1))) -> list[dict]:
    """The mid-config decode with the current kernels and with ``[out, in]`` kernels."""
    from benchmarks.decode import DecodeBench, DecodeCase

    from benchmarks.decode import make_params, load_bench_config

    recs = []
    steps = 8 if quick else 64
    config = load_bench_config("mid")
    for layout in ("in_out", "out_in"):
        ctx = kernel_out_in() if layout == "out_in" else contextlib.nullcontext()
        with ctx:
            for dtype in sorted({d for d, _ in cases}):
                # The shapes come from the unpatched model (jax caches the abstract evaluation of an
                # equal model), with the decoder layers' kernels transposed for the patched one.
                params = make_params(config, dtype)
                if layout == "out_in":
                    params = {k: (jax.tree_util.tree_map(lambda x: x.T if x.ndim == 2 else x, v)
                                  if k.startswith("layers_") else v) for k, v in params.items()}
                bench = DecodeBench("mid", dtype, params)
                for d, b in cases:
                    if d != dtype:
                        continue
                    m = bench.measure(DecodeCase("mid", dtype, b, steps, 128, 2 if quick else 5))
                    recs.append(record(f"proto_decode_kernel_{layout}", m["tok_s"], "tok/s", config="mid", dtype=dtype,
                                       batch=b, fraction_of_limit=m["gb_s"] / probe_gb_s,
                                       ms_per_step=m["step_s"] * 1e3, achieved_gb_s=m["gb_s"]))
                del bench
    return recs


# --------------------------------------------------------------------------- attention over the cache
def _attend_heads_major(q, k, v, mask):
    """One query position against a heads-major cache: q [B, 1, H, E]; k, v [B, K, T, E]; mask [B, 1, T]."""
    b, _, h, e = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, h // kh, e)
    s = jnp.einsum("bkge,bkte->bkgt", qg, k, precision=jax.lax.Precision.HIGHEST) / math.sqrt(e)
    s = jnp.where(mask[:, 0][:, None, None, :], s, -1e30)
    o = jnp.einsum("bkgt,bkte->bkge", jax.nn.softmax(s, axis=-1), v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, 1, h, e)


def attention_layouts(quick: bool = False, cache_length: int = 4096, batch: int = 1, layers: int = 8,
                      heads: int = 16, kv_heads: int = 4, head_dim: int = 64, steps: int = 16) -> list[dict]:
    """ms per decode step of the attention reads alone (``layers`` layers, no cache write), float32:
    the current ``[B, T, K, E]`` cache through ``cogvlm_jax.attention.attend`` vs a ``[B, K, T, E]`` one."""
    from cogvlm_jax.attention import attend

    recs = []
    t = 1024 if quick else cache_length
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, head_dim), np.float32))
    mask = jnp.ones((batch, 1, t), bool)
    kv_bytes = 2 * layers * batch * t * kv_heads * head_dim * 4
    for layout, fn, shape in (("current", attend, (batch, t, kv_heads, head_dim)),
                              ("heads_major", _attend_heads_major, (batch, kv_heads, t, head_dim))):
        ks = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2 * layers)]

        @jax.jit
        def loop(q, ks):
            def body(_, x):  # each step's query depends on the last: nothing can be hoisted
                for i in range(layers):
                    x = x + 1e-3 * fn(x, ks[2 * i], ks[2 * i + 1], mask)
                return x
            return jax.lax.fori_loop(0, steps, body, q)

        jax.block_until_ready(loop(q, ks))
        secs = best_time(lambda: jax.block_until_ready(loop(q, ks)), 2 if quick else 5) / steps
        recs.append(record(f"proto_attention_{layout}", secs * 1e3, "ms/step", config=f"{layers}L T={t}",
                           dtype="float32", batch=batch, kv_mb=kv_bytes / 1e6, kv_gb_s=kv_bytes / secs / 1e9))
    return recs


def run(probe_gb_s: float, quick: bool = False) -> list[dict]:
    return decode_kernel_layouts(probe_gb_s, quick) + attention_layouts(quick)
