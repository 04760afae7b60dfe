"""Slice reads: an HF checkpoint read region by region onto a mesh equals the whole-tensor read, bit for bit,
and the loader reads every stored byte exactly once per process (8 fake CPU devices, see conftest)."""

from __future__ import annotations

import os
import random

import jax
import ml_dtypes
import numpy as np
import pytest
from cogvlm_jax.convert import convert_hf, mapping
from cogvlm_jax.convert.hf_sharded import read_hf_sharded
from conftest import FAMILIES, SafetensorsReads, fixture_dir
from flax.traverse_util import flatten_dict

from cogvlm_jax.config import load_config
from cogvlm_jax.parallel.axes import make_mesh
from cogvlm_jax.parallel.sharding import param_shardings

MESHES = [(1, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8), (8, 1, 1)]


def _random_region(shape, rng):
    out = []
    for n in shape:
        a, b = sorted(rng.sample(range(n + 1), 2)) if rng.random() < 0.7 else (0, n)
        out.append(slice(a, b))
    return tuple(out)


def test_read_region_reads_exactly_the_region(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    gen = np.random.default_rng(0)
    arrays = {"w": gen.standard_normal((6, 5, 4, 3)).astype(np.float32), "b": gen.standard_normal(7).astype(np.float16),
              "m": gen.standard_normal((9, 8)).astype(np.float32), "s": np.array(3.0, np.float32),
              "h": gen.standard_normal((5, 4)).astype(ml_dtypes.bfloat16).view(np.uint16)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    reads = SafetensorsReads().install(monkeypatch.setattr)
    st = convert_hf.SafetensorsFile(str(tmp_path / "x.safetensors"))
    rng = random.Random(0)
    for name, a in arrays.items():
        for _ in range(100):
            index = _random_region(a.shape, rng)
            reads.bytes = 0
            got = st.read_region(name, index)
            assert got.dtype == a.dtype and np.array_equal(got, a[index]), (name, index)
            assert reads.bytes == a[index].nbytes, (name, index)
    with pytest.raises(ValueError, match="step"):
        st.read_region("m", (slice(0, 9, 2), slice(None)))


@pytest.mark.parametrize("transform", [mapping.TRANSPOSE, mapping.CONV, mapping.NONE])
def test_region_of_relayout_is_relayout_of_hf_region(transform):
    """The identity the loader rests on, for every layout rule the mapping has."""
    rng = random.Random(1)
    shape = {mapping.TRANSPOSE: (7, 5), mapping.CONV: (6, 3, 2, 4), mapping.NONE: (5, 3, 4)}[transform]
    hf = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    ours = mapping.relayout(transform, hf)
    assert ours.shape == mapping.ours_shape(shape, transform)
    for _ in range(50):
        index = _random_region(ours.shape, rng)
        np.testing.assert_array_equal(mapping.relayout(transform, hf[mapping.hf_region(transform, index)]),
                                      ours[index])


@pytest.fixture(scope="module")
def whole_reads():
    return {fam: flatten_dict(convert_hf.read_hf_checkpoint(os.path.join(fixture_dir(fam), "checkpoint"),
                                                           progress=False)) for fam in FAMILIES}


def _stored_bytes(path):
    return sum(info.nbytes for _, info in convert_hf.open_tensors(path).values())


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_slice_reads_equal_whole_reads_and_read_each_byte_once(shape, whole_reads, monkeypatch):
    mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    reads = SafetensorsReads().install(monkeypatch.setattr)
    for fam in FAMILIES:
        path = os.path.join(fixture_dir(fam), "checkpoint")
        config = load_config(path)
        shardings = flatten_dict(param_shardings(config, mesh))
        reads.bytes = 0
        params = flatten_dict(read_hf_sharded(path, config, shardings, None, progress=False))
        # One process holds every device: each stored byte is read once, however often devices repeat a
        # region (data=8 replicates everything 8 times; (2,2,2) twice).
        assert reads.bytes == _stored_bytes(path), (fam, shape)
        assert params.keys() == whole_reads[fam].keys()
        for key, leaf in params.items():
            assert leaf.sharding == shardings[key], key
            want = whole_reads[fam][key]
            assert leaf.dtype == want.dtype, key
            np.testing.assert_array_equal(np.asarray(leaf).view(np.uint8), want.view(np.uint8), err_msg=str(key))


def test_cast_slices_equal_cast_whole_reads(whole_reads):
    fam = "cogvlm1"
    path = os.path.join(fixture_dir(fam), "checkpoint")
    config = load_config(path)
    mesh = make_mesh(1, 4, 2)
    params = flatten_dict(read_hf_sharded(path, config, flatten_dict(param_shardings(config, mesh)),
                                          ml_dtypes.bfloat16, progress=False))
    for key, leaf in params.items():
        want = whole_reads[fam][key].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(leaf).view(np.uint16), want.view(np.uint16), err_msg=str(key))


def test_converted_with_a_mesh_is_chunked_by_shard_and_loads_anywhere(tmp_path, whole_reads):
    """convert --mesh stores each tensor in chunks of its shard; the checkpoint loads with or without a mesh."""
    from cogvlm_jax.convert import checkpoint

    import cogvlm_jax

    fam = "cogvlm1"
    src = os.path.join(fixture_dir(fam), "checkpoint")
    mesh = make_mesh(1, 4, 2)
    dst = convert_hf.convert_hf_to_ours(src, str(tmp_path / "ours"), progress=False, mesh=mesh)
    plain = flatten_dict(checkpoint.restore_params(dst))
    assert plain.keys() == whole_reads[fam].keys()
    for key, want in whole_reads[fam].items():
        np.testing.assert_array_equal(plain[key], want, err_msg=str(key))
    # Stored chunks tile the shards (Orbax may split a replicated shard further between its replicas), so a
    # process reads no chunk beyond its own slices. The embedding [600, 64], rows over (tensor, fsdp): 8 chunks.
    tree = checkpoint.tree_metadata(os.path.join(dst, checkpoint.PARAMS_DIR))
    shards = flatten_dict(param_shardings(load_config(src), mesh))
    for key, m in flatten_dict(tree).items():
        shard = shards[key].shard_shape(tuple(m.shape))
        assert all(s % c == 0 for s, c in zip(shard, m.storage.chunk_shape)), (key, shard, m.storage.chunk_shape)
    assert tuple(tree["embed_tokens"]["embedding"].storage.chunk_shape) == (75, 64)
    model = cogvlm_jax.load(dst, mesh=mesh, progress=False)
    leaf = model.params["embed_tokens"]["embedding"]
    assert leaf.sharding.spec == param_shardings(model.config, mesh)["embed_tokens"]["embedding"].spec
    np.testing.assert_array_equal(np.asarray(leaf), whole_reads[fam][("embed_tokens", "embedding")])


def test_convert_cli_with_a_mesh_makes_its_own_cpu_devices(tmp_path):
    """`cogvlm-jax convert --mesh 1,4,2` in a fresh process (one CPU device by default) stores shard chunks."""
    import subprocess
    import sys

    from cogvlm_jax.convert import checkpoint

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    dst = str(tmp_path / "ours")
    r = subprocess.run([sys.executable, "-m", "cogvlm_jax.cli", "convert", os.path.join(fixture_dir("cogvlm1"),
                        "checkpoint"), dst, "--mesh", "1,4,2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    tree = checkpoint.tree_metadata(os.path.join(dst, checkpoint.PARAMS_DIR))
    assert tuple(tree["embed_tokens"]["embedding"].storage.chunk_shape) == (75, 64)
