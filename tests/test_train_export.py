"""A checkpoint saved by training stores large parameters in row blocks, and exports a block at a time.

``checkpoint.BLOCK_BYTES`` is lowered to 32 kB so that the CogVLM1 fixture's embedding and lm_head (150 kB
in float32, as the real CogVLM2's are 2.1 GB against 64 MB), its patch embedding and its QKV kernels take
the row-block path when saved by ``train.save_state`` and exported by ``cogvlm-jax convert --to hf``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from cogvlm_jax.convert import checkpoint, mapping
from cogvlm_jax.convert.checkpoint import CheckpointError, block_reader
from cogvlm_jax.convert.convert_hf import read_hf_checkpoint
from conftest import fixture_dir
from flax.traverse_util import flatten_dict
from test_convert import hf_dir
from test_convert_blocks import Reads, weight_files

from cogvlm_jax.config import load_config
from cogvlm_jax.parallel.axes import make_mesh
from cogvlm_jax.training import run as finetune
from cogvlm_jax.training import trainer as train
from cogvlm_jax.training.export import main_convert
from cogvlm_jax.training.export import to_hf as convert_ours_to_hf

BUDGET = 32 * 1024
SRC = hf_dir("cogvlm1")
CASES = {"vision-expert": ("vision-expert", None), "full-fsdp2": ("full", (1, 2, 1))}


def _trainer(mode: str, mesh_shape):
    run = finetune.RunConfig(data="train.jsonl", model=SRC, tokenizer=os.path.join(fixture_dir("cogvlm1"), "tokenizer"),
                             train=train.TrainConfig(trainable=mode), mesh=mesh_shape or (1, 1, 1))
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape, devices=jax.devices()[:2])
    return run, train.Trainer(load_config(SRC), run.train, mesh=mesh)


def _leaves(state) -> dict:
    return {"/".join(map(str, p)): np.asarray(v) for p, v in
            flatten_dict(jax.device_get(train._state_tree(state))).items()}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """A state (trained parameters moved off the starting model's) saved by the training saver, exported by
    the converter and, for reference, by the run's own in-memory export."""
    mode, mesh_shape = CASES[request.param]
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    run, tr = _trainer(mode, mesh_shape)
    state, frozen = tr.init(read_hf_checkpoint(SRC, progress=False))
    # the export must take the trained leaves from the state, not from the starting model
    state = state.replace(trainable=jax.tree.map(lambda a: a * 1.5 + 0.25, state.trainable))
    ckpt = str(root / "checkpoints" / "step_00000001")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "BLOCK_BYTES", BUDGET)
        train.save_state(ckpt, state, {"run": run.to_dict()})
        reads = Reads(mp)
        convert_ours_to_hf(ckpt, str(root / "hf"), progress=False)
    finetune.export_model(tr, state, frozen, tr.config, str(root / "reference"), run.dtype, progress=False)
    return request.param, root, ckpt, state, reads


def test_large_trained_parameters_are_stored_and_exported_in_row_blocks(saved):
    case, root, ckpt, state, reads = saved
    rows, _ = block_reader(os.path.join(ckpt, train.STATE_DIR))
    big = {p: a for p, a in flatten_dict(state.trainable).items() if a.nbytes > BUDGET}
    expect = {"full": 7, "vision-expert": 2}[CASES[case][0]]  # embedding, lm_head, patch embedding, 4 / 2 QKV
    assert len(big) == expect, sorted(big)
    for p, a in big.items():
        axis = mapping.rows_axis(mapping.transform_of(p), a.ndim)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(checkpoint, "BLOCK_BYTES", BUDGET)
            n = rows(("trainable",) + p, axis)
        assert n is not None and n < a.shape[axis], (p, n)  # stored in bands of whole chunks, not one chunk
        sizes = [size for leaf, size in reads.blocks if leaf == ("trainable",) + p]  # the leaf's path in the state
        assert len(sizes) > 1 and sum(sizes) == a.nbytes and max(sizes) <= BUDGET, (p, sizes)
    assert {leaf for leaf, _ in reads.blocks} == {("trainable",) + p for p in big}
    if CASES[case][0] == "vision-expert":  # the frozen embedding and lm_head come from the HF start, in regions
        assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(reads.whole)
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= {name for name, _ in reads.regions}
    # bit for bit what the run's own export writes from memory
    assert weight_files(str(root / "hf")) == weight_files(str(root / "reference"))
    with open(root / "hf" / "config.json") as a, open(root / "reference" / "config.json") as b:
        assert a.read() == b.read()
    assert "tokenizer_config.json" in os.listdir(root / "hf")


def test_restores_exactly_into_another_layout(saved):
    """Restoring (``train --resume``) reads the block-chunked leaves back bit for bit, onto one device from a
    mesh-saved checkpoint and onto a mesh from a one-device one."""
    case, _, ckpt, state, _ = saved
    mode, mesh_shape = CASES[case]
    _, tr = _trainer(mode, None if mesh_shape else (1, 2, 1))
    like, _ = tr.init(read_hf_checkpoint(SRC, progress=False), seed=3)
    restored = train.restore_state(ckpt, like)
    want, got = _leaves(state), _leaves(restored)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert v.dtype == got[k].dtype and np.array_equal(v, got[k]), k
    if tr.mesh is not None:  # onto the mesh, sharded
        qkv = restored.trainable["layers_0"]["self_attn"]["vision_expert_query_key_value"]["kernel"]
        assert qkv.sharding.shard_shape(qkv.shape) == (192, 32)


def test_a_lora_checkpoint_or_a_bare_state_is_refused_clearly(tmp_path):
    run, tr = _trainer("lora", None)
    state, _ = tr.init(read_hf_checkpoint(SRC, progress=False))
    train.save_state(str(tmp_path / "lora"), state, {"run": run.to_dict()})
    with pytest.raises(CheckpointError, match="holds LoRA factors; export them merged with `cogvlm-jax train"):
        convert_ours_to_hf(str(tmp_path / "lora"), str(tmp_path / "out"), progress=False)
    train.save_state(str(tmp_path / "bare"), state)
    with pytest.raises(CheckpointError, match="records no run settings"):
        convert_ours_to_hf(str(tmp_path / "bare"), str(tmp_path / "out"), progress=False)
    with pytest.raises(CheckpointError, match="already a cogvlm-jax checkpoint; use --to hf"):
        main_convert(str(tmp_path / "lora"), str(tmp_path / "out"), to="ours")
    assert not os.path.exists(tmp_path / "out")


def test_the_export_of_a_run_keeps_its_starting_models_file_split(tmp_path):
    """``convert --to hf`` of a training checkpoint writes the files of the run's starting model: an HF
    checkpoint's own split, or the one ours recorded when it was converted (None: one file)."""
    from cogvlm_jax.convert import convert_hf
    from cogvlm_jax.training.export import source_shards

    sharded = os.path.join(fixture_dir("cogvlm2"), "checkpoint")
    with open(os.path.join(sharded, convert_hf.INDEX_FILE)) as f:
        split = json.load(f)["weight_map"]
    assert source_shards(sharded) == split and len(set(split.values())) == 2
    ours = convert_hf.convert_hf_to_ours(sharded, str(tmp_path / "ours"), progress=False)
    assert source_shards(ours) == split
    assert source_shards(os.path.join(fixture_dir("cogvlm1"), "checkpoint")) is None
