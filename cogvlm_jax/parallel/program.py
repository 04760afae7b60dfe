"""How every model program is jitted: the XLA options it is compiled with, and the mesh it is traced on.

``jit(fn, mesh)`` is ``jax.jit`` plus two things:

* On a mesh, ``fn`` is traced with ``axes.activations_on(mesh)``, so the activation constraints in the
  model (``axes.whole_rows``) hold: no product splits its contraction across devices.
* On CPU, XLA:CPU's YNNPACK reduce fusion is off (``CPU_OPTIONS``). XLA:CPU (jax 0.10.2) hands a reduction,
  and the elementwise ops fused around it, to YNNPACK only when one of its arrays has at least 4096
  elements; below that its own loop emitter computes it, and the two compute ``exp`` one ulp apart. A
  softmax then changed with how many rows or heads shared the program: the CogVLM2 fixture's ViT score
  ``[B, 4, 1, 17, 17]`` crosses the threshold between batch 2 and 4, and a mesh gives each device fewer
  rows or heads. Without it, every reduction runs through XLA's emitter whatever the shape (dots and
  convolutions keep YNNPACK, as by default). A jaxlib that does not know the option gets none.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from cogvlm_jax.parallel import axes

# XLA:CPU's default set is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE: this is it without REDUCE.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


@functools.lru_cache(maxsize=None)
def compiler_options() -> Optional[dict]:
    """The options of a model program on this backend, or None (not CPU, or a jaxlib without the option)."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(jnp.sin, compiler_options=CPU_OPTIONS).lower(jnp.zeros(2)).compile()
    except Exception:  # noqa: BLE001 - an older / newer jaxlib without this option: XLA's defaults
        return None
    return dict(CPU_OPTIONS)


def jit(fn: Callable, mesh=None, options: Optional[dict] = None, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)`` traced on ``mesh`` and compiled with ``options`` (default:
    ``compiler_options()``)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with axes.activations_on(mesh):
            return fn(*args, **kwargs)

    return jax.jit(traced, compiler_options=compiler_options() if options is None else options, **jit_kwargs)
