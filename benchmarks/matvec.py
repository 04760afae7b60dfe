"""Which one-row matmul (the operation a batch-1 decode step is made of) reaches the bandwidth?

A model-free experiment behind the decode findings: a chain of ``pairs`` x ([D, F] then [F, D])
weights, applied to one row inside a ``lax.fori_loop`` (weights loop-invariant, as in the decode
loop), timed per step and reported as GB/s of the weights *as stored*. Variants:

* ``dot``: ``x @ w`` with ``jnp.einsum(..., preferred_element_type=float32)``, as ``layers.Dense``.
  For bfloat16 weights XLA:CPU (no native bfloat16 dot without AVX512-BF16/AMX) converts the weights
  to float32; the conversion is loop-invariant, so it is hoisted out of the loop and every step reads
  float32 copies: twice the bytes, plus a full conversion per call.
* ``dot_t``: the same product with the weight stored ``[out, in]`` (PyTorch's layout): the
  contraction runs along contiguous memory; on XLA:CPU this is the fast one-row matmul;
* ``dot_inloop``: the same behind ``lax.optimization_barrier``, so the conversion is not hoisted:
  the loop keeps only bfloat16 weights (no float32 copy of the model) but converts every step;
* ``mulsum``: ``sum(x[:, None] * w, axis=0)`` in float32: an elementwise multiply fused into a
  reduction, so a bfloat16 weight is widened in registers and only its own bytes are read; the
  reduction runs down the columns of the row-major ``[in, out]`` kernel;
* ``mulsum_t``: the same with the weight stored ``[out, in]`` (the PyTorch layout), so each output is
  a contiguous row reduction.

Axis legend: D model width, F mlp width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, record
from benchmarks.decode import DTYPES


VARIANTS = ("dot", "dot_t", "dot_inloop", "mulsum", "mulsum_t")
TRANSPOSED = ("dot_t", "mulsum_t")  # weights stored [out, in]


def _apply(x, w, how: str):
    """One row times one weight: ``w`` is [in, out], or [out, in] for the ``TRANSPOSED`` variants."""
    if how == "dot_t":
        return jnp.einsum("d,fd->f", x.astype(w.dtype), w, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None)
    if how == "dot_inloop":  # a barrier keeps the bfloat16 -> float32 conversion inside the loop body
        w = jax.lax.optimization_barrier(w)
    if how in ("dot", "dot_inloop"):
        return jnp.einsum("d,df->f", x.astype(w.dtype), w, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None)
    if how == "mulsum":
        return jnp.sum(x[:, None] * w.astype(jnp.float32), axis=0)
    return jnp.sum(w.astype(jnp.float32) * x[None, :], axis=1)


def chain_step_time(dtype: str, how: str, d: int = 1024, f: int = 2816, pairs: int = 16, steps: int = 16,
                    repeats: int = 5) -> tuple[float, int]:
    """(seconds per loop step, weight bytes per step) of the chain in ``dtype`` computed ``how``."""
    rng = np.random.default_rng(0)
    shapes = ((f, d), (d, f)) if how in TRANSPOSED else ((d, f), (f, d))
    ws = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02, DTYPES[dtype]) for _ in range(pairs) for s in shapes]

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
        for how in VARIANTS:
            if dtype == "float32" and how == "dot_inloop":
                continue  # nothing to convert
            t, nbytes = chain_step_time(dtype, how, pairs=pairs, steps=4 if quick else 16,
                                        repeats=2 if quick else 5)
            recs.append(record(f"matvec_{how}", nbytes / t / 1e9, "GB/s", config=f"{pairs}x2 1024x2816", dtype=dtype,
                               batch=1, fraction_of_limit=nbytes / t / 1e9 / probe_gb_s, ms_per_step=t * 1e3,
                               weight_mb=nbytes / 1e6))
    return recs
