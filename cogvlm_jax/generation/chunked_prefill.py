"""Chunked prefill: one step that decodes every slot and prefills the next chunk of one text prompt.

A serving engine (``engine.py``) holds S requests in the rows of one KV cache. Prefilling a new prompt on
its own runs the whole model for that prompt while the S decoding rows wait, and pads the prompt to a
bucket (one compile per bucket). Here the prompt's next C tokens ride along with the decode step instead:
the S decode tokens and the C prompt tokens go through every product together, as one ``[S + C, D]``
block, so the weights are read once for both, and only attention is done per group:

* the S decode rows write their key/value at their own index and read their own row of the cache, as in
  ``CogVLM.decode_step``;
* the chunk writes its C keys/values into row ``slot`` at ``start`` .. ``start + C`` and its queries read
  that row causally: the prompt's earlier chunks, then the chunk itself up to each query.

The prompt is not padded: its tokens take cache slots ``0 .. L`` of its row, C at a time, so any prompt
length runs the same compiled step (a prompt of 45 tokens and C = 48 is one step; 70 tokens, two). The
last chunk's unused rows (``chunk_len`` .. C) are computed and marked invalid; their writes past the end
of the cache are dropped. Only text: every prompt token takes the language expert (a prompt with an
image is prefilled on its own, with the ViT).

The slot's own decode row is idle while its prompt is prefilled; its (discarded) write lands at
``start``, which the chunk then overwrites.

Axis legend: S decode rows (slots), C chunk length, T cache length, V vocab, D model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cogvlm_jax.models import attention, kv_cache


def mixed_step(model, tokens, token_positions, cache: kv_cache.KVCache, chunk_ids, chunk_positions, chunk_len,
               slot, start):
    """One decode step of every row plus one prompt chunk for row ``slot`` (use as ``method=`` of a
    ``CogVLM``'s ``apply``).

    tokens, token_positions [S]: as ``CogVLM.decode_step``. chunk_ids, chunk_positions [C]: the prompt's
    next C tokens (the first ``chunk_len`` real, the rest padding), written from cache slot ``start`` of
    row ``slot``; ``start == 0`` begins a new prompt (the row's previous request is forgotten).
    -> (logits [S, V], the chunk's logits at its last real token [V], cache). Row ``slot``'s index ends
    at ``start + chunk_len``, the next chunk's start.
    """
    s, c, t = tokens.shape[0], chunk_ids.shape[0], cache.length
    index = cache.index.at[slot].set(start)  # the idle decode row of ``slot`` writes where the chunk will
    new_valid = jnp.ones((s, 1), bool)
    decode_mask = kv_cache.read_mask(cache.replace(index=index), new_valid)  # [S, 1, T]
    row = jnp.where(start == 0, False, cache.valid[slot])  # the prompt's slots so far
    row = row.at[start + jnp.arange(c)].set(jnp.arange(c) < chunk_len, mode="drop")
    chunk_mask = (row[None, :] & (jnp.arange(t)[None, :] <= start + jnp.arange(c)[:, None]))[None]  # [1, C, T]
    platform = model.execution.platform

    def core(q, k, v, kv, layer):
        """q [1, S + C, H, E]; k, v [1, S + C, K, E]; kv: the buffers [S, N, K, T, E] of every layer, of
        which this one is ``layer``."""
        qd, kd, vd = (x[0, :s, None] for x in (q, k, v))  # the decode rows, [S, 1, ., E]
        qc, kc, vc = (x[0, s:] for x in (q, k, v))  # the chunk, [C, ., E]
        kb, vb = (kv_cache.write_chunk(kv_cache.write(buf, new, index, layer), chunk, slot, start, layer)
                  for buf, new, chunk in ((kv[0], kd, kc), (kv[1], vd, vc)))
        od = attention.attend_cache(qd, kb, vb, decode_mask, jnp.max(index) + 1, layer=layer,
                                    chunk=attention.CACHE_CHUNK, platform=platform)
        k_row, v_row = (jax.lax.dynamic_slice_in_dim(b, slot, 1, axis=0) for b in (kb, vb))
        oc = attention.attend_cache(qc[None], k_row, v_row, chunk_mask, start + c, layer=layer,
                                    chunk=attention.CACHE_CHUNK, platform=platform)
        return jnp.concatenate([od[:, 0][None], oc], axis=1), (kb, vb)

    x = model.embed(jnp.concatenate([tokens, chunk_ids])[None])  # [1, S + C, D]
    pos = jnp.concatenate([token_positions, chunk_positions])[None]
    x, (new_k, new_v), _ = model.run_layers(x, None, pos, None, cache, core=core)
    x = model.norm(x[0])
    last = jax.lax.dynamic_index_in_dim(x[s:], jnp.maximum(chunk_len - 1, 0), keepdims=True)
    logits = model.lm_head(jnp.concatenate([x[:s], last]))  # [S + 1, V]: the chunk's last real token only
    cache = kv_cache.advance(cache.replace(k=new_k, v=new_v, index=index), new_valid)
    cache = cache.replace(valid=cache.valid.at[slot].set(row), index=cache.index.at[slot].set(start + chunk_len))
    return logits[:s], logits[s], cache
