"""How every model program is built and jitted: what its module is traced for, and the XLA options.

* ``execution(mesh)``: the ``models.execution.Execution`` a module whose programs run on ``mesh`` (None:
  the default device) is built with: the mesh, the layout and its rules table (``axes.rules_for``), and
  the platform of the mesh's devices. The layout defaults by that platform: ``"exact"`` on CPU (a sharded
  program adds as one device does: the parity tests' layout), ``"megatron"`` on a TPU or GPU mesh (one
  all-reduce per attention and MLP). A program compiled for TPU or GPU devices from a CPU host is then the
  TPU or GPU program.
* ``jit(fn, mesh)`` is ``jax.jit`` compiled with ``compiler_options(platform_of(mesh))``, whose calls say
  a compile of a second or more (``compiles.py``). On CPU, XLA:CPU's
  YNNPACK reduce fusion is off (``CPU_OPTIONS``). XLA:CPU hands a reduction, and the elementwise ops
  fused around it, to YNNPACK only when one of its arrays has at least 4096 elements; below that its own
  loop emitter computes it, and the two compute ``exp`` one ulp apart. With the fusion on, a softmax
  would change with how many rows or heads share the program: the CogVLM2 fixture's ViT score
  ``[B, 4, 1, 17, 17]`` crosses the threshold between batch 2 and 4, and a mesh gives each device fewer
  rows or heads. Without it, every reduction runs through XLA's emitter whatever the shape (dots and
  convolutions keep YNNPACK, as by default). A jaxlib that does not know the option gets none.

Nothing here is read while a program is traced: the module carries its execution as a field.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, SingleDeviceSharding

from cogvlm_jax.models.execution import Execution
from cogvlm_jax.parallel import axes, compiles

# XLA:CPU's default set is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE: this is it without REDUCE.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def platform_of(mesh: Optional[Mesh] = None) -> str:
    """The platform a program on ``mesh`` is compiled for: that of the mesh's devices; without a mesh,
    that of the default device (``jax.devices()[0]``)."""
    return (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform


def default_layout(mesh: Optional[Mesh] = None) -> str:
    """The layout a program on ``mesh`` gets unless one is asked for: Megatron on a TPU or GPU mesh, exact
    on CPU and on one device (where the two differ only in how the fused QKV rows are held)."""
    return "exact" if mesh is None or platform_of(mesh) == "cpu" else "megatron"


def execution(mesh: Optional[Mesh] = None, layout: Optional[str] = None, **fields) -> Execution:
    """The execution of a module whose programs run on ``mesh`` (None: the default device), with the
    platform of its devices, ``layout`` (default: :func:`default_layout`) and that layout's rules table.
    ``fields``: the other ``Execution`` fields (``weight_lhs``, ``widened_kernels``)."""
    layout = default_layout(mesh) if layout is None else layout
    rules = () if mesh is None else axes.rules_for(layout)
    return Execution(mesh=mesh, rules=rules, platform=platform_of(mesh), layout=layout, **fields)


@functools.lru_cache(maxsize=None)
def compiler_options(platform: str) -> Optional[dict]:
    """The options of a model program on ``platform``, or None (not CPU, or a jaxlib without the option)."""
    if platform != "cpu":
        return None
    try:
        cpu = SingleDeviceSharding(jax.devices("cpu")[0])
        jax.jit(jnp.sin, compiler_options=CPU_OPTIONS).lower(
            jax.ShapeDtypeStruct((2,), jnp.float32, sharding=cpu)).compile()
    except Exception:  # noqa: BLE001 - an older / newer jaxlib without this option: XLA's defaults
        return None
    return dict(CPU_OPTIONS)


class Program:
    """A jitted model program whose calls say their slow compiles (``compiles.timed``), described by
    ``describe(*args, **kwargs)`` (what it is and its shapes; it reads only the arguments' shapes).
    ``lower`` and every other attribute are the jitted function's."""

    def __init__(self, jitted, describe: Callable[..., str]):
        self._jitted, self._describe = jitted, describe

    def __call__(self, *args, **kwargs):
        with compiles.timed(lambda: self._describe(*args, **kwargs)):
            return self._jitted(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._jitted, name)


def jit(fn: Callable, mesh: Optional[Mesh] = None, options: Optional[dict] = None,
        describe: Optional[Callable[..., str]] = None, **jit_kwargs) -> Program:
    """``jax.jit(fn, **jit_kwargs)`` compiled with ``options`` (default: ``compiler_options`` of the
    platform of ``mesh``, or of the default device without one), as a :class:`Program`: a compile of
    a second or more says what compiled (``describe(*args, **kwargs)``, default the function's name).

    The mesh chooses only the options: the sharding constraints inside ``fn`` are those of the modules it
    applies, built with ``execution(mesh)``."""
    if options is None:
        options = compiler_options(platform_of(mesh))
    if describe is None:
        name = getattr(getattr(fn, "func", fn), "__name__", "a program")
        describe = lambda *a, **k: name  # noqa: E731
    return Program(jax.jit(fn, compiler_options=options, **jit_kwargs), describe)
