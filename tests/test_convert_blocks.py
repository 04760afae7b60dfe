"""Tensors larger than the converter's block budget go through in row blocks, both ways, bit for bit.

``checkpoint.BLOCK_BYTES`` is lowered to 256 kB so that the CogVLM2 fixture's embedding and lm_head
(128256 x 64 bfloat16, 16 MB each, as the real model's 1.05 GB ones are against 64 MB) take the
row-block path; everything else stays whole.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from cogvlm_jax.convert import checkpoint, convert_hf
from cogvlm_jax.convert.checkpoint import CheckpointError, block_reader, restore_params, save_params
from cogvlm_jax.convert.convert_hf import SafetensorsFile, convert_hf_to_ours, convert_ours_to_hf, read_hf_checkpoint
from test_convert import FIXTURE_SHARD_BYTES, flat, hf_dir, leftovers, raw_tensors

from cogvlm_jax.config import load_config

BUDGET = 256 * 1024
SRC = hf_dir("cogvlm2")
BIG = {"lm_head.weight": ("lm_head", "kernel"), "model.embed_tokens.weight": ("embed_tokens", "embedding")}


def weight_files(path: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".index.json")):
            with open(os.path.join(path, name), "rb") as f:
                out[name] = f.read()
    return out


class Reads:
    """Every safetensors read (whole tensors, regions) and every block read from our checkpoints."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.whole, self.regions, self.blocks = [], [], []
        real_read, real_region, real_reader = SafetensorsFile.read, SafetensorsFile.read_region, convert_hf.block_reader
        mp.setattr(SafetensorsFile, "read", lambda st, name: self.whole.append(name) or real_read(st, name))

        def region(st, name, index):
            a = real_region(st, name, index)
            self.regions.append((name, a.nbytes))
            return a

        def reader(path):
            rows, read = real_reader(path)

            def read_block(leaf, index):
                a = read(leaf, index)
                self.blocks.append((leaf, a.nbytes))
                return a
            return rows, read_block
        mp.setattr(SafetensorsFile, "read_region", region)
        mp.setattr(convert_hf, "block_reader", reader)


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """The fixture converted and exported back with the small budget (as stored, and cast to float32 and back)."""
    base = tmp_path_factory.mktemp("blocks")
    paths = {k: str(base / k) for k in ("ours", "back", "ours32", "back16")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "BLOCK_BYTES", BUDGET)
        reads = {}
        for step, run in (
                ("ours", lambda: convert_hf_to_ours(SRC, paths["ours"], progress=False)),
                ("back", lambda: convert_ours_to_hf(paths["ours"], paths["back"], FIXTURE_SHARD_BYTES["cogvlm2"],
                                                    progress=False)),
                ("ours32", lambda: convert_hf_to_ours(SRC, paths["ours32"], "float32", progress=False)),
                ("back16", lambda: convert_ours_to_hf(paths["ours32"], paths["back16"], FIXTURE_SHARD_BYTES["cogvlm2"],
                                                      "bfloat16", progress=False))):
            with pytest.MonkeyPatch.context() as inner:
                reads[step] = Reads(inner)
                run()
    return paths, reads


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_hf_to_ours_reads_big_tensors_in_row_blocks(blocked, dtype):
    paths, reads = blocked
    r = reads["ours" if dtype is None else "ours32"]
    assert not set(BIG) & set(r.whole)  # never read whole...
    for key in BIG:  # ...but in blocks of at most the budget (cast included: float32 blocks are twice the bf16 read)
        sizes = [n for name, n in r.regions if name == key]
        assert len(sizes) > 10 and sum(sizes) == 128256 * 64 * 2, (key, len(sizes), sum(sizes))
        assert max(sizes) * (2 if dtype else 1) <= BUDGET
    assert len(r.whole) == len(raw_tensors(SRC)) - len(BIG)  # every smaller tensor is read whole
    # the same values as the whole-tensor reader gives, in the same dtypes
    direct = flat(read_hf_checkpoint(SRC, dtype=dtype, progress=False))
    stored = flat(restore_params(paths["ours" if dtype is None else "ours32"]))
    assert stored.keys() == direct.keys()
    for k, v in stored.items():
        assert v.dtype == direct[k].dtype and v.tobytes() == direct[k].tobytes(), k
    # stored in chunks of those blocks along the axis that holds the HF rows (axis 0: both keep HF's layout)
    rows, _ = block_reader(paths["ours"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "BLOCK_BYTES", BUDGET)
        assert rows(("lm_head", "kernel"), 0) == BUDGET // (64 * 2) and rows(("lm_head", "kernel"), 1) is None
        assert rows(("embed_tokens", "embedding"), 0) == BUDGET // (64 * 2)


def test_ours_to_hf_writes_big_tensors_in_row_blocks(blocked):
    paths, reads = blocked
    for step, itemsize in (("back", 2), ("back16", 4)):
        r = reads[step]
        for leaf in BIG.values():
            sizes = [n for p, n in r.blocks if p == leaf]
            assert len(sizes) > 10 and sum(sizes) == 128256 * 64 * itemsize and max(sizes) <= BUDGET, (step, leaf)
        assert {p for p, _ in r.blocks} == set(BIG.values())
    # byte for byte the published files, from bfloat16 and from the float32 copy cast back per block
    assert weight_files(paths["back"]) == weight_files(SRC)
    assert weight_files(paths["back16"]) == weight_files(SRC)


def test_a_checkpoint_saved_whole_exports_whole(tmp_path, monkeypatch):
    """A leaf stored as one chunk (saved from memory) cannot be read a block at a time: it is read whole."""
    ours = str(tmp_path / "ours")
    save_params(ours, read_hf_checkpoint(SRC, progress=False), load_config(SRC))
    monkeypatch.setattr(checkpoint, "BLOCK_BYTES", BUDGET)
    reads = Reads(monkeypatch)
    convert_ours_to_hf(ours, str(tmp_path / "back"), FIXTURE_SHARD_BYTES["cogvlm2"], progress=False)
    assert reads.blocks == []
    assert weight_files(str(tmp_path / "back")) == weight_files(SRC)


def test_a_bad_block_is_named_and_leaves_nothing(tmp_path, monkeypatch, blocked):
    monkeypatch.setattr(checkpoint, "BLOCK_BYTES", BUDGET)
    real_region = SafetensorsFile.read_region
    calls = []

    def short_region(st, name, index):  # the 3rd block of the lm_head comes back a row short
        a = real_region(st, name, index)
        calls.append(name)
        return a[:-1] if name == "lm_head.weight" and calls.count(name) == 3 else a
    monkeypatch.setattr(SafetensorsFile, "read_region", short_region)
    with pytest.raises(CheckpointError, match=r"lm_head\.kernel: a lazy leaf made bfloat16\(2047, 64\), declared "
                                              r"bfloat16\(2048, 64\)"):
        convert_hf_to_ours(SRC, str(tmp_path / "ours"), progress=False)
    assert leftovers(str(tmp_path), set()) == []

    real_reader = convert_hf.block_reader

    def reader(path):  # the 2nd block of the embedding comes back a column short
        rows, read = real_reader(path)
        seen = []

        def read_block(leaf, index):
            seen.append(leaf)
            a = read(leaf, index)
            return a[:, :-1] if leaf == ("embed_tokens", "embedding") and seen.count(leaf) == 2 else a
        return rows, read_block
    monkeypatch.setattr(convert_hf, "block_reader", reader)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight: produced bfloat16\(2048, 63\) at row "
                                              r"2048, planned BF16\(128256, 64\)"):
        convert_ours_to_hf(blocked[0]["ours"], str(tmp_path / "back"), progress=False)
    assert leftovers(str(tmp_path), set()) == []


def test_convert_with_a_mesh_streams_a_tile_at_a_time(tmp_path, monkeypatch):
    """convert --mesh: every tensor stored in chunks that tile its shard, those larger than the budget read and
    written a tile at a time; the values are those of the whole-tensor reader. On the CogVLM1 fixture (float32,
    tensors up to 150 kB) with a 16 kB budget."""
    from flax.traverse_util import flatten_dict

    from cogvlm_jax.parallel.axes import make_mesh
    from cogvlm_jax.parallel.sharding import param_shardings

    budget, src = 16 * 1024, hf_dir("cogvlm1")
    monkeypatch.setattr(checkpoint, "BLOCK_BYTES", budget)
    reads = Reads(monkeypatch)
    mesh = make_mesh(1, 4, 2)
    dst = convert_hf_to_ours(src, str(tmp_path / "ours"), progress=False, mesh=mesh)
    whole, regions = list(reads.whole), list(reads.regions)
    direct = flat(read_hf_checkpoint(src, progress=False))
    stored = flat(restore_params(dst))
    assert stored.keys() == direct.keys()
    for k, v in stored.items():
        assert v.dtype == direct[k].dtype and v.tobytes() == direct[k].tobytes(), k
    tree = checkpoint.tree_metadata(os.path.join(dst, checkpoint.PARAMS_DIR))
    shardings = flatten_dict(param_shardings(load_config(src), mesh))
    sharded = 0
    for key, m in flatten_dict(tree).items():
        shard, chunk = shardings[key].shard_shape(tuple(m.shape)), tuple(m.storage.chunk_shape)
        assert all(s % c == 0 for s, c in zip(shard, chunk)), (key, shard, chunk)
        too_big = np.prod(shard) * np.dtype(m.dtype).itemsize > budget
        assert (chunk != shard and np.prod(chunk) * np.dtype(m.dtype).itemsize <= budget) if too_big \
            else chunk == shard, (key, shard, chunk)
        sharded += shard != tuple(m.shape)
    assert sharded > 20
    # the embedding [600, 64], split by rows over (tensor, fsdp) = (2, 4): shards [75, 64] (19 kB), cut to [25, 64]
    # for the budget
    assert tuple(tree["embed_tokens"]["embedding"].storage.chunk_shape) == (25, 64)
    # tensors larger than the budget were read in regions of at most the budget, never whole
    big = {k for k, (_, shape, data) in raw_tensors(src).items() if len(data) > budget}
    assert len(big) > 10 and not big & set(whole) and {k for k, _ in regions} == big
    assert max(n for _, n in regions) <= budget
