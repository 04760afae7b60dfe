"""The parameters of a checkpoint on disk, in either format, placed on one device or straight onto a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from cogvlm_jax.convert import checkpoint
from cogvlm_jax.convert.convert_hf import read_hf_checkpoint
from cogvlm_jax.convert.hf_sharded import read_hf_sharded
from flax.traverse_util import flatten_dict

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.parallel.sharding import abstract_sharded_params, param_shardings


def read_params(path: str, config: CogVLMConfig, dtype, *, mesh=None, progress: bool = True, rules=None):
    """The parameter tree of the checkpoint at ``path`` (an HF directory or ours), as ``dtype`` arrays, in
    checkpoint order.

    ``mesh``: every parameter goes straight into its sharded layout (by ``rules``, default
    ``axes.RULES``) and each process reads only the slices its own devices hold: from HF safetensors
    region by region (``hf_sharded.py``), from our Orbax format by restoring into the sharded abstract tree.
    """
    ours = checkpoint.is_our_checkpoint(path)
    if mesh is None:
        def place(_path, a):
            return jnp.asarray(a, dtype=dtype)

        if ours:
            return jax.tree_util.tree_map(lambda a: place(None, a), checkpoint.restore_params(path))
        return read_hf_checkpoint(path, config, progress=progress, place=place)
    if ours:
        return checkpoint.restore_params(path, abstract_sharded_params(config, mesh, dtype, rules))
    shardings = flatten_dict(param_shardings(config, mesh, rules))
    return read_hf_sharded(path, config, shardings, dtype, progress=progress)
