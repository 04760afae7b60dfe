"""The whole CogVLM: (ids, token types, mask, pixels) -> logits, and the one-token decode step.

Data flow: pixels -> ViT -> adapter (``adapter.VisionModel``) -> spliced into the token embeddings at the
image slots -> decoder layers -> final norm -> lm_head (float32 logits).

Axis legend: B batch, L length, D model, V vocab, I image tokens (boi + patches + eoi), T video frames.

A video model (``config.video``) takes [B, T, 3, S, S] pixels; its decoder has no vision expert
(``TextConfig.vision_expert``), so no token is routed and its positions follow the token types alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.models import kv_cache, positions
from cogvlm_jax.models.adapter import VisionModel
from cogvlm_jax.models.decoder import DecoderLayer
from cogvlm_jax.models.execution import Execution
from cogvlm_jax.models.layers import Dense, RMSNorm, _init, accumulation
from cogvlm_jax.models.quantize import SCALE, Quantization
from cogvlm_jax.models.vision import SCAN_SCOPE, STACKED

Dtype = jnp.dtype


def splice(text_embeds, token_type_ids, image_features):
    """Replace the embeddings of the type-1 slots of each row, in order, by that row's image features.

    text_embeds [B, L, D]; image_features [B, I, D]. Rows without image tokens are untouched.
    """
    is_image = token_type_ids == positions.VISION
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class CogVLM(nn.Module):
    """``execution``: what the programs of this module are traced for (mesh, platform, few-row products,
    pre-widened kernels: ``execution.py``); ``parallel/program.py`` ``execution(mesh)`` builds it.
    ``rope_inv_freq``: the decoder's rotary inverse frequencies, head_dim / 2 numbers (the float64 reference
    mode passes the checkpoint's stored buffer, ``convert/params.stored_inv_freq``); None: computed from
    the config's ``rope_theta`` in ``layers.accumulation(dtype)``."""

    config: CogVLMConfig
    dtype: Dtype = jnp.float32
    vit_query_chunk: Optional[int] = None
    remat: bool = False  # training: recompute each decoder layer / ViT block in the backward pass
    execution: Execution = Execution()
    rope_inv_freq: Optional[tuple[float, ...]] = None

    def setup(self):
        t, ex = self.config.text, self.execution
        self.vision = VisionModel(self.config, self.dtype, self.vit_query_chunk, self.remat, ex)
        # dtype None: look rows up in the table's own dtype, then widen only those rows (``embed``); a
        # float32 Embed would widen the whole table first (once per decode loop call, on XLA:CPU).
        self.embed_tokens = nn.Embed(t.vocab_size, t.hidden_size, dtype=None,
                                     embedding_init=nn.with_logical_partitioning(_init, ("vocab_table", None)))
        layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        if ex.megatron:  # one layer, run under ``nn.scan`` over parameters stacked as ``layers``
            self.layers = layer(t, self.dtype, ex, self.rope_inv_freq, name=STACKED)
        else:
            self.layers = [layer(t, self.dtype, ex, self.rope_inv_freq) for _ in range(t.num_layers)]
        self.norm = RMSNorm(t.rms_norm_eps)
        # the lm_head reads one row at prefill (``last_only``): a product of the module's dtype even in a
        # program of 16-bit products (``Execution.matmul_dtype``), and float32 logits from float32 weights
        self.lm_head = Dense(t.vocab_size, ("embed", "vocab"), dtype=self.dtype, out_in=True,  # HF's [V, D]
                             execution=ex.replace(matmul_dtype=None))

    def embed(self, ids):
        """[B, L] token ids -> [B, L, D] embeddings in ``accumulation(dtype)`` (float32; float64 for float64)."""
        return self.embed_tokens(ids).astype(accumulation(self.dtype))

    def encode_images(self, pixel_values):
        """[B, 3, S, S] -> [B, I, D]: boi, adapted patches, eoi. Several images per row, or a video's
        frames, [B, N, 3, S, S] -> [B, N * I, D]: each image's (frame's) span, in order (the order of their
        spans in the prompt); the ViT runs over the B * N images as one batch."""
        if pixel_values.ndim == 4:
            return self.vision(pixel_values)
        b, n = pixel_values.shape[:2]
        feats = self.vision(pixel_values.reshape(b * n, *pixel_values.shape[2:]))
        return feats.reshape(b, n * feats.shape[1], feats.shape[2])

    def __call__(self, input_ids, token_type_ids, attention_mask, pixel_values=None, cache=None,
                 last_only: bool = False, return_hidden: bool = False, every_row_has_image: bool = False,
                 image_features=None):
        """Prefill / full forward. Returns (logits, cache, hidden_states).

        ``every_row_has_image`` (static): the caller checked that every row holds one whole image, so each
        decoder layer runs each expert on its own tokens without the mixed-batch branch (a smaller program,
        compiled faster; the same numbers).

        ``image_features`` [B, N * I, D]: what ``encode_images`` gave for the rows' pixels, in place of
        ``pixel_values`` (a prefix cache kept them: the ViT is not run again).

        logits: float32 [B, L, V], or [B, V] at the last position with ``last_only`` (left-padded
        prompts end there). cache: the KV cache with the prompt written at slots [0, L), or None.
        hidden_states: tuple of the decoder input and every layer's output (last one normed), if asked.
        """
        x = self.embed(input_ids)
        route = None  # None: every token takes the language expert
        n_img = self.config.num_image_tokens
        if pixel_values is not None and image_features is None:
            image_features = self.encode_images(pixel_values)
        if image_features is not None:
            x = splice(x, token_type_ids, image_features)
        if image_features is not None and self.config.text.vision_expert:
            # several images per row are several spans: the mask routes them, never the one-run split
            one_image = image_features.shape[1] == n_img
            route = positions.expert_route(token_type_ids, n_img - 1, every_row_has_image and one_image)
        pos = positions.position_ids(token_type_ids, attention_mask, self.config.position_span)
        mask = positions.causal_mask(attention_mask)
        x, kv, hidden = self.run_layers(x, route, pos, mask, cache, hidden=return_hidden)
        x = self.norm(x)
        hidden = hidden[:-1] + (x,) if return_hidden else None
        if cache is not None:
            cache = kv_cache.advance(cache.replace(k=kv[0], v=kv[1]), attention_mask.astype(bool))
        logits = self.lm_head(x[:, -1] if last_only else x)
        return logits, cache, hidden

    def run_layers(self, x, route, pos, mask, cache=None, hidden: bool = False, **layer_kw):
        """``x`` [B, L, D] through every decoder layer, each writing its keys/values into its layer of the
        buffers of ``cache`` (at ``cache.index``; None: no cache) -> (x, the (keys, values) buffers or
        None, with ``hidden`` the hidden states: the input and every layer's output, else None).
        ``layer_kw``: ``attend_cache`` or ``core`` (see ``DecoderLayer``). The cache's bookkeeping
        (``valid``, ``index``) is the caller's to advance.

        In the Megatron layout the layers run as one layer under ``nn.scan`` over their stacked
        parameters (the published 19B's 32 layers compile once), the cache buffers carried through the
        scan and each layer's keys/values written in place at the scan's index."""
        kv = None if cache is None else (cache.k, cache.v)
        index = None if cache is None else cache.index
        if self.execution.megatron:
            return self._scan_layers(x, route, pos, mask, kv, index, hidden, **layer_kw)
        states = [x]
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, route, pos, mask, kv, index, layer=i, **layer_kw)
            states.append(x)
        return x, kv, tuple(states) if hidden else None

    def _scan_layers(self, x, route, pos, mask, kv, index, hidden, attend_cache=False, core=None):
        """``run_layers`` of the Megatron layout: ``self.layers`` (one ``DecoderLayer``, its parameters
        stacked on a leading axis) as the body of ``nn.scan`` over the layer index. The route, masks and
        ``core`` are the same for every layer (closed over: ``route.split`` stays the Python ``True`` a
        caller may give it); the carry is the residual stream and the cache buffers."""
        n = self.config.text.num_layers

        def step(layer, carry, i):
            x, kv = carry
            x, kv = layer(x, route, pos, mask, kv, index, attend_cache, core, i)
            return (x, kv), (x if hidden else None)

        scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True}, length=n,
                       metadata_params={nn.PARTITION_NAME: None})
        x_in = x
        with jax.named_scope(SCAN_SCOPE):
            (x, kv), ys = scan(self.layers, (x, kv), jnp.arange(n, dtype=jnp.int32))
        return x, kv, ((x_in,) + tuple(ys[i] for i in range(n))) if hidden else None

    def extend(self, tokens, token_positions, lengths, cache):
        """Text tokens appended to each row's cache (a prompt whose prefix the cache already holds):
        tokens, token_positions [B, L], of which the first ``lengths[b]`` [B] of row b are real (right
        padding after them), written from ``cache.index`` and attending to the row's valid slots and,
        causally, to each other -> (logits [B, V] float32 at each row's last real token, cache with
        ``index`` moved on by ``lengths``: the next write goes over the padding). Language expert only,
        as a decode step (of which this is the case of L tokens at once).
        """
        new_valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        mask = kv_cache.extend_mask(cache, new_valid)
        x, (k, v), _ = self.run_layers(self.embed(tokens), None, token_positions, mask, cache, attend_cache=True)
        cache = kv_cache.advance(cache.replace(k=k, v=v), new_valid, lengths)
        last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        return self.lm_head(self.norm(last)), cache

    def decode_step(self, tokens, token_positions, cache):
        """One text token per row: tokens [B], token_positions [B] -> (logits [B, V] float32, cache).

        Runs the language expert only: the vision-expert weights are never read.
        """
        x = self.embed(tokens[:, None])
        new_valid = jnp.ones((tokens.shape[0], 1), bool)
        mask = kv_cache.read_mask(cache, new_valid)
        pos = token_positions[:, None]
        x, (k, v), _ = self.run_layers(x, None, pos, mask, cache, attend_cache=True)
        cache = kv_cache.advance(cache.replace(k=k, v=v), new_valid)
        return self.lm_head(self.norm(x))[:, 0], cache


_VISION_ONLY = frozenset({"vision", "vision_expert_query_key_value", "vision_expert_dense", "vision_mlp"})


def text_params(params):
    """``params`` without what a text-only step (``CogVLM.decode_step``) never reads: the vision tower and
    the decoder's vision experts. A step inside a loop (the decode loop) reads the loop's parameters as
    constants of the loop; a scan over stacked layers inside it takes every leaf of the stacked layer, so
    without this the unread vision experts stay arguments of the program."""
    if not hasattr(params, "items"):  # a leaf
        return params
    return {k: text_params(v) for k, v in params.items() if k not in _VISION_ONLY}


def _dummy_inputs(config: CogVLMConfig, batch: int = 1):
    n = config.num_image_tokens + 2
    ids = jnp.zeros((batch, n), jnp.int32)
    tt = jnp.zeros((batch, n), jnp.int32).at[:, 1:-1].set(1)
    s = config.vision.image_size
    return ids, tt, jnp.ones((batch, n), jnp.int32), jnp.zeros((batch, config.vision.in_channels, s, s), jnp.float32)


def init_params(config: CogVLMConfig, rng, dtype=jnp.float32):
    """Random parameters (normal 0.02, norms at one), boxed with their logical axes stripped."""
    model = CogVLM(config, dtype)
    boxed = model.init(rng, *_dummy_inputs(config))["params"]
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), nn.unbox(boxed))


@functools.lru_cache(maxsize=16)
def _traced_boxed_params(config: CogVLMConfig, quant: Optional[Quantization] = None):
    """The boxed float32 parameter shapes of ``config`` with one decoder layer and one ViT block, from
    ``jax.eval_shape`` of the init (nothing allocated, nothing compiled)."""
    one = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=1),
                              vision=dataclasses.replace(config.vision, num_layers=1))
    model = CogVLM(one, jnp.float32, execution=Execution(quant=quant))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_dummy_inputs(one))["params"])


def _held(tree, dtype):
    """Boxed shapes as a model of ``dtype`` holds them: every parameter in ``dtype``, except a quantized
    model's integer kernels and their float32 ``kernel_scale`` (``models/quantize.py``), kept as they are."""
    flat = flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))

    def held(path, b):
        keep = path[-1] == SCALE or not jnp.issubdtype(b.value.dtype, jnp.floating)
        return b.replace_boxed(jax.ShapeDtypeStruct(b.value.shape, b.value.dtype if keep else dtype))

    return unflatten_dict({p: held(p, b) for p, b in flat.items()})


def abstract_boxed_params(config: CogVLMConfig, dtype=jnp.float32, quant: Optional[Quantization] = None):
    """Parameter shapes with their ``nn.LogicallyPartitioned`` boxes, without allocating anything.

    Every decoder layer (``layers_i``) and every ViT block (``vision/transformer/layers_i``) is built
    from the same config, so one of each is traced and copied to every index: tracing all of them
    (the published 19B: 32 layers and 63 blocks) takes 10-20 s and gives the same tree
    (tests/test_sharding.py compares the two). ``quant``: the tree of a quantized model
    (``models/quantize.py``): its quantized kernels are integers, their ``kernel_scale`` float32,
    whatever ``dtype``."""
    dtype = jnp.dtype(dtype)
    traced = dict(_traced_boxed_params(config, quant))
    layer = traced.pop("layers_0")
    traced.update({f"layers_{i}": layer for i in range(config.text.num_layers)})
    vision = dict(traced["vision"])
    block = dict(vision["transformer"]).pop("layers_0")
    vision["transformer"] = {f"layers_{i}": block for i in range(config.vision.num_layers)}
    traced["vision"] = vision
    return _held(traced, dtype)


def traced_boxed_params(config: CogVLMConfig, dtype=jnp.float32, quant: Optional[Quantization] = None):
    """``abstract_boxed_params`` with every layer traced: what it must equal (the tests compare them)."""
    model = CogVLM(config, jnp.dtype(dtype), execution=Execution(quant=quant))
    tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_dummy_inputs(config))["params"])
    return _held(tree, jnp.dtype(dtype))


def abstract_params(config: CogVLMConfig, dtype=jnp.float32, quant: Optional[Quantization] = None):
    """Nested dict of ``jax.ShapeDtypeStruct``: every parameter's shape and dtype, nothing allocated."""
    return nn.unbox(abstract_boxed_params(config, dtype, quant))


def logical_axes(config: CogVLMConfig, quant: Optional[Quantization] = None):
    """Nested dict of tuples: every parameter's logical axis names (see ``axes.py``)."""
    return nn.get_partition_spec(abstract_boxed_params(config, quant=quant))


def count_params(config: CogVLMConfig) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_params(config)))
