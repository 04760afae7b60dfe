"""Chunked prefill (``chunked_prefill.mixed_step``): prompts written 8 tokens at a time into rows of a
shared cache while other rows decode give the logits and greedy continuations of ``Model.forward`` /
``Model.generate`` alone, and the decoding rows get what a plain decode step gives them.

A prompt's chunked logits are the same function as its prefill computed with products of other shapes (the
cache read in another order than a prefill's own keys), which XLA:CPU's kernels round differently on
different CPUs: they are held to the bound two correct float32 runs of the model meet, measured in this run
(conftest ``reference``). A decoding row beside a chunk is held to 1e-5 of a plain decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogvlm_jax.generation import chunked_prefill
from cogvlm_jax.models import kv_cache
from cogvlm_jax.models.cogvlm import CogVLM

S, C, T = 3, 8, 38  # slots, chunk, cache length
DECODE_ROWS_ATOL = 1e-5  # a decoding row beside a chunk against a plain decode step: the same products per row


@pytest.fixture(scope="module")
def model(f32_models):
    return f32_models["cogvlm2"]


@pytest.fixture(scope="module")
def bound(reference):
    return reference["cogvlm2"][3]


@pytest.fixture(scope="module")
def steps(model):
    apply = lambda method: jax.jit(  # noqa: E731
        lambda params, *a: model.module.apply({"params": params}, *a, method=method))
    return apply(chunked_prefill.mixed_step), apply(CogVLM.decode_step)


def prompt(model, n: int) -> np.ndarray:
    ids = np.asarray(model.build_inputs("tell me about the sea and the sky, " * 8)["input_ids"], np.int32)[:n]
    assert len(ids) == n
    return ids


def alone(model, ids, new=6):
    """(last-token logits, greedy ids) of the prompt prefilled on its own."""
    x = (ids[None], np.zeros_like(ids)[None], np.ones_like(ids)[None])
    return np.asarray(model.forward(*x))[0, -1], np.asarray(model.generate(*x, max_new_tokens=new))[0]


def test_prompts_in_chunks_beside_decoding_rows(model, steps, bound):
    mixed, decode = steps
    t = model.config.text
    cache = kv_cache.init_cache(t.num_layers, S, T, t.num_kv_heads, t.head_dim, jnp.float32)
    tokens, pos = np.zeros(S, np.int32), np.zeros(S, np.int32)
    live = np.zeros(S, bool)

    def prefill(cache, ids, slot, decoding_ids):
        """Every chunk of ``ids`` into ``slot``; the live rows decode greedily meanwhile (their tokens
        appended to ``decoding_ids[row]``) -> (cache, the prompt's last logits)."""
        for start in range(0, len(ids), C):
            n = min(C, len(ids) - start)
            chunk = np.zeros(C, np.int32)
            chunk[:n] = ids[start:start + n]
            positions = np.zeros(C, np.int32)
            positions[:n] = np.arange(start, start + n)
            before = cache
            logits, last, cache = mixed(model.params, tokens, pos, cache, chunk, positions, np.int32(n),
                                        np.int32(slot), np.int32(start))
            if live.any():  # the decoding rows get a plain decode step's logits
                plain, _ = decode(model.params, tokens, pos, before)
                np.testing.assert_allclose(np.asarray(logits)[live], np.asarray(plain)[live], atol=DECODE_ROWS_ATOL)
            for row in np.flatnonzero(live):
                tokens[row] = int(np.argmax(logits[row]))
                pos[row] += 1
                decoding_ids[row].append(int(tokens[row]))
        assert int(cache.index[slot]) == len(ids)
        return cache, np.asarray(last)

    def start_decoding(slot, ids, last, decoding_ids):
        tokens[slot], pos[slot], live[slot] = int(np.argmax(last)), len(ids), True
        decoding_ids[slot] = [int(tokens[slot])]

    got = {}
    a, b, c = prompt(model, 20), prompt(model, 35), prompt(model, 7)
    (a_logits, a_ids), (b_logits, b_ids), (c_logits, _) = alone(model, a), alone(model, b), alone(model, c)

    cache, last = prefill(cache, a, 0, got)  # 3 chunks, the last one partial; the other rows idle
    np.testing.assert_allclose(last, a_logits, rtol=0, atol=bound)
    start_decoding(0, a, last, got)

    # 5 chunks while row 0 decodes; the last chunk (32..40) passes the cache's end (38): dropped, not clamped
    cache, last = prefill(cache, b, 1, got)
    np.testing.assert_allclose(last, b_logits, rtol=0, atol=bound)
    assert got[0] == a_ids.tolist()
    start_decoding(1, b, last, got)
    for _ in range(2):
        logits, cache = decode(model.params, tokens, pos, cache)
        for row in (0, 1):
            tokens[row] = int(np.argmax(logits[row]))
            pos[row] += 1
            got[row].append(int(tokens[row]))
    assert got[1] == b_ids[:3].tolist()

    # row 0 is taken by a shorter prompt (row 1 decodes on): nothing of row 0's former request may be attended
    live[0] = False
    cache, last = prefill(cache, c, 0, got)
    np.testing.assert_allclose(last, c_logits, rtol=0, atol=bound)
    valid = np.asarray(cache.valid[0])
    assert valid[:len(c)].all() and not valid[len(c):].any()
