"""The same numbers on 1 device or 8 (fake CPU devices, see conftest), and the sharding rules."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES
from jax.sharding import PartitionSpec as P

import cogvlm_jax
from cogvlm_jax.config import preset
from cogvlm_jax.models import kv_cache
from cogvlm_jax.parallel.axes import make_mesh, spec_for
from cogvlm_jax.parallel.sharding import cache_shardings, param_shardings

MESHES = [(1, 1, 1), (2, 2, 2), (2, 1, 2), (1, 4, 2), (8, 1, 1)]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_gives_single_device_numbers(shape, f32_models, reference):
    assert len(jax.devices()) == 8
    mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    for fam in FAMILIES:
        base = f32_models[fam]
        model = cogvlm_jax.Model(base.config, base.params, base.tokenizer, mesh=mesh)
        batch, logits, ids, bound = reference[fam]
        leaf = model.params["layers_0"]["mlp"]["language_mlp"]["gate_proj"]["kernel"]
        assert len(leaf.sharding.device_set) == int(np.prod(shape))
        err = float(np.abs(model.forward(*batch) - logits).max())
        print(f"\n{fam} mesh {shape}: max |sharded - one device| = {err:.2e} (bound {bound:.2e})")
        assert err <= bound, (fam, shape, err, bound)
        np.testing.assert_array_equal(model.generate(*batch, max_new_tokens=6), ids)


@pytest.mark.parametrize("fam", FAMILIES)
def test_one_device_numbers_do_not_depend_on_the_batch(fam, f32_models):
    """A data-sharded mesh gives each device fewer rows; a row's numbers must not change with that beyond
    float32 rounding. Compiled as every model program is (``program.jit``: on CPU without XLA's YNNPACK
    reduce fusion, whose ``exp`` differs from XLA's own by an ulp and is used only for big enough arrays),
    a row's image features and last hidden state alone and in a batch of all the cases (image and
    text-only rows) differ by no more than two correct float32 runs may: the row's own distance from the
    float64 references (fixtures64), measured in this run, plus the official float32 code's. Which dot
    kernel a row count gets differs between CPUs, so bit-identity is not a property XLA:CPU guarantees."""
    from conftest import FIXTURES64, cases, left_pad_batch

    from cogvlm_jax.parallel import program

    m = f32_models[fam]
    recs = cases(fam)
    ids, tt, am, pv = left_pad_batch(recs, m.config.pad_token_id)
    features = program.jit(lambda p, pv: m.module.apply({"params": p}, pv, method=m.module.encode_images))
    hidden = program.jit(lambda p, *batch: m.module.apply({"params": p}, *batch, return_hidden=True)[2][-1])
    all_f, all_h = np.asarray(features(m.params, pv)), np.asarray(hidden(m.params, ids, tt, am, pv))
    for i, rec in enumerate(recs):
        exact = np.load(os.path.join(FIXTURES64, fam, rec["name"] + ".f64.npz"))
        n = len(rec["arrays"]["input_ids"])
        row = [x[i:i + 1] for x in (ids, tt, am, pv)]
        one_h = np.asarray(hidden(m.params, *row))[0]
        official = rec["arrays"]

        def bound(ours, key, pick=slice(None)):
            truth = exact[key][pick]
            return float(np.abs(ours - truth).max() + np.abs(official[key][pick] - truth).max())

        bound_h = bound(one_h[-n:], "hidden_states", -1)  # the last (normed) hidden state
        assert float(np.abs(one_h - all_h[i]).max()) <= max(bound_h, 1e-6), (rec["name"], bound_h)
        if "vision_features" in exact.files:
            one_f = np.asarray(features(m.params, row[3]))[0]
            bound_f = bound(one_f, "vision_features")
            assert float(np.abs(one_f - all_f[i]).max()) <= max(bound_f, 1e-6), (rec["name"], bound_f)


def test_rules_table_for_published_cogvlm2():
    """Table-driven: each kind of parameter gets the spec the rules say, on a (2, 2, 2) mesh."""
    mesh = make_mesh(2, 2, 2)
    sh = param_shardings(preset("cogvlm2-llama3-chat-19B"), mesh)
    layer = sh["layers_0"]
    expected = {
        ("embed_tokens", "embedding"): P(("tensor", "fsdp"), None),  # split by rows: lookups are exact
        ("lm_head", "kernel"): P("tensor", "fsdp"),  # [V, D], like the decoder linears
        ("norm", "scale"): P(None),  # norm scales whole on every device (axes.py's "norm")
    }
    for path, spec in expected.items():
        assert sh[path[0]][path[1]].spec == spec, path
    assert layer["input_layernorm"]["scale"].spec == layer["post_attention_layernorm"]["scale"].spec == P(None)
    # Decoder linears are stored [out, in] (PyTorch's layout): their specs read out-axis first. Every
    # linear is split over tensor by its outputs and over fsdp by its inputs, the projections back to the
    # model width (dense, down_proj, fc2) too: no device sums a part of a contraction (axes.py).
    assert layer["self_attn"]["language_expert_query_key_value"]["kernel"].spec == P("tensor", "fsdp")
    assert layer["self_attn"]["vision_expert_query_key_value"]["bias"].spec == P("tensor")
    assert layer["self_attn"]["language_expert_dense"]["kernel"].spec == P("tensor", "fsdp")
    assert layer["mlp"]["vision_mlp"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")
    assert layer["mlp"]["language_mlp"]["up_proj"]["kernel"].spec == P("tensor", "fsdp")
    vit = sh["vision"]["transformer"]["layers_0"]
    assert vit["attention"]["query_key_value"]["kernel"].spec == P("fsdp", "tensor")
    assert vit["attention"]["dense"]["bias"].spec == P("tensor")
    assert vit["mlp"]["fc2"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["vision"]["linear_proj"]["dense_4h_to_h"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["vision"]["patch_embedding"]["proj"]["kernel"].spec == P(None, None, None, "fsdp")
    assert sh["vision"]["boi"].spec == P(None, None, "fsdp")
    # The KV cache, one [B, N, K, T, E] buffer each for k and v (N layers): batch over (data, fsdp), kv
    # heads over tensor, the layer axis whole; bookkeeping by batch.
    cache = jax.eval_shape(lambda: kv_cache.init_cache(2, 4, 64, 8, 16, jnp.bfloat16))
    csh = cache_shardings(cache, mesh)
    assert cache.k.shape == (4, 2, 8, 64, 16)
    assert all(s.spec == P(("data", "fsdp"), None, "tensor", None, None) for s in (csh.k, csh.v))
    assert csh.valid.spec == P(("data", "fsdp"), None) and csh.index.spec == P(("data", "fsdp"))


def test_indivisible_dimension_falls_back_to_replication():
    mesh = make_mesh(1, 1, 8)
    # 604 % 8 != 0: the vocab dim is replicated, the embed dim (fsdp = 1) too.
    assert spec_for(("vocab", "embed"), (604, 64), mesh) == P(None, None)
    assert spec_for(("vocab", "embed"), (608, 64), mesh) == P("tensor", None)
    # A mesh axis is used once per array: the second claimant is replicated.
    assert spec_for(("qkv", "mlp"), (16, 16), mesh) == P("tensor", None)
    with pytest.raises(ValueError, match="product must equal the device count"):
        make_mesh(2, 2, 1)


@pytest.mark.parametrize("fmt", ["hf", "ours"])
def test_sharded_load_places_each_tensor_with_bounded_host_memory(fmt, tmp_path, f32_models, reference):
    """load(path, mesh=...) puts every tensor straight into its sharded layout, one tensor at a time."""
    import os
    import tracemalloc

    from cogvlm_jax.convert.convert_hf import convert_hf_to_ours
    from conftest import fixture_dir

    fam = "cogvlm2"
    src = os.path.join(fixture_dir(fam), "checkpoint")
    if fmt == "ours":
        src = convert_hf_to_ours(src, str(tmp_path / "ours"), progress=False) or str(tmp_path / "ours")
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    tracemalloc.start()
    model = cogvlm_jax.load(src, mesh=mesh, progress=False)
    # On CPU the "devices" live in host memory and may alias numpy buffers: what is still allocated at
    # the end is the placed model; the transient host overhead is the peak above that.
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    transient = peak - retained
    want = param_shardings(model.config, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    for path, leaf in leaves:
        sh = want
        for k in path:
            sh = sh[k.key]
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), jax.tree_util.keystr(path)
    largest = max(leaf.size * 4 for _, leaf in leaves)  # float32 bytes
    total = sum(leaf.size * 4 for _, leaf in leaves)
    print(f"\n{fmt}: transient host memory {transient / 2**20:.1f} MiB while loading (peak {peak / 2**20:.1f}, "
          f"retained {retained / 2**20:.1f}); largest tensor {largest / 2**20:.1f} MiB, model {total / 2**20:.1f} MiB")
    # One tensor in flight at a time, never a whole-model host copy. That tensor exists at most as read
    # (bf16), transposed, cast to float32 and handed to the device: under 3x the largest float32 tensor,
    # whatever the number of tensors.
    assert transient < 3 * largest
    batch, logits, _, bound = reference[fam]
    assert float(np.abs(model.forward(*batch) - logits).max()) <= bound


@pytest.mark.parametrize("name", ["cogvlm-chat-hf", "cogvlm2-llama3-chat-19B"])
def test_planner_equals_abstract_shapes(name):
    from cogvlm_jax.models.cogvlm import abstract_params
    from cogvlm_jax.parallel.planner import plan
    from cogvlm_jax.parallel.sharding import abstract_sharded_params

    cfg = preset(name)
    total = sum(x.size * 2 for x in jax.tree_util.tree_leaves(abstract_params(cfg)))
    one = plan(cfg, 1, 1, 1, "bfloat16")
    assert one.params_total_bytes == one.params_per_device_bytes == total
    for shape in [(1, 1, 8), (2, 2, 2)]:
        p = plan(cfg, *shape, dtype="bfloat16", batch=8, context=4096)
        # Cross-check against real NamedShardings on 8 fake devices: the bytes of one shard per leaf.
        tree = abstract_sharded_params(cfg, make_mesh(*shape), jnp.bfloat16)
        per_dev = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * 2 for x in jax.tree_util.tree_leaves(tree))
        assert p.params_total_bytes == total and p.params_per_device_bytes == per_dev
        t = cfg.text
        assert p.kv_total_bytes == 2 * 2 * t.num_layers * 8 * 4096 * t.num_kv_heads * t.head_dim
    p = plan(cfg, 1, 1, 8, "bfloat16", batch=8, context=4096)
    assert p.params_per_device_bytes < total / 7  # almost everything splits 8 ways over tensor


def _plan_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cogvlm_jax.cli", "plan", "--config", "cogvlm2-llama3-chat-19B",
                           *args], capture_output=True, text=True, timeout=120)


def test_plan_cli():
    r = _plan_cli("--mesh", "1,1,8", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "per device" in r.stdout and "36.3" in r.stdout  # 19.5B params x 2 bytes = 36.3 GiB total
    assert "replicated because the mesh does not divide them: nothing" in r.stdout


def test_plan_refuses_a_mesh_axis_below_one_in_one_line():
    from cogvlm_jax.parallel.multihost import parse_mesh
    from cogvlm_jax.parallel.planner import plan

    r = _plan_cli("--mesh", "1,0,8")
    assert r.returncode == 2 and r.stdout == ""
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("cogvlm-jax")]
    assert "Traceback" not in r.stderr and line == ("cogvlm-jax plan: error: argument --mesh: must be DATA,FSDP,"
                                                    "TENSOR, each a device count >= 1, got '1,0,8' (FSDP is 0)"), r.stderr
    for mesh, axis in (("0,1,1", "DATA is 0"), ("1,1,-2", "TENSOR is -2")):  # every verb's --mesh
        with pytest.raises(ValueError, match=axis):
            parse_mesh(mesh)

    with pytest.raises(ValueError, match="mesh axis fsdp must be an integer >= 1"):
        plan(preset("cogvlm2-llama3-chat-19B"), 1, 0, 8)


def test_plan_lists_what_falls_back_to_replication():
    """A mesh that does not divide a dimension its rule shards: the plan names the parameter (decoder
    layers and ViT blocks once, with their count), the dimension, its size and the mesh axes, and the
    bytes per device count that dimension whole."""
    from cogvlm_jax.parallel.planner import plan

    cfg = preset("cogvlm2-llama3-chat-19B")
    assert plan(cfg, 1, 1, 8).replicated == ()
    p = plan(cfg, 1, 1, 16)  # 8 kv heads do not split 16 ways; every parameter does
    assert p.replicated == ("KV cache: dim 1 (kv_heads, 8) by tensor=16",)
    assert p.kv_per_device_bytes == p.kv_total_bytes
    p = plan(cfg, 1, 1, 7)
    assert "lm_head/kernel: dim 0 (vocab, 128256) by tensor=7" in p.replicated
    assert "vision/transformer/layers_*/mlp/fc1/kernel (x63): dim 1 (vit_mlp, 15360) by tensor=7" in p.replicated
    assert "layers_*/self_attn/language_expert_query_key_value/kernel (x32): dim 0 (qkv, 6144) by tensor=7" \
        in p.replicated
    r = _plan_cli("--mesh", "1,1,7")
    assert r.returncode == 0 and "lm_head/kernel: dim 0 (vocab, 128256) by tensor=7" in r.stdout, r.stderr


def test_plan_traces_one_layer_and_compiles_nothing(monkeypatch):
    """The published 19B's plan from abstract shapes: one decoder layer and one ViT block traced (their
    trees copied to every index), nothing compiled."""
    from cogvlm_jax.models import cogvlm, decoder, vision
    from cogvlm_jax.parallel.planner import plan

    traced = {"decoder": 0, "vit": 0}
    for cls, key in ((decoder.DecoderLayer, "decoder"), (vision.ViTBlock, "vit")):
        def counted(self, *a, _call=cls.__call__, _key=key, **k):
            traced[_key] += 1
            return _call(self, *a, **k)
        monkeypatch.setattr(cls, "__call__", counted)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    cogvlm._traced_boxed_params.cache_clear()
    p = plan(preset("cogvlm2-llama3-chat-19B"), 1, 1, 8)
    assert traced == {"decoder": 1, "vit": 1} and compiles == []
    assert p.params_total_bytes == 2 * 19_503_105_280  # bfloat16: every one of the 19.5B parameters


@pytest.mark.parametrize("which", ["default", "cogvlm1", "cogvlm2"])
def test_abstract_params_equal_the_trace_of_every_layer(which):
    """``abstract_boxed_params`` traces one decoder layer and one ViT block and copies them; the tree, the
    shapes, the dtypes and the logical axes equal those of the init traced with every layer."""
    import flax.linen as nn
    from conftest import fixture_dir

    from cogvlm_jax.api import DEFAULT_MODEL
    from cogvlm_jax.config import load_config
    from cogvlm_jax.models.cogvlm import abstract_boxed_params, traced_boxed_params

    cfg = load_config(DEFAULT_MODEL if which == "default" else os.path.join(fixture_dir(which), "checkpoint"))
    assert cfg.text.num_layers > 1 and cfg.vision.num_layers > 1
    for dtype in (jnp.float32, jnp.bfloat16):
        fast, full = abstract_boxed_params(cfg, dtype), traced_boxed_params(cfg, dtype)
        assert jax.tree_util.tree_structure(nn.unbox(fast)) == jax.tree_util.tree_structure(nn.unbox(full))
        assert jax.tree_util.tree_leaves(nn.unbox(fast)) == jax.tree_util.tree_leaves(nn.unbox(full))
        assert nn.get_partition_spec(fast) == nn.get_partition_spec(full)
