"""The Llama decoder of CogVLM: every layer has a language expert and a vision expert.

Token i uses the vision expert iff it and token i+1 are image tokens (see ``positions.py``); the expert
choice covers the fused QKV projection, the attention output projection and the MLP. At prefill each
expert runs on its own tokens only: every image row's vision tokens are one run of a size the config
fixes, so the run is gathered to the end of the row (static shapes), the vision expert runs on it and
the language expert on the rest, and the outputs are put back in place (``positions.ExpertRoute``). A
batch mixing image and text-only rows takes the other branch of a ``cond``: both experts on every
token and a select. The one-token decode step runs the language expert only (generated tokens are
text), so it never reads the vision-expert weights.

Axis legend: B batch, L length, T cache length, D model, H query heads, K kv heads, E head dim, F mlp.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from cogvlm_jax.config import TextConfig
from cogvlm_jax.models import attention, kv_cache, qkv_layout
from cogvlm_jax.models.execution import Execution
from cogvlm_jax.models.layers import Dense, RMSNorm, apply_rope
from cogvlm_jax.models.positions import ExpertRoute

Dtype = jnp.dtype


def _route(module: nn.Module, route: Optional[ExpertRoute], vision: Callable[[], nn.Module],
           language: Callable[[], nn.Module], x):
    """The routed projection of ``x`` [B, L, ...]; ``route is None``: all tokens are text (decode).

    ``vision`` / ``language`` build the expert's module; each branch of the ``cond`` builds its own, under
    the same names, so both use the same parameters.
    """
    if route is None:
        return language()(x)

    def both(mdl, x, route):
        return jnp.where(route.mask[..., None], vision()(x), language()(x))

    def split(mdl, x, route):
        n = x.shape[1] - route.span
        xs = jnp.take_along_axis(x, route.order[..., None], axis=1)
        y = jnp.concatenate([language()(xs[:, :n]), vision()(xs[:, n:])], axis=1)
        return jnp.take_along_axis(y, route.restore[..., None], axis=1)

    if route.order is None:
        return both(module, x, route)
    if route.split is True:  # every row holds an image (the caller knows): only the split program
        return split(module, x, route)
    return nn.cond(route.split, split, both, module, x, route)


def _write_and_attend(q, k, v, mask, kv, write_index, layer, attend_cache: bool, platform: str):
    """Write the new keys/values into layer ``layer`` of the cache (if any), then attend:
    -> (o [B, L, H, E], kv)."""
    if kv is not None:
        kv = (kv_cache.write(kv[0], k, write_index, layer), kv_cache.write(kv[1], v, write_index, layer))
    if attend_cache:  # the queries read the filled part of the (heads-major) cache
        return attention.attend_cache(q, kv[0], kv[1], mask, jnp.max(write_index) + q.shape[1], layer=layer,
                                      chunk=attention.CACHE_CHUNK, platform=platform), kv
    return attention.attend(q, k, v, mask, platform=platform), kv


class MLP(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        f, d = self.cfg.intermediate_size, self.cfg.hidden_size
        ex = self.execution
        gate = Dense(f, ("embed", "mlp"), dtype=self.dtype, out_in=True, execution=ex, name="gate_proj")(x)
        up = Dense(f, ("embed", "mlp"), dtype=self.dtype, out_in=True, execution=ex, name="up_proj")(x)
        return Dense(d, ("proj_in", "proj_out"), dtype=self.dtype, out_in=True, gather=True, execution=ex,
                     name="down_proj")(nn.silu(gate) * up)


class VisionExpertMLP(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x, route):
        return _route(self, route, lambda: MLP(self.cfg, self.dtype, self.execution, name="vision_mlp"),
                      lambda: MLP(self.cfg, self.dtype, self.execution, name="language_mlp"), x)


class VisionExpertAttention(nn.Module):
    """``rope_inv_freq``: the rotary inverse frequencies (``layers.apply_rope``); None: from the config's theta."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()
    rope_inv_freq: Optional[tuple[float, ...]] = None

    @nn.compact
    def __call__(self, x, route, positions, mask, kv=None, write_index=None, attend_cache=False, core=None,
                 layer=0):
        """x [B, L, D]; route: the experts' tokens (None: all text); positions [B, L]; mask [B, L, L]
        (prefill) or [B, 1, T] (decode).

        kv: the (k, v) cache buffers of every layer (``kv_cache.py``) or None; this layer is ``layer`` (an
        int, or the traced index of a scan over layers) of them, and its new keys/values are written at
        ``write_index`` [B]. With ``attend_cache`` the queries read the cache (decode: only its filled
        part, up to the largest write index, see ``attention.attend_cache``), else only the fresh keys
        (prefill). ``core``: instead of that, ``core(q, k, v, kv, layer) -> (o, kv)`` writes and attends
        (the chunked-prefill step, whose rows belong to different caches: ``chunked_prefill.py``).
        Returns (output [B, L, D], updated (k, v) or None).
        """
        c, ex = self.cfg, self.execution
        b, n, _ = x.shape
        h, kh, e = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = _route(self, route,
                     lambda: Dense(c.qkv_size, ("embed", "qkv"), use_bias=c.vision_qkv_bias, dtype=self.dtype,
                                   out_in=True, execution=ex, name="vision_expert_query_key_value"),
                     lambda: Dense(c.qkv_size, ("embed", "qkv"), dtype=self.dtype, out_in=True, execution=ex,
                                   name="language_expert_query_key_value"), x)
        q, k, v = qkv_layout.split(qkv, h, kh, e, grouped=ex.megatron)
        # the attention's operands in the compute dtype, as every other product's (a float32 score dot of
        # a 16-bit model would be a full-precision, several-pass product on TPU); scores stay float32
        q = apply_rope(q, positions, c.rope_theta, self.rope_inv_freq).astype(self.dtype)
        k = apply_rope(k, positions, c.rope_theta, self.rope_inv_freq).astype(self.dtype)
        v = v.astype(self.dtype)
        if core is None:
            o, kv = _write_and_attend(q, k, v, mask, kv, write_index, layer, attend_cache, ex.platform)
        else:
            o, kv = core(q, k, v, kv, layer)
        o = o.reshape(b, n, h * e)
        return _route(self, route,
                      lambda: Dense(c.hidden_size, ("proj_in", "proj_out"), dtype=self.dtype, out_in=True,
                                    gather=True, execution=ex, name="vision_expert_dense"),
                      lambda: Dense(c.hidden_size, ("proj_in", "proj_out"), dtype=self.dtype, out_in=True,
                                    gather=True, execution=ex, name="language_expert_dense"), o), kv


class DecoderLayer(nn.Module):
    """Pre-norm: ``h = x + attn(rms(x))``, ``y = h + mlp(rms(h))``."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    execution: Execution = Execution()
    rope_inv_freq: Optional[tuple[float, ...]] = None

    @nn.compact
    def __call__(self, x, route, positions, mask, kv=None, write_index=None, attend_cache=False, core=None,
                 layer=0):
        eps = self.cfg.rms_norm_eps
        a, kv = VisionExpertAttention(self.cfg, self.dtype, self.execution, self.rope_inv_freq, name="self_attn")(
            RMSNorm(eps, name="input_layernorm")(x), route, positions, mask, kv, write_index, attend_cache, core,
            layer)
        x = x + a
        x = x + VisionExpertMLP(self.cfg, self.dtype, self.execution, name="mlp")(
            RMSNorm(eps, name="post_attention_layernorm")(x), route)
        return x, kv
