"""Attention over long unmasked sequences (the ViT: 9217 tokens for a 1344x1344 image) without the scores.

Written as ``softmax(q k^T) v`` the published CogVLM2 ViT's float32 scores are ``[16, 9217, 9217]``, 5 GiB per
image, in each of its 63 blocks. Each platform gets an attention that never holds them:

* TPU: the Pallas flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``), the
  sequence padded to its 128-token blocks and the padding kept out by segment ids.
* GPU: cuDNN's fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``) for 16-bit
  operands when the cuDNN library can be loaded; otherwise, and for float32, the chunked form.
* CPU, and the rest: ``attention.attend`` in blocks of queries (``query_chunk``): one block's scores at a
  time, the same numbers as the whole softmax.

A Pallas or cuDNN kernel is a custom call that XLA's partitioner cannot split, so on a mesh it runs inside
``shard_map``: every device attends its own rows (batch over the batch axes) and heads (over ``tensor``, the
split the rules give ``kv_heads``), which is where the Megatron layout's head-grouped QKV already puts them.

Axis legend: B batch, N tokens, H heads, E head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from cogvlm_jax.models import partitioning
from cogvlm_jax.models.attention import attend
from cogvlm_jax.models.execution import Execution

TPU_BLOCK = 128  # the Pallas kernel's query / key block
_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _tpu_flash(q, k, v):
    """q, k, v [B, N, H, E] -> [B, N, H, E], with the Pallas TPU kernel."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, n, h, e = q.shape
    padded = -(-n // TPU_BLOCK) * TPU_BLOCK
    heads_major = [jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (q, k, v)]
    segment = jnp.broadcast_to((jnp.arange(padded) >= n).astype(jnp.int32), (b, padded))  # 1: padding
    o = fa.flash_attention(*heads_major, segment_ids=fa.SegmentIds(segment, segment), sm_scale=1.0 / math.sqrt(e))
    return o.transpose(0, 2, 1, 3)[:, :n]


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


@functools.lru_cache(maxsize=None)
def cudnn_available() -> bool:
    """Whether this process can load cuDNN (the GPU runtime has it; a compile-only host may not)."""
    probe = jax.ShapeDtypeStruct((1, 8, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(_cudnn, probe, probe, probe)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def kernel_for(platform: str, dtype) -> Optional[str]:
    """The fused kernel a long attention on ``platform`` in ``dtype`` runs: "tpu_flash", "cudnn" or None
    (the chunked form)."""
    if platform == "tpu":
        return "tpu_flash"
    if platform == "gpu" and jnp.dtype(dtype) in _SIXTEEN_BIT and cudnn_available():
        return "cudnn"
    return None


def attend_long(q, k, v, execution: Execution, query_chunk: Optional[int] = None):
    """Unmasked attention, q, k, v [B, N, H, E] -> [B, N, H, E], by the platform's kernel (module doc)."""
    kernel = kernel_for(execution.platform, q.dtype)
    if kernel is None:
        return attend(q, k, v, None, query_chunk=query_chunk, platform=execution.platform)
    fn = _tpu_flash if kernel == "tpu_flash" else _cudnn
    if execution.mesh is None:
        return fn(q, k, v).astype(q.dtype)
    spec = partitioning.spec_for(("batch", None, "kv_heads", None), q.shape, execution.mesh, execution.rules)
    out = jax.shard_map(fn, mesh=execution.mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return out(q, k, v).astype(q.dtype)
