"""bfloat16 training on CPU widens the frozen kernels once, at init, not inside every step: same numbers.

XLA:CPU has no bfloat16 matmul; the module rounds each operand to bfloat16 and multiplies in float32.
Given the frozen kernels in bfloat16, a step would convert every one of them to float32 on every call;
``Trainer.init`` keeps them rounded to bfloat16 but stored in float32 (the step's module is built with
``Execution(widened_kernels=True)``).
The reference below is the step given the frozen kernels in bfloat16, the trained ones rounded inside
the module.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LINEAR_TRAIN, write_train_data
from flax.traverse_util import flatten_dict

from cogvlm_jax.training import lora
from cogvlm_jax.training import trainer as train
from cogvlm_jax.training.data import Batches, read_jsonl

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="only XLA:CPU widens 16-bit weights")
CONVERT = re.compile(r"stablehlo\.convert %[^:]+: \(tensor<([0-9x]+)x(\w+)>\) -> tensor<[0-9x]+x(\w+)>")


@pytest.fixture(scope="module")
def env(tmp_path_factory, f32_models):
    model = f32_models["cogvlm1"]
    recs = read_jsonl(write_train_data(tmp_path_factory.mktemp("widen")), model.tokenizer, model.config)
    return model, Batches(recs, model.tokenizer, model.config, batch_size=4, seed=0)


def _reference_loss_and_grads(tr: train.Trainer, trainable, frozen16, batch):
    """The step's loss and gradient with the frozen kernels given in bfloat16 (one micro-batch)."""
    mb = {k: v[0] for k, v in batch.items()}
    denom = jnp.maximum((mb["labels"][:, 1:] != train.IGNORE).sum(), 1).astype(jnp.float32)
    args = (mb["input_ids"], mb["token_type_ids"], mb["attention_mask"], mb.get("pixel_values"))

    def loss(t):
        if tr.tc.trainable == "lora":
            with lora.applied(tr.tc.lora_scale):
                logits = tr.module.apply({"params": frozen16, lora.COLLECTION: t}, *args)[0]
        else:
            logits = tr.module.apply({"params": train.combine(t, frozen16)}, *args)[0]
        return train.next_token_nll(logits, mb["labels"])[0] / denom
    return jax.value_and_grad(loss)(trainable)


def _converted_shapes(hlo: str) -> list[tuple[int, ...]]:
    return [tuple(int(n) for n in m.group(1).split("x")) for m in CONVERT.finditer(hlo)]


def _trainer(model, mode):
    tr = train.Trainer(model.config, train.TrainConfig(**LINEAR_TRAIN, trainable=mode), dtype=jnp.bfloat16)
    state, frozen = tr.init(model.params)
    return tr, state, frozen, jax.tree.map(lambda a: a.astype(jnp.bfloat16), frozen)


def test_the_same_numbers(env):
    """Vision-expert training (frozen ViT and language weights, trained vision expert): loss and gradient bit
    for bit those of the reference step. Frozen kernels are float32 holding bfloat16 values, the rest
    bfloat16."""
    model, batches = env
    tr, state, frozen, frozen16 = _trainer(model, "vision-expert")
    start = flatten_dict(model.params)
    for p, a in flatten_dict(frozen).items():
        assert a.dtype == (jnp.float32 if p[-1] == "kernel" else jnp.bfloat16), p
        np.testing.assert_array_equal(np.asarray(a), np.asarray(
            jnp.asarray(start[p]).astype(jnp.bfloat16).astype(a.dtype)), err_msg=str(p))
    batch = tr.place_batch(batches.batch(0))
    assert "pixel_values" in batch  # the frozen ViT runs
    loss, _, grads = jax.jit(tr.loss_and_grads)(state.trainable, frozen, batch)
    reference = jax.jit(lambda t, f, b: _reference_loss_and_grads(tr, t, f, b))
    ref_loss, ref_grads = reference(state.trainable, frozen16, batch)
    assert float(loss) == float(ref_loss) and np.isfinite(float(loss))
    got, ref = flatten_dict(grads), flatten_dict(ref_grads)
    assert got.keys() == ref.keys() and sum(np.any(np.asarray(g) != 0) for g in got.values()) > len(got) // 2
    for p in got:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(ref[p]), err_msg=str(p))
    # the exported tree has the frozen weights back in bfloat16, bit for bit
    exported = flatten_dict(tr.params(state, frozen))
    for p, a in flatten_dict(frozen16).items():
        assert exported[p].dtype == jnp.bfloat16 and np.array_equal(np.asarray(exported[p]), np.asarray(a)), p


@pytest.mark.parametrize("mode", ["vision-expert", "lora"])
def test_no_frozen_kernel_is_converted_in_the_step(env, mode):
    """In the lowered step no convert touches a frozen kernel (shapes no trained leaf has, so unambiguous);
    the reference step, given them in bfloat16, converts every one of them."""
    model, batches = env
    tr, state, frozen, frozen16 = _trainer(model, mode)
    batch = tr.place_batch(batches.batch(0))
    trained = {tuple(a.shape) for a in jax.tree.leaves(state.trainable)}
    only_frozen = {tuple(a.shape) for p, a in flatten_dict(frozen).items() if p[-1] == "kernel"} - trained
    assert len(only_frozen) >= 4
    step = _converted_shapes(jax.jit(tr._step_fn).lower(state, frozen, batch).as_text())
    reference = _converted_shapes(jax.jit(lambda t, f, b: _reference_loss_and_grads(tr, t, f, b)).lower(
        state.trainable, frozen16, batch).as_text())
    assert only_frozen <= set(reference)
    assert not only_frozen & set(step), sorted(only_frozen & set(step))
