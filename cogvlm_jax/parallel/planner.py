"""Memory planner: per-device bytes of parameters and KV cache from abstract shapes, nothing allocated.

Uses the same rules (``axes.py``) as the real placement, on a mesh described by its sizes only, so it
runs anywhere: ``cogvlm-jax plan --config cogvlm2-llama3-chat-19B --mesh 1,1,8 --dtype bfloat16``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.models import kv_cache
from cogvlm_jax.models.cogvlm import abstract_params, logical_axes
from cogvlm_jax.parallel import axes


@dataclasses.dataclass(frozen=True)
class _SizesOnly:
    """What ``axes.spec_for`` needs of a mesh: its axis sizes."""

    shape: dict


def _shard_elems(shape, spec: PartitionSpec, sizes: dict) -> int:
    n = 1
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        n *= dim // math.prod(sizes[a] for a in names)
    return n


@dataclasses.dataclass(frozen=True)
class Plan:
    devices: int
    params_total_bytes: int
    params_per_device_bytes: int
    kv_total_bytes: int
    kv_per_device_bytes: int

    @property
    def per_device_bytes(self) -> int:
        return self.params_per_device_bytes + self.kv_per_device_bytes


def _bits(dtype) -> int:
    """Bits per value as a device holds it (``jnp.int4`` packs two per byte though its itemsize says 1)."""
    return 4 if jnp.dtype(dtype) == jnp.dtype(jnp.int4) else 8 * jnp.dtype(dtype).itemsize


def plan(config: CogVLMConfig, data: int = 1, fsdp: int = 1, tensor: int = 1, dtype="bfloat16", batch: int = 1,
         context: int | None = None, rules=axes.RULES, quant=None) -> Plan:
    """``quant``: the parameters of a model quantized so (``models/quantize.py``): integer kernels and
    their float32 scales, the other parameters in ``dtype``."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    mesh = _SizesOnly(sizes)
    itemsize = jnp.dtype(dtype).itemsize
    shapes = abstract_params(config, dtype, quant)
    names = logical_axes(config, quant)
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda s, p: (s.shape, axes.spec_for(tuple(p), s.shape, mesh, rules), _bits(s.dtype)), shapes, names,
        is_leaf=lambda x: isinstance(x, PartitionSpec)), is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3
        and isinstance(x[1], PartitionSpec))
    p_total = sum(math.prod(s) * bits for s, _, bits in leaves) // 8
    p_dev = sum(_shard_elems(s, spec, sizes) * bits for s, spec, bits in leaves) // 8
    t = config.text
    kv_shape = kv_cache.kv_shape(batch, context or config.context_length, t.num_kv_heads, t.head_dim)
    kv_spec = axes.spec_for(kv_cache.KV_AXES, kv_shape, mesh, rules)
    per_layer = 2 * itemsize
    kv_total = per_layer * t.num_layers * math.prod(kv_shape)
    kv_dev = per_layer * t.num_layers * _shard_elems(kv_shape, kv_spec, sizes)
    return Plan(data * fsdp * tensor, p_total, p_dev, kv_total, kv_dev)


def format_plan(name: str, p: Plan, dtype: str, batch: int, context: int, quantize: str | None = None) -> str:
    gib = 2 ** 30
    dtype = dtype + (f" {quantize}" if quantize else "")
    return (f"{name} {dtype} on {p.devices} device(s), batch {batch}, context {context}\n"
            f"  parameters: {p.params_total_bytes / gib:8.2f} GiB total, {p.params_per_device_bytes / gib:8.2f} GiB per device\n"
            f"  KV cache:   {p.kv_total_bytes / gib:8.2f} GiB total, {p.kv_per_device_bytes / gib:8.2f} GiB per device\n"
            f"  per device: {p.per_device_bytes / gib:8.2f} GiB")
