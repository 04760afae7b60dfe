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


@dataclasses.dataclass(frozen=True)
class Execution:
    """What a model program is traced for. Frozen and hashable: a module field.

    ``mesh``: the mesh the program runs on, or None (one device). On a mesh the input of every
    ``Dense`` (and the output of the ``gather`` ones) is constrained to whole feature rows on each
    device (:meth:`whole_rows`), its batch split as ``rules`` (logical name -> mesh axes, the pairs of
    ``parallel/axes.py`` ``RULES``) say: no product splits its contraction across devices.

    ``platform``: the platform of the devices the program is compiled for (``"cpu"``, ``"gpu"``,
    ``"tpu"``); on a mesh, that of its devices. XLA:CPU multiplies 16-bit floats by widening them to
    float32, and the model widens them itself there (``layers.operands``).

    ``weight_lhs``: a few-row program (``parallel/rows.py``): an ``[out, in]`` kernel is the left operand
    of its product (``(kernel @ x.T).T``), which XLA:CPU does not re-pack on every call.

    ``widened_kernels``: a float32 ``kernel`` of a 16-bit ``Dense`` / ``PatchConv`` that widens on this
    platform is taken as already rounded to the module's dtype and widened, and multiplied as it is
    (training widens its frozen kernels once, outside the step); a 16-bit kernel is widened as always.
    """

    mesh: Optional[Mesh] = None
    rules: partitioning.Rules = ()
    platform: str = "cpu"
    weight_lhs: bool = False
    widened_kernels: bool = False

    def __post_init__(self):
        object.__setattr__(self, "rules", partitioning.as_rules(self.rules))
        if self.mesh is not None:
            on = self.mesh.devices.flat[0].platform
            if on != self.platform:
                raise ValueError(f"Execution for platform {self.platform!r} on a mesh of {on!r} devices; "
                                 "build it with parallel.program.execution(mesh)")
            if "batch" not in dict(self.rules):
                raise ValueError("an Execution on a mesh needs rules with a 'batch' entry (parallel/axes.py RULES)")

    def replace(self, **changes) -> "Execution":
        return dataclasses.replace(self, **changes)

    def whole_rows(self, x):
        """``x`` [batch, ...] with its batch split as the rules say and everything else whole on every
        device; ``x`` itself without a mesh."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, partitioning.named_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, self.mesh, self.rules))
