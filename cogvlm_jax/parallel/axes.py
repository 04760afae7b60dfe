"""Logical axis names, the one table that maps them onto mesh axes, and ``make_mesh``.

Every parameter declares logical names where it is created (``layers.py``, ``vision.py`` ...); the KV
cache and the inputs use the names below too. Changing the parallelism is editing ``RULES``.

No product splits its contraction across devices: the inputs of every ``layers.Dense`` are constrained to
whole feature rows on each device (``whole_rows``), and the projections back to the model width (attention
output, MLP down, their ViT and adapter twins: ``proj_in`` -> ``proj_out``) are split over ``tensor`` by
their *outputs*, whose pieces are then gathered, instead of by their inputs, whose partial sums would be
added across devices in another order than one device adds them. A tensor-parallel layer thus moves an
all-gather of its input and one of its output where Megatron's layout moves one all-reduce (the same bytes
for attention; for the MLP the gathered input is the mlp width), and fsdp-sharded weights are gathered
before use. The numbers are then those of one device, up to how XLA's dot kernels block a narrower output
(``tests/test_sharding.py``).

Fallback rule (stated, never an XLA error): a dimension is sharded over its mesh axes only if its size
is divisible by the product of their sizes; otherwise that dimension is replicated. A mesh axis is used
at most once per array (the first dimension that claims it wins).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
             rules: dict[str, tuple[str, ...]] = RULES) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes and shape, after the fallback rule."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in axes.RULES")
        axes = tuple(a for a in rules[name] if mesh.shape[a] > 1 and a not in used)
        total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or size % total:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named_sharding(logical, shape, mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh, rules))


_active = threading.local()


@contextlib.contextmanager
def activations_on(mesh: Optional[Mesh]):
    """While a program is traced: the mesh ``whole_rows`` constrains activations to (None: no constraint)."""
    saved = getattr(_active, "mesh", None)
    _active.mesh = mesh
    try:
        yield
    finally:
        _active.mesh = saved


def whole_rows(x):
    """``x`` [batch, ...] with its batch split as the rules say and everything else whole on every device.

    A no-op unless a program is being traced on a mesh (``activations_on``, set by ``program.jit``)."""
    mesh = getattr(_active, "mesh", None)
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh))
