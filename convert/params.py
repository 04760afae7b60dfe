"""The parameters of a checkpoint on disk, in either format, placed on one device or straight onto a mesh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from cogvlm_jax.convert import checkpoint, mapping
from cogvlm_jax.convert.convert_hf import open_tensors, read_hf_checkpoint
from cogvlm_jax.convert.hf_sharded import read_hf_sharded
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.dtypes import as_dtype
from cogvlm_jax.models import quantize as quant_lib
from cogvlm_jax.models.cogvlm import abstract_params
from cogvlm_jax.parallel.sharding import abstract_sharded_params, param_shardings


def read_params(path: str, config: CogVLMConfig, dtype, *, mesh=None, progress: bool = True, rules=None,
                quant=None):
    """The parameter tree of the checkpoint at ``path`` (an HF directory or ours), as ``dtype`` arrays, in
    checkpoint order.

    ``mesh``: every parameter goes straight into its sharded layout (by ``rules``, default
    ``axes.RULES``) and each process reads only the slices its own devices hold: from HF safetensors
    region by region (``hf_sharded.py``), from our Orbax format by restoring into the sharded abstract tree.
    ``quant``: how a quantized checkpoint of ours (``checkpoint.stored_quantization``) is held
    (``models/quantize.py``): its integer kernels and float32 scales are read as they are stored, then
    given the held form (int4 unpacked into ``jnp.int4`` where the platform holds it so).
    """
    ours = checkpoint.is_our_checkpoint(path)
    stored_quant = checkpoint.stored_quantization(path) if ours else None
    if stored_quant is not None:
        if quant is None:
            raise checkpoint.CheckpointError(
                f"{path} holds {stored_quant.format}-quantized weights (convert --quantize); this reads float "
                "weights (training, export): use the checkpoint it was converted from, or cogvlm_jax.load it")
        return _read_quantized(path, config, dtype, stored_quant, quant or stored_quant, mesh, rules)
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


def _read_quantized(path, config, dtype, stored_quant, quant, mesh, rules):
    """A quantized checkpoint of ours: restored into the stored tree (float leaves in ``dtype``), then each
    stored kernel given ``quant``'s held form."""
    if mesh is None:
        target = abstract_params(config, dtype, stored_quant)
    else:
        target = abstract_sharded_params(config, mesh, dtype, rules, stored_quant)
    params = flatten_dict(checkpoint.restore_params(path, target))
    if quant.packed == stored_quant.packed:
        return unflatten_dict(params)
    held = None if mesh is None else flatten_dict(param_shardings(config, mesh, rules, quant))
    for p in quantized_kernel_paths(params):
        fn = jax.jit(functools.partial(quant_lib.from_stored, in_axis=quant_lib.in_axis_of(p), quant=quant),
                     out_shardings=None if held is None else held[p])
        params[p] = fn(params[p])
    return unflatten_dict(params)


def quantized_kernel_paths(flat) -> list[tuple]:
    """The kernels of a flattened tree that have a ``kernel_scale`` beside them."""
    return [p[:-1] + ("kernel",) for p in flat if p[-1] == quant_lib.SCALE]


def stored_inv_freq(path: str, config: CogVLMConfig) -> tuple[float, ...] | None:
    """The rotary inverse frequencies the checkpoint at ``path`` stores, exactly (its dtype's values as
    Python floats), or None where it stores none.

    The reference code rotates by its ``rotary_emb.inv_freq`` buffer as loaded (CogVLM1's float32, computed
    by torch in float32), not by frequencies recomputed in the compute dtype: the float64 reference mode
    reads them here (``api.load``). An HF checkpoint: its ``model.layers.N.self_attn.rotary_emb.inv_freq``
    tensors, which must agree across the layers. One of ours: the buffer the conversion recorded
    (``checkpoint.json``: the source's values where they differ from ``mapping.rotary_inv_freq``, else that
    in the source's dtype); a checkpoint not converted from one that stored them has none."""
    if checkpoint.is_our_checkpoint(path):
        facts = checkpoint.read_meta(path).get("hf", {})
        if "inv_freq" in facts:
            return tuple(float(f) for f in facts["inv_freq"])
        if "inv_freq_dtype" in facts:
            values = mapping.rotary_inv_freq(config).astype(as_dtype(facts["inv_freq_dtype"]))
            return tuple(float(f) for f in values.astype(np.float64))
        return None
    entries = open_tensors(path)
    keys = [k for k in mapping.buffer_hf_keys(config) if k in entries]
    if not keys:
        return None
    arrays = [np.asarray(entries[k][0].read(k)).astype(np.float64) for k in keys]
    for k, a in zip(keys[1:], arrays[1:]):
        if a.shape != arrays[0].shape or not np.array_equal(a, arrays[0]):
            raise checkpoint.CheckpointError(f"{path}: {k} differs from {keys[0]}; the layers must store the same "
                                             "rotary frequencies")
    return tuple(float(f) for f in arrays[0])
