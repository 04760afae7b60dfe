"""Logical axis names, the tables that map them onto mesh axes, and ``make_mesh``.

Every parameter declares logical names where it is created (``layers.py``, ``vision.py`` ...); the KV
cache and the inputs use the names below too. Changing the parallelism is editing these tables.

Two tables, one per layout (``models/execution.py`` ``Execution.layout``; ``rules_for``):

* ``RULES`` (``"exact"``): no product splits its contraction across devices. The inputs of every
  ``layers.Dense`` are constrained to whole feature rows on each device (``Execution.whole_rows``), and the
  projections back to the model width (attention output, MLP down, their ViT and adapter twins:
  ``proj_in`` -> ``proj_out``) are split over ``tensor`` by their *outputs*, whose pieces are then
  gathered, instead of by their inputs, whose partial sums would be added across devices in another order
  than one device adds them. A tensor-parallel layer thus moves an all-gather of its input and one of its
  output where Megatron's layout moves one all-reduce. The numbers are those of one device, up to how
  XLA's dot kernels block a narrower output (``tests/test_sharding.py``). The default on CPU.
* ``MEGATRON_RULES`` (``"megatron"``): the projections back to the model width are split over ``tensor``
  by their inputs (``proj_in``), and their partial sums are all-reduced: one collective per attention and
  per MLP. The default on TPU and GPU (``parallel/program.py`` ``execution``).

In both, fsdp shards one dimension of every weight and the weight is gathered before use
(``Execution.weight``): no partial sums over ``fsdp``.

Fallback rule (stated, never an XLA error; applied by ``models/partitioning.py``): a dimension is sharded
over its mesh axes only if its size is divisible by the product of their sizes; otherwise that dimension
is replicated. A mesh axis is used at most once per array (the first dimension that claims it wins).
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cogvlm_jax.models import partitioning

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a tuple: sharded over their product), or () for replicated.
RULES: dict[str, tuple[str, ...]] = {
    # activations / cache
    "batch": ("data", "fsdp"),
    "length": (),
    "kv_heads": ("tensor",),
    "head_dim": (),
    # decoder weights: fsdp shards the model width, tensor the heads / mlp / vocab
    "embed": ("fsdp",),
    # the decoder's norm scales, whole on every device (a vector per layer: sharding them saves nothing,
    # and a layer under ``nn.scan`` would gather its slice of the stacked scales with an all-reduce)
    "norm": (),
    "qkv": ("tensor",),
    "mlp": ("tensor",),
    "proj_in": ("fsdp",),  # the input features of a projection back to the model width (heads or mlp)
    "proj_out": ("tensor",),  # its outputs (the model width)
    "vocab": ("tensor",),
    # the embedding table: split by rows (a lookup adds one device's row to the others' zeros: exact)
    "vocab_table": ("tensor", "fsdp"),
    # ViT weights
    "vit_embed": ("fsdp",),
    "vit_qkv": ("tensor",),
    "vit_mlp": ("tensor",),
    "vit_proj_in": ("fsdp",),
    "vit_proj_out": ("tensor",),
    "vit_channels": (),
}


# Megatron-LM's tensor parallelism: a projection back to the model width is split by its input features.
MEGATRON_RULES: dict[str, tuple[str, ...]] = dict(
    RULES, proj_in=("tensor",), proj_out=("fsdp",), vit_proj_in=("tensor",), vit_proj_out=("fsdp",))

LAYOUT_RULES = {"exact": RULES, "megatron": MEGATRON_RULES}


def rules_for(layout: str) -> dict[str, tuple[str, ...]]:
    """The rules table of a layout (``"exact"`` or ``"megatron"``)."""
    if layout not in LAYOUT_RULES:
        raise ValueError(f"layout must be one of {tuple(LAYOUT_RULES)}, got {layout!r}")
    return LAYOUT_RULES[layout]


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all of ``jax.devices()``, every process's).

    Devices are ordered by process, then id, and ``tensor`` varies fastest: a tensor group (the axis
    with the most traffic) stays inside one process (host) whenever ``tensor`` divides the devices per
    process, and ``data``/``fsdp`` span the processes. A ``tensor`` that neither divides nor is a
    multiple of the devices per process would split groups unevenly across hosts and is refused.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = data * fsdp * tensor
    if min(data, fsdp, tensor) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got data={data} fsdp={fsdp} tensor={tensor}")
    if n != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {n} devices, but {len(devices)} "
                         f"are available; the product must equal the device count")
    per_process = collections.Counter(d.process_index for d in devices)
    if len(per_process) > 1:
        local = min(per_process.values())
        if local != max(per_process.values()):
            raise ValueError(f"processes contribute different numbers of devices {dict(per_process)}; a mesh "
                             "over several processes needs the same number from each")
        if local % tensor and tensor % local:
            raise ValueError(f"tensor={tensor} neither divides nor is a multiple of the {local} devices per process: "
                             "tensor groups would straddle hosts unevenly")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(data, fsdp, tensor), MESH_AXES)


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
             rules: partitioning.RulesLike = RULES) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes and shape, after the fallback rule."""
    return partitioning.spec_for(logical, shape, mesh, rules)


def named_sharding(logical, shape, mesh: Mesh, rules: partitioning.RulesLike = RULES) -> NamedSharding:
    return partitioning.named_sharding(logical, shape, mesh, rules)
