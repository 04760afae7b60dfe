"""How the rows of a fused QKV projection are ordered, and how its output splits into q, k and v.

The checkpoints (HF's and ours) hold a fused QKV projection's output features as ``[q | k | v]``: all
query heads, then all key heads, then all value heads (``[H*E | K*E | K*E]``; the ViT's ``[3, H, E]`` is
the same with ``K = H``). Split contiguously over ``tensor``, device ``i``'s slice of that output is not
its own heads: the decoder of CogVLM2-19B on 8 devices would hold q heads 0-5 on device 0 while its kv
head 0 serves q heads 0-3, and every layer would reshuffle its activations between devices.

The Megatron layout (``Execution.layout``) holds those features *head-grouped* instead: for each kv head
``j`` in turn, the ``G = H / K`` query heads that read it, then key head ``j``, then value head ``j``
(``[K, G + 2, E]``). A contiguous split over ``tensor`` then gives each device whole groups, and query
head ``j * G + i`` is still the ``i``-th query of group ``j``: the head numbering, and so the attention,
is unchanged. ``parallel/layout.py`` reorders a checkpoint's weights into this order (and back).
"""

from __future__ import annotations

import numpy as np


def head_grouped_order(num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """Indices ``p`` such that ``features[p]`` is the head-grouped order of checkpoint-ordered QKV features."""
    h, kh, e = num_heads, num_kv_heads, head_dim
    if h % kh:
        raise ValueError(f"{h} query heads do not split into groups over {kh} kv heads")
    g = h // kh
    q = np.arange(h * e).reshape(kh, g, e)
    k = h * e + np.arange(kh * e).reshape(kh, 1, e)
    v = (h + kh) * e + np.arange(kh * e).reshape(kh, 1, e)
    return np.concatenate([q, k, v], axis=1).reshape(-1)


def checkpoint_order(num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """The inverse of :func:`head_grouped_order`: ``grouped[p]`` is in checkpoint order."""
    return np.argsort(head_grouped_order(num_heads, num_kv_heads, head_dim))


def split(qkv, num_heads: int, num_kv_heads: int, head_dim: int, grouped: bool):
    """``qkv`` [..., (H + 2K) * E] -> q [..., H, E], k [..., K, E], v [..., K, E].

    ``grouped``: the features are head-grouped (``[K, G + 2, E]``), else in checkpoint order."""
    h, kh, e = num_heads, num_kv_heads, head_dim
    lead = qkv.shape[:-1]
    if grouped:
        g = h // kh
        x = qkv.reshape(*lead, kh, g + 2, e)
        return x[..., :g, :].reshape(*lead, h, e), x[..., g, :], x[..., g + 1, :]
    q = qkv[..., :h * e].reshape(*lead, h, e)
    k = qkv[..., h * e:(h + kh) * e].reshape(*lead, kh, e)
    v = qkv[..., (h + kh) * e:].reshape(*lead, kh, e)
    return q, k, v
