"""Which one-row matmul (the operation a batch-1 decode step is made of) reaches the bandwidth?

A model-free experiment behind the decode findings: a chain of ``pairs`` x ([D, F] then [F, D])
weights, applied to one row inside a ``lax.fori_loop`` (weights loop-invariant, as in the decode
loop), timed per step and reported as GB/s of the weights *as stored*. Variants:

* ``dot``: ``x @ w`` with ``jnp.einsum(..., preferred_element_type=float32)``, as ``layers.Dense``.
  For bfloat16 weights XLA:CPU (no native bfloat16 dot without AVX512-BF16/AMX) converts the weights
  to float32; the conversion is loop-invariant, so it is hoisted out of the loop and every step reads
  float32 copies: twice the bytes, plus a full conversion per call.
* ``mulsum``: ``sum(x[:, None] * w, axis=0)`` in float32: an elementwise multiply fused into a
  reduction, so a bfloat16 weight is widened in registers and only its own bytes are read.

Axis legend: D model width, F mlp width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, record
from benchmarks.decode import DTYPES


def _apply(x, w, how: str):
    if how == "dot":
        return jnp.einsum("d,df->f", x.astype(w.dtype), w, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None)
    return jnp.sum(x[:, None] * w.astype(jnp.float32), axis=0)


def chain_step_time(dtype: str, how: str, d: int = 1024, f: int = 2816, pairs: int = 16, steps: int = 16,
                    repeats: int = 5) -> tuple[float, int]:
    """(seconds per loop step, weight bytes per step) of the chain in ``dtype`` computed ``how``."""
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02, DTYPES[dtype])
          for _ in range(pairs) for s in ((d, f), (f, d))]

    @jax.jit
    def loop(ws, x):
        def body(_, x):
            for w in ws:
                y = _apply(x, w, how)
                x = y * jax.lax.rsqrt(jnp.mean(y * y) + 1e-6)  # keep the values tame, force the dependency
            return x
        return jax.lax.fori_loop(0, steps, body, x)

    x = jnp.ones((d,), jnp.float32)
    jax.block_until_ready(loop(ws, x))
    t = best_time(lambda: jax.block_until_ready(loop(ws, x)), repeats)
    return t / steps, sum(int(w.size) * w.dtype.itemsize for w in ws)


def run(probe_gb_s: float, quick: bool = False) -> list[dict]:
    recs = []
    pairs = 4 if quick else 16
    for dtype in ("float32", "bfloat16"):
        for how in ("dot", "mulsum"):
            t, nbytes = chain_step_time(dtype, how, pairs=pairs, steps=4 if quick else 16,
                                        repeats=2 if quick else 5)
            recs.append(record(f"matvec_{how}", nbytes / t / 1e9, "GB/s", config=f"{pairs}x2 1024x2816", dtype=dtype,
                               batch=1, fraction_of_limit=nbytes / t / 1e9 / probe_gb_s, ms_per_step=t * 1e3,
                               weight_mb=nbytes / 1e6))
    return recs
