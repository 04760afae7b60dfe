"""KV-cache generation: greedy ids equal to the reference, batching, sampling, compile counts, experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, cases, left_pad_batch

import cogvlm_jax
from cogvlm_jax.generation.sampling import filter_logits

TOL = 1e-4


def _gen_cases(family):
    return [c for c in cases(family) if c["max_new_tokens"] > 0]


def _single(case):
    a = case["arrays"]
    pv = a["pixel_values"][None] if "pixel_values" in a.files else None
    return a["input_ids"][None], a["token_type_ids"][None], a["attention_mask"][None], pv


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_and_logits_match_reference(family, f32_models):
    model = f32_models[family]
    worst = 0.0
    for case in _gen_cases(family):
        a = case["arrays"]
        n = case["max_new_tokens"]
        state = model.generate_state(*_single(case), max_new_tokens=n, collect_logits=True)
        np.testing.assert_array_equal(np.asarray(state.tokens[0]), a["generated_ids"], err_msg=case["name"])
        chosen = np.asarray(state.chosen_logits[0])[:, a["logits_columns"]]
        worst = max(worst, float(np.abs(chosen - a["generated_logits"]).max()))
        ids = model.generate(*_single(case), max_new_tokens=n)
        assert ids.shape == (1, n) and ids.dtype.kind == "i"
        np.testing.assert_array_equal(ids[0], a["generated_ids"])
    print(f"\n{family} generated_logits max abs error: {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_each_rows_ids(family, f32_models):
    model = f32_models[family]
    recs = _gen_cases(family)
    batch = left_pad_batch(recs, model.config.pad_token_id)
    ids = model.generate(*batch, max_new_tokens=8)
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(ids[i], r["arrays"]["generated_ids"], err_msg=r["name"])


def test_rows_stop_at_eos_and_pad_after(f32_models):
    model = f32_models["cogvlm1"]
    case = _gen_cases("cogvlm1")[0]
    first = int(case["arrays"]["generated_ids"][2])
    # Make the third greedy token the eos by reusing the model with that id declared as eos.
    gen = model._generator
    old = gen.eos_ids
    try:
        model._generator = type(gen)(model.module, (first,), model.config.pad_token_id)
        ids = model.generate(*_single(case), max_new_tokens=8)
    finally:
        model._generator = gen
    assert old == model.config.eos_token_ids
    np.testing.assert_array_equal(ids[0, :3], case["arrays"]["generated_ids"][:3])
    assert (ids[0, 3:] == model.config.pad_token_id).all()


def test_decode_reads_only_the_language_expert(f32_models):
    model = f32_models["cogvlm2"]
    case = _gen_cases("cogvlm2")[0]
    n = case["max_new_tokens"]
    state, do_sample, _ = model._start(*_single(case), n, 0.0, None, None, 0)
    poisoned = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, jnp.nan) if "vision" in jax.tree_util.keystr(path) else x, model.params)
    out = model._generator.decode(poisoned, state, jnp.int32(n), do_sample=False)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), case["arrays"]["generated_ids"])


def test_decode_reading_the_cache_in_blocks_keeps_ids_and_logits(f32_models, monkeypatch):
    """Decode attention walks the cache in blocks up to its filled part (``attention.attend_cache``); with
    7-slot blocks (several per cache, the last one shifted back to end at T since 7 does not divide the
    cache lengths, which are multiples of 16) the fixtures' ids and logits hold."""
    from cogvlm_jax.models import attention

    monkeypatch.setattr(attention, "CACHE_CHUNK", 7)
    base = f32_models["cogvlm2"]
    model = cogvlm_jax.Model(base.config, base.params, dtype="float32")  # a fresh jit traces with 7
    for case in _gen_cases("cogvlm2"):
        a = case["arrays"]
        state = model.generate_state(*_single(case), max_new_tokens=case["max_new_tokens"], collect_logits=True)
        assert state.cache.length > 2 * 7 and state.cache.length % 7
        np.testing.assert_array_equal(np.asarray(state.tokens[0]), a["generated_ids"], err_msg=case["name"])
        chosen = np.asarray(state.chosen_logits[0])[:, a["logits_columns"]]
        assert float(np.abs(chosen - a["generated_logits"]).max()) <= TOL


def test_sampling_is_seeded_and_top_k_1_is_greedy(f32_models):
    model = f32_models["cogvlm1"]
    case = _gen_cases("cogvlm1")[0]
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = model.generate(*_single(case), seed=3, **kw)
    b = model.generate(*_single(case), seed=3, **kw)
    c = model.generate(*_single(case), seed=4, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # 8 draws at temperature 1 over a near-uniform random model
    greedy = model.generate(*_single(case), max_new_tokens=8, temperature=0.7, top_k=1, seed=9)
    np.testing.assert_array_equal(greedy[0], case["arrays"]["generated_ids"])


@pytest.mark.parametrize("seed", range(5))
def test_top_p_keeps_smallest_set_reaching_p(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    p = rng.uniform(0.05, 0.99, size=4).astype(np.float32)
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), jnp.zeros(4, jnp.int32), jnp.asarray(p))))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for r in range(4):
        order = np.argsort(-probs[r])
        csum = np.cumsum(probs[r][order])
        k = int(np.searchsorted(csum, p[r]) + 1)  # smallest k with cumulative prob >= p
        assert set(np.flatnonzero(kept[r])) == set(order[:k].tolist())
    topk = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), jnp.full(4, 7, jnp.int32), jnp.ones(4))))
    assert (topk.sum(-1) == 7).all()


def _reference_keep(logits, top_k, top_p):
    """Top-k then top-p by a full stable sort in float64 (the definition ``filter_logits`` must meet)."""
    order = np.argsort(-logits, kind="stable")
    rank = np.arange(logits.size)
    keep = (top_k <= 0) | (rank < top_k)
    ranked = logits[order].astype(np.float64)
    probs = np.where(keep, np.exp(ranked - ranked[0]), 0.0)
    probs /= probs.sum()
    keep &= (top_p >= 1.0) | (np.cumsum(probs) - probs < top_p)
    out = np.zeros(logits.size, bool)
    out[order] = keep
    return out


@pytest.mark.parametrize("scale", [0.1, 3.0, 8.0], ids=["flat", "peaked", "very-peaked"])
def test_top_k_candidates_give_the_full_sort_answer(scale):
    """``filter_logits`` pre-selects 32 candidates with ``lax.top_k`` (the vocabulary here is 300) and
    sorts the whole row only when a row's cut may fall outside them: every setting (top-k off, inside,
    beyond the candidates, beyond the vocabulary; top-p off or on; a flat distribution whose top-p set is
    larger than the candidates) keeps exactly the reference's set, with rows of different settings mixed."""
    rng = np.random.default_rng(int(scale * 10))
    settings = [(k, p) for k in (0, 1, 7, 32, 40, 300, 500) for p in (0.3, 0.9, 1.0)]
    logits = (rng.normal(size=(len(settings), 300)) * scale).astype(np.float32)
    logits[:, 17] = logits[:, 18]  # a tie: the lower id ranks first
    top_k = jnp.asarray([k for k, _ in settings], jnp.int32)
    top_p = jnp.asarray([p for _, p in settings], jnp.float32)
    kept = np.isfinite(np.asarray(jax.jit(lambda l, k, p: filter_logits(l, k, p, candidates=32))(
        jnp.asarray(logits), top_k, top_p)))
    for row, (k, p) in enumerate(settings):
        want = _reference_keep(logits[row], k, p)
        assert np.array_equal(kept[row], want), (scale, k, p, int(kept[row].sum()), int(want.sum()))
        if 1 <= k <= 300 and p >= 1.0:
            assert kept[row].sum() == k
        if k == 0 and p >= 1.0:
            assert kept[row].all()


def test_one_compile_per_bucket(f32_models):
    model = cogvlm_jax.Model(f32_models["cogvlm1"].config, f32_models["cogvlm1"].params, dtype="float32")
    compiles = []
    # the model's two programs only: the first call in a process also compiles small eager ops (PRNG keys)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, fun_name="", **_k: compiles.append(fun_name)
        if event == "/jax/core/compile/backend_compile_duration" and fun_name in ("jit(_start)", "jit(_decode)")
        else None)
    rng = np.random.default_rng(0)
    for n in (3, 5, 9, 14, 16, 17, 30):  # buckets 16, 16, 16, 16, 16, 32, 32
        ids = rng.integers(3, 500, size=(1, n)).astype(np.int32)
        model.generate(ids, np.zeros_like(ids), np.ones_like(ids), max_new_tokens=4)
    # Each bucket compiles prefill+start and the decode loop once: 2 buckets x 2 programs.
    assert len(compiles) == 4, compiles


def test_bucket_length_steps_by_64_to_1024_then_by_eighths_of_an_octave():
    from cogvlm_jax.generation.buckets import bucket_length

    ns = (1, 16, 17, 33, 64, 65, 129, 193, 274, 1000, 1024, 1025, 1153, 2049, 2306, 4097)
    assert [bucket_length(n) for n in ns] == [16, 16, 32, 64, 64, 128, 192, 256, 320, 1024, 1024, 1152, 1280,
                                              2304, 2560, 4608]
    for n in range(65, 1025):  # padded by less than 64 tokens, to a multiple of 64
        assert bucket_length(n) % 64 == 0 and 0 <= bucket_length(n) - n < 64, n
    for n in range(1025, 9000):  # past 1024: by less than an eighth, to one of eight steps of the octave
        octave = 1 << (n - 1).bit_length()
        assert bucket_length(n) % (octave // 16) == 0 and 0 <= bucket_length(n) - n < n / 8, n
    buckets = sorted({bucket_length(n) for n in range(1, 8193)})
    assert all(bucket_length(b) == b for b in buckets)  # a padded prompt stays in its bucket
    assert len([b for b in buckets if b <= 1024]) == 18 and len([b for b in buckets if 2048 < b <= 4096]) == 8
    # the ladder passes the limit: padded less, to a multiple of 16, else not at all
    assert bucket_length(129, 192) == 192 and bucket_length(1025, 4096) == 1152  # fits: unchanged
    assert bucket_length(129, 191) == 144 and bucket_length(1025, 1100) == 1040  # a multiple of 16
    assert bucket_length(129, 140) == 129 and bucket_length(129, 129) == 129  # the prompt as it is
    assert bucket_length(129, 100) == 129  # does not fit at all: the caller's length check refuses it
    for limit in range(17, 300):
        got = {bucket_length(n, limit) for n in range(1, limit + 1)}
        assert all(n <= bucket_length(n, limit) <= limit for n in range(1, limit + 1)), limit
        assert len(got) <= 2 * limit.bit_length() + 8 + 16, (limit, sorted(got))  # few shapes, whatever the limit


def test_answer_length_holds_any_answer_of_its_bucket_in_one_shape():
    """The token buffer of an answer with no set maximum (the rest of the context): one size per prompt
    bucket, room for the answer of every prompt in it, no more than the bucket's shortest prompt needs."""
    from cogvlm_jax.generation.buckets import answer_length, bucket_length

    for context in (256, 300, 2048):
        by_bucket = {}
        for n in range(1, context):
            assert answer_length(n, context) >= context - n, (context, n)
            by_bucket.setdefault(bucket_length(n, context), set()).add(answer_length(n, context))
        assert all(len(sizes) == 1 for sizes in by_bucket.values()), (context, by_bucket)
        assert answer_length(1, context) == context - 1 and answer_length(context - 1, context) < context // 2


def test_generate_input_errors(f32_models):
    model = f32_models["cogvlm1"]
    ids = np.array([[1, 5, 6]])
    with pytest.raises(cogvlm_jax.InputError, match="left-padded"):
        model.generate(ids, np.zeros_like(ids), np.array([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(cogvlm_jax.InputError, match="exceeds max_length"):
        model.generate(ids, np.zeros_like(ids), np.ones_like(ids), max_new_tokens=model.config.context_length)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_inputs_and_chat_from_text(family, f32_models):
    import os

    from conftest import fixture_dir

    model = f32_models[family]
    for case in cases(family):
        a = case["arrays"]
        image = None if case["image"] is None else os.path.join(fixture_dir(family), "images", case["image"])
        x = model.build_inputs(case["query"], [tuple(h) for h in case["history"]], image, case["template"])
        for k in ("input_ids", "token_type_ids", "attention_mask"):
            np.testing.assert_array_equal(x[k], a[k], err_msg=f"{case['name']} {k}")
        if image is not None:
            np.testing.assert_allclose(x["pixel_values"], a["pixel_values"], atol=1e-5)
        if case["max_new_tokens"]:
            ids = [int(i) for i in a["generated_ids"]]
            stop = [i for i, t in enumerate(ids) if t in model.config.eos_token_ids]
            want = model.tokenizer.decode(ids[:stop[0]] if stop else ids)
            kw = dict(history=[tuple(h) for h in case["history"]], template=case["template"],
                      max_new_tokens=case["max_new_tokens"])
            assert model.chat(image, case["query"], **kw) == want
            assert "".join(model.stream(image, case["query"], chunk=3, **kw)) == want


def test_load_without_tokenizer_still_runs_ids():
    import os

    from conftest import fixture_dir

    model = cogvlm_jax.load(os.path.join(fixture_dir("cogvlm1"), "checkpoint"), progress=False)
    assert model.tokenizer is None  # CogVLM1 checkpoints ship none
    case = _gen_cases("cogvlm1")[0]
    np.testing.assert_array_equal(model.generate(*_single(case), max_new_tokens=8)[0],
                                  case["arrays"]["generated_ids"])
    with pytest.raises(cogvlm_jax.InputError, match="needs a tokenizer"):
        model.chat(None, "hello")


def test_bucket_length_pads_only_the_text_of_an_image_prompt():
    """``fixed`` tokens (an image's) are never padded: the text alone goes up the ladder, within the limit."""
    from cogvlm_jax.generation.buckets import answer_length, bucket_length

    assert bucket_length(274) == 320 and bucket_length(274, fixed=258) == 274  # 16 text tokens: bucket 16
    assert bucket_length(275, fixed=258) == 258 + 32 and bucket_length(258 + 65, fixed=258) == 258 + 128
    for fixed in (6, 258):
        for n in range(fixed + 1, fixed + 1100):
            b = bucket_length(n, fixed=fixed)
            assert b - fixed == bucket_length(n - fixed) and b >= n, (fixed, n)
        for limit in (fixed + 40, fixed + 200):  # near the limit: fixed + a multiple of 16, else the prompt
            for n in range(fixed + 1, limit + 1):
                b = bucket_length(n, limit, fixed)
                assert n <= b <= limit and (b == n or (b - fixed) % 16 == 0), (fixed, limit, n, b)
        context = fixed + 300
        by_bucket = {}
        for n in range(fixed + 1, context):
            by_bucket.setdefault(bucket_length(n, context, fixed), set()).add(answer_length(n, context, fixed))
            assert answer_length(n, context, fixed) >= context - n
        assert all(len(sizes) == 1 for sizes in by_bucket.values()), by_bucket
    assert bucket_length(10, fixed=0) == 16
    with pytest.raises(ValueError, match="fixed"):
        bucket_length(5, fixed=6)


def _image_cases(family):
    return [c for c in _gen_cases(family) if "pixel_values" in c["arrays"].files]


def test_first_streamed_token_comes_alone_and_image_prompts_pad_only_text(f32_models):
    """``generate_chunks`` yields the first token by itself (the time to it is the prefill's, not a chunk's),
    then chunks, the same ids as ``generate``; an image prompt's prefill is padded by its text alone."""
    model = f32_models["cogvlm1"]
    case = _image_cases("cogvlm1")[0]
    a = case["arrays"]
    pieces = list(model.generate_chunks(*_single(case), max_new_tokens=case["max_new_tokens"], chunk=3))
    assert [p.shape[1] for p in pieces][:2] == [1, 3], [p.shape for p in pieces]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1)[0], a["generated_ids"])
    from cogvlm_jax.generation.buckets import bucket_length, round_up

    m = case["max_new_tokens"]
    state = model._start(*_single(case), m, 0.0, None, None, 0)[0]  # the prefill generate_chunks ran
    n, fixed = len(a["input_ids"]), model.config.num_image_tokens
    assert state.cache.length == fixed + bucket_length(n - fixed) + round_up(m, 16), (state.cache.length, n)


# The first token's logits of a bfloat16 prefill (Model(prefill_dtype="bfloat16")) against the float32
# reference, largest over each family's image cases: the products' bfloat16 rounding (measured 2026-12-02
# on a CPU with native bfloat16 dots: cogvlm1 0.041, cogvlm2 0.047, text-only prompts 0.02-0.03). Each
# case must also stay inside the official code's own bfloat16 error on it (``bf16_max_abs_error``, 0.09-0.17).
BF16_PREFILL_BOUND = 0.06


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_prefill_stays_within_bfloat16_error(family, f32_models):
    """The prefill of 16-bit products reads bfloat16 copies of its kernels (the lm_head's and the decode
    loop's stay float32), chooses the reference's first token and is as close to the float32 reference as
    bfloat16 rounding allows. (The float32 path's ids and logits: test_greedy_ids_and_logits_match_reference.)"""
    f32 = f32_models[family]
    model = cogvlm_jax.Model(f32.config, f32.params, f32.tokenizer, prefill_dtype="bfloat16")
    kernels = {"/".join(str(getattr(k, "key", k)) for k in path): x.dtype
               for path, x in jax.tree_util.tree_flatten_with_path(model._prefill_params)[0]}
    assert kernels["lm_head/kernel"] == jnp.float32 and kernels["layers_0/mlp/vision_mlp/up_proj/kernel"] == jnp.bfloat16
    assert kernels["vision/transformer/layers_0/mlp/fc1/kernel"] == jnp.bfloat16
    assert model.params is f32.params
    recs = _image_cases(family)  # the image prompts, in one left-padded batch: one prefill compile
    state = model._start(*left_pad_batch(recs, f32.config.pad_token_id), 1, 0.0, None, None, 0)[0]  # its logits
    worst = 0.0
    for row, case in enumerate(recs):
        a = case["arrays"]
        err = float(np.abs(np.asarray(state.logits[row])[a["logits_columns"]] - a["generated_logits"][0]).max())
        assert err < case["bf16_max_abs_error"], (case["name"], err, case["bf16_max_abs_error"])
        assert int(np.argmax(state.logits[row])) == int(a["generated_ids"][0]), case["name"]
        worst = max(worst, err)
    print(f"\n{family} bfloat16 prefill: first-token logits max abs error vs float32 reference {worst:.4f}")
    assert worst <= BF16_PREFILL_BOUND
    with pytest.raises(ValueError, match="prefill_dtype"):
        cogvlm_jax.Model(f32.config, f32.params, prefill_dtype="float16")
