"""Checkpoint-ordered parameters <-> the parameters a layout's programs read.

Checkpoints hold every fused QKV projection with its output features ``[q | k | v]``; the Megatron
layout's programs read them head-grouped (``models/qkv_layout.py``). :func:`to_program` reorders the
fused QKV weights and biases of the decoder (both experts) and of the ViT into the program's order;
:func:`to_checkpoint` undoes it (for whoever writes parameters a Megatron program holds). Every other
parameter, and every parameter in the exact layout, is passed through as it is.

Each reordered leaf is one jitted gather whose output has the leaf's own sharding, one leaf at a time:
the extra memory is one leaf, and on a mesh over several processes every process runs the same program.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.models import qkv_layout
from cogvlm_jax.models.cogvlm import logical_axes

_QKV_AXES = {"qkv": "text", "vit_qkv": "vision"}  # the logical name of a fused QKV feature axis -> its tower


def _orders(config: CogVLMConfig, inverse: bool):
    """Tower -> the feature permutation of its fused QKV (head-grouped, or back with ``inverse``)."""
    fn = qkv_layout.checkpoint_order if inverse else qkv_layout.head_grouped_order
    t, v = config.text, config.vision
    return {"text": fn(t.num_heads, t.num_kv_heads, t.head_dim),
            "vision": fn(v.num_heads, v.num_heads, v.hidden_size // v.num_heads)}


def fused_qkv_axes(config: CogVLMConfig, quant=None) -> dict[tuple[str, ...], tuple[int, str]]:
    """Flattened parameter path -> (its fused QKV feature axis, its tower), for every leaf that has one.
    ``quant``: of the quantized tree (``models/quantize.py``), whose kernel scales are reordered too."""
    out = {}
    for path, names in flatten_dict(logical_axes(config, quant)).items():
        for axis, name in enumerate(tuple(names)):
            if name in _QKV_AXES:
                out[path] = (axis, _QKV_AXES[name])
    return out


@functools.lru_cache(maxsize=None)
def _permute(axis: int, order: tuple[int, ...], sharding):
    """The jitted reorder of one leaf along ``axis``, its output placed as ``sharding`` (None: as XLA
    chooses). The order is a constant of the program: every process of a mesh runs the same one."""
    index = np.asarray(order, np.int32)
    return jax.jit(lambda w: w.take(index, axis=axis), out_shardings=sharding)


def _reorder(params, config: CogVLMConfig, layout: str, inverse: bool, quant):
    if layout == "exact":
        return params
    if layout != "megatron":
        raise ValueError(f"layout must be 'exact' or 'megatron', got {layout!r}")
    orders = _orders(config, inverse)
    flat = flatten_dict(params)
    for path, (axis, tower) in fused_qkv_axes(config, quant).items():
        if path not in flat:  # a partial tree (a trainable subset): only what it holds
            continue
        w = flat[path]
        order = orders[tower]
        if isinstance(w, np.ndarray):
            flat[path] = w.take(order, axis=axis)
            continue
        sharding = None if isinstance(w, jax.core.Tracer) else getattr(w, "sharding", None)
        flat[path] = _permute(axis, tuple(int(i) for i in order), sharding)(w)
    return unflatten_dict(flat)


def to_program(params, config: CogVLMConfig, layout: str, quant=None):
    """Checkpoint-ordered ``params`` as the programs of ``layout`` read them. ``quant``: ``params`` is the
    tree of a model quantized so (``models/quantize.py``): a fused QKV's scales are reordered with its rows."""
    return _reorder(params, config, layout, inverse=False, quant=quant)


def to_checkpoint(params, config: CogVLMConfig, layout: str, quant=None):
    """Parameters the programs of ``layout`` hold, in checkpoint order: the inverse of :func:`to_program`."""
    return _reorder(params, config, layout, inverse=True, quant=quant)
