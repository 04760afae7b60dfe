"""The KV cache: an explicit pytree passed into prefill/decode and returned updated. Nothing else.

Keys and values, one buffer each for all layers, ``[B, N, K, T, E]`` (heads-major, T the fixed cache
length: a decode step's attention reads each head's keys as one contiguous block, with no transpose of
the cache), plus per row the slots that hold real tokens (``valid`` [B, T]; left padding leaves holes)
and the next slot to write (``index`` [B]). Rows write at their own index, so a serving engine can hold
requests of different lengths. Every leaf has the batch on axis 0. A layer writes and reads its own
``layer`` of the buffers (a Python int in an unrolled stack, the scan's traced index in a stack of
layers under ``nn.scan``: the same program for every layer, writing in place).

Axis legend: B batch, N layers, T cache length, K kv heads, E head dim, n new tokens.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# Logical axes of one layer's keys (or values), for the sharding rules in ``axes.py``; of the buffer of
# every layer's, ``CACHE_AXES``: the layer axis whole on every device.
KV_AXES = ("batch", "kv_heads", "length", "head_dim")
CACHE_AXES = ("batch", None) + KV_AXES[1:]


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [B, N, K, T, E]
    v: jax.Array  # [B, N, K, T, E]
    valid: jax.Array  # [B, T] bool
    index: jax.Array  # [B] int32

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def kv_shape(batch: int, length: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """The shape of one layer's key (or value) buffer, in the order of ``KV_AXES``."""
    return (batch, num_kv_heads, length, head_dim)


def cache_shape(num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int):
    """The shape of the key (or value) buffer of every layer, in the order of ``CACHE_AXES``."""
    return (batch, num_layers, num_kv_heads, length, head_dim)


def init_cache(num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = cache_shape(num_layers, batch, length, num_kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((batch,), jnp.int32))


def _write_rows(buf, new, index, axis: int):
    """buf [B, ...] with new [B, ...] written at position index[b] of (per-row) axis ``axis`` of each row."""
    return jax.vmap(lambda b, x, i: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), i, axis=axis))(
        buf, new, index)


def write(buf, new, index, layer):
    """buf [B, N, K, T, E] with layer ``layer``'s new keys/values [B, n, K, E] written at slots index[b]..
    of row b."""
    new = jnp.swapaxes(new, 1, 2)[:, None]  # [B, 1, K, n, E]
    zero = jnp.zeros((), jnp.int32)
    return jax.vmap(lambda b, x, i: jax.lax.dynamic_update_slice(
        b, x.astype(b.dtype), (jnp.asarray(layer, jnp.int32), zero, i, zero)))(buf, new, index)


def write_chunk(buf, new, row, start, layer):
    """buf [B, N, K, T, E] with layer ``layer``'s new [n, K, E] written into row ``row`` at slots start..
    (those past T are dropped: the padding of a prompt's last chunk, ``chunked_prefill.py``)."""
    return buf.at[row, layer, :, start + jnp.arange(new.shape[0])].set(new.astype(buf.dtype), mode="drop")


def advance(cache: KVCache, new_valid, lengths=None) -> KVCache:
    """After every layer wrote ``n`` slots at ``index``: mark them (``new_valid`` [B, n]) and move on, by
    ``n``, or by ``lengths`` [B] (right-padded new tokens: the next write goes over the padding)."""
    step = new_valid.shape[1] if lengths is None else lengths.astype(cache.index.dtype)
    return cache.replace(valid=_write_rows(cache.valid, new_valid, cache.index, axis=0), index=cache.index + step)


def drop_left_padding(cache: KVCache, pads) -> KVCache:
    """Each row's slots moved ``pads[b]`` [B] to the left, so that the first ``pads[b]`` slots, a
    left-padded prompt's padding (never valid), no longer take room: the row's next write goes right
    after its last real token. Its keys and values keep their positions (they are not slot numbers), so
    attention sees the same tokens."""
    roll = jax.vmap(lambda x, n: jnp.roll(x, -n, axis=2))  # [N, K, T, E] per row: slots are axis 2
    return cache.replace(k=roll(cache.k, pads), v=roll(cache.v, pads),
                         valid=jax.vmap(lambda x, n: jnp.roll(x, -n))(cache.valid, pads), index=cache.index - pads)


def extend_mask(cache: KVCache, new_valid):
    """[B, n, T] mask for ``n`` queries written at ``index`` (``new_valid`` [B, n]: the real ones): query i
    reads the valid slots before ``index`` and the real new slots up to its own (causal). Padding queries
    read the same and are discarded by the caller."""
    rel = jnp.arange(cache.length)[None, None, :] - cache.index[:, None, None]  # [B, 1, T]: slot - index
    i = jnp.arange(new_valid.shape[1])[None, :, None]
    new = jnp.take_along_axis(new_valid, jnp.clip(rel[:, 0], 0, new_valid.shape[1] - 1), axis=1)[:, None, :]
    return (cache.valid[:, None, :] & (rel < 0)) | ((rel >= 0) & (rel <= i) & new)


def read_mask(cache: KVCache, new_valid):
    """[B, 1, T] mask for a one-token query written at ``index``: the valid slots plus the new one."""
    return _write_rows(cache.valid, new_valid, cache.index, axis=0)[:, None, :]
