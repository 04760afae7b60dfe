"""A checkpoint ``cogvlm-jax train`` saved (``OUT/checkpoints/step_N``) -> a Hugging Face checkpoint.

The trained parameters come from the saved state, the frozen ones (vision-expert training) from the run's
starting model, and they are written as the run's own export writes them (``run.export_model``), by
default in the run's dtype. Large parameters are read in row blocks, as from a converted checkpoint. Any
other checkpoint goes to the converter unchanged (``convert_hf.convert_ours_to_hf``).
"""

from __future__ import annotations

import json
import os

from cogvlm_jax.config import load_config
from cogvlm_jax.convert import convert_hf
from cogvlm_jax.convert.checkpoint import CheckpointError, is_our_checkpoint, read_meta
from cogvlm_jax.files import check_destination
from cogvlm_jax.hub import resolve
from cogvlm_jax.training import run as finetune
from cogvlm_jax.training import trainer as train


def source_shards(model: str) -> dict[str, str] | None:
    """The HF file split (tensor name -> file) of a run's starting model: an HF checkpoint's own, or the
    one ours recorded when it was converted; None for one file or no record."""
    if is_our_checkpoint(model):
        return read_meta(model).get("hf", {}).get("shards")
    return convert_hf.shard_files(convert_hf.open_tensors(model))


def training_source(ckpt_dir: str):
    """(source, config, the run's dtype, files to carry, the starting model's file split) of a checkpoint
    ``cogvlm-jax train`` saved."""
    with open(os.path.join(ckpt_dir, train.META_FILE)) as f:
        meta = json.load(f)
    if "run" not in meta:
        raise CheckpointError(f"{ckpt_dir}/{train.META_FILE} records no run settings; only checkpoints "
                              "`cogvlm-jax train` saved can be exported")
    run = finetune.RunConfig.from_dict(meta["run"])
    if run.train.trainable == "lora":
        raise CheckpointError(f"{ckpt_dir} holds LoRA factors; export them merged with "
                              f"`cogvlm-jax train --out RUN --resume` (it writes RUN/{finetune.EXPORT})")
    trained = convert_hf.orbax_source(os.path.join(ckpt_dir, train.STATE_DIR))
    parts = [(trained, {p[1:]: p for p in trained.specs if p[0] == "trainable"})]
    config = load_config(run.model)
    if run.train.trainable != "full":
        if is_our_checkpoint(run.model):
            base = convert_hf.orbax_source(run.model)
        else:
            _, params, _, bar = convert_hf.load_hf(run.model, config, None, False, lazy=True)
            bar.close()
            base = convert_hf.lazy_source(params)
        parts.append((base, {p: p for p in base.specs if p not in parts[0][1]}))
    return convert_hf.union_source(parts), config, run.dtype, finetune.export_files(run), source_shards(run.model)


def to_hf(src: str, dst: str, max_shard_bytes: int | None = None, dtype=None, *,
          overwrite: bool = False, progress: bool = True) -> str:
    """``src`` (a training checkpoint or one of ours) -> an HF safetensors checkpoint at ``dst``, split into
    the files of the HF checkpoint it comes from (the run's starting model's), or into shards of at most
    ``max_shard_bytes`` when given (see ``convert_hf.convert_ours_to_hf``)."""
    if not train.is_training_checkpoint(src):
        return convert_hf.convert_ours_to_hf(src, dst, max_shard_bytes, dtype, overwrite=overwrite,
                                             progress=progress)
    convert_hf.check_not_same(src, dst)
    check_destination(dst, overwrite)
    source, config, run_dtype, extra, shards = training_source(src)
    return convert_hf.write_hf(source, config, dst, max_shard_bytes, run_dtype if dtype is None else dtype, None,
                               None, overwrite, extra, progress, shards)


def main_convert(src: str, dst: str, to: str = "ours", revision=None, **kw) -> int:
    """``cogvlm-jax convert``: ``convert_hf.main_convert``, with training checkpoints exported by ``to_hf``.
    ``src``: a directory or a Hugging Face Hub id (``revision``: its branch, tag or commit)."""
    src = resolve(src, revision, progress=kw.get("progress", True))
    if train.is_training_checkpoint(src):
        if to == "ours":
            raise CheckpointError(f"{src} is already a cogvlm-jax checkpoint; use --to hf to export it")
        if to == "hf":
            kw.pop("mesh", None)
            to_hf(src, dst, **kw)
            return 0
    return convert_hf.main_convert(src, dst, to, **kw)
