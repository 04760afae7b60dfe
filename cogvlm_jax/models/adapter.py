"""From ViT patches to decoder embeddings: CogVLM2's 2x2 conv downsample, the GLU adapter, boi/eoi.

Axis legend: B batch, N patches, W ViT width, D text width, F text mlp width.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.models.execution import Execution
from cogvlm_jax.models.layers import Dense, LayerNorm, PatchConv, _init, gelu
from cogvlm_jax.models.vision import PatchEmbedding, Transformer

Dtype = jnp.dtype


class GLU(nn.Module):
    """``dense_4h_to_h(silu(gate_proj(y)) * dense_h_to_4h(y))`` with ``y = gelu(norm1(linear_proj(x)))``."""

    cfg: CogVLMConfig
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):  # [B, N, W] -> [B, N, D]
        d, f = self.cfg.text.hidden_size, self.cfg.text.intermediate_size
        ex = self.execution
        x = Dense(d, ("vit_embed", "embed"), dtype=self.dtype, execution=ex, name="linear_proj")(x)
        x = gelu(LayerNorm(1e-5, "embed", name="norm1")(x))
        gate = Dense(f, ("embed", "mlp"), dtype=self.dtype, execution=ex, name="gate_proj")(x)
        up = Dense(f, ("embed", "mlp"), dtype=self.dtype, execution=ex, name="dense_h_to_4h")(x)
        return Dense(d, ("proj_in", "proj_out"), dtype=self.dtype, gather=True, execution=ex,
                     name="dense_4h_to_h")(nn.silu(gate) * up)


class VisionModel(nn.Module):
    """pixels [B, 3, S, S] -> image features [B, n + 2, D]: boi, one per adapted patch, eoi.

    Named ``vision`` in the parameter tree, as ``model.vision`` in the HF checkpoints.
    """

    cfg: CogVLMConfig
    dtype: Dtype = jnp.float32
    query_chunk: int | None = None
    remat: bool = False
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, pixels):
        v = self.cfg.vision
        ex = self.execution
        # the ViT's linears are quantized only when asked (``Quantization.vision``); the adapter's always
        vit = ex if ex.quant is None or ex.quant.vision else ex.replace(quant=None)
        x = PatchEmbedding(v, self.dtype, vit, name="patch_embedding")(pixels)
        x = Transformer(v, self.dtype, self.query_chunk, self.remat, vit, name="transformer")(x)
        x = x[:, 1:]  # drop cls
        b = x.shape[0]
        if v.downsample:
            g = v.grid
            x = PatchConv(2, v.hidden_size, (None, "vit_embed"), self.dtype, ex, name="conv")(
                x.reshape(b, g, g, v.hidden_size))
            x = x.reshape(b, (g // 2) ** 2, v.hidden_size)
        x = GLU(self.cfg, self.dtype, ex, name="linear_proj")(x)
        d = self.cfg.text.hidden_size
        boi = self.param("boi", nn.with_logical_partitioning(_init, (None, None, "embed")), (1, 1, d))
        eoi = self.param("eoi", nn.with_logical_partitioning(_init, (None, None, "embed")), (1, 1, d))
        return jnp.concatenate([jnp.broadcast_to(boi.astype(x.dtype), (b, 1, d)), x,
                                jnp.broadcast_to(eoi.astype(x.dtype), (b, 1, d))], axis=1)
