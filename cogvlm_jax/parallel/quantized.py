"""A float parameter tree -> the tree of a quantized model (``models/quantize.py``), one leaf at a time.

Each quantizable kernel is quantized by one jitted program whose outputs (the held integers and their
scales) are placed in their own shardings on a mesh (``param_shardings(..., quant=)``): the extra memory is
one leaf, and on a mesh over several processes every process runs the same program. Kernels that are
already quantized (a quantized checkpoint read back) are kept as they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.files import CheckpointError
from cogvlm_jax.models import quantize as quant_lib
from cogvlm_jax.models.cogvlm import abstract_params
from cogvlm_jax.parallel.sharding import param_shardings


@functools.lru_cache(maxsize=None)
def _quantizer(in_axis: int, quant: quant_lib.Quantization, shardings):
    def run(w):
        q, scale = quant_lib.quantize(w, in_axis, quant.format)
        return quant_lib.held(q, in_axis, quant), scale

    return jax.jit(run, out_shardings=shardings)


def quantize_leaf(w, in_axis: int, quant: quant_lib.Quantization, shardings=None):
    """One float kernel -> (its held integers, its float32 scales), by the jitted program every quantizing
    path runs (a load, a conversion): the same numbers wherever it is done. ``shardings``: the outputs'."""
    return _quantizer(in_axis, quant, shardings)(w)


def quantized_paths(config: CogVLMConfig, quant: quant_lib.Quantization) -> list[tuple[str, ...]]:
    """The paths of the kernels ``quant`` quantizes (each has a ``kernel_scale`` beside it)."""
    return [p[:-1] + ("kernel",) for p in flatten_dict(abstract_params(config, quant=quant)) if p[-1] == quant_lib.SCALE]


def quantize_params(params, config: CogVLMConfig, quant: quant_lib.Quantization, mesh=None, rules=None):
    """``params`` (checkpoint order) with every kernel ``quant`` covers quantized and its scales added."""
    flat = flatten_dict(params)
    shardings = None if mesh is None else flatten_dict(param_shardings(config, mesh, rules, quant))
    for path in quantized_paths(config, quant):
        if path not in flat:
            raise CheckpointError(f"parameter {'/'.join(path)} is missing: cannot quantize it")
        scale_path = path[:-1] + (quant_lib.SCALE,)
        w = flat[path]
        if not jnp.issubdtype(w.dtype, jnp.floating):  # held quantized already: its scales must be there
            if scale_path not in flat:
                raise CheckpointError(f"quantized kernel {'/'.join(path)} has no {quant_lib.SCALE} beside it")
            continue
        sh = None if shardings is None else (shardings[path], shardings[scale_path])
        flat[path], flat[scale_path] = quantize_leaf(w, quant_lib.in_axis_of(path), quant, sh)
    return unflatten_dict(flat)


def held_bytes(params) -> int:
    """The bytes ``params`` holds: int4 leaves at half a byte per value (``jnp.int4`` reports one)."""
    total = 0
    for a in jax.tree_util.tree_leaves(params):
        bits = 4 if jnp.dtype(a.dtype) == jnp.dtype(jnp.int4) else 8 * jnp.dtype(a.dtype).itemsize
        total += int(np.prod(a.shape, dtype=np.int64)) * bits // 8
    return total
