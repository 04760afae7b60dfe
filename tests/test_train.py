"""Training: loss and gradients equal the official PyTorch code's on the fixtures."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from cogvlm_jax.convert.mapping import hf_to_ours_key, to_hf
from conftest import FAMILIES, cases

from cogvlm_jax.training.trainer import loss_fn, next_token_loss


def _train_case(family):
    (rec,) = [r for r in cases(family) if "loss" in r["arrays"].files]
    a = rec["arrays"]
    batch = {"input_ids": a["train_input_ids"][None], "token_type_ids": a["train_token_type_ids"][None],
             "attention_mask": np.ones_like(a["train_input_ids"])[None], "labels": a["train_labels"][None],
             "pixel_values": a["pixel_values"][None]}
    return a, batch


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@pytest.fixture(scope="module")
def loss_and_grads(f32_models):
    out = {}
    for family in FAMILIES:
        model = f32_models[family]
        a, batch = _train_case(family)
        # jitted as the trainer runs it (op by op, the backward pass alone takes minutes on 2 cores)
        step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model.module, p, b), has_aux=True))
        (loss, count), grads = step(model.params, batch)
        out[family] = (a, float(loss), int(count), grads)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_matches_reference(family, loss_and_grads):
    a, loss, count, _ = loss_and_grads[family]
    assert count == int((a["train_labels"][1:] != -100).sum()) > 0
    ref = float(a["loss"])
    print(f"\n{family} loss {loss:.8f} ref {ref:.8f} rel {abs(loss - ref) / abs(ref):.2e}")
    assert abs(loss - ref) <= 1e-5 * abs(ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_grads_match_reference(family, loss_and_grads):
    a, _, _, grads = loss_and_grads[family]
    names = [k[len("grad/"):] for k in a.files if k.startswith("grad/")]
    assert len(names) >= 4
    worst = 0.0
    for name in names:
        path, _ = hf_to_ours_key(name)
        key, ours = to_hf(path, np.asarray(_leaf(grads, path)))
        ref = a["grad/" + name]
        assert key == name and ours.shape == ref.shape
        assert np.abs(ref).max() > 0
        rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
        worst = max(worst, rel)
        assert rel <= 1e-4, (name, rel)
    print(f"\n{family} worst grad error relative to its max: {worst:.2e}")


def test_loss_ignores_unlabelled_positions_and_shifts_by_one():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = np.array([[-100, -100, 3, 4, 1], [-100, 2, -100, -100, -100]], np.int32)
    loss, count = next_token_loss(logits, labels)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 1] + logp[1, 0, 2]) / 4
    assert int(count) == 4
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    # Changing a logit at a position whose next label is ignored changes nothing.
    logits2 = logits.copy()
    logits2[1, 2] += 5.0
    assert float(next_token_loss(logits2, labels)[0]) == float(loss)
