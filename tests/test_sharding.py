"""The same numbers on 1 device or 8 (fake CPU devices, see conftest), and the sharding rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import cogvlm_jax
from cogvlm_jax.axes import make_mesh, spec_for
from cogvlm_jax.config import preset
from cogvlm_jax.sharding import param_shardings
from conftest import FAMILIES, cases, left_pad_batch

MESHES = [(1, 1, 1), (2, 2, 2), (2, 1, 2), (1, 4, 2), (8, 1, 1)]


@pytest.fixture(scope="module")
def reference(f32_models):
    """Single-device logits and greedy ids for a left-padded batch of all cases of each family, and the
    single device's own float32 noise floor: how much a row's logits move when only the batch size
    changes (XLA:CPU's dot is not batch-invariant; measured 1.5e-5 on cogvlm2, whose logits reach 12)."""
    out = {}
    for fam in FAMILIES:
        m = f32_models[fam]
        batch = left_pad_batch(cases(fam), m.config.pad_token_id)
        logits = m.forward(*batch)
        floor = max(float(np.abs(m.forward(*[x[i:i + 1] for x in batch])[0] - logits[i]).max())
                    for i in range(len(batch[0])))
        out[fam] = (batch, logits, m.generate(*batch, max_new_tokens=6), floor)
    return out


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_gives_single_device_numbers(shape, f32_models, reference):
    assert len(jax.devices()) == 8
    mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    for fam in FAMILIES:
        base = f32_models[fam]
        model = cogvlm_jax.Model(base.config, base.params, base.tokenizer, mesh=mesh)
        batch, logits, ids, floor = reference[fam]
        leaf = model.params["layers_0"]["mlp"]["language_mlp"]["gate_proj"]["kernel"]
        assert len(leaf.sharding.device_set) == int(np.prod(shape))
        err = float(np.abs(model.forward(*batch) - logits).max())
        print(f"\n{fam} mesh {shape}: max |sharded - one device| = {err:.2e} (one device's batch-size floor {floor:.2e})")
        # Issue 5 asks for 1e-5. cogvlm1 meets it; on cogvlm2 one device alone moves by `floor` (1.5e-5)
        # between batch sizes, so the bound is 1e-5 or twice that floor, whichever is larger.
        assert err <= max(1e-5, 2 * floor), (fam, shape, err, floor)
        np.testing.assert_array_equal(model.generate(*batch, max_new_tokens=6), ids)


def test_rules_table_for_published_cogvlm2():
    """Table-driven: each kind of parameter gets the spec the rules say, on a (2, 2, 2) mesh."""
    mesh = make_mesh(2, 2, 2)
    sh = param_shardings(preset("cogvlm2-llama3-chat-19B"), mesh)
    layer = sh["layers_0"]
    expected = {
        ("embed_tokens", "embedding"): P("tensor", "fsdp"),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
        ("norm", "scale"): P("fsdp"),
    }
    for path, spec in expected.items():
        assert sh[path[0]][path[1]].spec == spec, path
    assert layer["self_attn"]["language_expert_query_key_value"]["kernel"].spec == P("fsdp", "tensor")
    assert layer["self_attn"]["vision_expert_query_key_value"]["bias"].spec == P("tensor")
    assert layer["self_attn"]["language_expert_dense"]["kernel"].spec == P("tensor", "fsdp")
    assert layer["mlp"]["vision_mlp"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")
    assert layer["mlp"]["language_mlp"]["up_proj"]["kernel"].spec == P("fsdp", "tensor")
    vit = sh["vision"]["transformer"]["layers_0"]
    assert vit["attention"]["query_key_value"]["kernel"].spec == P("fsdp", "tensor")
    assert vit["mlp"]["fc2"]["kernel"].spec == P("tensor", "fsdp")
    assert sh["vision"]["patch_embedding"]["proj"]["kernel"].spec == P(None, None, None, "fsdp")
    assert sh["vision"]["boi"].spec == P(None, None, "fsdp")


def test_indivisible_dimension_falls_back_to_replication():
    mesh = make_mesh(1, 1, 8)
    # 604 % 8 != 0: the vocab dim is replicated, the embed dim (fsdp = 1) too.
    assert spec_for(("vocab", "embed"), (604, 64), mesh) == P(None, None)
    assert spec_for(("vocab", "embed"), (608, 64), mesh) == P("tensor", None)
    # A mesh axis is used once per array: the second claimant is replicated.
    assert spec_for(("heads", "mlp"), (16, 16), mesh) == P("tensor", None)
    with pytest.raises(ValueError, match="product must equal the device count"):
        make_mesh(2, 2, 1)
