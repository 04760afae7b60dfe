"""Shardings for parameters, inputs and the KV cache, from abstract shapes and the rules in ``axes.py``.

Nothing here allocates: parameter shardings come from ``jax.eval_shape`` of the model's init, with the
logical axes each parameter declared where it was created.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.models import kv_cache
from cogvlm_jax.models.cogvlm import abstract_params, logical_axes
from cogvlm_jax.parallel import axes


def param_shardings(config: CogVLMConfig, mesh: Mesh, rules=None, quant=None):
    """Nested dict of NamedSharding, one per parameter, by ``rules`` (default ``axes.RULES``; a module's
    are its ``execution.rules``). ``quant``: the tree of a quantized model (``models/quantize.py``), each
    ``kernel_scale`` sharded like its kernel."""
    rules = axes.RULES if rules is None else rules
    shapes = abstract_params(config, quant=quant)
    names = logical_axes(config, quant)
    return jax.tree_util.tree_map(lambda s, p: axes.named_sharding(tuple(p), s.shape, mesh, rules), shapes, names,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_sharded_params(config: CogVLMConfig, mesh: Mesh, dtype, rules=None, quant=None):
    """ShapeDtypeStructs carrying their sharding: the target of a sharded restore."""
    shapes = abstract_params(config, dtype, quant)
    shard = param_shardings(config, mesh, rules, quant)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)


def batch_sharding(mesh: Mesh, shape) -> NamedSharding:
    """Inputs [B, ...]: batch over (data, fsdp) when divisible, the rest replicated."""
    return axes.named_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def cache_shardings(cache: kv_cache.KVCache, mesh: Mesh):
    """KV cache: batch over data (and fsdp), kv heads over tensor, layers whole; per-row bookkeeping by
    batch."""
    kv = lambda x: axes.named_sharding(kv_cache.CACHE_AXES, x.shape, mesh)  # noqa: E731
    return kv_cache.KVCache(k=kv(cache.k), v=kv(cache.v),
                            valid=axes.named_sharding(("batch", "length"), cache.valid.shape, mesh),
                            index=axes.named_sharding(("batch",), cache.index.shape, mesh))

