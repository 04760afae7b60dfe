"""The KV cache: an explicit pytree passed into prefill/decode and returned updated. Nothing else.

Per layer, keys and values ``[B, T, K, E]`` (T the fixed cache length), plus per row the slots that hold
real tokens (``valid`` [B, T]; left padding leaves holes) and the next slot to write (``index`` [B]).
Rows write at their own index, so a serving engine can hold requests of different lengths.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    k: tuple  # per layer [B, T, K, E]
    v: tuple  # per layer [B, T, K, E]
    valid: jax.Array  # [B, T] bool
    index: jax.Array  # [B] int32

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def init_cache(num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = (batch, length, num_kv_heads, head_dim)
    return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((batch,), jnp.int32))


def write(buf, new, index):
    """buf [B, T, ...] with new [B, n, ...] written at slot index[b] of each row."""
    return jax.vmap(lambda b, x, i: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), i, axis=0))(
        buf, new, index)


def advance(cache: KVCache, new_valid) -> KVCache:
    """After every layer wrote ``n`` slots at ``index``: mark them (``new_valid`` [B, n]) and move on."""
    return cache.replace(valid=write(cache.valid, new_valid, cache.index),
                         index=cache.index + new_valid.shape[1])


def read_mask(cache: KVCache, new_valid):
    """[B, 1, T] mask for a one-token query written at ``index``: the valid slots plus the new one."""
    return write(cache.valid, new_valid, cache.index)[:, None, :]
