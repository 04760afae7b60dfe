"""How a module's program runs: everything its tracing reads besides the arrays it is given.

Every module of the model takes an :class:`Execution` as a field and passes it down to its children;
``layers.Dense`` and ``layers.PatchConv`` read only that (and their other fields). So what a program does
follows from how its module was built: ``jax.jit(module.apply)`` traces the same program as any other jit
of the same module, and two modules that trace differently are two different (hashable, comparable)
modules. ``parallel/program.py`` ``execution(mesh)`` builds the one for a mesh or the default device.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from jax.sharding import Mesh

from cogvlm_jax.models import partitioning
from cogvlm_jax.models.quantize import Quantization

LAYOUTS = ("exact", "megatron")


@dataclasses.dataclass(frozen=True)
class Execution:
    """What a model program is traced for. Frozen and hashable: a module field.

    ``mesh``: the mesh the program runs on, or None (one device). ``rules``: logical name -> mesh axes
    (the pairs of one of ``parallel/axes.py``'s tables), for the activation and weight constraints.

    ``layout``: how a ``Dense`` is split over the mesh (the rules table must be that layout's,
    ``axes.rules_for``):

    * ``"exact"``: the input of every ``Dense`` and the output of every projection back to the model width
      (``gather``) are constrained to whole feature rows on each device (:meth:`whole_rows`), its batch
      split as the rules say: no product splits its contraction across devices, so a sharded program
      adds in the order one device does. Projections back to the model width are split over ``tensor``
      by their outputs and gathered. The default on CPU, for parity testing.
    * ``"megatron"``: Megatron-LM's tensor parallelism. Projections out of the model width (fused QKV,
      gate/up, the ViT's qkv/fc1) are split over ``tensor`` by their outputs and keep their outputs split;
      projections back to the model width (``gather``) are split by their *inputs*, and their partial sums
      are added across ``tensor`` (one all-reduce per attention and per MLP). The fused QKV rows are then
      held head-grouped (``models/qkv_layout.py``), so that each device's slice of the QKV output is its
      own heads. The default on TPU and GPU.

    In both layouts a weight sharded over an axis that also splits the batch (``fsdp``) is gathered whole
    before its product (:meth:`weight`): fully sharded data parallelism, no partial sums over ``fsdp``.

    ``platform``: the platform of the devices the program is compiled for (``"cpu"``, ``"gpu"``,
    ``"tpu"``); on a mesh, that of its devices. XLA:CPU multiplies 16-bit floats by widening them to
    float32, and the model widens them itself there (``layers.operands``).

    ``weight_lhs``: a few-row program (``parallel/rows.py``): an ``[out, in]`` kernel is the left operand
    of its product (``(kernel @ x.T).T``), which XLA:CPU does not re-pack on every call.

    ``widened_kernels``: a float32 ``kernel`` of a 16-bit ``Dense`` / ``PatchConv`` that widens on this
    platform is taken as already rounded to the module's dtype and widened, and multiplied as it is
    (training widens its frozen kernels once, outside the step); a 16-bit kernel is widened as always.

    ``matmul_dtype``: the ``Dense`` / ``PatchConv`` products multiply operands rounded to this dtype
    (``"bfloat16"``) natively, accumulated and returned in float32, whatever the module's dtype and
    platform: a prefill-only program (``Model(prefill_dtype=...)``) on a CPU that computes bfloat16 dots
    natively (AVX512_BF16, AMX) runs its big products about twice as fast as in float32. None: the
    module's dtype, as ``layers.operands`` multiplies it.

    ``quant``: the ``Dense`` kernels are held quantized (``models/quantize.py``); the vision tower's
    ViT is built without it unless ``quant.vision`` (``adapter.VisionModel``).

    ``quant_kernel``: on CPU, a quantized ``[out, in]`` product of few rows on one device reads its
    integers in the kernel of ``models/int8_cpu.py`` (``int8_cpu.applies``); False: XLA ops everywhere.
    """

    mesh: Optional[Mesh] = None
    rules: partitioning.Rules = ()
    platform: str = "cpu"
    layout: str = "exact"
    weight_lhs: bool = False
    widened_kernels: bool = False
    matmul_dtype: Optional[str] = None
    quant: Optional[Quantization] = None
    quant_kernel: bool = True

    def __post_init__(self):
        object.__setattr__(self, "rules", partitioning.as_rules(self.rules))
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.mesh is not None:
            on = self.mesh.devices.flat[0].platform
            if on != self.platform:
                raise ValueError(f"Execution for platform {self.platform!r} on a mesh of {on!r} devices; "
                                 "build it with parallel.program.execution(mesh)")
            if "batch" not in dict(self.rules):
                raise ValueError("an Execution on a mesh needs rules with a 'batch' entry (parallel/axes.py RULES)")

    @property
    def megatron(self) -> bool:
        return self.layout == "megatron"

    def replace(self, **changes) -> "Execution":
        return dataclasses.replace(self, **changes)

    def whole_rows(self, x):
        """``x`` [batch, ...] with its batch split as the rules say and everything else whole on every
        device; ``x`` itself without a mesh."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, partitioning.named_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, self.mesh, self.rules))

    def constrain(self, x, logical):
        """``x`` constrained to the sharding of these logical axes (after the fallback rule); ``x`` itself
        without a mesh."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, partitioning.named_sharding(logical, x.shape, self.mesh,
                                                                               self.rules))

    def weight(self, w, logical):
        """A weight with these logical axes as its product reads it: sharded as the rules say, except over
        the mesh axes that split the batch (``fsdp``), over which it is gathered whole. Without such an
        axis in its sharding this is the weight as it is held."""
        if self.mesh is None:
            return w
        batch_axes = set(dict(self.rules)["batch"])
        rules = tuple((name, tuple(a for a in axes if a not in batch_axes)) for name, axes in self.rules)
        return jax.lax.with_sharding_constraint(w, partitioning.named_sharding(logical, w.shape, self.mesh, rules))
