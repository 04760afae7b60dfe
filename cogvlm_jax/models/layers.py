"""Small building blocks shared by the ViT, the adapter and the decoder.

Every parameter is created here or in the module using it, with its logical axes beside its shape
(see ``parallel/axes.py`` for the names and the rules mapping them onto a mesh). Linear weights are
``kernel`` ``[in, out]``, or ``[out, in]`` (PyTorch's own layout) where ``Dense(out_in=True)``; norms
carry ``scale`` (and ``bias`` for LayerNorm), matching the HF names after the renames in
``convert/mapping.py``.

Axis legend: B batch, L length, D model width, F mlp width.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cogvlm_jax.models import int8_cpu
from cogvlm_jax.models import quantize as quant_lib
from cogvlm_jax.models.execution import Execution

Dtype = Any

_init = nn.initializers.normal(stddev=0.02)


def accumulation(dtype: Dtype) -> jnp.dtype:
    """The wide dtype of a model computing in ``dtype``: what its products accumulate in and its residual
    stream, norms, softmax, rotary angles and logits are computed in. Float32 for float32 and the 16-bit
    dtypes; float64 for float64 (the reference mode, ``api.check_reference_mode``), in which nothing is
    rounded to float32 anywhere."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def precision_for(dtype: Dtype):
    """Float32 and float64 runs are the exact paths: ask every backend for full-precision matmuls."""
    exact = jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
    return jax.lax.Precision.HIGHEST if exact else jax.lax.Precision.DEFAULT


def widens_on_cpu(dtype, platform: str) -> bool:
    """Whether ``dtype`` is a 16-bit float that ``platform`` (CPU) multiplies by widening to float32."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and platform == "cpu"


def operands(dtype, *arrays, platform: str):
    """``arrays`` rounded to ``dtype``, as the operands of a product accumulated in float32, on ``platform``.

    XLA:CPU has no native bfloat16 / float16 dot (without AVX512-BF16 or AMX): it widens the operands to
    float32 itself, but not for every shape (the batched attention dot over a short bfloat16 KV cache at
    batch 8 fails at run time with "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32").
    On CPU we widen them here: the same numbers, operands rounded to ``dtype``, products and sums in
    float32. Other platforms multiply 16-bit operands natively and get them as they are.
    """
    out = [a.astype(dtype) for a in arrays]
    return [a.astype(jnp.float32) for a in out] if widens_on_cpu(dtype, platform) else out


def weight_operands(dtype, x, kernel, execution: Execution):
    """``operands(dtype, x, kernel)``, except that a kernel widened once already (``execution.widened_kernels``)
    is used as it is: no convert of the whole weight in every call."""
    platform = execution.platform
    if execution.matmul_dtype is not None:  # native 16-bit products (a prefill program): no widening
        return x.astype(execution.matmul_dtype), kernel.astype(execution.matmul_dtype)
    if execution.widened_kernels and kernel.dtype == jnp.float32 and widens_on_cpu(dtype, platform):
        return operands(dtype, x, platform=platform)[0], kernel
    return operands(dtype, x, kernel, platform=platform)


class Dense(nn.Module):
    """``x @ kernel (+ bias)`` with logical axes ``axes = (in_axis, out_axis)``.

    ``execution`` (``execution.py``) is all the module reads besides its arrays and its other fields: the
    mesh, the platform, the few-row product and pre-widened kernels are decided where the module is built.

    On a mesh (``execution.mesh``), in the exact layout the input arrives whole on every device
    (``Execution.whole_rows``: no device sums a part of the contraction); ``gather``: so does the output (a
    projection back to the model width, split over ``tensor`` by its outputs, see ``parallel/axes.py``).
    In the Megatron layout a ``gather`` projection is row-parallel instead: its input stays split over
    ``tensor`` by features, and the partial sums of its output are all-reduced into whole rows. In both, the
    kernel is gathered over ``fsdp`` before the product (``Execution.weight``).

    ``out_in``: the kernel is stored ``[out, in]`` (PyTorch's layout; its logical axes reversed to
    match) and the product is ``x @ kernel.T``. On XLA:CPU a one-row product then reads each output's
    weights as one contiguous row: the decoder's linears and the lm_head use it (batch-1 decode is a chain
    of such products; ``benchmarks/matvec.py`` ``dot_t``). The prefill-only ViT/adapter keep ``[in, out]``,
    which is as fast there (``benchmarks/prototypes.py``). In a few-row program
    (``execution.weight_lhs``, set by ``parallel/rows.py`` ``ByRows``: a batched decode step, a prefill of up
    to 64 tokens, a chunked-prefill step) the product is ``(kernel @ x.T).T``: with the weight as the left
    operand XLA:CPU does not re-pack it on every call.

    A quantized ``[out, in]`` kernel of a few-row product on CPU is multiplied in the kernel of
    ``models/int8_cpu.py`` (``int8_cpu.applies``), which reads the held integers without widening them.

    The operands are rounded to ``dtype`` (``operands``: bfloat16 runs multiply bfloat16 values) and the
    The operands are rounded to ``dtype`` (``operands``: bfloat16 runs multiply bfloat16 values) and the
    product is accumulated and returned in ``accumulation(dtype)`` (float32; float64 for a float64 model),
    so the residual stream, norms, softmax and logits stay float32 whatever the weights are. That keeps a
    bfloat16 run's logits well inside the reference's own bfloat16 error (tests/test_model_parity.py).
    With ``execution.matmul_dtype`` they are rounded to that dtype instead and multiplied natively
    (``weight_operands``: a bfloat16 prefill program).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    out_in: bool = False
    gather: bool = False
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        ex = self.execution
        if ex.megatron and self.gather:  # row-parallel: the input's features stay split as they came
            x = ex.constrain(x, ("batch",) + (None,) * (x.ndim - 2) + (self.axes[0],))
        else:
            x = ex.whole_rows(x)
        d = x.shape[-1]
        logical = self.axes[::-1] if self.out_in else self.axes
        shape = (self.features, d) if self.out_in else (d, self.features)
        spec = "...d,fd->...f" if self.out_in else "...d,df->...f"
        out_scale = None
        wide = accumulation(self.dtype)
        if ex.quant is not None and int8_cpu.applies(ex, math.prod(x.shape[:-1]), self.out_in):
            kernel, scale = self._quantized_params(shape, logical)
            y = int8_cpu.matmul(x.astype(self.dtype).astype(jnp.float32), kernel, scale, ex.quant)
        else:
            if ex.quant is None:
                kernel = self.param("kernel", nn.with_logical_partitioning(_init, logical), shape)
                xs, ks = weight_operands(self.dtype, x, ex.weight(kernel, logical), ex)
            else:
                xs, ks, out_scale = self._quantized(x, shape, logical)
            prec = precision_for(ex.matmul_dtype or self.dtype)
            if self.out_in and ex.weight_lhs:  # a few-row program: see parallel/rows.py
                y = jnp.einsum("fd,rd->fr", ks, xs.reshape(-1, d), precision=prec, preferred_element_type=wide)
                y = jax.lax.optimization_barrier(y).T.reshape(*x.shape[:-1], self.features)  # barrier: keep W on the left
            else:
                y = jnp.einsum(spec, xs, ks, precision=prec, preferred_element_type=wide)
        if out_scale is not None:  # int8: one scale per output channel, applied to the product
            y = y * out_scale.astype(wide)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,))
            y = y + bias.astype(y.dtype)
        return self.execution.whole_rows(y) if self.gather else y

    def _quantized_params(self, shape, logical):
        """A quantized kernel's held integers and scales (``models/quantize.py``), as the product reads
        them. ``shape`` is the float kernel's."""
        ex, q = self.execution, self.execution.quant
        in_axis = 1 if self.out_in else 0
        held_shape = tuple(n // 2 if q.packed and a == in_axis else n for a, n in enumerate(shape))
        held_dtype = q.held_dtype()
        kernel = self.param("kernel", nn.with_logical_partitioning(
            lambda key, s: jnp.zeros(s, held_dtype), logical), held_shape)
        scale_logical = tuple(None if a == in_axis and not q.grouped else n for a, n in enumerate(logical))
        scale = self.param(quant_lib.SCALE, nn.with_logical_partitioning(
            lambda key, s: jnp.ones(s, jnp.float32), scale_logical), quant_lib.scale_shape(shape, in_axis, q.format))
        return ex.weight(kernel, logical), ex.weight(scale, scale_logical)

    def _quantized(self, x, shape, logical):
        """The operands of a quantized kernel's product as XLA ops: (x, the kernel in the compute dtype,
        the output channels' scales or None). ``shape`` is the float kernel's."""
        ex, q = self.execution, self.execution.quant
        in_axis = 1 if self.out_in else 0
        kernel, scale = self._quantized_params(shape, logical)
        compute = jnp.float32 if widens_on_cpu(self.dtype, ex.platform) else self.dtype
        ks, out_scale, x = quant_lib.product_kernel(kernel, scale, x, in_axis, q, compute)
        return x.astype(self.dtype).astype(compute), ks, out_scale


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in ``accumulation`` of the input's dtype (float32; float64 for float64) and
    cast back to the input dtype. The scale's logical axis is ``"norm"``: held whole on every device
    (``parallel/axes.py``), so no program gathers it."""

    eps: float = 1e-5
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],))
        wide = accumulation(x.dtype)
        xf = x.astype(wide)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(wide) * y).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in ``accumulation`` of the input's dtype and cast back to it."""

    eps: float = 1e-6
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1],)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), shape)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)), shape)
        wide = accumulation(x.dtype)
        xf = x.astype(wide)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(wide) + bias.astype(wide)).astype(x.dtype)


def gelu(x):
    """Exact (erf) GELU, as torch's default ``nn.GELU``."""
    return jax.nn.gelu(x, approximate=False)


def rope_inv_freq(head_dim: int, theta: float, dtype: Dtype = jnp.float32) -> jax.Array:
    """The rotary inverse frequencies ``theta ** -(2i / head_dim)``, computed in ``dtype``."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))


def apply_rope(x, positions, theta: float, inv_freq: Optional[tuple[float, ...]] = None):
    """Rotate-half rotary embedding over the full head dim.

    x: [B, L, N, E] (N query or kv heads); positions: [B, L] integers. The angles are computed in
    ``accumulation(x.dtype)`` (float32; float64 for float64) from integer positions, so they are exact at
    any length (the official bfloat16 CogVLM2 rounds positions above 256 because it builds them in the
    buffer's dtype; we do not reproduce that error). ``inv_freq``: the E/2 inverse frequencies to use (a
    checkpoint's stored buffer, ``convert/params.stored_inv_freq``); None: computed from ``theta`` in that
    dtype.
    """
    e = x.shape[-1]
    wide = accumulation(x.dtype)
    pos = positions.astype(wide)[..., None]
    ang = pos * (rope_inv_freq(e, theta, wide) if inv_freq is None else jnp.asarray(inv_freq, wide))  # [B, L, E/2]
    cos = jnp.concatenate([jnp.cos(ang), jnp.cos(ang)], axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang), jnp.sin(ang)], axis=-1)[:, :, None, :]
    xf = x.astype(wide)
    half = e // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class PatchConv(nn.Module):
    """Conv2d whose kernel equals its stride (patch embedding, CogVLM2's 2x2 downsample), as one matmul.

    x: [B, H, W, C] (NHWC) -> [B, H/P, W/P, out]; ``kernel`` is [P, P, C, out] (HWIO), with a bias. Its
    operands are those of ``Dense`` on ``execution``'s platform (``weight_operands``).
    """

    patch: int
    features: int
    axes: tuple[str, str]
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        p = self.patch
        kernel = self.param("kernel", nn.with_logical_partitioning(_init, (None, None) + tuple(self.axes)),
                            (p, p, c, self.features))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]), (self.features,))
        x = x.reshape(b, h // p, p, w // p, p, c)
        ex = self.execution
        wide = accumulation(self.dtype)
        y = jnp.einsum("bhpwqc,pqco->bhwo", *weight_operands(self.dtype, x, kernel, self.execution),
                       precision=precision_for(ex.matmul_dtype or self.dtype), preferred_element_type=wide)
        return y.astype(wide) + bias.astype(wide)
