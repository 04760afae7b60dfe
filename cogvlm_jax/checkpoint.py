"""Our checkpoint format, saved and restored atomically.

A checkpoint is a directory::

    config.json        the HF-style config (``CogVLMConfig.to_hf_dict``), so the HF tools read it too
    checkpoint.json    {"format": "cogvlm-jax", "version": 1, "hf": {...}}: facts an HF export needs
                       that are not parameters (the dtype the source stored ``inv_freq`` in)
    params/            an Orbax PyTree checkpoint of the parameter tree (layers unrolled, see
                       ``convert/mapping.py``), dtypes kept bit for bit (bfloat16 included)
    [generation_config.json, tokenizer files, ...]   copied through unchanged

Writes go to a temporary directory beside the destination that is renamed into place at the end, so
an interrupted run never leaves a partial checkpoint at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

FORMAT_FILE = "checkpoint.json"
PARAMS_DIR = "params"
FORMAT_NAME = "cogvlm-jax"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint we cannot read or write; the message names the key, file or directory."""


# --------------------------------------------------------------------------- atomic directories
def check_destination(out_dir: str, overwrite: bool = False) -> None:
    """Refuse a destination that is a file, or a non-empty directory unless ``overwrite``."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise CheckpointError(f"destination {out_dir} exists and is not a directory")
    if os.listdir(out_dir) and not overwrite:
        raise CheckpointError(f"destination {out_dir} exists and is not empty; "
                              "pass overwrite=True (CLI: --overwrite) to replace it")


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it becomes ``out_dir``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``out_dir`` is
    left as it was. With ``overwrite`` an existing ``out_dir`` is moved aside, the new one renamed in,
    and the old one deleted (two renames: the old tree is never deleted before the new one is in place).
    """
    out_dir = os.path.abspath(out_dir)
    check_destination(out_dir, overwrite)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint should be readable like any directory
        yield tmp
        check_destination(out_dir, overwrite)  # something may have appeared there meanwhile
        old = None
        if os.path.lexists(out_dir):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_files(paths: Iterable[str], out_dir: str) -> list[str]:
    """Copy each existing file into ``out_dir`` under its base name; returns the names copied."""
    names = []
    for p in paths:
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(out_dir, os.path.basename(p)))
            names.append(os.path.basename(p))
    return names


def write_json(path: str, obj: Any) -> None:
    """JSON the way Hugging Face writes its files (indent 2, sorted keys, trailing newline)."""
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- our format
def is_our_checkpoint(path: str) -> bool:
    """True for a directory holding ``config.json`` and an Orbax ``params/`` directory."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def read_meta(path: str) -> dict[str, Any]:
    """``checkpoint.json`` of one of our checkpoints (empty if it has none)."""
    p = os.path.join(path, FORMAT_FILE)
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


def save_params(out_dir: str, params: Mapping, config, overwrite: bool = False, *,
                meta: Mapping[str, Any] | None = None, extra_files: Iterable[str] = (),
                compress: bool = False) -> str:
    """Write ``params`` (our nested dict, numpy or jax arrays) and ``config`` as one of our checkpoints.

    ``meta`` is stored in ``checkpoint.json``; ``extra_files`` (paths; missing ones skipped) are copied
    in beside ``config.json``. ``compress``: zstd in Orbax; normally distributed bfloat16 weights shrink by
    about a fifth, but saving and restoring take about twice as long and saving buffers more memory, so it
    is off by default. Atomic: see :func:`atomic_directory`. Returns ``out_dir``.
    """
    with atomic_directory(out_dir, overwrite) as tmp:
        write_json(os.path.join(tmp, "config.json"), config.to_hf_dict())
        write_json(os.path.join(tmp, FORMAT_FILE),
                   {"format": FORMAT_NAME, "version": FORMAT_VERSION, **dict(meta or {})})
        copy_files(extra_files, tmp)
        with _saver(compress) as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), _plain_dict(params))
    return out_dir


def _saver(compress: bool):
    """A synchronous Orbax PyTree checkpointer that writes host arrays without copying them first.

    Orbax's default numpy handler deep-copies every host array before writing (in case the caller
    mutates it during an async save): a second copy of the whole model in memory. Our save is
    synchronous, so the copy is skipped where this Orbax version allows it.
    """
    import jax
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    try:
        registry = th.create_type_handler_registry(
            (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, th.get_type_handler(jax.Array)))
        handler = ocp.PyTreeCheckpointHandler(use_compression=compress, type_handler_registry=registry)
    except (TypeError, AttributeError):  # an Orbax without these options: its defaults
        handler = ocp.PyTreeCheckpointHandler()
    return ocp.Checkpointer(handler)


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested mappings -> {path tuple: leaf} (a lone top-level "params" collection is unwrapped)."""
    if not prefix and set(tree) == {"params"} and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten_tree(flat: Mapping[tuple, Any]) -> dict:
    """{path tuple: leaf} -> nested plain dicts."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def _plain_dict(tree: Mapping) -> dict:
    """A nested plain ``dict`` (FrozenDicts unfrozen, a lone top-level "params" collection unwrapped)."""
    if set(tree) == {"params"} and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    return {k: _plain_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _params_dir(path: str) -> str:
    """The Orbax directory of a checkpoint: ``path/params``, or ``path`` itself if it is one."""
    for p in (os.path.join(path, PARAMS_DIR), path):
        if os.path.isdir(p) and os.path.exists(os.path.join(p, "_METADATA")):
            return os.path.abspath(p)
    raise CheckpointError(f"{path} is not a cogvlm-jax checkpoint (no Orbax {PARAMS_DIR}/ directory); "
                          "convert a Hugging Face checkpoint with `cogvlm-jax convert SRC DST`")


def params_metadata(path: str) -> dict:
    """The stored tree as ``jax.ShapeDtypeStruct`` leaves (no sharding): shapes/dtypes without reading data."""
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(_params_dir(path))
    item = getattr(meta, "item_metadata", meta)  # newer Orbax wraps the tree in a StepMetadata
    tree = getattr(item, "tree", item)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def restore_params(path: str, target: Any = None, *, subset: Iterable[tuple] | None = None) -> dict:
    """Read the parameter tree of one of our checkpoints.

    ``target=None``: host numpy arrays in the stored dtypes. ``target``: a tree of the same structure
    with ``jax.ShapeDtypeStruct`` leaves; each leaf is restored as a ``jax.Array`` with the leaf's dtype
    (cast if it differs from the stored one) and ``.sharding`` (one device if it has none), so each
    device reads only its shard. Structure or shape differences raise :class:`CheckpointError`.
    ``subset``: only these leaf paths (tuples), as host numpy arrays (a nested dict of just those).
    """
    import jax
    import orbax.checkpoint as ocp

    pdir = _params_dir(path)
    stored = params_metadata(path)
    if subset is not None:
        subset = list(subset)
        if not subset:
            return {}
        flat = flatten_tree(stored)
        unknown = [p for p in subset if p not in flat]
        if unknown:
            raise CheckpointError(f"checkpoint {pdir} has no parameter(s) " + ", ".join("/".join(p) for p in unknown))
        item = unflatten_tree({p: flat[p] for p in subset})
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            pdir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    if target is None:
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
        return ocp.PyTreeCheckpointer().restore(pdir, restore_args=args)
    _check_target(stored, target, pdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda t: t if getattr(t, "sharding", None) is not None
        else jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device), _plain_dict(target))
    return ocp.StandardCheckpointer().restore(pdir, target)


def _check_target(stored, target, where: str) -> None:
    """Name every path the target lacks, adds or shapes differently from the checkpoint."""
    have = {"/".join(p): v for p, v in flatten_tree(stored).items()}
    want = {"/".join(p): v for p, v in flatten_tree(target).items()}
    problems = [f"missing in target: {k}" for k in sorted(set(have) - set(want))]
    problems += [f"not in checkpoint: {k}" for k in sorted(set(want) - set(have))]
    problems += [f"{k}: expected shape {tuple(want[k].shape)}, got {tuple(have[k].shape)}"
                 for k in sorted(set(have) & set(want)) if tuple(have[k].shape) != tuple(want[k].shape)]
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match the target tree:\n  " + "\n  ".join(problems))
