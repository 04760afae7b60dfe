"""Which one-row matmul (the operation a batch-1 decode step is made of) reaches the bandwidth?

A model-free experiment behind the decode layout choices: a chain of ``pairs`` x ([D, F] then [F, D])
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

``run_rows`` (records ``matvec_rows_*``, ``batch`` = M): the same question for M = 1..16 rows, a batched
decode step, on the mid config's lm_head and on its 8 decoder layers' language expert (40 products,
361 MB), for each formulation in ``ROW_VARIANTS`` (a product plus the XLA:CPU options it is compiled
with); ``vs_one_row`` is the time over the same variant's one-row time. Behind ``cogvlm_jax/parallel/rows.py``.

Axis legend: D model width, F mlp width.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, load_bench_config, record
from cogvlm_jax.dtypes import DTYPES

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
    return recs + run_rows(probe_gb_s, quick)


# --------------------------------------------------------------------------- a few rows (batched decode)
# Which product of M = 1..16 rows (a batched decode step: one row per slot) reaches the bandwidth? Each
# variant is one formulation plus the XLA:CPU options it is compiled with. By default XLA:CPU
# hands every float32 dot of two or more rows, and most reductions, to a YNNPACK fusion (``__ynn_fusion`` in
# the optimised HLO); a one-row dot stays an XLA dot (the matrix-vector path). ``NO_YNN`` turns YNNPACK off
# for one compilation, so the dots go to Eigen and reductions to XLA's own loop emitter.
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
HIGHEST = jax.lax.Precision.HIGHEST
ROW_COUNTS = (1, 2, 4, 8, 16)
COLSUM_CHUNK = 16  # XLA:CPU splits a reduction over more than 32 elements into a tree, unfused from its product
COLSUM_MAX_ROWS = 4  # beyond this the column sums are many times slower than any dot: not worth the time
# (and on the lm_head only: over the decoder layers' 40 products, hundreds of chunk fusions take minutes
# to compile and run slower than any dot even at 1-2 rows)


def _ynn_out_in(x, w):  # as shipped for one row and past 64 rows: kernel [out, in] (decoder, lm_head)
    return jnp.einsum("md,nd->mn", x, w, precision=HIGHEST)


def _in_out(x, w):  # kernel [in, out] (the ViT / adapter layout)
    return jnp.einsum("md,dn->mn", x, w, precision=HIGHEST)


def _out_in_lhs(x, w):
    """``(W @ x.T).T`` with the [out, in] weight as the left operand (as shipped for 2-64 rows, with
    YNNPACK: it packs only the rows); the barrier keeps XLA from folding the transpose back into
    ``x @ W.T`` (which packs the whole weight, or in Eigen runs many times slower)."""
    return jax.lax.optimization_barrier(jnp.einsum("nd,md->nm", w, x, precision=HIGHEST)).T


def _colsum_in_out(x, w):
    """``x @ W`` ([in, out]) as column sums over chunks of ``COLSUM_CHUNK`` inputs: each chunk is one XLA
    loop fusion (multiply fused into a reduction over a major axis, vectorised along the outputs), the
    chunks' [M, out] partial sums are added at the end."""
    k = w.shape[0]
    parts = [jnp.sum(x.T[i:i + COLSUM_CHUNK, :, None] * w[i:i + COLSUM_CHUNK, None, :], axis=0)
             for i in range(0, k, COLSUM_CHUNK)]
    return functools.reduce(jnp.add, parts)


# name: (product, kernel stored [out, in]?, compiler options)
ROW_VARIANTS = {
    "ynn_out_in": (_ynn_out_in, True, {}),
    "ynn_in_out": (_in_out, False, {}),
    "eigen_in_out": (_in_out, False, NO_YNN),
    "eigen_out_in_lhs": (_out_in_lhs, True, NO_YNN),
    "ynn_out_in_lhs": (_out_in_lhs, True, {}),
    "colsum_in_out": (_colsum_in_out, False, NO_YNN),
}


def row_workloads(config) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of the products of one decode step: the lm_head alone, and the decoder layers' language
    expert (QKV, dense, gate, up, down per layer) in order."""
    t = config.text
    d, f = t.hidden_size, t.intermediate_size
    layer = [(d, t.qkv_size), (t.num_heads * t.head_dim, d), (d, f), (d, f), (f, d)]
    return {"lm_head": [(d, t.vocab_size)], "layers": layer * t.num_layers}


def _chain(product, x, ws, q_width: int):
    """Apply the workload's products in order, each fed by the last (a decoder layer's data flow: the
    QKV's first ``q_width`` outputs (the query) into dense, x into gate and up, their gated product into
    down, then a norm)."""
    if len(ws) == 1:
        return product(x, ws[0])
    for i in range(0, len(ws), 5):
        wqkv, wo, wg, wu, wd = ws[i:i + 5]
        x = x + product(product(x, wqkv)[:, :q_width], wo)
        x = x + product(jax.nn.silu(product(x, wg)) * product(x, wu), wd)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x


def rows_times(shapes, rows=ROW_COUNTS, variants=tuple(ROW_VARIANTS), repeats: int = 9, seed: int = 0):
    """{(variant, M): best seconds of one pass over the ``shapes`` products with M rows}, plus the bytes.

    For each M every variant is compiled, checked against a float64 product chain (within float32
    rounding) and then timed round-robin, best of ``repeats``: a load that comes and goes hits all alike.
    """
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 22, np.float32) * np.float32(0.02)
    kernels = {False: [], True: []}
    for n_in, n_out in shapes:
        w = np.resize(np.roll(pool, int(rng.integers(1 << 22))), (n_in, n_out))
        kernels[False].append(jnp.asarray(w))
        kernels[True].append(jnp.asarray(np.ascontiguousarray(w.T)))
    nbytes = sum(n_in * n_out * 4 for n_in, n_out in shapes)
    times = {}
    for m in rows:
        x = jnp.asarray(rng.standard_normal((m, shapes[0][0]), np.float32))
        names = [v for v in variants if not (v == "colsum_in_out" and (m > COLSUM_MAX_ROWS or len(shapes) > 1))]
        fns = {}
        for v in names:
            product, out_in, options = ROW_VARIANTS[v]
            ws = kernels[out_in]
            fn = functools.partial(_chain, product, q_width=shapes[1][0] if len(shapes) > 1 else 0)
            fns[v] = jax.jit(fn).lower(x, ws).compile(compiler_options=options)
        ref = np.asarray(fns[names[0]](x, kernels[ROW_VARIANTS[names[0]][1]]))
        for v in names:
            got = np.asarray(fns[v](x, kernels[ROW_VARIANTS[v][1]]))
            if not np.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max())):
                raise AssertionError(f"{v} at {m} rows differs from {names[0]}: {np.abs(got - ref).max():.3g}")
        best = {v: float("inf") for v in names}
        for _ in range(repeats):
            for v in names:
                ws = kernels[ROW_VARIANTS[v][1]]
                t0 = time.perf_counter()
                jax.block_until_ready(fns[v](x, ws))
                best[v] = min(best[v], time.perf_counter() - t0)
        times.update({(v, m): t for v, t in best.items()})
    return times, nbytes


def run_rows(probe_gb_s: float, quick: bool = False, config_name: str = "mid") -> list[dict]:
    """One record per (workload, variant, M): GB/s of the weights read, and ms."""
    recs = []
    config = load_bench_config(config_name)
    for workload, shapes in row_workloads(config).items():
        if quick:
            shapes = shapes[:5]
        times, nbytes = rows_times(shapes, rows=(1, 2, 8) if quick else ROW_COUNTS, repeats=2 if quick else 9)
        for (v, m), t in times.items():
            recs.append(record(f"matvec_rows_{v}", nbytes / t / 1e9, "GB/s", config=f"{config_name} {workload}",
                               dtype="float32", batch=m, fraction_of_limit=nbytes / t / 1e9 / probe_gb_s,
                               ms_per_step=t * 1e3, weight_mb=nbytes / 1e6,
                               vs_one_row=t / times[(v, 1)] if (v, 1) in times else None))
    return recs
