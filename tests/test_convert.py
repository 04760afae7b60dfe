"""Checkpoint conversion: the key table, HF <-> ours <-> HF round trips, and every bad input named."""

from __future__ import annotations

import json
import os
import re
import shutil
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from cogvlm_jax.convert import checkpoint, convert_hf, mapping
from cogvlm_jax.convert.checkpoint import (
    CheckpointError,
    LazyArray,
    is_our_checkpoint,
    params_metadata,
    read_meta,
    restore_params,
    save_params,
)
from cogvlm_jax.convert.convert_hf import (
    SafetensorsFile,
    convert_hf_to_ours,
    convert_ours_to_hf,
    main_convert,
    read_hf_checkpoint,
    write_hf_checkpoint,
)
from safetensors import safe_open
from safetensors.numpy import save_file

from cogvlm_jax.config import load_config, preset

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REAL_INDEX = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs", "cogvlm2-llama3-chat-19B",
                          "model.safetensors.index.json")
FAMILIES = ("cogvlm1", "cogvlm2")
# The fixture's CogVLM2 shards: lm_head + embed_tokens fill shard 1 exactly, the rest is shard 2.
FIXTURE_SHARD_BYTES = {"cogvlm1": convert_hf.DEFAULT_MAX_SHARD_BYTES, "cogvlm2": 2 * 128256 * 64 * 2}


def hf_dir(family: str) -> str:
    return os.path.join(FIXTURES, family, "checkpoint")


def raw_tensors(path: str) -> dict[str, tuple[str, tuple, bytes]]:
    """key -> (dtype code, shape, raw bytes) of every tensor of an HF checkpoint directory."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            st = SafetensorsFile(os.path.join(path, name))
            for key, info in st.tensors.items():
                out[key] = (info.code, info.shape, st.read(key).tobytes())
    return out


def flat(tree) -> dict[str, object]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(k.key) for k in kp): v for kp, v in leaves}


def leftovers(parent: str, keep: set[str]) -> list[str]:
    return sorted(set(os.listdir(parent)) - keep)


# --------------------------------------------------------------------------- the key table
@pytest.mark.skipif(not os.path.exists(REAL_INDEX), reason="shared/configs (the published index) not beside the repo")
def test_mapping_covers_the_real_cogvlm2_index():
    with open(REAL_INDEX) as f:
        real = set(json.load(f)["weight_map"])
    assert len(real) == 1221
    assert set(mapping.expected_hf_keys(preset("cogvlm2-llama3-chat-19B"))) == real


def test_mapping_counts_for_cogvlm1_presets():
    for name in ("cogvlm-chat-hf", "cogvlm-base-490-hf", "cogvlm-grounding-generalist-hf"):
        cfg = preset(name)
        keys = mapping.expected_hf_keys(cfg)
        # per text layer: 2 norms, 2 QKV, 2 dense, 6 MLP, inv_freq; per ViT layer: 12; globals: 3 + 12
        assert len(keys) == 13 * cfg.text.num_layers + 12 * cfg.vision.num_layers + 15 == 1187
        # no downsample conv, no bias on the decoder's QKV (only the ViT's QKV has one)
        assert not any(k.startswith("model.vision.conv") for k in keys)
        assert not any(k.endswith("query_key_value.bias") and not k.startswith("model.vision.") for k in keys)


@pytest.mark.parametrize("name", ["cogvlm-chat-hf", "cogvlm2-llama3-chat-19B"])
def test_mapping_is_a_bijection(name):
    cfg = preset(name)
    for key, shape in mapping.expected_hf_keys(cfg).items():
        path, transform = mapping.hf_to_ours_key(key)
        if transform == mapping.BUFFER:
            assert path is None and shape == (cfg.text.head_dim // 2,)
            continue
        assert mapping.ours_to_hf_key(path) == key
        assert mapping.ours_to_hf_key("/".join(path)) == key


def test_mapping_names_unknown_keys():
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        mapping.hf_to_ours_key("model.layers.0.mlp.extra.weight")
    with pytest.raises(CheckpointError, match="layers_0/foo/kernel"):
        mapping.ours_to_hf_key(("layers_0", "foo", "kernel"))


def test_transforms_invert_each_other():
    rng = np.random.default_rng(0)
    for key, shape in [("model.vision.patch_embedding.proj.weight", (6, 3, 14, 14)),
                       ("model.layers.2.mlp.vision_mlp.down_proj.weight", (8, 5)),
                       ("model.vision.boi", (1, 1, 8))]:
        x = rng.standard_normal(shape).astype(np.float32)
        path, ours = mapping.to_ours(key, x)
        back_key, back = mapping.to_hf(path, ours)
        assert back_key == key and np.array_equal(back, x)
    conv = rng.standard_normal((6, 3, 2, 2)).astype(np.float32)  # [out, in, kh, kw] -> [kh, kw, in, out]
    _, ours = mapping.to_ours("model.vision.conv.weight", conv)
    assert ours[1, 0, 2, 5] == conv[5, 2, 1, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_table_shapes_match_the_model(family):
    model = pytest.importorskip("cogvlm_jax.models.cogvlm")
    cfg = load_config(hf_dir(family))
    ours = {"/".join(p): s for p, s in mapping.expected_params_shapes(cfg).items()}
    theirs = {k: tuple(v.shape) for k, v in flat(model.abstract_params(cfg)).items()}
    assert ours == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_inv_freq_recomputed_bit_for_bit(family):
    cfg = load_config(hf_dir(family))
    tensors = raw_tensors(hf_dir(family))
    want = mapping.rotary_inv_freq(cfg)
    for i in range(cfg.text.num_layers):
        code, shape, data = tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"]
        assert code == "F32" and shape == want.shape and data == want.tobytes()


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("family", FAMILIES)
def test_reader_agrees_with_safetensors(family):
    """Our header parser and reader give what the safetensors library gives, bf16 included."""
    for name in os.listdir(hf_dir(family)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(hf_dir(family), name)
        ours = SafetensorsFile(path)
        with safe_open(path, framework="numpy") as f:
            assert set(f.keys()) == set(ours.tensors)
            for key in f.keys():
                a, b = f.get_tensor(key), ours.read(key)
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_read_layouts_and_dtypes(family):
    cfg = load_config(hf_dir(family))
    params = read_hf_checkpoint(hf_dir(family), progress=False)
    stored = "float32" if family == "cogvlm1" else "bfloat16"
    leaves = flat(params)
    assert {str(v.dtype) for v in leaves.values()} == {stored}
    assert {k: v.shape for k, v in leaves.items()} == {
        "/".join(p): s for p, s in mapping.expected_params_shapes(cfg).items()}
    tensors = raw_tensors(hf_dir(family))
    code, shape, data = tensors["model.layers.1.self_attn.vision_expert_query_key_value.weight"]
    hf = np.frombuffer(data, convert_hf.DTYPES[code]).reshape(shape)
    # Decoder linears and the lm_head keep PyTorch's [out, in] (layers.Dense(out_in=True)); the ViT/adapter transpose.
    assert np.array_equal(leaves["layers_1/self_attn/vision_expert_query_key_value/kernel"], hf)
    code, shape, data = tensors["lm_head.weight"]
    assert np.array_equal(leaves["lm_head/kernel"], np.frombuffer(data, convert_hf.DTYPES[code]).reshape(shape))
    code, shape, data = tensors["model.vision.linear_proj.gate_proj.weight"]
    hf = np.frombuffer(data, convert_hf.DTYPES[code]).reshape(shape)
    assert np.array_equal(leaves["vision/linear_proj/gate_proj/kernel"], hf.T)
    code, shape, data = tensors["model.vision.patch_embedding.proj.weight"]
    hf = np.frombuffer(data, convert_hf.DTYPES[code]).reshape(shape)
    assert np.array_equal(leaves["vision/patch_embedding/proj/kernel"], hf.transpose(2, 3, 1, 0))
    cast = read_hf_checkpoint(hf_dir(family), dtype="bfloat16", progress=False)
    assert {v.dtype for v in flat(cast).values()} == {np.dtype(ml_dtypes.bfloat16)}


# --------------------------------------------------------------------------- round trips
@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """HF fixture -> ours (Orbax) -> HF, once per family."""
    out = {}
    for family in FAMILIES:
        base = tmp_path_factory.mktemp(family)
        ours, back = str(base / "ours"), str(base / "hf")
        convert_hf_to_ours(hf_dir(family), ours, progress=False)
        convert_ours_to_hf(ours, back, max_shard_bytes=FIXTURE_SHARD_BYTES[family], progress=False)
        out[family] = (ours, back)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(family, round_trips):
    ours, back = round_trips[family]
    src = hf_dir(family)
    assert is_our_checkpoint(ours) and not is_our_checkpoint(back)
    split = json.load(open(os.path.join(src, convert_hf.INDEX_FILE)))["weight_map"] if family == "cogvlm2" else None
    assert read_meta(ours)["hf"] == {"inv_freq_dtype": "float32", **({"shards": split} if split else {})}
    # every tensor: same name, dtype, shape and bytes (inv_freq included)
    assert raw_tensors(back) == raw_tensors(src)
    # same files, same shard assignment; the shards are even byte-identical to the published ones
    weights = sorted(n for n in os.listdir(src) if n != "config.json")
    assert sorted(n for n in os.listdir(back) if n != "config.json") == weights
    for name in weights:
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(back, name), "rb") as b:
            assert a.read() == b.read(), name
    assert load_config(back) == load_config(src)


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_export_repeats_the_source_files_or_bounds_them(family, round_trips, tmp_path, capsys):
    """``convert --to hf`` writes the files the source HF checkpoint had (shards and index, or one file), byte
    for byte; ``--max-shard-size`` cuts shards of at most that size instead, with an index."""
    from cogvlm_jax import cli

    ours, _ = round_trips[family]
    src = hf_dir(family)
    back = tmp_path / "back"
    assert cli.main(["convert", ours, str(back), "--to", "hf"]) == 0
    weights = sorted(n for n in os.listdir(src) if n != "config.json")
    assert sorted(n for n in os.listdir(back) if n != "config.json") == weights
    for name in weights:
        assert (back / name).read_bytes() == open(os.path.join(src, name), "rb").read(), name
    limit = 100_000
    bounded = tmp_path / "bounded"
    assert cli.main(["convert", ours, str(bounded), "--to", "hf", "--max-shard-size", "100KB"]) == 0
    index = json.loads((bounded / convert_hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert sorted(n for n in os.listdir(bounded) if n.endswith(".safetensors")) == files and len(files) > 2
    for name in files:  # each shard is within the limit, or one tensor larger than it
        tensors = SafetensorsFile(str(bounded / name)).tensors.values()
        assert sum(t.nbytes for t in tensors) <= limit or len(tensors) == 1, name
    assert raw_tensors(str(bounded)) == raw_tensors(src)
    assert cli.main(["convert", src, str(tmp_path / "x"), "--max-shard-size", "1GB"]) == 2
    assert "--max-shard-size applies to --to hf" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_host_and_sharded(family, round_trips):
    ours, _ = round_trips[family]
    direct = flat(read_hf_checkpoint(hf_dir(family), progress=False))
    host = flat(restore_params(ours))
    assert host.keys() == direct.keys()
    for k, v in host.items():
        assert isinstance(v, np.ndarray) and v.dtype == direct[k].dtype and v.tobytes() == direct[k].tobytes()
    # an abstract target with shardings restores jax arrays placed (and cast) as asked
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)),
                                          jax.sharding.PartitionSpec())
    abstract = params_metadata(ours)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    restored = flat(restore_params(ours, target))
    for k, v in restored.items():
        assert isinstance(v, jax.Array) and v.sharding == sharding
        assert np.asarray(v).tobytes() == direct[k].tobytes()
    f32 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), abstract)
    cast = flat(restore_params(ours, f32))
    assert all(v.dtype == np.float32 for v in cast.values())
    # a subset, as the exporter fetches one shard at a time
    part = restore_params(ours, subset=[("norm", "scale"), ("layers_1", "input_layernorm", "scale")])
    assert flat(part).keys() == {"norm/scale", "layers_1/input_layernorm/scale"}
    assert part["norm"]["scale"].tobytes() == direct["norm/scale"].tobytes()
    assert restore_params(ours, subset=[]) == {}
    with pytest.raises(CheckpointError, match="no parameter.*norm/bias"):
        restore_params(ours, subset=[("norm", "bias")])
    bad = jax.tree.map(lambda a: a, abstract)
    bad["norm"]["scale"] = jax.ShapeDtypeStruct((3,), np.float32)
    with pytest.raises(CheckpointError, match=r"norm/scale: expected shape \(3,\), got \(64,\)"):
        restore_params(ours, bad)


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path, round_trips):
    """Version 1 stored the lm_head [hidden, vocab]: reading it as today's layout would be wrong."""
    ours = str(tmp_path / "old")
    shutil.copytree(round_trips["cogvlm2"][0], ours)
    meta = read_meta(ours)
    assert meta["version"] == checkpoint.FORMAT_VERSION == 2
    with open(os.path.join(ours, checkpoint.FORMAT_FILE), "w") as f:
        json.dump({**meta, "version": 1}, f)
    for read in (restore_params, params_metadata, lambda p: convert_ours_to_hf(p, str(tmp_path / "hf"), progress=False)):
        with pytest.raises(CheckpointError, match=r"format version 1; this cogvlm-jax reads version 2 .*lm_head"):
            read(ours)
    assert not os.path.exists(tmp_path / "hf")


def test_sharding_and_dtype_on_export(tmp_path):
    cfg = load_config(hf_dir("cogvlm1"))
    params = read_hf_checkpoint(hf_dir("cogvlm1"), progress=False)
    out = str(tmp_path / "sharded")
    write_hf_checkpoint(params, cfg, out, max_shard_bytes=40_000, dtype="bfloat16", inv_freq_dtype="bfloat16",
                        progress=False)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    tensors = raw_tensors(out)
    assert set(tensors) == set(mapping.expected_hf_keys(cfg)) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(len(t[2]) for t in tensors.values())
    assert {t[0] for t in tensors.values()} == {"BF16"}
    assert load_config(out).torch_dtype == "bfloat16"
    back = flat(read_hf_checkpoint(out, progress=False))
    for k, v in flat(params).items():
        assert back[k].tobytes() == v.astype(ml_dtypes.bfloat16).tobytes()


class LiveArrays:
    """Bytes of the arrays made so far that are still alive (tracked by their memory's owner)."""

    def __init__(self):
        self.live, self.peak, self.made = {}, 0, []

    def track(self, array: np.ndarray, name=None) -> np.ndarray:
        owner = array if array.base is None else array.base
        self.live[id(owner)] = owner.nbytes
        weakref.finalize(owner, self.live.pop, id(owner), None)
        self.peak = max(self.peak, sum(self.live.values()))
        self.made.append(name)
        return array


def test_lazy_leaves_are_written_in_order_a_group_at_a_time(tmp_path, monkeypatch):
    """save_params makes LazyArray leaves in their order, holding at most two groups of STREAM_BYTES."""
    monkeypatch.setattr(checkpoint, "STREAM_BYTES", 3 * 4096)
    tracker, values = LiveArrays(), {}
    rng = np.random.default_rng(0)
    tree = {}
    for i in range(24):  # 4 KiB leaves (one of 12 KiB) saved in the reverse of their sorted order
        shape = (3072,) if i == 5 else (1024,)
        values[i] = rng.standard_normal(shape).astype(np.float32)
        make = lambda i=i: tracker.track(values[i].copy(), i)
        tree[f"l{i:02d}"] = {"w": LazyArray(shape, np.dtype(np.float32), make, order=-i)}
    tree["plain"] = np.arange(5, dtype=np.int32)  # ordinary leaves save beside lazy ones
    save_params(str(tmp_path / "ck"), tree, load_config(hf_dir("cogvlm1")))
    assert tracker.made == list(range(23, -1, -1))
    # group k is written while group k+1 is made: two groups of 12 KiB (the 12 KiB leaf is a group alone)
    assert tracker.peak <= 2 * 3 * 4096, tracker.peak
    back = restore_params(str(tmp_path / "ck"))
    assert set(back) == set(tree)
    for i, v in values.items():
        assert back[f"l{i:02d}"]["w"].tobytes() == v.tobytes()
    assert back["plain"].tolist() == list(range(5))


def test_conversions_stream_both_ways(tmp_path, monkeypatch):
    """HF -> ours reads each tensor just before it is written; ours -> HF reads runs of FETCH_BYTES."""
    cfg = load_config(hf_dir("cogvlm1"))  # float32, 65 tensors, 1.2 MB, the largest 150 kB
    sizes = [int(np.prod(s)) * 4 for s in mapping.expected_hf_keys(cfg).values()]
    chunk = 16 * 1024
    monkeypatch.setattr(checkpoint, "STREAM_BYTES", chunk)
    monkeypatch.setattr(convert_hf, "FETCH_BYTES", chunk)
    tracker = LiveArrays()
    real_read = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, name: tracker.track(real_read(self, name), name))
    ours = str(tmp_path / "ours")
    convert_hf_to_ours(hf_dir("cogvlm1"), ours, progress=False)
    assert len(tracker.made) == len(sizes)  # every tensor read once
    # two groups at most: the one being written and the next (a group: <= chunk bytes, or one tensor)
    assert tracker.peak <= 2 * max(chunk, max(sizes)) < sum(sizes) / 3, (tracker.peak, max(sizes), sum(sizes))
    runs = []
    real_reader = convert_hf.subset_reader

    def reader(path):
        specs, read = real_reader(path)
        return specs, lambda paths: runs.append(sum(specs[p].size * specs[p].dtype.itemsize for p in paths)
                                                if len(paths) > 1 else 0) or read(paths)
    monkeypatch.setattr(convert_hf, "subset_reader", reader)
    back = str(tmp_path / "back")
    convert_ours_to_hf(ours, back, progress=False)
    assert len(runs) > 10 and max(runs) <= chunk, runs  # runs of several tensors stay under FETCH_BYTES
    monkeypatch.undo()
    assert raw_tensors(back) == raw_tensors(hf_dir("cogvlm1"))


def test_a_failed_read_while_streaming_leaves_nothing(tmp_path, monkeypatch):
    real_read, calls = SafetensorsFile.read, []

    def failing_read(self, name):
        calls.append(name)
        if len(calls) == 20:
            raise CheckpointError(f"{self.path} went away")
        return real_read(self, name)
    monkeypatch.setattr(SafetensorsFile, "read", failing_read)
    monkeypatch.setattr(checkpoint, "STREAM_BYTES", 16 * 1024)
    with pytest.raises(CheckpointError, match="went away"):
        convert_hf_to_ours(hf_dir("cogvlm1"), str(tmp_path / "ours"), progress=False)
    assert leftovers(str(tmp_path), set()) == []


def test_main_convert_directions(tmp_path, round_trips):
    ours, _ = round_trips["cogvlm1"]
    assert main_convert(ours, str(tmp_path / "hf"), to="hf", progress=False) == 0
    with pytest.raises(CheckpointError, match="already a cogvlm-jax checkpoint"):
        main_convert(ours, str(tmp_path / "x"), to="ours")
    with pytest.raises(CheckpointError, match="not a cogvlm-jax checkpoint"):
        main_convert(hf_dir("cogvlm1"), str(tmp_path / "y"), to="hf")
    assert leftovers(str(tmp_path), set()) == ["hf"]


def test_tokenizer_files_are_carried(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir("cogvlm2"), src)
    shutil.copytree(os.path.join(FIXTURES, "cogvlm2", "tokenizer"), src / "tokenizer")
    convert_hf_to_ours(str(src), str(tmp_path / "ours"), progress=False)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "ours"))
    convert_ours_to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"), progress=False)
    shards = {n for n in os.listdir(src) if n.endswith((".safetensors", ".index.json"))}  # the source's split
    assert {"tokenizer.json", "tokenizer_config.json", *shards} <= set(os.listdir(tmp_path / "hf"))


def test_existing_destination(tmp_path, round_trips):
    ours, _ = round_trips["cogvlm1"]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_ours_to_hf(ours, str(dst), progress=False)
    assert os.listdir(dst) == ["keep.txt"]
    convert_ours_to_hf(ours, str(dst), overwrite=True, progress=False)
    assert "model.safetensors" in os.listdir(dst) and "keep.txt" not in os.listdir(dst)
    assert leftovers(str(tmp_path), set()) == ["dst"]


def test_interrupted_writes_leave_nothing(tmp_path, monkeypatch):
    cfg = load_config(hf_dir("cogvlm1"))
    params = read_hf_checkpoint(hf_dir("cogvlm1"), progress=False)
    calls = []

    def failing_to_hf(path, array):
        calls.append(path)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real_to_hf(path, array)

    real_to_hf = mapping.to_hf
    monkeypatch.setattr(mapping, "to_hf", failing_to_hf)
    with pytest.raises(KeyboardInterrupt):
        write_hf_checkpoint(params, cfg, str(tmp_path / "hf"), progress=False)
    monkeypatch.undo()
    # an existing checkpoint survives a failed overwrite
    save_params(str(tmp_path / "ours"), params, cfg)
    broken = dict(params, norm={"scale": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"norm/scale: expected shape \(64,\), got \(3,\)"):
        write_hf_checkpoint(broken, cfg, str(tmp_path / "ours"), overwrite=True, progress=False)
    assert is_our_checkpoint(str(tmp_path / "ours"))
    assert leftovers(str(tmp_path), set()) == ["ours"]


# --------------------------------------------------------------------------- bad inputs
def _cogvlm1_copy(tmp_path, edit=None):
    """A copy of the CogVLM1 fixture whose tensors ``edit(dict)`` may change; returns its directory."""
    src = tmp_path / "bad"
    shutil.copytree(hf_dir("cogvlm1"), src)
    if edit is not None:
        with safe_open(str(src / "model.safetensors"), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        edit(tensors)
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def _truncate(src):
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _pickles_only(src):
    os.remove(src / "model.safetensors")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02 not to be unpickled")


BAD_INPUTS = {
    "missing key": (lambda t: t.pop("model.layers.1.mlp.vision_mlp.up_proj.weight"), None,
                    r"missing key model\.layers\.1\.mlp\.vision_mlp\.up_proj\.weight"),
    "unexpected key": (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(2, np.float32)}), None,
                       r"unexpected key model\.layers\.0\.mlp\.extra\.weight"),
    "extra layer": (lambda t: t.update({"model.layers.2.input_layernorm.weight": np.zeros(64, np.float32)}), None,
                    r"unexpected key model\.layers\.2\.input_layernorm\.weight"),
    "transposed": (lambda t: t.update({"model.layers.0.mlp.language_mlp.gate_proj.weight":
                                       t["model.layers.0.mlp.language_mlp.gate_proj.weight"].T.copy()}), None,
                   r"model\.layers\.0\.mlp\.language_mlp\.gate_proj\.weight: expected shape \(96, 64\), got \(64, 96\)"),
    "truncated": (None, _truncate, r"model\.safetensors is truncated"),
    "pickles only": (None, _pickles_only, r"pytorch_model\.bin.*never unpickles.*safe_serialization=True"),
    "wrong rope_theta": (None, lambda src: (src / "config.json").write_text(
        (src / "config.json").read_text().replace('"rms_norm_eps"', '"rope_theta": 500000.0, "rms_norm_eps"')),
        r"inv_freq does not match rope_theta 500000"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_nothing(tmp_path, case):
    edit, damage, message = BAD_INPUTS[case]
    src = _cogvlm1_copy(tmp_path, edit)
    if damage is not None:
        damage(src)
    with pytest.raises(CheckpointError, match=message):
        convert_hf_to_ours(str(src), str(tmp_path / "out"), progress=False)
    assert leftovers(str(tmp_path), set()) == ["bad"]


def test_index_naming_a_missing_shard(tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(hf_dir("cogvlm2"), src)
    os.remove(src / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        convert_hf_to_ours(str(src), str(tmp_path / "out"), progress=False)
    assert leftovers(str(tmp_path), set()) == ["bad"]


@pytest.mark.parametrize("index,message", [
    ({"weight_map": ["lm_head.weight"]}, "weight_map must be a non-empty object of tensor name -> shard file"),
    ({"weight_map": {}}, "weight_map must be a non-empty object"),
    ({"weight_map": "model.safetensors"}, "weight_map must be a non-empty object"),
    ([], "expected an object with a 'weight_map'"),
    ({"metadata": {}}, "expected an object with a 'weight_map'"),
    ({"weight_map": {"lm_head.weight": 1}}, "weight_map['lm_head.weight'] must be the name of a .safetensors file"),
    ({"weight_map": {"lm_head.weight": "../x.safetensors"}}, "must be the name of a .safetensors file beside"),
    ({"weight_map": {"lm_head.weight": "model.bin"}}, "must be the name of a .safetensors file"),
], ids=lambda x: str(x)[:40])
def test_a_bad_index_is_named(tmp_path, index, message):
    src = tmp_path / "bad"
    shutil.copytree(hf_dir("cogvlm2"), src)
    (src / convert_hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        convert_hf_to_ours(str(src), str(tmp_path / "out"), progress=False)
    assert f"{src / convert_hf.INDEX_FILE} is not a valid safetensors index: " in str(e.value) and message in str(e.value)
    (src / convert_hf.INDEX_FILE).write_text("{cut")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        convert_hf_to_ours(str(src), str(tmp_path / "out"), progress=False)


def test_every_problem_listed_at_once(tmp_path):
    def edit(t):
        t.pop("model.norm.weight")
        t.pop("model.vision.boi")
        t["lm_head.weight"] = t["lm_head.weight"].T.copy()
    with pytest.raises(CheckpointError) as err:
        read_hf_checkpoint(str(_cogvlm1_copy(tmp_path, edit)), progress=False)
    msg = str(err.value)
    assert "missing key model.norm.weight" in msg and "missing key model.vision.boi" in msg
    assert "lm_head.weight: expected shape (600, 64), got (64, 600)" in msg


def test_inv_freq_off_by_an_ulp_survives_a_round_trip(tmp_path):
    """A source whose buffer differs from ours in the last bit is accepted and exported unchanged."""
    def edit(t):
        for i in range(2):
            v = t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"]
            v[3] = np.nextafter(v[3], np.float32(1))
    src = _cogvlm1_copy(tmp_path, edit)
    convert_hf_to_ours(str(src), str(tmp_path / "ours"), progress=False)
    assert len(read_meta(str(tmp_path / "ours"))["hf"]["inv_freq"]) == 8
    convert_ours_to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"), progress=False)
    assert raw_tensors(str(tmp_path / "hf")) == raw_tensors(str(src))


def test_inv_freq_may_be_absent(tmp_path):
    def edit(t):
        for i in range(2):
            t.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq")
    params = read_hf_checkpoint(str(_cogvlm1_copy(tmp_path, edit)), progress=False)
    assert "layers_1" in params


def test_a_bad_checkpoint_json_is_named(tmp_path, round_trips):
    ours = tmp_path / "ours"
    shutil.copytree(round_trips["cogvlm2"][0], ours)
    meta = json.loads((ours / checkpoint.FORMAT_FILE).read_text())
    for bad, message in (("[]", "must be a JSON object"), ("{cut", "is not valid JSON"),
                         (json.dumps({**meta, "hf": []}), "must be a JSON object (with an 'hf' object"),
                         (json.dumps({**meta, "hf": {**meta["hf"], "shards": [1]}}), "hf.shards must be an object")):
        (ours / checkpoint.FORMAT_FILE).write_text(bad)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            convert_ours_to_hf(str(ours), str(tmp_path / "hf"), progress=False)
        assert not (tmp_path / "hf").exists()
