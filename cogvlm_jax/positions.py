"""Token types -> expert routing, position ids and attention masks. Pure functions of [B, L] arrays.

token_type_ids: 1 on the image span ``[boi, patches..., eoi]``, 0 elsewhere. attention_mask: 1 on real
tokens, 0 on padding (left padding for batches; right padding is also handled).
"""

from __future__ import annotations

import jax.numpy as jnp

LANGUAGE, VISION = 0, 1


def vision_expert_mask(token_type_ids):
    """True where the vision expert runs: ``tt[i] == 1 and tt[i+1] == 1``; the last position never.

    So boi and every patch use the vision expert, eoi (followed by text) the language expert.
    """
    tt = token_type_ids
    both = (tt[:, :-1] == VISION) & (tt[:, 1:] == VISION)
    return jnp.concatenate([both, jnp.zeros_like(tt[:, :1], dtype=bool)], axis=1)


def position_ids(token_type_ids, attention_mask):
    """Positions as the reference computes them for one unpadded prompt, at every real token.

    Text, boi and eoi advance the position by one; the first patch after boi advances by one and the
    other patches share it (an image costs 3 positions). Padding never advances the position, and the
    first real token of a row is position 0 whatever padding precedes it, so a left-padded row gets the
    positions it has alone. Example: ``[bos, boi, p, p, p, eoi, t, t] -> [0, 1, 2, 2, 2, 3, 4, 5]``.
    """
    real = attention_mask.astype(bool)
    tt = jnp.where(real, token_type_ids, -1)
    prev = jnp.concatenate([jnp.full_like(tt[:, :1], -1), tt[:, :-1]], axis=1)
    nxt = jnp.concatenate([tt[:, 1:], jnp.full_like(tt[:, :1], -1)], axis=1)
    is_vision = tt == VISION
    # boi (image token not preceded by one) and eoi (not followed by one) count as text.
    boundary = is_vision & ((prev != VISION) | (nxt != VISION))
    as_text = (tt == LANGUAGE) | boundary
    prev_as_text = jnp.concatenate([jnp.zeros_like(as_text[:, :1]), as_text[:, :-1]], axis=1)
    first_patch = is_vision & ~boundary & prev_as_text
    # The first real token of a row starts at 0: it advances nothing.
    first_real = real & (jnp.cumsum(real, axis=1) == 1)
    step = (as_text | first_patch) & real & ~first_real
    return jnp.cumsum(step.astype(jnp.int32), axis=1)


def causal_mask(attention_mask):
    """[B, L, L] bool: query i may attend key j iff j <= i and key j is a real token."""
    n = attention_mask.shape[1]
    causal = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
    return causal[None] & attention_mask.astype(bool)[:, None, :]
