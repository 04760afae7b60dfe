"""The train step on the tiny CogVLM1 fixture: schedule, masks, accumulation, remat, LoRA, sharding, resume.

Most comparisons use AdamW with ``eps=1`` and no clipping or decay (``LINEAR``): Adam's first update is then
``lr * g / (|g| + 1)`` elementwise, which is 1-Lipschitz in g, so two runs whose parameters agree after a
step had gradients that agree at least as closely. (With the usual eps=1e-8 the first update is about
``lr * sign(g)`` and any two float orderings of a near-zero gradient differ by 2 * lr.) Differences are
reported relative to the largest parameter update, i.e. like a gradient error relative to its max (the
fixtures' gradient tolerance is 1e-4 in those terms); lr=1 makes the updates large against the float32
spacing of the parameters themselves, and only one step is compared (later steps amplify differences).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import numpy as np
import pytest
from conftest import LINEAR_TRAIN, host_flat, train_batches
from flax.traverse_util import flatten_dict

from cogvlm_jax.training import lora
from cogvlm_jax.training import trainer as train

LINEAR = train.TrainConfig(**LINEAR_TRAIN)


@pytest.fixture(scope="module")
def env(tmp_path_factory, f32_models):
    d = tmp_path_factory.mktemp("train")
    model = f32_models["cogvlm1"]
    batches = train_batches(d, model)
    assert batches.buckets == (32,) and batches.steps_per_epoch == 2
    return d, model, batches


def _steps(trainer, state, frozen, batches, ks):
    losses = []
    for k in ks:
        state, m = trainer.step(state, frozen, trainer.place_batch(batches.batch(k)))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def reference(env):
    """Two LINEAR full-model steps on one device, from the fixture's parameters."""
    _, model, batches = env
    tr = train.Trainer(model.config, LINEAR)
    state, frozen = tr.init(model.params)
    state, losses = _steps(tr, state, frozen, batches, [0])
    after1 = host_flat(state.trainable)
    state, more = _steps(tr, state, frozen, batches, [1])
    return {"before": host_flat(model.params), "after1": after1, "losses": losses + more}


def _every_leaf(state):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}


def _max_diff(a, b, paths=None):
    return max(float(np.abs(np.asarray(a[p], np.float64) - np.asarray(b[p], np.float64)).max())
               for p in (paths or a))


def _rel_diff(a, ref, paths=None):
    """Largest difference between two parameter trees after training, over the largest update in ``ref``."""
    paths = list(paths or a)
    return _max_diff(a, ref["after1"], paths) / _max_diff(ref["after1"], ref["before"], paths)


# ------------------------------------------------------------------------------------------ schedule
def test_schedule_warmup_then_cosine():
    cfg = train.TrainConfig(learning_rate=2e-3, warmup_steps=4, total_steps=14, end_lr_ratio=0.1)
    lr = [float(train.lr_schedule(cfg)(t)) for t in range(16)]  # optax count t = the (t+1)-th step
    np.testing.assert_allclose(lr[:4], [5e-4, 1e-3, 1.5e-3, 2e-3], rtol=1e-6)  # no step with lr 0
    # The cosine runs from the peak at step 4 to the end value at step 15, one past the last: half-way at 9.5.
    np.testing.assert_allclose(lr[8], 2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 11)), rtol=1e-6)
    np.testing.assert_allclose(lr[13], 2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 10 / 11)), rtol=1e-6)
    assert lr[13] > 2e-4 * 1.1  # the last step (14) trains above the end value
    np.testing.assert_allclose(lr[14:], [2e-4] * 2, rtol=1e-6)  # the end value after the run
    assert all(a > b for a, b in zip(lr[3:14], lr[4:15]))
    # Without warmup the first step is at the peak; with end_lr_ratio 0 every step of the run has lr > 0, in
    # float32 too, for one step, a few, and a long run (where (1 + cos) / 2 would round to 0 at the end).
    no_warmup = dataclasses.replace(cfg, warmup_steps=0)
    np.testing.assert_allclose(float(train.lr_schedule(no_warmup)(0)), 2e-3, rtol=1e-6)
    for total, warm in ((1, 0), (1, 1), (2, 0), (3, 3), (7, 2), (100_000, 0), (1_000_000, 10)):
        c = dataclasses.replace(cfg, warmup_steps=warm, total_steps=total, end_lr_ratio=0.0)
        counts = np.unique(np.r_[np.arange(min(total, 50)), np.arange(max(total - 50, 0), total)])
        rates = np.asarray(jax.vmap(train.lr_schedule(c))(counts))
        assert rates.dtype == np.float32 and (rates > 0).all(), (total, warm, rates.min())
        assert float(train.lr_schedule(c)(total)) == 0.0  # one past the last step: the end value
    np.testing.assert_allclose(float(train.lr_schedule(dataclasses.replace(cfg, total_steps=1, warmup_steps=0))(0)),
                               2e-3, rtol=1e-6)  # a one-step run trains at the peak
    with pytest.raises(ValueError, match="warmup_steps"):
        train.TrainConfig(warmup_steps=5, total_steps=4)
    # Settings that would train silently wrong: negative decay grows the weights, a negative clip norm would
    # pass for "off" (0 is), a zero epsilon divides by zero, b1/b2 outside [0, 1) never forget or diverge.
    for bad in (dict(weight_decay=-0.1), dict(max_grad_norm=-1.0), dict(eps=0.0), dict(b1=1.0), dict(b2=-0.5),
                dict(lora_rank=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            train.TrainConfig(**bad)


# ------------------------------------------------------------------------------------------ masks
def test_vision_expert_mask_names(env):
    _, model, _ = env
    mask = {"/".join(p) for p, v in flatten_dict(train.trainable_mask(model.params, "vision-expert")).items() if v}
    for name in ("layers_0/self_attn/vision_expert_query_key_value/kernel",
                 "layers_1/self_attn/vision_expert_dense/kernel",
                 "layers_0/mlp/vision_mlp/gate_proj/kernel", "layers_1/mlp/vision_mlp/down_proj/kernel",
                 "vision/linear_proj/linear_proj/kernel", "vision/linear_proj/norm1/scale", "vision/boi", "vision/eoi"):
        assert name in mask, name
    for name in mask:
        assert "language" not in name and not name.startswith(("vision/transformer", "vision/patch_embedding",
                                                                "embed_tokens", "lm_head", "norm"))
    assert not any("layernorm" in n for n in mask)


def test_vision_expert_mask_cogvlm2(f32_models):
    """CogVLM2 adds the 2x2 conv to the adapter and a bias to the vision expert's QKV."""
    params = f32_models["cogvlm2"].params
    mask = {"/".join(p) for p, v in flatten_dict(train.trainable_mask(params, "vision-expert")).items() if v}
    assert {"vision/conv/kernel", "vision/conv/bias", "layers_1/self_attn/vision_expert_query_key_value/bias"} <= mask
    full = flatten_dict(train.trainable_mask(params, "full"))
    assert all(full.values()) and len(full) == len(flatten_dict(params))


def test_lora_targets_by_pattern(env):
    _, model, _ = env
    paths = lora.target_paths(model.params, lora.DEFAULT_TARGETS)
    assert sorted("/".join(p) for p in paths) == sorted(
        f"layers_{i}/self_attn/{e}_expert_{w}" for i in range(2) for e in ("language", "vision")
        for w in ("query_key_value", "dense"))
    with pytest.raises(ValueError, match="'layers_\\*/mlp/up' match no linear layer"):
        lora.target_paths(model.params, ["layers_*/mlp/up"])


# ------------------------------------------------------------------------------------------ the step
def test_accumulation_equals_whole_batch(env, reference):
    """accum=2 sums each micro-batch's cross-entropy over the whole batch's token count: the micro-batches
    here hold different numbers of labelled tokens, so a mean of means would differ."""
    _, model, batches = env
    b = batches.batch(0)
    half = [int((b["labels"][i:i + 2, 1:] != -100).sum()) for i in (0, 2)]
    assert half[0] != half[1]
    tr = train.Trainer(model.config, dataclasses.replace(LINEAR, accum=2))
    state, frozen = tr.init(model.params)
    state, losses = _steps(tr, state, frozen, batches, [0])
    rel = abs(losses[0] - reference["losses"][0]) / reference["losses"][0]
    diff = _rel_diff(host_flat(state.trainable), reference)
    print(f"\naccum=2 vs one batch: loss rel {rel:.1e}, parameters after a step {diff:.1e} of the largest update")
    assert rel <= 1e-6 and diff <= 1e-5


def test_vision_expert_with_remat(env, reference):
    """Only the vision expert and adapter move; everything else stays bit-identical and has no optimizer
    state; with remat the loss and the trained leaves equal the full-model step's (same gradients)."""
    _, model, batches = env
    tr = train.Trainer(model.config, dataclasses.replace(LINEAR, trainable="vision-expert", remat=True))
    state, frozen = tr.init(model.params)
    n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt == 2 * n_train + 2  # Adam's mu and nu of the trainable leaves, its count, the schedule's count
    state, losses = _steps(tr, state, frozen, batches, [0])
    assert abs(losses[0] - reference["losses"][0]) <= 1e-6 * reference["losses"][0]
    before, after = host_flat(model.params), host_flat(tr.params(state, frozen))
    trained = [p for p in before if train.is_vision_expert(p)]
    assert 0 < len(trained) < len(before)
    # The last layer's vision-expert dense and MLP only make image positions' outputs, which no label reads:
    # their gradient is exactly zero, so they stay too.
    last = f"layers_{model.config.text.num_layers - 1}"
    unread = {p for p in trained if p[0] == last and p[2] in ("vision_mlp", "vision_expert_dense")}
    assert len(unread) == 4
    for p in before:
        if train.is_vision_expert(p) and p not in unread:
            assert not np.array_equal(after[p], before[p]), p
        else:
            assert after[p].dtype == before[p].dtype and np.array_equal(after[p], before[p]), p
    diff = _rel_diff(after, reference, trained)
    print(f"\nvision-expert + remat vs full step, trained leaves: {diff:.1e} of the largest update")
    assert diff <= 1e-5


def _forward(module, with_lora: bool, scale=1.0):
    if with_lora:
        def f(params, factors, ids, tt, am, pv):
            with lora.applied(scale):
                return module.apply({"params": params, lora.COLLECTION: factors}, ids, tt, am, pv)[0]
        return jax.jit(f)
    return jax.jit(lambda params, ids, tt, am, pv: module.apply({"params": params}, ids, tt, am, pv)[0])


def test_lora_trains_factors_only_and_merges_exactly(env, reference):
    _, model, batches = env
    cfg = dataclasses.replace(LINEAR, trainable="lora", lora_rank=4, lora_alpha=8.0)
    tr = train.Trainer(model.config, cfg)
    state, frozen = tr.init(model.params, seed=1)
    base = host_flat(model.params)
    assert set(host_flat(state.trainable)) == {p + (k,) for p in lora.target_paths(model.params, cfg.lora_targets)
                                           for k in (lora.A, lora.B)}
    state, losses = _steps(tr, state, frozen, batches, [0, 1])
    assert abs(losses[0] - reference["losses"][0]) <= 1e-6 * reference["losses"][0]  # lora_b = 0: the base model
    assert losses[1] != reference["losses"][1]
    for p, v in host_flat(frozen).items():  # the frozen base is the same, bit for bit
        assert np.array_equal(v, base[p]), p
    factors = jax.device_get(state.trainable)
    moved = [p for p, v in flatten_dict(factors).items() if p[-1] == lora.B and np.abs(v).max() > 0]
    # all but the last layer's vision_expert_dense, whose outputs (image positions) no label reads
    assert len(moved) == len(lora.target_paths(model.params, cfg.lora_targets)) - 1
    # Merged on export == the unmerged low-rank path, on a batch with images and text.
    b = batches.batch(0)
    args = (b["input_ids"], b["token_type_ids"], b["attention_mask"], b["pixel_values"])
    unmerged = np.asarray(_forward(tr.module, True, cfg.lora_scale)(frozen, factors, *args))
    plain = _forward(tr.module, False)
    merged, base_logits = np.asarray(plain(tr.params(state, frozen), *args)), np.asarray(plain(frozen, *args))
    err, change = float(np.abs(merged - unmerged).max()), float(np.abs(base_logits - unmerged).max())
    print(f"\nLoRA merged vs unmerged logits: {err:.1e} (the factors moved them by {change:.1e})")
    assert change > 1e-2 and err <= 1e-5


def test_sharded_step_equals_one_device(env, reference):
    """data=2, fsdp=2, tensor=2 on 8 CPU devices: the same parameters after a step, the same two losses."""
    import cogvlm_jax

    _, model, batches = env
    mesh = cogvlm_jax.make_mesh(2, 2, 2)
    tr = train.Trainer(model.config, LINEAR, mesh=mesh)
    state, frozen = tr.init(model.params)
    k = state.trainable["layers_0"]["mlp"]["language_mlp"]["up_proj"]["kernel"]  # [mlp, embed]: decoder kernels are [out, in]
    assert k.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    mu = state.opt_state[0].mu["layers_0"]["mlp"]["language_mlp"]["up_proj"]["kernel"]
    assert mu.sharding == k.sharding  # the optimizer moments are sharded like their parameters
    state, losses = _steps(tr, state, frozen, batches, [0])
    assert state.trainable["layers_0"]["mlp"]["language_mlp"]["up_proj"]["kernel"].sharding == k.sharding
    diff = _rel_diff(host_flat(state.trainable), reference)
    state, more = _steps(tr, state, frozen, batches, [1])
    rel = max(abs(a - b) / b for a, b in zip(losses + more, reference["losses"]))
    print(f"\nsharded 2x2x2 vs one device: loss rel {rel:.1e} (2 steps), parameters after a step {diff:.1e} of "
          "the largest update")
    assert rel <= 1e-6 and diff <= 1e-5


# ------------------------------------------------------------------------------------------ resume
def test_resume_is_exact(env, tmp_path):
    """4 steps straight == 2 steps, save, restore into fresh objects, 2 steps: bit for bit."""
    _, model, batches = env
    cfg = LINEAR  # the settings of ``reference``: its compiled step is reused
    tr = train.Trainer(model.config, cfg)
    state, frozen = tr.init(model.params)
    straight, losses = _steps(tr, state, frozen, batches, range(4))
    straight = _every_leaf(straight)

    tr = train.Trainer(model.config, cfg)
    state, frozen = tr.init(model.params)
    state, first = _steps(tr, state, frozen, batches, range(2))
    train.save_state(str(tmp_path / "ckpt"), state, {"note": "half way"})
    assert json.load(open(tmp_path / "ckpt" / "train.json")) == {"note": "half way", "step": 2}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary left behind

    fresh = train.Trainer(model.config, cfg)
    like, frozen2 = fresh.init(model.params, seed=5)  # another RNG: the restore must bring back the saved one
    restored = train.restore_state(str(tmp_path / "ckpt"), like)
    assert int(restored.step) == 2
    resumed, second = _steps(fresh, restored, frozen2, batches, range(2, 4))
    assert first + second == losses and all(map(math.isfinite, losses))
    resumed = _every_leaf(resumed)  # step, parameters, optimizer moments and counts, RNG
    assert resumed.keys() == straight.keys() and len(straight) > 40
    for p in straight:
        assert np.array_equal(resumed[p], straight[p]), p

    lora_like, _ = train.Trainer(model.config, dataclasses.replace(cfg, trainable="lora")).init(model.params)
    with pytest.raises(ValueError, match="does not match this model and these settings"):
        train.restore_state(str(tmp_path / "ckpt"), lora_like)


def test_settings_of_the_wrong_type_are_named_not_coerced():
    """As a run.json or a caller gives them: a string or a float where an int belongs, a NaN, a string bool."""
    from cogvlm_jax.training.run import RunConfig

    for kw, message in ((dict(total_steps="5"), "train.total_steps must be an int, got '5'"),
                        (dict(accum=2.0), "train.accum must be an int, got 2.0"),
                        (dict(warmup_steps=True), "train.warmup_steps must be an int, got True"),
                        (dict(learning_rate=float("nan")), "train.learning_rate must be a finite number, got nan"),
                        (dict(eps="1e-8"), "train.eps must be a finite number, got '1e-8'"),
                        (dict(remat="yes"), "train.remat must be true or false, got 'yes'"),
                        (dict(lora_targets=("a", 1)), "train.lora_targets must be a list of strings")):
        with pytest.raises(ValueError, match=re.escape(message)):
            train.TrainConfig(**kw)
    for kw, message in ((dict(batch_size=8.0), "batch_size must be an int, got 8.0"),
                        (dict(seed="0"), "seed must be an int, got '0'"), (dict(seed=-1), "seed must be >= 0"),
                        (dict(mesh=(1, 0, 1)), "mesh must be three device counts >= 1"),
                        (dict(mesh=(1, 1)), "mesh must be three device counts >= 1"),
                        (dict(dtype="f99"), "dtype 'f99' unknown"), (dict(tokenizer=5), "tokenizer must be a string")):
        with pytest.raises(ValueError, match=re.escape(message)):
            RunConfig(data="d.jsonl", model="m", **kw)
