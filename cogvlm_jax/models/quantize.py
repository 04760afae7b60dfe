"""Weight-only quantization of the linear kernels: int8 per output channel, int4 in groups along the input.

A quantized ``layers.Dense`` holds its ``kernel`` as integers, with the shape and logical axes of the float
kernel, and a float32 ``kernel_scale`` beside it. The scale has the kernel's rank: its input axis has one
entry per group (int4) or a single one (int8: one scale per output channel, that axis unsharded); its other
axes, and their logical names, are the kernel's, so a scale is sharded like its weights.

* ``int8``: symmetric, ``q = round(w / s)`` in [-127, 127] with ``s = max|w| / 127`` over each output
  channel's inputs; ``|w - q s| <= s / 2``.
* ``int4``: symmetric in groups of ``GROUP`` (128) consecutive inputs, ``q`` in [-7, 7] with
  ``s = max|w| / 7`` over the group; ``|w - q s| <= s / 2``. An input width that 128 does not divide takes
  the largest divisor of the width not above 128 (:func:`group_size`): a width below 128 (the test
  fixtures' 64) is one group of the whole input. Held as ``jnp.int4`` where the platform stores it two per
  byte (TPU, GPU); XLA:CPU stores ``jnp.int4`` one per byte, so there (``Quantization.packed``) two
  consecutive inputs share one ``uint8`` (low nibble first) and the input axis is halved. Checkpoints
  always store the packed form.

The product dequantizes inside the program (:func:`product_kernel`): the integers are converted where
the product reads them; an int8 scale multiplies the product's output channels, an int4 group's scale
its group of weights. Nothing dequantized is held between calls.

Which kernels are quantized: every ``Dense`` built with an ``Execution`` whose ``quant`` is set: the
decoder's projections (both experts), the lm_head and the adapter's GLU; the ViT only with
``Quantization.vision`` (``adapter.VisionModel``). Norms, embeddings, biases and the patch convolutions
keep the model's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4")
GROUP = 128
SCALE = "kernel_scale"  # the parameter name of a quantized kernel's scales, beside its ``kernel``
_QMAX = {"int8": 127, "int4": 7}


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a model's kernels are quantized (a frozen, hashable part of ``Execution``).

    ``format``: ``"int8"`` or ``"int4"``. ``vision``: the ViT's linears too. ``packed`` (int4 only): the
    held kernels pack two values per ``uint8`` (platforms without a two-per-byte ``jnp.int4``: CPU)."""

    format: str
    vision: bool = False
    packed: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"quantize must be one of {FORMATS} or None, got {self.format!r}")
        if self.packed and self.format != "int4":
            raise ValueError("only int4 kernels are packed")

    @property
    def grouped(self) -> bool:
        return self.format == "int4"

    def held_dtype(self):
        if self.format == "int8":
            return jnp.dtype(jnp.int8)
        return jnp.dtype(jnp.uint8) if self.packed else jnp.dtype(jnp.int4)


def make(quantize: Optional[str], vision: bool = False, platform: str = "cpu") -> Optional[Quantization]:
    """The :class:`Quantization` of ``quantize`` (None: none) for a model whose programs run on ``platform``."""
    if quantize is None:
        if vision:
            raise ValueError("quantize_vision needs quantize='int8' or 'int4'")
        return None
    if quantize not in FORMATS:
        raise ValueError(f"quantize must be one of {FORMATS} or None, got {quantize!r}")
    return Quantization(quantize, bool(vision), packed=quantize == "int4" and platform == "cpu")


def group_size(width: int) -> int:
    """The int4 group along an input of ``width``: 128, or the largest divisor of ``width`` not above 128."""
    if width < 1:
        raise ValueError(f"input width must be positive, got {width}")
    return max(g for g in range(1, min(GROUP, width) + 1) if width % g == 0)


def in_axis_of(path: tuple) -> int:
    """The input axis of a quantizable kernel at parameter ``path``: the decoder's and lm_head's kernels are
    ``[out, in]``, the vision tower's (ViT and adapter) ``[in, out]`` (``layers.Dense`` ``out_in``)."""
    return 0 if path[0] == "vision" else 1


def scale_shape(shape: tuple[int, ...], in_axis: int, fmt: str) -> tuple[int, ...]:
    """The shape of the scales of a ``shape`` kernel (float, unpacked) quantized as ``fmt``."""
    n = shape[in_axis] // group_size(shape[in_axis]) if fmt == "int4" else 1
    return shape[:in_axis] + (n,) + shape[in_axis + 1:]


def _grouped(w, in_axis: int, g: int):
    """``w`` with its input axis split into (groups, g)."""
    s = w.shape
    return w.reshape(s[:in_axis] + (s[in_axis] // g, g) + s[in_axis + 1:])


def quantize(w, in_axis: int, fmt: str):
    """A float kernel -> (integers as ``int8`` values, float32 scales of :func:`scale_shape`), symmetric.

    The integers are returned as int8 for both formats (int4 values lie in [-7, 7]): :func:`held` gives
    them their held dtype. Works on numpy and jax arrays alike (traced: one leaf per jitted call)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(xp.float32)
    if fmt == "int8":
        g = w.shape[in_axis]
    else:
        g = group_size(w.shape[in_axis])
    wg = _grouped(w, in_axis, g)
    amax = xp.max(xp.abs(wg), axis=in_axis + 1, keepdims=True)
    scale = xp.where(amax > 0, amax / _QMAX[fmt], xp.float32(1.0)).astype(xp.float32)
    q = xp.clip(xp.round(wg / scale), -_QMAX[fmt], _QMAX[fmt]).astype(xp.int8).reshape(w.shape)
    return q, xp.squeeze(scale, axis=in_axis + 1)


def pack(q, in_axis: int):
    """int4 values (as int8, in [-8, 7]) -> ``uint8`` pairs along ``in_axis`` (low nibble: the even input)."""
    xp = np if isinstance(q, np.ndarray) else jnp
    if q.shape[in_axis] % 2:
        raise ValueError(f"an int4 kernel packs pairs of inputs: its input width {q.shape[in_axis]} is odd")
    pairs = _grouped(q.astype(xp.uint8) & 0xF, in_axis, 2)
    lo = xp.take(pairs, 0, axis=in_axis + 1)
    hi = xp.take(pairs, 1, axis=in_axis + 1)
    return (lo | (hi << 4)).astype(xp.uint8)


def unpack(p, in_axis: int):
    """``uint8`` pairs -> int4 values as int8, the input axis doubled (the inverse of :func:`pack`)."""
    xp = np if isinstance(p, np.ndarray) else jnp
    lo = (p & 0xF).astype(xp.int8)
    hi = (p >> 4).astype(xp.int8)
    both = xp.stack([lo, hi], axis=in_axis + 1)
    both = ((both ^ 8) - 8).astype(xp.int8)  # sign-extend the nibbles
    s = p.shape
    return both.reshape(s[:in_axis] + (2 * s[in_axis],) + s[in_axis + 1:])


def held(q, in_axis: int, quant: Quantization):
    """Integers from :func:`quantize` in the dtype (and packing) ``quant`` holds them in."""
    if quant.format == "int8":
        return q.astype(jnp.int8) if not isinstance(q, np.ndarray) else q.astype(np.int8)
    if quant.packed:
        return pack(q, in_axis)
    return jnp.asarray(q).astype(jnp.int4)


def stored(kernel, in_axis: int, quant: Quantization):
    """A held kernel in its checkpoint form: int8 as it is, int4 packed pairs of ``uint8``."""
    if quant.format == "int4" and not quant.packed:
        return pack(np.asarray(kernel).astype(np.int8), in_axis)
    return kernel


def from_stored(kernel, in_axis: int, quant: Quantization):
    """A checkpoint's kernel as ``quant`` holds it (the inverse of :func:`stored`)."""
    if quant.format == "int4" and not quant.packed:
        return unpack(kernel, in_axis).astype(jnp.int4)
    return kernel


def dequantize(kernel, scale, in_axis: int, quant: Quantization, dtype=jnp.float32):
    """The float kernel a held ``kernel`` and its ``scale`` stand for, in ``dtype``."""
    q = unpack(kernel, in_axis) if quant.packed else kernel
    q = q.astype(dtype)
    g = q.shape[in_axis] // scale.shape[in_axis]
    w = _grouped(q, in_axis, g) * jnp.expand_dims(scale.astype(dtype), in_axis + 1)
    return w.reshape(q.shape)


def product_kernel(kernel, scale, x, in_axis: int, quant: Quantization, dtype):
    """(the kernel the product multiplies ``x`` by, in ``dtype``; the scale of its output channels or None).

    int8: the integers converted to ``dtype`` (exact: |q| <= 127 fits a bfloat16), and the per-channel
    scales for the caller to multiply the product's output by. int4: the groups dequantized (each group's
    integers times its scale), no output scale. The kernel passes an optimization barrier with ``x``
    first, so the conversion depends on the call's input: XLA cannot hoist it out of a decode loop as a
    loop invariant and hold a converted copy of every weight for the loop's whole run."""
    kernel, x = jax.lax.optimization_barrier((kernel, x))
    if quant.format == "int8":
        return kernel.astype(dtype), jnp.squeeze(scale, axis=in_axis), x
    return dequantize(kernel, scale, in_axis, quant, dtype), None, x
