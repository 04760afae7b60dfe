"""Token types -> expert routing, position ids and attention masks. Pure functions of [B, L] arrays.

token_type_ids: 1 on the image span ``[boi, patches..., eoi]``, 0 elsewhere. attention_mask: 1 on real
tokens, 0 on padding (left padding for batches; right padding is also handled).
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

LANGUAGE, VISION = 0, 1


def span_index(token_type_ids, image_tokens: Optional[int]):
    """[B, L] int32: each image token's index inside its own ``[boi, patches, eoi]`` span (-1 on text), or
    None without ``image_tokens``. Several images side by side are one run of image tokens, cut every
    ``image_tokens`` (``config.num_image_tokens``) tokens into one span per image."""
    if image_tokens is None:
        return None
    tt = token_type_ids
    n = tt.shape[1]
    is_vision = tt == VISION
    prev = jnp.concatenate([jnp.zeros_like(is_vision[:, :1]), is_vision[:, :-1]], axis=1)
    i = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], tt.shape)
    run_start = jax.lax.cummax(jnp.where(is_vision & ~prev, i, 0), axis=1)
    return jnp.where(is_vision, (i - run_start) % image_tokens, -1)


def vision_expert_mask(token_type_ids, image_tokens: Optional[int] = None):
    """True where the vision expert runs: ``tt[i] == 1 and tt[i+1] == 1``; the last position never.

    So boi and every patch use the vision expert, eoi (followed by text) the language expert. With
    ``image_tokens`` (one image's span), the rule holds per span: the eoi of an image followed at once by
    the boi of the next one takes the language expert too.
    """
    tt = token_type_ids
    both = (tt[:, :-1] == VISION) & (tt[:, 1:] == VISION)
    mask = jnp.concatenate([both, jnp.zeros_like(tt[:, :1], dtype=bool)], axis=1)
    k = span_index(tt, image_tokens)
    return mask if k is None else mask & (k != image_tokens - 1)


@flax.struct.dataclass
class ExpertRoute:
    """Which tokens the decoder's vision expert takes, and how to give each expert only its own tokens.

    ``mask`` [B, L]: :func:`vision_expert_mask`. ``split`` (a traced bool, or ``True`` where the caller
    knows it): every row's vision tokens are
    one run of exactly ``span`` tokens (boi + patches: ``num_image_tokens - 1``); then ``order`` [B, L]
    lists each row's other tokens in order followed by its run, and ``restore`` [B, L] is its inverse, so
    a routed projection can run the language expert on the first ``L - span`` tokens of the reordered
    row, the vision expert on the last ``span``, and put the results back. Otherwise (a batch mixing image
    and text-only rows) both experts run on every token and ``mask`` selects. ``order`` is None when the
    prompt is not longer than ``span``.
    """
    mask: jax.Array
    order: Optional[jax.Array]
    restore: Optional[jax.Array]
    split: jax.Array
    span: int = flax.struct.field(pytree_node=False)


def expert_route(token_type_ids, span: int, every_row: bool = False) -> ExpertRoute:
    """The :class:`ExpertRoute` of a batch whose image rows have ``span`` vision-expert tokens each.

    ``every_row``: the caller guarantees that every row holds one whole image (its checks did), so
    ``split`` is the Python ``True`` and the decoder builds only the split program (no ``cond``). Rows
    with several images (``span + 1`` tokens each, side by side or apart) are not one run: the mask
    selects, per span."""
    mask = vision_expert_mask(token_type_ids, span + 1)
    b, n = mask.shape
    if not 0 < span < n:
        return ExpertRoute(mask, None, None, jnp.zeros((), bool), span)
    start = jnp.argmax(mask, axis=1).astype(jnp.int32)[:, None]  # each row's first vision token (0: none)
    j = jnp.arange(n - span, dtype=jnp.int32)[None]
    run = start + jnp.arange(span, dtype=jnp.int32)[None]
    order = jnp.concatenate([j + span * (j >= start), run], axis=1)
    i = jnp.arange(n, dtype=jnp.int32)[None]
    restore = jnp.where(i < start, i, jnp.where(i < start + span, n - span + i - start, i - span))
    whole_run = jnp.all(jnp.take_along_axis(mask, jnp.minimum(run, n - 1), axis=1), axis=1)
    split = True if every_row else jnp.all(whole_run & (jnp.sum(mask, axis=1) == span) & (start[:, 0] + span <= n))
    return ExpertRoute(mask, order, restore, split, span)


def position_ids(token_type_ids, attention_mask, image_tokens: Optional[int] = None):
    """Positions as the reference computes them for one unpadded prompt, at every real token.

    Text, boi and eoi advance the position by one; the first patch after boi advances by one and the
    other patches share it (an image costs 3 positions). Padding never advances the position, and the
    first real token of a row is position 0 whatever padding precedes it, so a left-padded row gets the
    positions it has alone. Example: ``[bos, boi, p, p, p, eoi, t, t] -> [0, 1, 2, 2, 2, 3, 4, 5]``.
    With ``image_tokens`` (one image's span) images side by side are told apart: each span's boi and eoi
    count as text, ``[bos, boi, p, p, eoi, boi, p, p, eoi] -> [0, 1, 2, 2, 3, 4, 5, 5, 6]``.
    """
    real = attention_mask.astype(bool)
    tt = jnp.where(real, token_type_ids, -1)
    prev = jnp.concatenate([jnp.full_like(tt[:, :1], -1), tt[:, :-1]], axis=1)
    nxt = jnp.concatenate([tt[:, 1:], jnp.full_like(tt[:, :1], -1)], axis=1)
    is_vision = tt == VISION
    # boi (image token not preceded by one) and eoi (not followed by one) count as text.
    boundary = is_vision & ((prev != VISION) | (nxt != VISION))
    k = span_index(tt, image_tokens)
    if k is not None:
        boundary = boundary | (is_vision & ((k == 0) | (k == image_tokens - 1)))
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
