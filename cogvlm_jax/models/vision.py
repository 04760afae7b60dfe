"""EVA2-CLIP ViT: conv patch embedding, cls + learned positions, post-norm transformer blocks.

Post-norm means the LayerNorm is applied to each branch's *output* before the residual add
(``h = x + ln(attn(x))``), unlike the usual pre-norm ViT. The cls output is dropped at the end.

Axis legend: B batch, C channels, S image side, P patch side, N tokens (cls + patches), W ViT width.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cogvlm_jax.config import VisionConfig
from cogvlm_jax.models import qkv_layout
from cogvlm_jax.models.long_attention import attend_long
from cogvlm_jax.models.execution import Execution
from cogvlm_jax.models.layers import Dense, LayerNorm, PatchConv, _init, gelu

Dtype = jnp.dtype


QUERY_CHUNK = 1024  # queries per block of a long ViT attention


def default_query_chunk(tokens: int) -> Optional[int]:
    """The query block of a ViT attention over ``tokens`` when none is asked for: whole up to
    ``2 * QUERY_CHUNK`` tokens, else ``QUERY_CHUNK`` queries at a time, so the float32 scores of a block are
    ``[B, H, QUERY_CHUNK, N]``, never ``[B, H, N, N]`` (the published CogVLM2 ViT attends over 9217 tokens:
    5.1 GiB of scores for 16 heads at once, 0.6 GiB a block)."""
    return None if tokens <= 2 * QUERY_CHUNK else QUERY_CHUNK


class PatchEmbedding(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, pixels):  # [B, C, S, S] -> [B, 1 + g*g, W]
        b, w, g = pixels.shape[0], self.cfg.hidden_size, self.cfg.grid
        proj = PatchConv(self.cfg.patch_size, w, ("vit_channels", "vit_embed"), self.dtype, self.execution, name="proj")
        x = proj(pixels.astype(self.dtype).transpose(0, 2, 3, 1))  # NCHW -> NHWC
        x = x.reshape(b, g * g, w)  # row-major over the grid, as torch's flatten(2)
        cls = self.param("cls_embedding", nn.with_logical_partitioning(_init, (None, "vit_embed")), (1, w))
        pos = self.param("position_embedding", nn.with_logical_partitioning(_init, (None, "vit_embed")),
                         (g * g + 1, w))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype)[None], (b, 1, w)), x], axis=1)
        return x + pos.astype(self.dtype)[None]


class ViTAttention(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    query_chunk: Optional[int] = None
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):  # [B, N, W]
        b, n, w = x.shape
        h = self.cfg.num_heads
        ex = self.execution
        qkv = Dense(3 * w, ("vit_embed", "vit_qkv"), use_bias=True, dtype=self.dtype, execution=ex,
                    name="query_key_value")(x)
        # the attention's operands in the compute dtype (the Dense output is float32), as in the decoder
        q, k, v = (x.astype(self.dtype) for x in qkv_layout.split(qkv, h, h, w // h, grouped=ex.megatron))
        chunk = self.query_chunk if self.query_chunk is not None else default_query_chunk(n)
        o = attend_long(q, k, v, ex, query_chunk=chunk)  # a fused kernel on TPU / GPU, else chunked
        return Dense(w, ("vit_proj_in", "vit_proj_out"), use_bias=True, dtype=self.dtype, gather=True,
                     execution=ex, name="dense")(o.reshape(b, n, w))


class ViTMLP(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        x = Dense(self.cfg.intermediate_size, ("vit_embed", "vit_mlp"), use_bias=True, dtype=self.dtype,
                  execution=self.execution, name="fc1")(x)
        return Dense(self.cfg.hidden_size, ("vit_proj_in", "vit_proj_out"), use_bias=True, dtype=self.dtype,
                     gather=True, execution=self.execution, name="fc2")(gelu(x))


class ViTBlock(nn.Module):
    """One post-norm block. ``scan_step``: called as a step of ``nn.scan`` (``(x, None) -> (x, None)``)."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    query_chunk: Optional[int] = None
    execution: Execution = Execution()
    scan_step: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        eps = self.cfg.layer_norm_eps
        attn = ViTAttention(self.cfg, self.dtype, self.query_chunk, self.execution, name="attention")(x)
        x = x + LayerNorm(eps, "vit_embed", name="input_layernorm")(attn)
        mlp = ViTMLP(self.cfg, self.dtype, self.execution, name="mlp")(x)
        x = x + LayerNorm(eps, "vit_embed", name="post_attention_layernorm")(mlp)
        return (x, None) if self.scan_step else x


class Transformer(nn.Module):
    """The blocks, one after another: ``layers_0`` ... (the checkpoints' tree), or, in the Megatron layout's
    programs, one block under ``nn.scan`` over parameters stacked on a leading axis (``layers``: the
    published CogVLM2 ViT's 63 blocks compile once instead of 63 times; ``parallel/layout.py`` stacks a
    checkpoint's blocks into it)."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    query_chunk: Optional[int] = None
    remat: bool = False  # recompute each block in the backward pass (training memory)
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ViTBlock) if self.remat else ViTBlock
        if self.execution.megatron:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=self.cfg.num_layers, metadata_params={nn.PARTITION_NAME: None})
            with jax.named_scope(SCAN_SCOPE):
                x, _ = stack(self.cfg, self.dtype, self.query_chunk, self.execution, scan_step=True,
                             name=STACKED)(x, None)
            return x
        for i in range(self.cfg.num_layers):
            x = block(self.cfg, self.dtype, self.query_chunk, self.execution, name=f"layers_{i}")(x)
        return x


STACKED = "layers"  # the name of the stacked blocks in a Megatron program's ``vision/transformer``
# the name scope of every ``nn.scan`` over stacked layers or blocks: a compiled program's loops from it run
# their body once per layer (``aot.count_collectives`` counts them so)
SCAN_SCOPE = "scan_over_layers"
