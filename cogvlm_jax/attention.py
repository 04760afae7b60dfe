"""Scaled dot-product attention: the one function the ViT, prefill and decode all call.

Scores and softmax are float32 whatever the activation dtype. Grouped-query attention is native: query
head h reads kv head ``h // (H / K)``. Long queries (the published CogVLM2 ViT attends over 9217 tokens)
can be processed in chunks of ``query_chunk`` so the score matrix stays bounded; the result is the same
numbers, since every query row's softmax is independent of the others.

Axis legend: B batch, Q query length, S key length, H query heads, K kv heads, G = H/K, E head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cogvlm_jax.layers import precision_for

_MASKED = -1e30  # finite: a row with no visible key (a pad query) gives a uniform average, never NaN


def _attend_block(q, k, v, mask, scale):
    b, nq, h, e = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, nq, kv, h // kv, e)
    prec = precision_for(q.dtype)
    s = jnp.einsum("bqkge,bske->bkgqs", qg, k, precision=prec, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask[:, None, None, :, :], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgqs,bske->bqkge", p, v, precision=prec, preferred_element_type=jnp.float32)
    return o.reshape(b, nq, h, e).astype(q.dtype)


def attend(q, k, v, mask=None, *, query_chunk: int | None = None):
    """q [B, Q, H, E]; k, v [B, S, K, E]; mask [B, Q, S] bool (True: may attend) or None -> [B, Q, H, E]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    nq = q.shape[1]
    if not query_chunk or nq <= query_chunk:
        return _attend_block(q, k, v, mask, scale)
    n = -(-nq // query_chunk)
    pad = n * query_chunk - nq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = jnp.moveaxis(qp.reshape(q.shape[0], n, query_chunk, *q.shape[2:]), 1, 0)
    if mask is None:
        out = jax.lax.map(lambda qi: _attend_block(qi, k, v, None, scale), qc)
    else:
        mp = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
        mc = jnp.moveaxis(mp.reshape(mask.shape[0], n, query_chunk, mask.shape[-1]), 1, 0)
        out = jax.lax.map(lambda a: _attend_block(a[0], k, v, a[1], scale), (qc, mc))
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * query_chunk, *q.shape[2:])
    return out[:, :nq]
