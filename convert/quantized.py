"""The leaves of a quantized checkpoint (``cogvlm-jax convert --quantize``), made as they are written.

Each kernel the quantization covers (``parallel.quantized.quantized_paths``) becomes two lazy leaves, its
stored integers (int8, or int4 as packed ``uint8`` pairs: ``models/quantize.py``) and its float32
``kernel_scale``, both made from one read of the float kernel: the first of the two to be written
quantizes it, the second takes its half, and nothing more is kept. The numbers are those ``load(...,
quantize=)`` computes from the same weights (the same jitted program, ``parallel.quantized.quantize_leaf``),
so loading the written checkpoint gives the held arrays a quantizing load gives.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.checkpoint import QUANTIZE_KEY, LazyArray
from cogvlm_jax.files import CheckpointError
from cogvlm_jax.models import quantize as quant_lib
from cogvlm_jax.parallel.quantized import quantize_leaf, quantized_paths


def storage(quantize: str, vision: bool = False) -> quant_lib.Quantization:
    """The :class:`Quantization` checkpoints store (int4 packed on every platform)."""
    q = quant_lib.make(quantize, vision)
    return quant_lib.Quantization(q.format, q.vision, packed=q.format == "int4")


def meta(quant: quant_lib.Quantization) -> dict[str, Any]:
    """The ``checkpoint.json`` entry naming how a checkpoint is quantized."""
    return {QUANTIZE_KEY: {"format": quant.format, "vision": quant.vision}}


class _Pair:
    """Quantizes one source kernel when either of its two leaves is first made; hands each its half once."""

    def __init__(self, source, in_axis: int, quant: quant_lib.Quantization):
        self.source, self.in_axis, self.quant = source, in_axis, quant
        self.halves: dict[int, np.ndarray] = {}

    def half(self, i: int) -> np.ndarray:
        if i not in self.halves:
            w = self.source.made() if isinstance(self.source, LazyArray) else np.asarray(self.source)
            q, scale = jax.device_get(quantize_leaf(np.asarray(w), self.in_axis, self.quant))
            self.halves = {0: np.asarray(q), 1: np.asarray(scale, np.float32)}
        return self.halves.pop(i)


def quantized_leaves(params: Mapping, config: CogVLMConfig, quant: quant_lib.Quantization) -> dict:
    """``params`` (float leaves, numpy or :class:`LazyArray`) with every covered kernel replaced by its
    stored integers and scales, as lazy leaves."""
    flat = flatten_dict(dict(params))
    for path in quantized_paths(config, quant):
        if path not in flat:
            raise CheckpointError(f"parameter {'/'.join(path)} is missing: cannot quantize it")
        src = flat[path]
        shape, in_axis = tuple(src.shape), quant_lib.in_axis_of(path)
        held_shape = tuple(n // 2 if quant.packed and a == in_axis else n for a, n in enumerate(shape))
        pair = _Pair(src, in_axis, quant)
        order = getattr(src, "order", 0)
        flat[path] = LazyArray(held_shape, np.dtype(quant.held_dtype()), lambda p=pair: p.half(0), order=order)
        flat[path[:-1] + (quant_lib.SCALE,)] = LazyArray(quant_lib.scale_shape(shape, in_axis, quant.format),
                                                         np.dtype(np.float32), lambda p=pair: p.half(1), order=order)
    return unflatten_dict(flat)
