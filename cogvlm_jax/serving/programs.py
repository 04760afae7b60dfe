"""The serving engine's device programs: jitted functions that move the state of S request slots on.

The engine (``engine.py``) holds one ``Slots`` value on device and replaces it with what these programs
return. Each is a pure function ``(params, state, host inputs) -> (state, outputs)`` that donates the
state it is given:

* ``empty()``: all-zero slots, made on the host (nothing to compile);
* ``insert``: one prompt prefilled on its own, left-padded to a bucket ``[1, L]`` (with its image, through
  the ViT), its first token chosen, its one-row KV cache (the padding's slots dropped) and settings put
  into a slot: one compile per prompt shape;
* ``decode``: ``chunk`` decode steps of the first rows (a static row count, one of
  ``buckets.decode_sizes``): one compile per row count;
* ``resume``: like ``insert``, for a prompt whose first tokens' keys and values a prefix cache kept
  (``generation/prefix_cache.py``): the kept slots copied into a one-row cache, only the rest of the
  prompt (text) prefilled (``CogVLM.extend``), then put into a slot: one compile per (kept slots, rest
  bucket);
* ``keep``: a copy of the first slots of one row (a request's prompt and answer), for the prefix cache;
* ``mix`` (chunked prefill, ``chunked_prefill.py``): one decode step of every slot plus the next chunk of
  one text prompt, the products of both in one block; after the prompt's last chunk its slot starts
  decoding from its first token. One compile per chunk length (``buckets.prefill_sizes``).

Sampling settings, seeds, slot numbers and limits are traced values: no traffic compiles anything new.
Token i of a request is chosen with ``sampling.choose`` and the key ``fold_in(fold_in(PRNGKey(seed), 0), i)``,
the key ``Model.chat(seed=seed)`` uses for the same token, so a request's text depends on its own seed and
prompt, not on what else is being served.

Every leaf of the KV cache has the batch on axis 0. On a mesh the slots' cache is sharded like
``generate``'s (batch over ``data``/``fsdp``, kv heads over ``tensor``); the rest of the state, and every
output, is replicated.

Axis legend: S slots, L prompt bucket, T cache length, V vocab, C decode chunk, P prefill chunk.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cogvlm_jax.generation import chunked_prefill, sampling
from cogvlm_jax.models import kv_cache
from cogvlm_jax.models.cogvlm import CogVLM, text_params
from cogvlm_jax.parallel import multihost, program, rows
from cogvlm_jax.parallel.sharding import cache_shardings, replicated


@flax.struct.dataclass
class Slots:
    """Everything the decode chunk reads and writes, for all S slots (batch on axis 0 everywhere)."""

    cache: kv_cache.KVCache
    token: jax.Array  # [S] the last chosen token: the next one fed to the model
    position: jax.Array  # [S] its position id
    step: jax.Array  # [S] tokens chosen so far (the index of the next token's key)
    sampling: sampling.SamplingParams  # [S] per-slot settings; key = fold_in(PRNGKey(seed), 0)


# --------------------------------------------------------------------------------------- choosing tokens
def choose_rows(logits, sp: sampling.SamplingParams, steps):
    """Next token per row [S], each row with its own settings and step [S] (one compile for any mix).

    Rows are visited one at a time and only a sampling row (temperature > 0) pays for the top-k/top-p
    filter over the vocabulary: a full-vocabulary sort per row and step, which an idle or greedy slot
    should not cost. Each row's draw is ``sampling.choose`` on that row alone, as in ``Model.chat``.
    """
    def one(row):
        row_logits, row_sp, row_step = row
        one_row = jax.tree_util.tree_map(lambda x: x[None], row_sp)
        draw = lambda: sampling.choose(row_logits[None], one_row, row_step, True)[0]  # noqa: E731
        greedy = lambda: jnp.argmax(row_logits).astype(jnp.int32)  # noqa: E731
        return jax.lax.cond(row_sp.temperature > 0, draw, greedy)

    return jax.lax.cond(jnp.any(sp.temperature > 0), lambda: jax.lax.map(one, (logits, sp, steps)),
                        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def first_token(logits, temperature, top_k, top_p, seed):
    """A new request's first token from its prompt's last logits [1, V] -> (token [1], its settings [1]): key
    ``fold_in(PRNGKey(seed), 0)``, as ``SamplingParams.make(1, seed=seed)`` and so ``Model.chat``."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    sp = sampling.SamplingParams(temperature[None], top_k[None], top_p[None], key[None])
    return choose_rows(logits, sp, jnp.zeros((1,), jnp.int32)), sp


def next_tokens(state: Slots, logits, cache, live, keep):
    """One decode step's bookkeeping for every row: the next tokens [S] (an idle row, not ``live``, greedy,
    so it never makes the step take the sampling branch) and the state moved on. An idle row's write
    index goes back to 0, unless ``keep`` [S] (a prompt being prefilled in chunks): it writes at slot 0 of
    its own row again and again, since decode attention reads every row up to the largest write index,
    which an idle row advancing each step would push to the end."""
    cache = cache.replace(index=jnp.where(live | keep, cache.index, 0))
    tok = choose_rows(logits, state.sampling.replace(temperature=jnp.where(live, state.sampling.temperature, 0.0)),
                      state.step)
    return tok, state.replace(cache=cache, token=tok, position=state.position + 1, step=state.step + 1)


def decode_steps(module: CogVLM, params, state: Slots, live, chunk: int):
    """``chunk`` decode steps of every row of ``state`` -> (state, tokens [rows, C]); ``live`` [rows]: the
    rows whose tokens are used (``next_tokens``)."""
    def body(i, carry):
        s, tokens = carry
        logits, cache = sampling.decode_step(module, params, s.token, s.position, s.cache)
        tok, s = next_tokens(s, logits, cache, live, False)
        return s, jax.lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)

    return jax.lax.fori_loop(0, chunk, body, (state, jnp.zeros((live.shape[0], chunk), jnp.int32)))


# --------------------------------------------------------------------------------------- starting a request
def _put_row(full, row, slot):
    """Write the one-row ``row`` [1, ...] into row ``slot`` of ``full`` [S, ...]."""
    return jax.lax.dynamic_update_index_in_dim(full, row.astype(full.dtype), slot, axis=0)


def _start_row(state: Slots, put, logits, position, temperature, top_k, top_p, seed):
    """One row set to decode a new request from its prompt's last logits [1, V]: its first token
    (``first_token``) at ``position`` [1], step 1, its settings -> (state, the first token [1]).
    ``put(full, row)`` writes a one-row value into that row of ``full``."""
    first, sp = first_token(logits, temperature, top_k, top_p, seed)
    state = state.replace(token=put(state.token, first), position=put(state.position, position),
                          step=put(state.step, jnp.ones((1,), jnp.int32)),
                          sampling=jax.tree_util.tree_map(put, state.sampling, sp))
    return state, first


# --------------------------------------------------------------------------------------- the programs
class Programs:
    """The device programs of one engine: ``slots`` rows of ``cache_length`` cache slots each, ``chunk``
    decode steps per ``decode`` call, on ``mesh`` (or one device).

    ``empty()`` is a method; ``insert``, ``decode`` and ``mix`` are the jitted programs, each built at
    init by its own method (``_insert_program`` ...)."""

    def __init__(self, module: CogVLM, slots: int, cache_length: int, chunk: int, mesh=None):
        self.module, self.slots, self.cache_length, self.chunk, self.mesh = module, slots, cache_length, chunk, mesh
        self.shapes = jax.eval_shape(self._zeros)
        self.shardings: Optional[Slots] = None
        self._out = {}
        if mesh is not None:  # the cache sharded like generate's; the rest, and the outputs, replicated
            rep = replicated(mesh)
            self.shardings = jax.tree_util.tree_map(lambda _: rep, self.shapes).replace(
                cache=cache_shardings(self.shapes.cache, mesh))
            self._out = {"out_shardings": (self.shardings, rep)}
        self.insert = self._insert_program()
        self.resume = self._resume_program()
        self.decode = self._decode_program()
        self.mix = self._mix_program()
        self.keep = program.jit(lambda state, slot, length: sampling.take_prefix(
            jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0), state.cache), 0,
            length), mesh, static_argnames=("length",), describe=lambda state, slot, length: (
                f"keep a request's keys and values ({length} slots)"))

    def new_cache(self, batch: int) -> kv_cache.KVCache:
        module, cache_length = self.module, self.cache_length
        t = module.config.text
        return kv_cache.init_cache(t.num_layers, batch, cache_length, t.num_kv_heads, t.head_dim, module.dtype)

    def _zeros(self) -> Slots:
        zeros = jnp.zeros((self.slots,), jnp.int32)
        sp = sampling.SamplingParams(zeros.astype(jnp.float32), zeros, zeros.astype(jnp.float32),
                                     jnp.zeros((self.slots, 2), jnp.uint32))
        return Slots(cache=self.new_cache(self.slots), token=zeros, position=zeros, step=zeros, sampling=sp)

    def empty(self) -> Slots:
        """All-zero slots, made on the host from the traced shapes: nothing to compile."""
        if self.mesh is None:
            return jax.tree_util.tree_map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype)), self.shapes)
        return jax.tree_util.tree_map(lambda x, sh: multihost.to_global(np.zeros(x.shape, x.dtype), sh),
                                      self.shapes, self.shardings)

    def _insert_program(self):
        module, mesh, out = self.module, self.mesh, self._out

        # a prompt of rows.MIN_ROWS to rows.MAX_ROWS tokens prefills as a few-row program (see rows.py)
        @functools.partial(rows.ByRows, rows=lambda params, state, input_ids, *a, **k: input_ids.size, mesh=mesh,
                           module=module, donate_argnames=("state",), static_argnames=("keep_features",), **out,
                           describe=lambda params, state, input_ids, tt, am, pixel_values, *a, image_features=None,
                           keep_features=False: (
                               f"insert (a prompt of bucket {input_ids.shape[1]}"
                               f"{', an image' if pixel_values is not None else ''}"
                               f"{', image features' if image_features is not None else ''})"))
        def insert(module, params, state: Slots, input_ids, token_type_ids, attention_mask, pixel_values, slot,
                   temperature, top_k, top_p, seed, image_features=None, keep_features=False):
            """Prefill one prompt [1, L] into a fresh one-row cache, choose its first token, put it in ``slot``
            -> (state, the first token), or with ``keep_features`` (state, (the first token, the ViT features
            [1, N * I, D] of its pixels)). ``image_features``: the ViT's, in place of ``pixel_values``."""
            # one row: with pixels it holds its image (the engine built it), so no mixed-batch branch
            images = pixel_values is not None or image_features is not None
            if keep_features:  # the ops the prefill runs on the pixels, as an output
                image_features = module.apply({"params": params}, pixel_values, method=CogVLM.encode_images)
                pixel_values = None
            logits, next_pos, cache = sampling.prefill(module, params, input_ids, token_type_ids, attention_mask,
                                                       pixel_values, self.new_cache(1), every_row_has_image=images,
                                                       image_features=image_features)
            # the bucket's padding gives its slots back: the answer has the whole rest of the slot
            pads = input_ids.shape[1] - jnp.sum(attention_mask, axis=1).astype(jnp.int32)
            cache = kv_cache.drop_left_padding(cache, pads)
            put = lambda full, row: _put_row(full, row, slot)  # noqa: E731
            state = state.replace(cache=jax.tree_util.tree_map(put, state.cache, cache))
            state, first = _start_row(state, put, logits, next_pos.astype(jnp.int32), temperature, top_k, top_p,
                                      seed)
            return state, ((first[0], image_features) if keep_features else first[0])

        return insert

    def _resume_program(self):
        module, mesh, out, cache_length = self.module, self.mesh, self._out, self.cache_length

        @functools.partial(rows.ByRows, rows=lambda params, state, k, v, prefix, ids, *a: ids.size, mesh=mesh,
                           module=module, donate_argnames=("state",), **out,
                           describe=lambda params, state, k, v, prefix, ids, *a: (
                               f"insert after a kept prefix ({k.shape[3]} kept slots, {ids.shape[1]} new tokens)"))
        def resume(module, params, state: Slots, k, v, prefix_length, input_ids, token_positions, length, slot,
                   temperature, top_k, top_p, seed):
            """The kept keys and values ``k``, ``v`` [1, N, K, P, E] (their first ``prefix_length`` slots) and
            then the prompt's text ``input_ids`` [1, L] (the first ``length`` real) into a one-row cache,
            put in ``slot`` with its first token chosen -> (state, the first token)."""
            cache = sampling.resumed_cache(k, v, prefix_length, cache_length)
            logits, cache = module.apply({"params": text_params(params)}, input_ids, token_positions,
                                         length[None], cache, method=CogVLM.extend)
            put = lambda full, row: _put_row(full, row, slot)  # noqa: E731
            state = state.replace(cache=jax.tree_util.tree_map(put, state.cache, cache))
            next_pos = jax.lax.dynamic_index_in_dim(token_positions[0], length - 1, keepdims=True) + 1
            state, first = _start_row(state, put, logits, next_pos, temperature, top_k, top_p, seed)
            return state, first[0]

        return resume

    def _decode_program(self):
        module, mesh, slots, chunk, out = self.module, self.mesh, self.slots, self.chunk, self._out

        @functools.partial(rows.ByRows, rows=lambda params, state, live, active: active, mesh=mesh,
                           module=module, donate_argnames=("state",), static_argnames=("active",), **out,
                           describe=lambda params, state, live, active: (
                               f"decode chunk ({active} of {slots} slots, {chunk} steps)"))
        def decode(module, params, state: Slots, live, active: int):
            """``chunk`` steps of the first ``active`` slots (static; the others are left as they are)
            -> (state, tokens [active, C]). ``live`` [S]: slots whose tokens are used (an idle slot never makes
            the chunk take the sampling branch)."""
            if active >= slots:
                return decode_steps(module, params, state, live, chunk)
            # a copy of those rows is decoded and written back: a cheap part of the chunk
            part, tokens = decode_steps(module, params, jax.tree_util.tree_map(lambda x: x[:active], state),
                                        live[:active], chunk)
            state = jax.tree_util.tree_map(lambda full, p: jax.lax.dynamic_update_slice_in_dim(full, p, 0, axis=0),
                                           state, part)
            # the rows past ``active`` are idle: their write index goes to 0, as an idle decoded row's does
            index = jnp.where(jnp.arange(slots) < active, state.cache.index, 0)
            return state.replace(cache=state.cache.replace(index=index)), tokens

        return decode

    def _mix_program(self):
        module, mesh, slots, out = self.module, self.mesh, self.slots, self._out

        @functools.partial(rows.ByRows, rows=lambda params, state, live, chunk_ids, *a: slots + chunk_ids.shape[0],
                           mesh=mesh, module=module, donate_argnames=("state",), **out,
                           describe=lambda params, state, live, chunk_ids, *a: (
                               f"chunked prefill step ({chunk_ids.shape[0]} prompt tokens, {slots} slots)"))
        def mix(module, params, state: Slots, live, chunk_ids, chunk_positions, chunk_len, slot, start, last,
                temperature, top_k, top_p, seed):
            """One decode step of every slot plus the next chunk [P] of ``slot``'s text prompt
            -> (state, (tokens [S], the prompt's first token)). ``last``: the chunk ends the prompt, so
            ``slot`` starts decoding from its first token (chosen as ``insert`` does)."""
            logits, chunk_logits, cache = module.apply(
                {"params": params}, state.token, state.position, state.cache, chunk_ids, chunk_positions, chunk_len,
                slot, start, method=chunked_prefill.mixed_step)
            # the prompt's slot keeps the index its next chunk starts at
            tok, state = next_tokens(state, logits, cache, live, jnp.arange(slots) == slot)
            begin = lambda full, row: jnp.where(last, _put_row(full, row, slot), full)  # noqa: E731
            next_pos = jax.lax.dynamic_index_in_dim(chunk_positions, jnp.maximum(chunk_len - 1, 0)) + 1
            state, first = _start_row(state, begin, chunk_logits[None], next_pos, temperature, top_k, top_p, seed)
            return state, (tok, first[0])

        return mix
