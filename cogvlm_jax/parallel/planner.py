"""Memory planner: per-device bytes of parameters and KV cache from abstract shapes, nothing allocated.

Uses the same rules (``axes.py``) as the real placement, on a mesh described by its sizes only, so it
runs anywhere: ``cogvlm-jax plan --config cogvlm2-llama3-chat-19B --mesh 1,1,8 --dtype bfloat16``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.models import kv_cache, partitioning
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
    # what the fallback rule (models/partitioning.py) replicates because the mesh does not divide it: one
    # line per parameter path (decoder layers and ViT blocks as layers_*) or the KV cache
    replicated: tuple[str, ...] = ()
    # a video model (CogVLM2-Video): prompt slots one frame takes, and the most frames the context holds
    # beside bos (chat template: each frame's index is one more token, as Llama-3 encodes 0..999)
    frame_tokens: int = 0
    max_frames: int = 0

    @property
    def per_device_bytes(self) -> int:
        return self.params_per_device_bytes + self.kv_per_device_bytes


def _bits(dtype) -> int:
    """Bits per value as a device holds it (``jnp.int4`` packs two per byte though its itemsize says 1)."""
    return 4 if jnp.dtype(dtype) == jnp.dtype(jnp.int4) else 8 * jnp.dtype(dtype).itemsize


def _undivided_line(what: str, dims, sizes: dict, count: int = 1) -> str:
    parts = [f"dim {d} ({name}, {size}) by {' x '.join(f'{a}={sizes[a]}' for a in axes)}"
             for d, name, size, axes in dims]
    return f"{what}{f' (x{count})' if count > 1 else ''}: " + "; ".join(parts)


def plan(config: CogVLMConfig, data: int = 1, fsdp: int = 1, tensor: int = 1, dtype="bfloat16", batch: int = 1,
         context: int | None = None, rules=axes.RULES, quant=None) -> Plan:
    """Per-device bytes of parameters and KV cache on a ``data x fsdp x tensor`` mesh, from abstract
    shapes (``abstract_params``: nothing allocated or compiled), and what falls back to replication.
    ``quant``: the parameters of a model quantized so (``models/quantize.py``): integer kernels and their
    float32 scales at the bits they are held in, the other parameters in ``dtype``."""
    for axis, size in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {axis} must be an integer >= 1, got {size!r}")
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    mesh = _SizesOnly(sizes)
    itemsize = jnp.dtype(dtype).itemsize
    shapes = abstract_params(config, dtype, quant)
    names = logical_axes(config, quant)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    specs = jax.tree_util.tree_leaves(names, is_leaf=lambda x: isinstance(x, PartitionSpec))
    p_total = p_dev = 0
    undivided: dict[str, list] = {}  # path with layers_* -> [count, the dims]
    for (path, s), logical in zip(flat, specs):
        logical = tuple(logical) + (None,) * (len(s.shape) - len(logical))
        bits = _bits(s.dtype)
        p_total += math.prod(s.shape) * bits
        p_dev += _shard_elems(s.shape, axes.spec_for(logical, s.shape, mesh, rules), sizes) * bits
        dims = partitioning.undivided(logical, s.shape, mesh, rules)
        if dims:
            key = re.sub(r"layers_\d+", "layers_*", "/".join(str(getattr(k, "key", k)) for k in path))
            undivided.setdefault(key, [0, dims])[0] += 1
    p_total, p_dev = p_total // 8, p_dev // 8
    replicated = [_undivided_line(key, dims, sizes, count) for key, (count, dims) in undivided.items()]
    t = config.text
    kv_shape = kv_cache.kv_shape(batch, context or config.context_length, t.num_kv_heads, t.head_dim)
    kv_spec = axes.spec_for(kv_cache.KV_AXES, kv_shape, mesh, rules)
    kv_dims = partitioning.undivided(kv_cache.KV_AXES, kv_shape, mesh, rules)
    if kv_dims:
        replicated.append(_undivided_line("KV cache", kv_dims, sizes))
    per_layer = 2 * itemsize
    kv_total = per_layer * t.num_layers * math.prod(kv_shape)
    kv_dev = per_layer * t.num_layers * _shard_elems(kv_shape, kv_spec, sizes)
    ctx = context or config.context_length
    frame_tokens = config.num_image_tokens if config.video else 0
    max_frames = (ctx - 1) // (frame_tokens + 1) if config.video else 0
    return Plan(data * fsdp * tensor, p_total, p_dev, kv_total, kv_dev, tuple(replicated), frame_tokens, max_frames)


def format_plan(name: str, p: Plan, dtype: str, batch: int, context: int, quantize: str | None = None) -> str:
    gib = 2 ** 30
    dtype = dtype + (f" {quantize}" if quantize else "")
    lines = [f"{name} {dtype} on {p.devices} device(s), batch {batch}, context {context}",
             f"  parameters: {p.params_total_bytes / gib:8.2f} GiB total, {p.params_per_device_bytes / gib:8.2f} GiB per device",
             f"  KV cache:   {p.kv_total_bytes / gib:8.2f} GiB total, {p.kv_per_device_bytes / gib:8.2f} GiB per device",
             f"  per device: {p.per_device_bytes / gib:8.2f} GiB"]
    if p.frame_tokens:
        lines.append(f"  video:      {p.frame_tokens} slots a frame (+1 for its index with the chat template); the "
                     f"context holds at most {p.max_frames} frames (the demo samples up to 24)")
    if p.replicated:
        lines.append(f"  replicated because the mesh does not divide them (the fallback rule of "
                     f"models/partitioning.py), {len(p.replicated)}:")
        lines += [f"    {line}" for line in p.replicated]
    else:
        lines.append("  replicated because the mesh does not divide them: nothing")
    return "\n".join(lines)
