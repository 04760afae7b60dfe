"""The prefix cache: which leading tokens a kept entry may stand for, its byte bound, and that a prompt
prefilled after kept keys and values answers what the whole prompt's prefill answers, in ``Model.chat``,
in the serving engine and through the server's usage."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cases, fixture_dir

import cogvlm_jax
from cogvlm_jax.generation.prefix_cache import MIN_REUSE, Entry, PrefixCache, image_digests, reusable_length
from cogvlm_jax.models import kv_cache
from cogvlm_jax.models.cogvlm import CogVLM
from cogvlm_jax.models.positions import position_ids
from cogvlm_jax.parallel.axes import make_mesh
from cogvlm_jax.serving.engine import Engine

IMG0 = os.path.join(fixture_dir("cogvlm2"), "images", "img0.png")
IMG1 = os.path.join(fixture_dir("cogvlm2"), "images", "img1.png")
Q1, Q2, Q3 = "What is in the picture?", "And what colour is it?", "Say it once more."


# ----------------------------------------------------------------------------------------- host rules
def _prompt(n_text_before, image, n_text_after, base=100):
    """ids and types: ``n_text_before`` text tokens, an image span of 4 if ``image``, then text."""
    ids = list(range(base, base + n_text_before)) + ([7] * 4 if image else []) + \
        list(range(base + 50, base + 50 + n_text_after))
    types = [0] * n_text_before + ([1] * 4 if image else []) + [0] * n_text_after
    return np.array(ids, np.int32), np.array(types, np.int32)


def _entry(ids, types, images=()):
    return Entry(np.asarray(ids, np.int32), np.asarray(types, np.int32), tuple(images), None, 0)


def test_reuse_is_the_common_prefix_cut_at_a_changed_image_and_ended_on_text():
    ids, tt = _prompt(1, True, 40)
    a, b = b"a" * 16, b"b" * 16
    kept = _entry(ids[:30], tt[:30], (a,))
    assert reusable_length(ids, tt, (a,), kept, 4) == 30
    # another picture in the same span: nothing before it but bos, fewer than MIN_REUSE tokens
    assert reusable_length(ids, tt, (b,), kept, 4) == 0
    # the prompt differs from token 20 on: the 20 before it
    other = ids.copy()
    other[20] += 1
    assert reusable_length(other, tt, (a,), kept, 4) == 20
    # an entry holding the whole prompt stands for all but its last token (whose logits choose the answer)
    assert reusable_length(ids, tt, (a,), _entry(ids, tt, (a,)), 4) == len(ids) - 1
    # the same ids with other token types are other tokens
    flipped = tt.copy()
    flipped[25] = 1
    assert reusable_length(ids, flipped, (a,), kept, 4) == 0  # its rest would hold an image token


def test_reuse_never_ends_in_an_image_span_nor_leaves_image_tokens_to_prefill():
    ids, tt = _prompt(MIN_REUSE + 4, True, 10)
    a = b"a" * 16
    start = MIN_REUSE + 4  # the image's first token
    for end in range(start + 1, start + 5):  # an entry ending inside or at the end of the span
        assert reusable_length(ids, tt, (a,), _entry(ids[:end], tt[:end], (a,)), 4) == 0, end
    # ending right before the image would leave its tokens to the text-only extension: nothing reused
    assert reusable_length(ids, tt, (a,), _entry(ids[:start], tt[:start], ()), 4) == 0
    assert reusable_length(ids, tt, (a,), _entry(ids[:start + 6], tt[:start + 6], (a,)), 4) == start + 6
    short = _entry(ids[:MIN_REUSE - 1], tt[:MIN_REUSE - 1])
    assert reusable_length(ids, tt, (a,), short, 4) == 0


def test_the_byte_bound_drops_the_least_recently_used_and_extended_entries():
    dropped = []
    cache = PrefixCache(300, 4, on_evict=dropped.append)
    ids, tt = _prompt(60, False, 0)
    cache.put(ids[:20], tt[:20], (), "a20", 100)
    cache.put(ids[:40], tt[:40], (), "a40", 100)  # extends a20: a20 goes
    assert dropped == ["a20"] and len(cache) == 1
    assert cache.put(ids[:30], tt[:30], (), "a30", 100) is None and dropped[-1] == "a30"  # a40 holds it
    other, _ = _prompt(60, False, 0, base=300)
    cache.put(other[:20], tt[:20], (), "b", 100)
    cache.put_features(b"x" * 16, "img", 100)
    assert cache.bytes == 300 and len(cache) == 3
    assert cache.match(ids, tt)[0].value == "a40"  # used: now the most recent
    cache.put(other[:50] + 1000, tt[:50], (), "c", 100)  # over the bound: the least recently used goes
    assert dropped[-1] == "b" and cache.bytes == 300 and cache.stats()["evicted"] == 1
    assert cache.put(ids[:50] + 2000, tt[:50], (), "huge", 301) is None and dropped[-1] == "huge"
    assert cache.features(b"x" * 16) == "img" and cache.features(b"y" * 16) is None
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0 and set(dropped) >= {"a40", "c", "img"}


def test_image_digests_tell_pictures_apart():
    a = np.zeros((2, 3, 4, 4), np.float32)
    a[1, 0, 0, 0] = 1.0
    d = image_digests(a)
    assert len(d) == 2 and d[0] != d[1] and image_digests(a[0]) == d[:1] and image_digests(None) == ()


# ----------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("fam", ["cogvlm1", "cogvlm2"])
def test_extend_after_a_prefix_gives_the_whole_prompts_logits(fam, f32_models, reference):
    """Every case's prompt prefilled up to a cut on text (after its image), the rest appended by
    ``CogVLM.extend``, right padded, each row its own number of new tokens, in one batch: the last logits
    are the whole prompt's within two float32 runs' distance, and each row's cache holds its tokens."""
    model = f32_models[fam]
    _, logits, _, bound = reference[fam]
    t, recs = model.config.text, cases(fam)
    rows = []
    for rec in recs:
        a = rec["arrays"]
        ids, tt, am = (np.asarray(a[k], np.int32) for k in ("input_ids", "token_type_ids", "attention_mask"))
        n = len(ids)
        after_image = int(np.flatnonzero(tt)[-1]) + 2 if tt.any() else 1
        cut = max(n - 3, after_image)
        assert cut < n and tt[cut - 1] == 0, rec["name"]
        pos = np.asarray(position_ids(tt[None], am[None], model.config.position_span))[0]
        rows.append((ids, tt, am, pos, cut))
    b, width = len(rows), max(c for *_, c in rows)
    pre = np.full((b, width), model.config.pad_token_id, np.int32)
    pre_tt, pre_am = np.zeros((b, width), np.int32), np.zeros((b, width), np.int32)
    rest, rest_pos, lengths = np.zeros((b, 8), np.int32), np.zeros((b, 8), np.int32), np.zeros(b, np.int32)
    pix = None
    for i, ((ids, tt, am, pos, cut), rec) in enumerate(zip(rows, recs)):
        pre[i, width - cut:], pre_tt[i, width - cut:], pre_am[i, width - cut:] = ids[:cut], tt[:cut], am[:cut]
        lengths[i] = len(ids) - cut
        rest[i, :lengths[i]], rest_pos[i, :lengths[i]] = ids[cut:], pos[cut:]
        if "pixel_values" in rec["arrays"].files:
            pv = rec["arrays"]["pixel_values"]
            pix = np.zeros((b,) + pv.shape, np.float32) if pix is None else pix
            pix[i] = pv

    @jax.jit
    def run(params, pre, pre_tt, pre_am, pix, rest, rest_pos, lengths):
        cache = kv_cache.init_cache(t.num_layers, b, width + 8, t.num_kv_heads, t.head_dim, jnp.float32)
        _, cache, _ = model.module.apply({"params": params}, pre, pre_tt, pre_am, pix, cache=cache, last_only=True)
        return model.module.apply({"params": params}, rest, rest_pos, lengths, cache, method=CogVLM.extend)

    ext, cache = run(model.params, pre, pre_tt, pre_am, pix, rest, rest_pos, lengths)
    assert np.array_equal(np.asarray(cache.index), width + lengths)
    assert np.array_equal(np.asarray(cache.valid.sum(axis=1)), [len(r[0]) for r in rows])
    err = np.abs(np.asarray(ext) - logits[:, -1]).max(axis=1)
    assert np.all(err <= bound), (err, bound)


def _fresh(base, **kw):
    """A model with its own programs and prefix cache over ``base``'s parameters."""
    return cogvlm_jax.Model(base.config, base.params, base.tokenizer, **kw)


def test_a_follow_up_turn_prefills_only_its_new_tokens_and_answers_the_same(f32_models):
    base = f32_models["cogvlm2"]
    cached, plain = _fresh(base), _fresh(base, prefix_cache_bytes=0)
    history = []
    for turn, query in enumerate((Q1, Q2, Q3)):
        want = plain.chat(IMG0, query, history, max_new_tokens=6)
        got = cached.chat(IMG0, query, history, max_new_tokens=6)
        assert got == want, (turn, got, want)
        if turn:
            # the kept prompt and answer of the turn before stand for at least that prompt
            before = len(base.build_inputs(history[-1][0], history[:-1], IMG0)["input_ids"])
            assert cached.last_cached_tokens >= before, (turn, cached.last_cached_tokens, before)
        else:
            assert cached.last_cached_tokens == 0
        history.append((query, got))
    stats = cached.prefix_cache.stats()
    # a random model's answers re-tokenize differently, so each turn keeps an entry of its own
    assert stats["hits"] == 2 and stats["images"] == 1, stats


def test_a_new_question_about_kept_pictures_skips_the_vit(f32_models):
    base = f32_models["cogvlm2"]
    cached, plain = _fresh(base), _fresh(base, prefix_cache_bytes=0)
    pixels = []  # the pixels each prefill ran the ViT on
    start = cached._generator.start
    cached._generator.start = lambda params, ids, tt, am, pv, *a, **k: pixels.append(pv) or start(
        params, ids, tt, am, pv, *a, **k)
    assert cached.chat([IMG0, IMG1], Q1, max_new_tokens=4) == plain.chat([IMG0, IMG1], Q1, max_new_tokens=4)
    assert pixels[-1] is not None and cached.prefix_cache.stats()["images"] == 2
    # the spans the other way round: no prefix in common past bos, but both pictures' features are kept
    assert cached.chat([IMG1, IMG0], Q1, max_new_tokens=4) == plain.chat([IMG1, IMG0], Q1, max_new_tokens=4)
    assert len(pixels) == 2 and pixels[-1] is None and cached.last_cached_tokens == 0


def test_eviction_under_a_small_byte_bound_keeps_answers_correct(f32_models):
    base = f32_models["cogvlm2"]
    plain = _fresh(base, prefix_cache_bytes=0)
    t = base.config.text
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 4
    small = _fresh(base, prefix_cache_bytes=per_token * 48)  # one first turn's keys and values, not two
    talks = {"a": (IMG0, []), "b": (IMG1, [])}
    for name in ("a", "b", "a", "b", "a"):
        image, history = talks[name]
        got = small.chat(image, Q1 if not history else Q2, history, max_new_tokens=5)
        assert got == plain.chat(image, Q1 if not history else Q2, history, max_new_tokens=5)
        history.append((Q1 if not history else Q2, got))
        assert small.prefix_cache.bytes <= small.prefix_cache.max_bytes
    assert small.prefix_cache.stats()["evicted"] > 0


# ----------------------------------------------------------------------------------------- serving
def _conversation(engine, model, image, turns, max_tokens=6):
    """Each query asked after the ones before, with their answers -> [(answer, last event)]."""
    history, out = [], []
    for query in turns:
        text, ev = engine.complete(model.build_inputs(query, history, image), max_tokens)
        assert ev.error is None, ev.error
        out.append((text, ev))
        history.append((query, text))
    return out


@pytest.fixture(scope="module")
def engines(f32_models):
    model = f32_models["cogvlm2"]
    with Engine(model, slots=2, max_length=256) as cached, Engine(model, slots=2, max_length=256,
                                                                  prefix_cache_bytes=0) as plain:
        yield cached, plain


def test_the_engine_resumes_a_conversation_and_answers_as_without_the_cache(f32_models, engines):
    model = f32_models["cogvlm2"]
    cached, plain = engines
    got = _conversation(cached, model, IMG0, (Q1, Q2, Q3))
    want = _conversation(plain, model, IMG0, (Q1, Q2, Q3))
    assert [t for t, _ in got] == [t for t, _ in want]
    assert got[0][1].cached_tokens == 0 and all(ev.cached_tokens == 0 for _, ev in want)
    assert all(ev.cached_tokens > 0 for _, ev in got[1:]), [ev.cached_tokens for _, ev in got]
    # what the engine holds on device is what its index holds
    assert len(cached._kept) == len(cached.prefix_cache), (len(cached._kept), len(cached.prefix_cache))
    # a text conversation too (a first question long enough to be worth keeping), the answers Model.chat gives
    q1 = Q1 + " Look at it closely, then say what you see."
    text = _conversation(cached, model, None, (q1, Q2))
    assert text[1][1].cached_tokens > 0
    assert text[1][0] == _fresh(model, prefix_cache_bytes=0).chat(None, Q2, [(q1, text[0][0])], max_new_tokens=6)


def test_the_engine_evicts_under_a_small_bound_and_stays_correct(f32_models, engines):
    model = f32_models["cogvlm2"]
    _, plain = engines
    t = model.config.text
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 4
    with Engine(model, slots=2, max_length=256, prefix_cache_bytes=per_token * 48) as small:
        for image in (IMG0, IMG1, IMG0):
            got = _conversation(small, model, image, (Q1, Q2))
            assert [a for a, _ in got] == [a for a, _ in _conversation(plain, model, image, (Q1, Q2))]
            assert small.prefix_cache.bytes <= small.prefix_cache.max_bytes
        stats = small.stats()["prefix_cache"]
        assert stats["evicted"] > 0 and stats["hits"] >= 3, stats
        assert len(small._kept) == len(small.prefix_cache)


def test_a_second_turn_on_a_live_server_reports_cached_tokens(f32_models, engines):
    openai = pytest.importorskip("openai")
    from cogvlm_jax.serving.server import BackgroundServer, ServerConfig
    from test_serve import messages

    answers = {}
    for name, engine in zip(("cached", "plain"), engines):
        with BackgroundServer(engine, ServerConfig("tiny"), manage_engine=False) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
            first = client.chat.completions.create(model="tiny", messages=messages(Q1, IMG1), max_tokens=6,
                                                   temperature=0)
            a1 = first.choices[0].message.content
            second = client.chat.completions.create(model="tiny", messages=messages(Q2, IMG1, [(Q1, a1)]),
                                                    max_tokens=6, temperature=0)
            stream = client.chat.completions.create(model="tiny", messages=messages(Q2, IMG1, [(Q1, a1)]),
                                                    max_tokens=6, temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
            chunks = list(stream)
            answers[name] = (a1, second.choices[0].message.content,
                             "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            cached = (first.usage.prompt_tokens_details.cached_tokens,
                      second.usage.prompt_tokens_details.cached_tokens,
                      chunks[-1].usage.prompt_tokens_details.cached_tokens)
            if name == "cached":
                assert cached[0] == 0 and 0 < cached[1] < second.usage.prompt_tokens and cached[2] > 0, cached
            else:
                assert cached == (0, 0, 0)
    assert answers["cached"] == answers["plain"], answers


def test_the_engine_keeps_and_resumes_on_a_megatron_mesh(f32_models):
    """On a mesh the kept keys and values are sharded as the slots' cache is: the same answers."""
    base = f32_models["cogvlm2"]
    sharded = cogvlm_jax.Model(base.config, base.params, base.tokenizer, mesh=make_mesh(1, 1, 2,
                               devices=jax.devices()[:2]), layout="megatron", prefix_cache_bytes=0)
    answers = {}
    for name, model in (("one device", base), ("megatron", sharded)):
        with Engine(model, slots=2, max_length=128) as eng:
            got = _conversation(eng, base, IMG0, (Q1, Q2))
            answers[name] = [a for a, _ in got]
            assert got[1][1].cached_tokens > 0
    assert answers["megatron"] == answers["one device"], answers


def test_chat_keeps_and_resumes_on_a_mesh(f32_models):
    """``Model.chat`` on a mesh that splits the batch and the kv heads: the kept keys and values and the
    resumed row are sharded arrays; the answers are one device's."""
    base = f32_models["cogvlm2"]
    plain = _fresh(base, prefix_cache_bytes=0)
    sharded = cogvlm_jax.Model(base.config, base.params, base.tokenizer, mesh=make_mesh(2, 1, 2,
                               devices=jax.devices()[:4]))
    history = []
    for query in (Q1, Q2):
        got = sharded.chat(IMG0, query, history, max_new_tokens=5)
        assert got == plain.chat(IMG0, query, history, max_new_tokens=5)
        history.append((query, got))
    assert sharded.last_cached_tokens > 0
    (entry,) = [e for key, (e, _) in sharded.prefix_cache._items.items() if key[0] == "kv"][-1:]
    assert len(entry.value[0].sharding.device_set) == 4
