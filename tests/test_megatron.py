"""The Megatron layout (``Execution.layout``, the default on TPU and GPU meshes) on 8 fake CPU devices: the
same greedy ids as one device and logits within 1e-4 (its row-parallel projections add partial sums across
``tensor``, in another order than one device), the head-grouped fused QKV, and what it does per layer."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from conftest import FAMILIES, fixture_dir
from flax.traverse_util import flatten_dict

import cogvlm_jax
from cogvlm_jax.models import qkv_layout
from cogvlm_jax.parallel import layout, program
from cogvlm_jax.parallel.axes import MEGATRON_RULES, make_mesh
from cogvlm_jax.parallel.sharding import param_shardings

MEGATRON_BOUND = 1e-4  # |Megatron - one device| logits, float32
MESHES = [(1, 1, 2), (1, 1, 8), (2, 2, 2), (1, 4, 2)]


def mesh_of(shape):
    return make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_megatron_layout_gives_single_device_answers(shape, f32_models, reference):
    mesh = mesh_of(shape)
    for fam in FAMILIES:
        base = f32_models[fam]
        model = cogvlm_jax.Model(base.config, base.params, base.tokenizer, mesh=mesh, layout="megatron")
        assert model.layout == "megatron"
        batch, logits, ids, _ = reference[fam]
        err = float(np.abs(model.forward(*batch) - logits).max())
        print(f"\n{fam} mesh {shape} megatron: max |sharded - one device| = {err:.2e}")
        assert err <= MEGATRON_BOUND, (fam, shape, err)
        np.testing.assert_array_equal(model.generate(*batch, max_new_tokens=6), ids)


def test_cpu_meshes_default_to_the_exact_layout(f32_models):
    base = f32_models["cogvlm2"]
    model = cogvlm_jax.Model(base.config, base.params, mesh=mesh_of((1, 1, 2)))
    assert model.layout == "exact" and program.default_layout(None) == "exact"


@pytest.mark.parametrize("heads", [(4, 4, 3), (4, 2, 3), (32, 8, 5), (6, 1, 2)])
def test_head_grouped_qkv_splits_into_the_same_heads(heads):
    """Reordered head-grouped and split as such, a fused QKV output gives every head what the checkpoint
    order gives it; checkpoint_order undoes the reorder."""
    h, kh, e = heads
    x = np.random.default_rng(0).normal(size=(2, 3, (h + 2 * kh) * e)).astype(np.float32)
    order = qkv_layout.head_grouped_order(h, kh, e)
    assert sorted(order) == list(range(x.shape[-1]))
    for a, b in zip(qkv_layout.split(x[..., order], h, kh, e, grouped=True),
                    qkv_layout.split(x, h, kh, e, grouped=False)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(order[qkv_layout.checkpoint_order(h, kh, e)], np.arange(x.shape[-1]))


def test_every_fused_qkv_is_reordered_the_layers_stacked_and_back(f32_models):
    base = f32_models["cogvlm2"]  # CogVLM2's vision expert QKV has a bias, its ViT qkv a kernel [in, out]
    axes = layout.fused_qkv_axes(base.config)
    names = {"/".join(p[-2:]) for p in axes}
    assert names == {"language_expert_query_key_value/kernel", "vision_expert_query_key_value/kernel",
                     "vision_expert_query_key_value/bias", "query_key_value/kernel", "query_key_value/bias"}
    # per decoder layer both experts' kernels and the vision expert's bias; per ViT block a kernel and a bias
    assert len(axes) == 3 * base.config.text.num_layers + 2 * base.config.vision.num_layers
    mesh = mesh_of((1, 1, 2))
    model = cogvlm_jax.Model(base.config, base.params, mesh=mesh, layout="megatron")
    want = flatten_dict(param_shardings(base.config, mesh, MEGATRON_RULES))
    given = flatten_dict(base.params)
    held = flatten_dict(model.params)
    stacks = {(): base.config.text.num_layers, ("vision", "transformer"): base.config.vision.num_layers}
    for path, a in held.items():
        # the decoder's layers and the ViT's blocks, stacked on a leading axis: layer i is layers_i
        prefix = next((p for p in stacks if path[:len(p) + 1] == p + ("layers",)), None)
        parts = [(path, a)]
        if prefix is not None:
            n, rest = stacks[prefix], path[len(prefix) + 1:]
            first = prefix + ("layers_0",) + rest
            assert a.shape == (n,) + given[first].shape, path
            assert a.sharding.spec == jax.sharding.PartitionSpec(None, *want[first].spec), path
            parts = [(prefix + (f"layers_{i}",) + rest, np.asarray(a)[i]) for i in range(n)]
        else:
            assert a.sharding == want[path], path
        for part_path, part in parts:
            if part_path in axes:  # head-grouped
                assert not np.array_equal(np.asarray(part), np.asarray(given[part_path])), part_path
            else:
                np.testing.assert_array_equal(np.asarray(part), np.asarray(given[part_path]))
    back = flatten_dict(layout.to_checkpoint(model.params, base.config, "megatron"))
    assert set(back) == set(given)
    for path, a in back.items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(given[path]))
        assert a.sharding == want[path], path


def test_load_reads_straight_into_the_megatron_layout(reference):
    fam = "cogvlm2"
    # a mesh of test_megatron_layout_gives_single_device_answers: its forward program, compiled there, serves here
    model = cogvlm_jax.load(os.path.join(fixture_dir(fam), "checkpoint"), mesh=mesh_of((1, 4, 2)),
                            layout="megatron", progress=False)
    down = model.params["layers"]["mlp"]["language_mlp"]["down_proj"]["kernel"]  # [layer, out=D, in=F]
    assert down.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # split by its inputs
    batch, logits, ids, _ = reference[fam]
    assert float(np.abs(model.forward(*batch) - logits).max()) <= MEGATRON_BOUND


def test_the_serving_engine_runs_the_megatron_layout(f32_models):
    """The engine's insert / decode programs read the head-grouped parameters the Megatron model holds: the
    same greedy answers as on one device, for an image prompt and a text one."""
    from cogvlm_jax.serving.engine import Engine

    base = f32_models["cogvlm2"]
    sharded = cogvlm_jax.Model(base.config, base.params, base.tokenizer, mesh=mesh_of((1, 1, 2)), layout="megatron")
    image = os.path.join(fixture_dir("cogvlm2"), "images", "img0.png")
    prompts = [base.build_inputs("What is in the picture?", image=image), base.build_inputs("Say something.")]
    answers = {}
    for name, model in (("one device", base), ("megatron", sharded)):
        eng = Engine(model, slots=2, max_length=128, max_queue=4).start()
        try:
            answers[name] = [eng.complete(p, max_tokens=8)[0] for p in prompts]
        finally:
            eng.shutdown()
    assert answers["megatron"] == answers["one device"] and all(answers["one device"]), answers
