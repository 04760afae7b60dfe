"""An HF safetensors checkpoint straight into sharded ``jax.Array``s, each process reading only its slices.

Every parameter is built with ``jax.make_array_from_callback``: the callback asks for the region of our
layout one of this process's devices holds, :func:`cogvlm_jax.convert.mapping.hf_region` turns it into the region
of the stored (HF) layout behind it, and only those bytes are read (``SafetensorsFile.read_region``)
and re-laid out (``mapping.relayout``). Devices of this process that hold the same region (a dimension
replicated over a mesh axis) share one read, so a replicated tensor is read once per process. Other
processes' devices are never asked for: on a multi-host mesh each process reads its share of the
checkpoint, plus the small rotary buffers it checks.

The host holds at most the distinct regions of one tensor at a time (this process's share of it).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from cogvlm_jax.convert import mapping
from cogvlm_jax.convert.convert_hf import DTYPES, check_keys, note_inv_freq, open_tensors
from flax.traverse_util import unflatten_dict
from tqdm.auto import tqdm

from cogvlm_jax.config import CogVLMConfig


def _region_key(index, shape) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def read_hf_sharded(path: str, config: CogVLMConfig, shardings: Mapping[tuple, jax.sharding.Sharding], dtype,
                    progress: bool = True, facts: dict | None = None) -> dict:
    """Our parameter tree of ``jax.Array``s, each leaf in ``shardings[leaf path]``, cast to ``dtype`` (None:
    each tensor's stored dtype).

    Checks every key and shape against ``config`` first (``CheckpointError`` naming each problem), like
    ``read_hf_checkpoint``, whose result this equals bit for bit once gathered. ``facts``: filled with
    what an export needs to know about the source (how it stored the rotary buffer).
    """
    entries = open_tensors(path)
    check_keys(entries, config, path)
    dtype = None if dtype is None else np.dtype(dtype)
    flat = {}
    order = sorted(entries, key=lambda k: (entries[k][0].path, entries[k][1].index))
    desc = "reading" if jax.process_count() == 1 else f"reading (process {jax.process_index()})"
    for key in tqdm(order, desc=desc, unit="tensor", disable=not progress):
        st, info = entries[key]
        ours, transform = mapping.hf_to_ours_key(key)
        if ours is None:  # the rotary buffer: tiny, checked against the config, not a parameter
            note_inv_freq(key, st.read(key), config, {} if facts is None else facts)
            continue
        shape = mapping.ours_shape(info.shape, transform)
        want = DTYPES[info.code] if dtype is None else dtype
        regions: dict[tuple, np.ndarray] = {}

        def read(index, key=key, st=st, transform=transform, shape=shape, regions=regions, want=want):
            k = _region_key(index, shape)
            if k not in regions:
                a = mapping.relayout(transform, st.read_region(key, mapping.hf_region(transform, index)))
                regions[k] = a.astype(want, copy=False)
            return regions[k]

        flat[ours] = jax.make_array_from_callback(shape, shardings[ours], read, dtype=want)
        del regions
    return unflatten_dict(flat)
