"""The Llama decoder of CogVLM: every layer has a language expert and a vision expert.

Token i uses the vision expert iff it and token i+1 are image tokens (see ``positions.py``); the expert
choice covers the fused QKV projection, the attention output projection and the MLP. At prefill both
experts run and a select picks per token; the one-token decode step runs the language expert only
(generated tokens are text), so it never reads the vision-expert weights.

Axis legend: B batch, L length, T cache length, D model, H query heads, K kv heads, E head dim, F mlp.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from cogvlm_jax import attention, kv_cache
from cogvlm_jax.config import TextConfig
from cogvlm_jax.layers import Dense, RMSNorm, apply_rope, split_sizes

Dtype = jnp.dtype


def _route(vision_mask, vision_fn, language_fn, x):
    """Per-token expert select; ``vision_mask is None`` means all tokens are text (decode)."""
    lang = language_fn(x)
    if vision_mask is None:
        return lang
    return jnp.where(vision_mask[..., None], vision_fn(x), lang)


class MLP(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        f, d = self.cfg.intermediate_size, self.cfg.hidden_size
        gate = Dense(f, ("embed", "mlp"), dtype=self.dtype, out_in=True, name="gate_proj")(x)
        up = Dense(f, ("embed", "mlp"), dtype=self.dtype, out_in=True, name="up_proj")(x)
        return Dense(d, ("mlp", "embed"), dtype=self.dtype, out_in=True, name="down_proj")(nn.silu(gate) * up)


class VisionExpertMLP(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, vision_mask):
        language = MLP(self.cfg, self.dtype, name="language_mlp")
        if vision_mask is None:
            return language(x)
        return _route(vision_mask, MLP(self.cfg, self.dtype, name="vision_mlp"), language, x)


class VisionExpertAttention(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, vision_mask, positions, mask, kv=None, write_index=None, attend_cache=False):
        """x [B, L, D]; positions [B, L]; mask [B, L, L] (prefill) or [B, 1, T] (decode).

        kv: this layer's (k, v) cache buffers or None; the new keys/values are written at
        ``write_index`` [B]. With ``attend_cache`` the queries read the cache (decode: only its filled
        part, up to the largest write index, see ``attention.attend_cache``), else only the fresh keys
        (prefill). Returns (output [B, L, D], updated (k, v) or None).
        """
        c = self.cfg
        b, n, _ = x.shape
        h, kh, e = c.num_heads, c.num_kv_heads, c.head_dim
        language_qkv = Dense(c.qkv_size, ("embed", "qkv"), dtype=self.dtype, out_in=True,
                             name="language_expert_query_key_value")
        if vision_mask is None:
            qkv = language_qkv(x)
        else:
            vision_qkv = Dense(c.qkv_size, ("embed", "qkv"), use_bias=c.vision_qkv_bias, dtype=self.dtype,
                               out_in=True, name="vision_expert_query_key_value")
            qkv = _route(vision_mask, vision_qkv, language_qkv, x)
        q, k, v = split_sizes(qkv, (h * e, kh * e, kh * e))
        q = apply_rope(q.reshape(b, n, h, e), positions, c.rope_theta)
        k = apply_rope(k.reshape(b, n, kh, e), positions, c.rope_theta)
        v = v.reshape(b, n, kh, e)
        if kv is not None:
            kv = (kv_cache.write(kv[0], k, write_index), kv_cache.write(kv[1], v, write_index))
        if attend_cache:  # the queries read the filled part of the (heads-major) cache
            o = attention.attend_cache(q, kv[0], kv[1], mask, jnp.max(write_index) + n,
                                       chunk=attention.CACHE_CHUNK)
        else:
            o = attention.attend(q, k, v, mask)
        o = o.reshape(b, n, h * e)
        language_dense = Dense(c.hidden_size, ("heads", "embed"), dtype=self.dtype, out_in=True,
                               name="language_expert_dense")
        if vision_mask is None:
            return language_dense(o), kv
        vision_dense = Dense(c.hidden_size, ("heads", "embed"), dtype=self.dtype, out_in=True,
                             name="vision_expert_dense")
        return _route(vision_mask, vision_dense, language_dense, o), kv


class DecoderLayer(nn.Module):
    """Pre-norm: ``h = x + attn(rms(x))``, ``y = h + mlp(rms(h))``."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, vision_mask, positions, mask, kv=None, write_index=None, attend_cache=False):
        eps = self.cfg.rms_norm_eps
        a, kv = VisionExpertAttention(self.cfg, self.dtype, name="self_attn")(
            RMSNorm(eps, name="input_layernorm")(x), vision_mask, positions, mask, kv, write_index, attend_cache)
        x = x + a
        x = x + VisionExpertMLP(self.cfg, self.dtype, name="mlp")(
            RMSNorm(eps, name="post_attention_layernorm")(x), vision_mask)
        return x, kv
