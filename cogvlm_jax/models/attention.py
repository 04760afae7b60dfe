"""Scaled dot-product attention: the one function the ViT, prefill and decode all call.

Scores and softmax are float32 whatever the activation dtype (float64 for float64 operands:
``layers.accumulation``). Grouped-query attention is native: query
head h reads kv head ``h // (H / K)``. Long queries (the published CogVLM2 ViT attends over 9217 tokens)
can be processed in chunks of ``query_chunk`` so the score matrix stays bounded; the result is the same
numbers, since every query row's softmax is independent of the others. Keys and values come either
sequence-major ``[B, S, K, E]`` (fresh projections: the ViT, prefill) or heads-major ``[B, K, S, E]``
(the KV cache, see ``kv_cache.py``); the einsums read either layout as it is, without a transpose.
``platform``: the platform the program is compiled for (a module's ``execution.platform``), which decides
how 16-bit operands are multiplied (``layers.operands``).

Axis legend: B batch, Q query length, S key length, H query heads, K kv heads, G = H/K, E head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cogvlm_jax.models.layers import accumulation, operands, precision_for

_MASKED = -1e30  # finite: a row with no visible key (a pad query) gives a uniform average, never NaN
CACHE_CHUNK = 256  # slots per block when decode attention walks the filled part of a long cache


def _attend_block(q, k, v, mask, scale, heads_major: bool, platform: str):
    b, nq, h, e = q.shape
    kv = k.shape[1 if heads_major else 2]
    if kv == h and not heads_major:  # fresh keys (a prefill, the ViT); a cache read keeps the grouped form
        return _attend_per_head(q, k, v, mask, scale, platform)
    kv_spec = "bkse" if heads_major else "bske"
    qg = q.reshape(b, nq, kv, h // kv, e)
    prec, wide = precision_for(q.dtype), accumulation(q.dtype)
    s = jnp.einsum(f"bqkge,{kv_spec}->bkgqs", *operands(q.dtype, qg, k, platform=platform), precision=prec,
                   preferred_element_type=wide) * scale
    if mask is not None:
        s = jnp.where(mask[:, None, None, :, :], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1)
    # "->bkgqe", then the transpose: asked for "bqkge" directly, XLA:CPU swaps the operands into a
    # batched V.T @ p that Eigen runs several times slower (most of a few-row decode step's attention)
    o = jnp.einsum(f"bkgqs,{kv_spec}->bkgqe", *operands(v.dtype, p, v, platform=platform), precision=prec,
                   preferred_element_type=wide)
    return jnp.moveaxis(o, 3, 1).reshape(b, nq, h, e).astype(q.dtype)


def _attend_per_head(q, k, v, mask, scale, platform: str):
    """``_attend_block`` over sequence-major keys with one query head per kv head (CogVLM1's decoder,
    every ViT): the products batched over heads alone, the same numbers. Written with the grouped axis
    of size one, XLA:CPU runs the score and value products of a 274-token prefill about three times
    slower (docs/benchmarks.md, "Time to first token")."""
    kv_spec = "bshe"
    prec, wide = precision_for(q.dtype), accumulation(q.dtype)
    s = jnp.einsum(f"bqhe,{kv_spec}->bhqs", *operands(q.dtype, q, k, platform=platform), precision=prec,
                   preferred_element_type=wide) * scale
    if mask is not None:
        s = jnp.where(mask[:, None, :, :], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum(f"bhqs,{kv_spec}->bhqe", *operands(v.dtype, p, v, platform=platform), precision=prec,
                   preferred_element_type=wide)
    return jnp.moveaxis(o, 1, 2).astype(q.dtype)


def attend(q, k, v, mask=None, *, query_chunk: int | None = None, heads_major: bool = False,
           platform: str = "cpu"):
    """q [B, Q, H, E]; k, v [B, S, K, E] (or [B, K, S, E] with ``heads_major``); mask [B, Q, S] bool
    (True: may attend) or None -> [B, Q, H, E]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    nq = q.shape[1]
    block = lambda qi, mi: _attend_block(qi, k, v, mi, scale, heads_major, platform)  # noqa: E731
    if not query_chunk or nq <= query_chunk:
        return block(q, mask)
    n = -(-nq // query_chunk)
    pad = n * query_chunk - nq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = jnp.moveaxis(qp.reshape(q.shape[0], n, query_chunk, *q.shape[2:]), 1, 0)
    if mask is None:
        out = jax.lax.map(lambda qi: block(qi, None), qc)
    else:
        mp = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
        mc = jnp.moveaxis(mp.reshape(mask.shape[0], n, query_chunk, mask.shape[-1]), 1, 0)
        out = jax.lax.map(lambda a: block(a[0], a[1]), (qc, mc))
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * query_chunk, *q.shape[2:])
    return out[:, :nq]


def attend_cache(q, k, v, mask, filled, *, layer=None, chunk: int = CACHE_CHUNK, platform: str = "cpu"):
    """Attention of a few queries over a heads-major cache, reading only its first ``filled`` slots.

    q [B, Q, H, E]; k, v [B, K, T, E], or with ``layer`` (an int or a traced index) the buffers of every
    layer [B, N, K, T, E], of which layer ``layer``'s slots are read where they lie (no copy of the
    layer's cache first); mask [B, Q, T]; ``filled`` a traced int: no row has a valid slot
    at or after it (the largest write index + Q; the rows keep their own indices). A cache no longer
    than ``chunk`` is read whole; a longer one in blocks of ``chunk`` slots, ceil(filled / chunk) of
    them, in a ``while`` loop with an online softmax: a long, mostly empty cache costs what its filled
    part does, and ``filled`` is a value, so nothing recompiles as it grows. The last block is shifted
    back to end at T when T is not a multiple of ``chunk``; slots an earlier block already counted are
    skipped.
    """
    b, nq, h, e = q.shape
    kh, t = k.shape[-3], k.shape[-2]
    if layer is not None and t <= chunk:
        k, v = (jax.lax.dynamic_index_in_dim(x, layer, axis=1, keepdims=False) for x in (k, v))
        layer = None
    if t <= chunk:
        return attend(q, k, v, mask, heads_major=True, platform=platform)
    qg = q.reshape(b, nq, kh, h // kh, e)
    prec, wide = precision_for(q.dtype), accumulation(q.dtype)  # ``wide``: not the carry's ``acc``
    scale = 1.0 / math.sqrt(e)

    def block(c, carry):
        m, l, acc = carry  # running max, sum of exp, weighted values: [B, K, G, Q] (acc: + [E])
        start = jnp.minimum(c * chunk, t - chunk)
        if layer is None:
            kc, vc = (jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=2) for x in (k, v))
        else:  # [B, 1, K, chunk, E] of layer ``layer`` -> [B, K, chunk, E]
            at = (0, layer, 0, start, 0)
            kc, vc = (jax.lax.dynamic_slice(x, at, (b, 1, kh, chunk, e))[:, 0] for x in (k, v))
        mc = jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=2)
        s = jnp.einsum("bqkge,bkse->bkgqs", *operands(q.dtype, qg, kc, platform=platform), precision=prec,
                       preferred_element_type=wide) * scale
        s = jnp.where(mc[:, None, None, :, :], s, _MASKED)
        fresh = start + jnp.arange(chunk) >= c * chunk  # block 0 is all fresh, so m is finite after it
        s = jnp.where(fresh, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        o = jnp.einsum("bkgqs,bkse->bkgqe", *operands(v.dtype, p, vc, platform=platform), precision=prec,
                       preferred_element_type=wide)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + o

    g = h // kh
    init = (jnp.full((b, kh, g, nq), -jnp.inf, wide), jnp.zeros((b, kh, g, nq), wide),
            jnp.zeros((b, kh, g, nq, e), wide))
    blocks = jnp.clip((filled + chunk - 1) // chunk, 1, -(-t // chunk))
    _, l, acc = jax.lax.fori_loop(0, blocks, block, init)
    o = acc / l[..., None]  # [B, K, G, Q, E]
    return jnp.moveaxis(o, 3, 1).reshape(b, nq, h, e).astype(q.dtype)
