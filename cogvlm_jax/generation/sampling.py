"""Jitted generation: one prefill that fills a preallocated KV cache, then a ``lax.while_loop`` decode.

Static shapes: the caller left-pads prompts to a bucket length and fixes the cache length, so each
(bucket, cache length) compiles once. Temperature, top-k, top-p, the step limit and the seeds are traced
values: changing them never recompiles. The decode loop runs on device until every row has stopped or
``stop_at`` steps are done: no host round trip per token (streaming calls it again for the next chunk).
The serving engine's decode chunk runs the same model step (``decode_step``), and both check a request's
sampling settings with ``check_sampling``.

Axis legend: B batch, L prompt length, N max new tokens, V vocab.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.models import kv_cache, positions
from cogvlm_jax.models.cogvlm import CogVLM, text_params
from cogvlm_jax.parallel import program, rows
from cogvlm_jax.parallel.sharding import cache_shardings


INT32_MAX = 2**31 - 1  # top_k is an int32 on device
FLOAT32_MAX = 3.4028234663852886e38  # the largest temperature a float32 holds
SEED_RANGE = (-2**63, 2**63 - 1)  # seeds are int64 (jax.random.PRNGKey, OpenAI's seed)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def check_sampling(temperature, top_k=None, top_p=None, seed=None) -> None:
    """Raise ``InputError`` unless the settings are what the device programs can represent: temperature a
    finite number in [0, float32 max], top_k an integer in [0, 2**31 - 1], top_p a number in (0, 1] and
    seed an integer in int64's range (None: off / not given). Booleans, strings, NaN and inf are refused."""
    bad = []
    if temperature is not None and not (_is_real(temperature) and 0 <= temperature <= FLOAT32_MAX):
        bad.append(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and 0 <= top_k <= INT32_MAX):
        bad.append(f"top_k must be an integer in [0, {INT32_MAX}], got {top_k!r}")
    if top_p is not None and not (_is_real(top_p) and 0 < top_p <= 1):
        bad.append(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and not (_is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        bad.append(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed!r}")
    if bad:
        raise InputError("bad sampling settings: " + "; ".join(bad))


@flax.struct.dataclass
class SamplingParams:
    """Per-row sampling settings (all [B]); temperature 0 means greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0: off
    top_p: jax.Array  # 1.0: off
    key: jax.Array  # [B, 2] uint32 per-row PRNG keys; step s uses fold_in(key, s)

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=None, top_p=None, seed=0):
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))
        full = lambda v, dt: jnp.full((batch,), v, dt)  # noqa: E731
        return cls(full(temperature or 0.0, jnp.float32), full(top_k or 0, jnp.int32),
                   full(1.0 if top_p is None else top_p, jnp.float32), keys)


@flax.struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, N] generated ids, pad after a row stops
    logits: jax.Array  # [B, V] logits that will choose the next token
    step: jax.Array  # [] tokens generated so far
    done: jax.Array  # [B] row has stopped
    position: jax.Array  # [B] position id of the next token
    cache: kv_cache.KVCache
    sampling: SamplingParams
    chosen_logits: Any = None  # [B, N, V] when collected (tests), else None
    image_features: Any = None  # [B, I, D] the prefill's ViT features when asked for (a prefix cache keeps them)


TOP_CANDIDATES = 256  # tokens lax.top_k pre-selects per row before top-k / top-p filtering


def _keep_ranked(ranked, top_k, top_p, log_total):
    """Keep mask [B, C] over logits sorted descending (``ranked`` [B, C], a prefix of the whole sorted row
    or all of it): rank < top_k (0: off), then the probability ranked strictly above < top_p (>= 1: off).
    ``log_total`` [B]: log of the softmax denominator of what top-k keeps (over the whole row). The most
    likely token is always kept: a top_p that is 0 in float32 (any p below 1.4e-45) keeps it alone."""
    rank = jnp.arange(ranked.shape[-1])[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jnp.where(keep, jnp.exp(ranked - log_total[:, None]), 0.0)
    above = jnp.cumsum(probs, axis=-1) - probs
    return keep & ((top_p[:, None] >= 1.0) | (above < top_p[:, None]) | (rank == 0))


def _filter_by_sort(logits, top_k, top_p):
    """The whole vocabulary sorted: exact for any setting, but a full sort per step (slow on CPU)."""
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    kept = (top_k[:, None] <= 0) | (jnp.arange(logits.shape[-1])[None, :] < top_k[:, None])
    log_total = jax.nn.logsumexp(jnp.where(kept, ranked, -jnp.inf), axis=-1)
    keep_ranked = _keep_ranked(ranked, top_k, top_p, log_total)
    return jnp.zeros_like(keep_ranked).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_ranked)


def filter_logits(logits, top_k, top_p, candidates: int = TOP_CANDIDATES):
    """Mask (to -inf) what top-k [B] and top-p [B] exclude; 0 and >= 1.0 switch each off.

    top-p keeps the smallest set of most likely tokens whose probability reaches p: a token is kept iff
    the probability of the tokens ranked strictly above it is below p (ties rank the lower id first).

    ``lax.top_k`` picks the ``candidates`` most likely tokens of each row; that decides exactly when
    every row's cut falls among them (``1 <= top_k <= candidates``, or top-p reached within them, or
    both filters off). Only if some row's does not, the whole vocabulary is sorted (``lax.cond``: the
    sort runs only on such steps).
    """
    b, v = logits.shape
    c = min(candidates, v)
    ranked, ids = jax.lax.top_k(logits, c)
    k_within = (top_k >= 1) & (top_k <= c)
    k_off = (top_k <= 0) | (top_k >= v)
    first_k = jnp.where(jnp.arange(c)[None, :] < top_k[:, None], ranked, -jnp.inf)
    log_total = jnp.where(k_within, jax.nn.logsumexp(first_k, axis=-1), jax.nn.logsumexp(logits, axis=-1))
    keep = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], ids].set(_keep_ranked(ranked, top_k, top_p, log_total))
    keep |= (k_off & (top_p >= 1.0))[:, None]  # no filter: the whole row
    if c < v:
        mass = jnp.sum(jnp.exp(ranked - log_total[:, None]), axis=-1)  # of the candidates
        decided = k_within | (k_off & ((top_p >= 1.0) | (mass >= top_p)))
        keep = jax.lax.cond(jnp.all(decided), lambda: keep, lambda: _filter_by_sort(logits, top_k, top_p))
    return jnp.where(keep, logits, -jnp.inf)


def choose(logits, sp: SamplingParams, step, do_sample: bool):
    """Next token per row: argmax where temperature is 0, else a draw from the filtered distribution."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not do_sample:
        return greedy
    t = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
    # Shifted so that the largest is 0 before dividing: a tiny temperature (a float32 subnormal) sends the
    # rest to -inf, never to +inf or NaN, and the draw is the argmax (the softmax is shift-invariant).
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / t[:, None]
    filtered = filter_logits(scaled, sp.top_k, sp.top_p)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(sp.key)
    drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, filtered).astype(jnp.int32)
    return jnp.where(sp.temperature > 0, drawn, greedy)


def prefill(model: CogVLM, params, input_ids, token_type_ids, attention_mask, pixel_values, cache,
            every_row_has_image: bool = False, image_features=None):
    """Run the prompt, write it into ``cache``; -> (last logits [B, V], next positions [B], cache).
    ``every_row_has_image``, ``image_features`` (in place of ``pixel_values``): see ``CogVLM.__call__``."""
    logits, cache, _ = model.apply({"params": params}, input_ids, token_type_ids, attention_mask, pixel_values,
                                   cache=cache, last_only=True, every_row_has_image=every_row_has_image,
                                   image_features=image_features)
    next_pos = jnp.max(positions.position_ids(token_type_ids, attention_mask, model.config.position_span), axis=1) + 1
    return logits, next_pos, cache


def decode_step(model: CogVLM, params, token, position, cache):
    """One token per row through the model: ``token`` [B] at ``position`` [B], its keys and values written
    into ``cache`` -> (the logits that choose the next token [B, V], cache). Only the parameters it reads
    are handed in (``text_params``)."""
    return model.apply({"params": text_params(params)}, token, position, cache, method=CogVLM.decode_step)


def decode_one(model: CogVLM, params, s: DecodeState, eos_ids, pad_id, do_sample: bool) -> DecodeState:
    """One step of the decode loop: choose every row's next token from ``s.logits``, record it, and run it
    through the model (the new logits and the cache with its keys and values)."""
    tok = choose(s.logits, s.sampling, s.step, do_sample)
    tok = jnp.where(s.done, pad_id, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.step, axis=1)
    chosen = s.chosen_logits
    if chosen is not None:
        chosen = jax.lax.dynamic_update_slice_in_dim(chosen, s.logits[:, None], s.step, axis=1)
    done = s.done | jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32))
    logits, cache = decode_step(model, params, tok, s.position, s.cache)
    return s.replace(tokens=tokens, logits=logits, step=s.step + 1, done=done, position=s.position + 1,
                     cache=cache, chosen_logits=chosen)


def decode_loop(model: CogVLM, params, state: DecodeState, stop_at, eos_ids, pad_id, do_sample: bool):
    """Generate until ``state.step == stop_at`` or every row is done (eos or ``N`` tokens)."""
    n = state.tokens.shape[1]
    limit = jnp.minimum(stop_at, n)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, lambda s: decode_one(model, params, s, eos_ids, pad_id, do_sample), state)


def start_state(logits, next_pos, cache, sampling: SamplingParams, max_new_tokens: int, pad_id: int,
                collect_logits: bool = False) -> DecodeState:
    b = logits.shape[0]
    return DecodeState(
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32), logits=logits, step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((b,), bool), position=next_pos.astype(jnp.int32), cache=cache, sampling=sampling,
        chosen_logits=(jnp.zeros((b, max_new_tokens, logits.shape[-1]), logits.dtype) if collect_logits else None))


def _describe_start(params, input_ids, token_type_ids, attention_mask, pixel_values, sampling, *, max_new_tokens,
                    cache_length, collect_logits, every_row_has_image=False, image_features=None,
                    keep_features=False):
    b, n = input_ids.shape
    images = ", images" if pixel_values is not None else ", image features" if image_features is not None else ""
    return f"prefill ({b} x {n} tokens{images}, cache {cache_length})"


def _describe_resume(params, k, v, prefix, ids, *a, max_new_tokens, cache_length, collect_logits):
    return (f"prefill after a cached prefix ({ids.shape[0]} x {ids.shape[1]} new tokens, {k.shape[3]} kept slots, "
            f"cache {cache_length})")


def take_prefix(cache: kv_cache.KVCache, start, length: int):
    """The keys and values of row 0's slots ``start`` .. ``start + length`` [1, N, K, length, E] each (the
    slots rolled, so a ``length`` past the cache's end wraps round to slots that are never read)."""
    k, v = (jnp.roll(x[:1], -start, axis=3)[:, :, :, :length] for x in (cache.k, cache.v))
    return k, v


def resumed_cache(k, v, prefix_length, cache_length: int) -> kv_cache.KVCache:
    """A one-row cache of ``cache_length`` slots holding kept keys and values ``k``, ``v`` [1, N, K, P, E]
    (``take_prefix``), of which the first ``prefix_length`` (traced) are valid; the next write goes after them."""
    _, n, kh, p, e = k.shape
    full = kv_cache.init_cache(n, 1, cache_length, kh, e, k.dtype)
    k, v = (jax.lax.dynamic_update_slice_in_dim(buf, x[..., :min(p, cache_length), :], 0, axis=3)
            for buf, x in ((full.k, k), (full.v, v)))
    valid = (jnp.arange(cache_length) < prefix_length)[None]
    return full.replace(k=k, v=v, valid=valid, index=jnp.full((1,), prefix_length, jnp.int32))


def _describe_decode(params, state, stop_at, *, do_sample):
    b, n = state.tokens.shape
    return (f"decode loop ({b} row{'s' if b > 1 else ''}, cache {state.cache.length}, up to {n} tokens"
            f"{', sampling' if do_sample else ''})")


class Generator:
    """The jitted pair (prefill+start, decode loop) for one model; jax caches a compile per shape."""

    def __init__(self, model: CogVLM, eos_ids, pad_id: int, mesh=None, prefill_model: CogVLM | None = None):
        """``prefill_model``: the module the prefill (``start``) is traced with, if not ``model`` (one whose
        products multiply 16-bit operands, ``Execution.matmul_dtype``); the decode loop runs ``model``."""
        self.model = model
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)

        # rows.MIN_ROWS to rows.MAX_ROWS rows (batch x prompt bucket, or batch in decode) compile their own way
        # on CPU (few-row products, see rows.py): each program is given its variant of ``model``
        @functools.partial(rows.ByRows, rows=lambda params, input_ids, *a, **k: input_ids.size, mesh=mesh,
                           module=model if prefill_model is None else prefill_model,
                           static_argnames=("max_new_tokens", "cache_length", "collect_logits",
                                            "every_row_has_image", "keep_features"),
                           describe=_describe_start)
        def _start(model, params, input_ids, token_type_ids, attention_mask, pixel_values, sampling, *,
                   max_new_tokens, cache_length, collect_logits, every_row_has_image=False, image_features=None,
                   keep_features=False):
            """The prefilled ``DecodeState``. ``image_features``: the ViT's, in place of ``pixel_values``;
            ``keep_features``: the state holds the features the prefill computed (``DecodeState``)."""
            t = model.config.text
            cache = kv_cache.init_cache(t.num_layers, input_ids.shape[0], cache_length, t.num_kv_heads,
                                        t.head_dim, model.dtype)
            if mesh is not None:  # batch over data, kv heads over tensor
                cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
            images = pixel_values is not None or image_features is not None
            if keep_features and pixel_values is not None:  # the ops the prefill runs on the pixels, as an output
                image_features = model.apply({"params": params}, pixel_values, method=CogVLM.encode_images)
                pixel_values = None
            logits, next_pos, cache = prefill(model, params, input_ids, token_type_ids, attention_mask,
                                              pixel_values, cache, every_row_has_image and images, image_features)
            state = start_state(logits, next_pos, cache, sampling, max_new_tokens, self.pad_id, collect_logits)
            return state.replace(image_features=image_features) if keep_features else state

        # one row whose prompt begins with kept keys and values (``prefix_cache.py``): only the rest prefilled
        @functools.partial(rows.ByRows, rows=lambda params, k, v, prefix, ids, *a, **kw: ids.size, mesh=mesh,
                           module=model if prefill_model is None else prefill_model,
                           static_argnames=("max_new_tokens", "cache_length", "collect_logits"),
                           describe=_describe_resume)
        def _resume(model, params, k, v, prefix_length, input_ids, token_positions, lengths, sampling, *,
                    max_new_tokens, cache_length, collect_logits):
            cache = resumed_cache(k, v, prefix_length, cache_length)
            if mesh is not None:
                cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
            logits, cache = model.apply({"params": text_params(params)}, input_ids, token_positions, lengths, cache,
                                        method=CogVLM.extend)
            next_pos = jnp.take_along_axis(token_positions, lengths[:, None] - 1, axis=1)[:, 0] + 1
            return start_state(logits, next_pos, cache, sampling, max_new_tokens, self.pad_id, collect_logits)

        def _decode(model, params, state, stop_at, *, do_sample):
            return decode_loop(model, params, state, stop_at, self.eos_ids, self.pad_id, do_sample)

        self.start = _start
        self.resume = _resume
        self.take = program.jit(take_prefix, mesh, static_argnames=("length",),
                                describe=lambda cache, start, length: f"keep a prefix ({length} slots)")
        self.decode = rows.ByRows(_decode, lambda params, state, *a, **k: state.tokens.shape[0], mesh, module=model,
                                  static_argnames=("do_sample",), donate_argnames=("state",),
                                  describe=_describe_decode)
