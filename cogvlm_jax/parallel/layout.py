"""Checkpoint-ordered parameters <-> the parameters a layout's programs read.

The Megatron layout's programs differ from the checkpoints in two ways; :func:`to_program` makes a
checkpoint's tree into theirs and :func:`to_checkpoint` undoes it (for whoever writes parameters a
Megatron program holds). In the exact layout both pass the tree through as it is.

* Checkpoints hold every fused QKV projection with its output features ``[q | k | v]``; the programs read
  them head-grouped (``models/qkv_layout.py``): the fused QKV weights and biases of the decoder (both
  experts) and of the ViT are reordered, each leaf one jitted gather whose output keeps the leaf's
  sharding.
* The decoder's layers ``layers_{i}`` and the ViT's blocks ``vision/transformer/layers_{i}`` are stacked
  on a leading axis into ``layers`` and ``vision/transformer/layers`` (``models/cogvlm.py`` and
  ``models/vision.py`` run them under ``nn.scan``), each stacked leaf one jitted stack sharded as its
  blocks' leaves were, the new axis whole on every device.

The extra memory is one leaf (or one stack) at a time, and on a mesh over several processes every
process runs the same programs. Abstract trees (``jax.ShapeDtypeStruct`` leaves, for ahead-of-time
compiles) get the program's shapes and shardings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.models import qkv_layout
from cogvlm_jax.models.cogvlm import logical_axes
from cogvlm_jax.models.execution import LAYOUTS
from cogvlm_jax.models.vision import STACKED

_VIT = ("vision", "transformer")  # the path of the ViT's blocks (the decoder's layers are at the top)

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


@functools.lru_cache(maxsize=None)
def _stack(sharding):
    """The jitted stack of a block's leaves on a new leading axis, placed as ``sharding``."""
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _unstack(n: int, sharding):
    """The jitted split of a stacked leaf into its ``n`` blocks, each placed as ``sharding``."""
    return jax.jit(lambda w: tuple(w[i] for i in range(n)), out_shardings=(sharding,) * n)


def _reorder(params, config: CogVLMConfig, inverse: bool, quant):
    orders = _orders(config, inverse)
    flat = flatten_dict(params)
    for path, (axis, tower) in fused_qkv_axes(config, quant).items():
        if path not in flat:  # a partial tree (a trainable subset): only what it holds
            continue
        w = flat[path]
        order = orders[tower]
        if isinstance(w, jax.ShapeDtypeStruct):  # the same shape and sharding
            continue
        if isinstance(w, np.ndarray):
            flat[path] = w.take(order, axis=axis)
            continue
        sharding = None if isinstance(w, jax.core.Tracer) else getattr(w, "sharding", None)
        flat[path] = _permute(axis, tuple(int(i) for i in order), sharding)(w)
    return unflatten_dict(flat)


def _stacked_sharding(sharding):
    """The sharding of a stack of leaves sharded as ``sharding``: the new leading axis whole."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return sharding  # one device


def _unstacked_sharding(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _block_index(key: str):
    return int(key[len("layers_"):]) if key.startswith("layers_") and key[len("layers_"):].isdigit() else None


def _stacks(config: CogVLMConfig):
    """(the path of a stack of blocks, their number): the decoder's layers and the ViT's blocks."""
    return (((), config.text.num_layers), (_VIT, config.vision.num_layers))


def stack_layers(params, config: CogVLMConfig):
    """``layers_{i}/...`` (the decoder's) and ``vision/transformer/layers_{i}/...`` (the ViT's) ->
    ``layers/...`` and ``vision/transformer/layers/...``, each stacked over ``i``."""
    flat = flatten_dict(params)
    for prefix, n in _stacks(config):
        k = len(prefix)
        groups: dict[tuple, dict[int, tuple]] = {}
        for path in list(flat):
            if path[:k] == prefix and len(path) > k + 1 and (i := _block_index(path[k])) is not None:
                groups.setdefault(path[k + 1:], {})[i] = path
        for rest, paths in groups.items():
            if sorted(paths) != list(range(n)):
                raise ValueError(f"{'/'.join(prefix + ('layers_*',) + rest)}: blocks {sorted(paths)}, "
                                 f"expected 0..{n - 1}")
            leaves = [flat.pop(paths[i]) for i in range(n)]
            first = leaves[0]
            sharding = _stacked_sharding(getattr(first, "sharding", None))
            if isinstance(first, jax.ShapeDtypeStruct):
                stacked = jax.ShapeDtypeStruct((n,) + tuple(first.shape), first.dtype, sharding=sharding)
            elif isinstance(first, np.ndarray):
                stacked = np.stack(leaves)
            else:
                stacked = _stack(sharding)(*leaves)
            del leaves
            flat[prefix + (STACKED,) + rest] = stacked
    return unflatten_dict(flat)


def unstack_layers(params, config: CogVLMConfig):
    """The inverse of :func:`stack_layers`."""
    flat = flatten_dict(params)
    for prefix, n in _stacks(config):
        k = len(prefix)
        for path in [p for p in flat if p[:k + 1] == prefix + (STACKED,) and len(p) > k + 1]:
            w = flat.pop(path)
            if isinstance(w, jax.ShapeDtypeStruct):
                sharding = _unstacked_sharding(getattr(w, "sharding", None))
                parts = [jax.ShapeDtypeStruct(tuple(w.shape[1:]), w.dtype, sharding=sharding)] * n
            elif isinstance(w, np.ndarray):
                parts = list(w)
            else:
                parts = _unstack(n, _unstacked_sharding(w.sharding))(w)
            for i, part in enumerate(parts):
                flat[prefix + (f"layers_{i}",) + path[k + 1:]] = part
    return unflatten_dict(flat)


def _megatron(layout: str) -> bool:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout == "megatron"


def to_program(params, config: CogVLMConfig, layout: str, quant=None):
    """Checkpoint-ordered ``params`` as the programs of ``layout`` read them. ``quant``: ``params`` is the
    tree of a model quantized so (``models/quantize.py``): a fused QKV's scales are reordered with its rows."""
    if not _megatron(layout):
        return params
    return stack_layers(_reorder(params, config, inverse=False, quant=quant), config)


def to_checkpoint(params, config: CogVLMConfig, layout: str, quant=None):
    """Parameters the programs of ``layout`` hold, in checkpoint order: the inverse of :func:`to_program`."""
    if not _megatron(layout):
        return params
    return _reorder(unstack_layers(params, config), config, inverse=True, quant=quant)
