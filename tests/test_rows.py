"""Few-row decode (rows.py): batches of rows.MIN_ROWS to rows.MAX_ROWS rows compile on CPU with the
``[out, in]`` kernels (decoder, lm_head) as the left operand, and give the same numbers and greedy ids."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cases, fixture_dir, left_pad_batch

from cogvlm_jax.models.layers import Dense
from cogvlm_jax.parallel import rows

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the few-row compilation is CPU-only")


@pytest.mark.parametrize("n", [1, 2, 16, 65])
def test_dense_few_row_product_has_the_weight_on_the_left(n):
    dense = Dense(48, ("embed", "mlp"), out_in=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 1, 32), jnp.float32)
    params = nn.unbox(dense.init(jax.random.PRNGKey(1), x))
    fn = rows.ByRows(Dense.apply, lambda p, x: x.shape[0], module=dense)
    got = np.asarray(fn(params, x))
    kernel = np.asarray(params["params"]["kernel"], np.float64)
    want = np.asarray(x, np.float64) @ kernel.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    hlo = fn.lower(params, x).compile().as_text()
    few = rows.MIN_ROWS <= n <= rows.MAX_ROWS
    assert rows.few_rows(n, "cpu") == few
    # the product's output: f32[48, n] = the [out, in] kernel (first operand) times x.T in the few-row
    # compilation; else f32[n, 48] as written (x first: YNNPACK packs the weight, or one row's matvec)
    products = [line for line in hlo.splitlines() if "ynn_fusion = " in line or (" dot(" in line and "ROOT" not in line)]
    assert len(products) == 1, products
    shape = f"f32[48,{n}]" if few else f"f32[{n},48]" if n > 1 else "f32[1,48]"
    assert f"= {shape}" in products[0], products[0]
    assert ("fusion(%variables__params____kernel__" in products[0]) == few, products[0]


def test_batch_of_eight_generates_each_rows_reference_ids(f32_models):
    model = f32_models["cogvlm2"]
    recs = [c for c in cases("cogvlm2") if c["max_new_tokens"] > 0]
    recs = (recs * 8)[:8]
    batch = left_pad_batch(recs, model.config.pad_token_id)
    assert rows.few_rows(len(recs), model.module.execution.platform)
    ids = model.generate(*batch, max_new_tokens=8)
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(ids[i], r["arrays"]["generated_ids"][:8], err_msg=r["name"])


def test_engine_of_eight_slots_gives_the_reference_answers(f32_models):
    """The serving engine's decode over 8 slots (the few-row compilation), every chat case at once."""
    from cogvlm_jax.serving.engine import Engine

    model = f32_models["cogvlm2"]
    chats = [c for c in cases("cogvlm2") if c["template"] == "chat" and c["max_new_tokens"]]
    assert chats
    assert rows.few_rows(8, model.module.execution.platform)
    eng = Engine(model, slots=8, max_length=256, max_queue=16).start()
    try:
        for case in chats:
            image = None if case["image"] is None else os.path.join(fixture_dir("cogvlm2"), "images", case["image"])
            text, _ = eng.complete(model.build_inputs(case["query"], image=image), case["max_new_tokens"])
            ids = [int(i) for i in case["arrays"]["generated_ids"]]
            stop = [i for i, t in enumerate(ids) if t in model.config.eos_token_ids]
            assert text == model.tokenizer.decode(ids[:stop[0]] if stop else ids), case["name"]
    finally:
        eng.shutdown()
