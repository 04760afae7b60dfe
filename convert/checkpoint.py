"""Our checkpoint format, saved and restored atomically.

A checkpoint is a directory::

    config.json        the HF-style config (``CogVLMConfig.to_hf_dict``), so the HF tools read it too
    checkpoint.json    {"format": "cogvlm-jax", "version": 2, "hf": {...}}: facts an HF export needs
                       that are not parameters (the dtype the source stored ``inv_freq`` in)
    params/            an Orbax PyTree checkpoint of the parameter tree (layers unrolled, see
                       ``convert/mapping.py``), dtypes kept bit for bit (bfloat16 included)
    [generation_config.json, tokenizer files, ...]   copied through unchanged

Writes go to a temporary directory beside the destination that is renamed into place at the end, so
an interrupted run never leaves a partial checkpoint at the destination. A saved tree may hold
:class:`LazyArray` leaves, made a few at a time as they are written, so a conversion streams: the host
holds about two groups of ``STREAM_BYTES`` (or two tensors), not the model, whatever its size; on disk they are ordinary
numpy leaves (nothing changes for restoring).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import itertools
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict
from orbax.checkpoint import future

from cogvlm_jax.files import CheckpointError, atomic_directory, copy_files, write_json

FORMAT_FILE = "checkpoint.json"
PARAMS_DIR = "params"
FORMAT_NAME = "cogvlm-jax"
FORMAT_VERSION = 2  # 2: the lm_head kernel is [vocab, hidden] (HF's layout); version 1 stored it transposed


QUANTIZE_KEY = "quantize"  # checkpoint.json: {"format": "int8" | "int4", "vision": bool} of a quantized checkpoint


# --------------------------------------------------------------------------- our format
def stored_quantization(path: str):
    """The ``models.quantize.Quantization`` the parameters of our checkpoint at ``path`` are stored in
    (int4 packed, as checkpoints store it), or None: not quantized (or not one of ours)."""
    from cogvlm_jax.models.quantize import FORMATS, Quantization

    if not is_our_checkpoint(path):
        return None
    q = read_meta(path).get(QUANTIZE_KEY)
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("format") not in FORMATS:
        raise CheckpointError(f"{os.path.join(path, FORMAT_FILE)}: {QUANTIZE_KEY!r} must be "
                              f"{{'format': one of {FORMATS}, 'vision': bool}}, got {q!r}")
    return Quantization(q["format"], bool(q.get("vision", False)), packed=q["format"] == "int4")


def is_our_checkpoint(path: str) -> bool:
    """True for a directory holding ``config.json`` and an Orbax ``params/`` directory."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def read_meta(path: str) -> dict[str, Any]:
    """``checkpoint.json`` of one of our checkpoints (empty if it has none)."""
    p = os.path.join(path, FORMAT_FILE)
    if not os.path.exists(p):
        return {}
    try:
        with open(p) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); re-convert the checkpoint") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("hf", {}), dict):
        raise CheckpointError(f"{p} must be a JSON object (with an 'hf' object of facts, if any); re-convert the "
                              "checkpoint")
    return meta


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
    """A leaf to save whose data ``make()`` produces only when it is written (e.g. read from a file).

    :func:`save_params` writes lazy leaves in ``order``, in groups of about ``STREAM_BYTES``, each made
    just before its write and dropped after it (the next group is made while one is written). Stored like
    a numpy leaf of ``shape`` and ``dtype``.
    """
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]
    order: Any = 0  # sort key of the writes (e.g. file and offset, for sequential reads)
    # ``region(index)`` makes ``make()[index]`` (one step-1 slice per axis) without the rest: a leaf that has
    # it is stored in chunks of ``tile``, and made and written in runs of them if larger than BLOCK_BYTES
    region: Callable[[tuple[slice, ...]], np.ndarray] | None = None
    block_axis: int = 0  # the axis a tile is cut along to stay within BLOCK_BYTES
    chunks: tuple[int, ...] | None = None  # a chunk shape to store it in (e.g. its shard on a mesh)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def made(self) -> np.ndarray:
        """``make()``, checked against the declared shape and dtype."""
        return self._checked(self.make(), self.shape)

    def made_region(self, index: tuple[slice, ...]) -> np.ndarray:
        """``region(index)``, checked against the shape and dtype that slice of the leaf has."""
        return self._checked(self.region(index), tuple(len(range(*s.indices(n))) for s, n in zip(index, self.shape)))

    def _checked(self, a, shape: tuple[int, ...]) -> np.ndarray:
        a = np.asarray(a)
        if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(self.dtype):
            raise CheckpointError(f"a lazy leaf made {a.dtype}{tuple(a.shape)}, declared {np.dtype(self.dtype)}"
                                  f"{tuple(shape)}")
        return a

    @property
    def pieces(self) -> bool:
        """Whether :func:`save_params` makes and writes this leaf in pieces (runs of ``tile``): it is larger
        than BLOCK_BYTES and can make a region of itself."""
        return self.region is not None and self.nbytes > BLOCK_BYTES and self.tile != tuple(self.shape)

    @functools.cached_property
    def tile(self) -> tuple[int, ...]:
        """The chunk shape it is stored in: ``chunks`` (or ``shape``) cut along ``block_axis`` to at most
        BLOCK_BYTES where it can make regions of itself; cuts of ``chunks`` divide them (the stored chunks
        tile the shards)."""
        shape = tuple(self.chunks or self.shape)
        if not shape or self.region is None:
            return shape
        rows = block_rows(shape, np.dtype(self.dtype).itemsize, self.block_axis)
        if self.chunks is not None:
            rows = max(d for d in range(1, rows + 1) if shape[self.block_axis] % d == 0)
        return tuple(rows if d == self.block_axis else n for d, n in enumerate(shape))


def save_params(out_dir: str, params: Mapping, config, overwrite: bool = False, *,
                meta: Mapping[str, Any] | None = None, extra_files: Iterable[str] = (),
                compress: bool = False) -> str:
    """Write ``params`` (our nested dict of numpy or jax arrays or :class:`LazyArray`) and ``config``.

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
        with saver(compress) as save:
            save(os.path.join(tmp, PARAMS_DIR), plain_params(params))
    return out_dir


@contextlib.contextmanager
def saver(compress: bool = False):
    """A synchronous Orbax PyTree checkpointer that writes host arrays without copying them first, and
    :class:`LazyArray` leaves one at a time; yields ``save(directory, tree)``.

    Orbax's default numpy handler deep-copies every host array before writing (in case the caller
    mutates it during an async save): a second copy of the whole model in memory. Our save is
    synchronous, so the copy is skipped where this Orbax version allows it.
    """
    th = ocp.type_handlers
    try:
        registry = th.create_type_handler_registry(
            (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, th.get_type_handler(jax.Array)),
            (LazyArray, _streaming_handler()))
        handler = ocp.PyTreeCheckpointHandler(use_compression=compress, type_handler_registry=registry)
        eager = False
    except (TypeError, AttributeError):  # an Orbax without these options: its defaults, lazy leaves made first
        handler, eager = ocp.PyTreeCheckpointHandler(), True
    with ocp.Checkpointer(handler) as ckptr:
        def save(directory: str, tree: Mapping) -> None:
            if eager:
                tree = jax.tree.map(lambda x: x.made() if isinstance(x, LazyArray) else x, tree)
            ckptr.save(directory, tree)
        yield save


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Give the memory of freed arrays back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Tensors made and dropped one after another in several threads (ours and tensorstore's) leave
    glibc's heaps fragmented: freed but never returned, the resident set grows with every tensor (in an
    export in pieces, to most of the checkpoint's size). Trimming after each piece keeps it flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


STREAM_BYTES = 64 * 2**20  # lazy leaves are made and written in groups of about this many bytes
# A tensor larger than this is converted in blocks of at most this many bytes along one axis, both ways (the
# real CogVLM2's embedding and lm_head are 1.05 GB each); on disk such a leaf is chunked in those blocks.
BLOCK_BYTES = 64 * 2**20


def block_rows(shape: tuple[int, ...], itemsize: int, axis: int) -> int:
    """Indices of ``axis`` per block: as many as fit in BLOCK_BYTES (at least one)."""
    per_index = itemsize * int(np.prod(shape, dtype=np.int64)) // max(shape[axis], 1)
    return max(1, min(shape[axis], BLOCK_BYTES // max(per_index, 1)))


def tiles(shape: tuple[int, ...], tile: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The indices of the tiles of ``tile`` shape that cover ``shape``, in C order (edge tiles may be smaller)."""
    for corner in itertools.product(*[range(0, n, t) for n, t in zip(shape, tile)]):
        yield tuple(slice(a, min(a + t, n)) for a, t, n in zip(corner, tile, shape))


async def _made_ahead(items: list, make: Callable[[Any], Any], write: Callable[[Any, Any], Any]) -> None:
    """``await write(item, make(item))`` for each item in order, making the next item (in a thread) while one
    is written, so at most two made items exist at once; the heap is trimmed after each write."""
    if not items:
        return
    pending = asyncio.create_task(asyncio.to_thread(make, items[0]))
    try:
        for k, item in enumerate(items):
            value = await pending
            pending = asyncio.create_task(asyncio.to_thread(make, items[k + 1])) if k + 1 < len(items) else None
            await write(item, value)
            del value
            trim_heap()
    except BaseException:
        if pending is not None and not pending.done():
            pending.cancel()
        raise


def _streaming_handler():
    """Orbax's numpy handler, writing :class:`LazyArray` leaves in their order, a group at a time.

    Each group (consecutive leaves of at most ``STREAM_BYTES``, or one leaf) is made, then written as
    one batch while the next group is made, so at most two groups exist at once. Batches, not single
    leaves: every write to an OCDBT checkpoint commits a new version of its index (writes issued together
    share one), and thousands of small commits cost minutes and rewrite the growing index each time. On
    disk each leaf is what the numpy handler writes (same typestr, same tensorstore spec, built by Orbax),
    except for the chunk shape, ``LazyArray.tile``; restoring needs nothing of ours.

    A leaf larger than ``BLOCK_BYTES`` that can make a region of itself (``LazyArray.pieces``) is a group
    alone, written in runs of tiles of at most ``STREAM_BYTES`` (the next run made while one is written):
    each write fills whole chunks, so tensorstore never holds a partial chunk, nor the tensor.
    """
    def made(group):
        return [leaf.made() for leaf, _, _ in group]

    class StreamingHandler(ocp.type_handlers.NumpyHandler):
        async def serialize(self, values, infos, args=None):
            args = list(args or [ocp.SaveArgs()] * len(values))
            order = sorted(range(len(values)), key=lambda i: values[i].order)
            groups, size = [[]], 0
            for i in order:
                n = values[i].nbytes
                if groups[-1] and (size + n > STREAM_BYTES or values[i].pieces or groups[-1][-1][0].pieces):
                    groups.append([])
                    size = 0
                groups[-1].append((values[i], infos[i], args[i]))
                size += n
            return [future.CommitFutureAwaitingContractedSignals(self._stream(groups), name="cogvlm_stream")]

        async def _stream(self, groups):
            def make(group):  # a leaf in pieces makes them as it writes them
                return None if group[0][0].pieces else made(group)

            async def write(group, arrays):
                if arrays is None:
                    await self._write_pieces(*group[0])
                else:
                    stores = [await self._open(leaf, info, arg) for leaf, info, arg in group]
                    await asyncio.gather(*[t.write(a, can_reference_source_data_indefinitely=True)
                                           for t, a in zip(stores, arrays) if t is not None])

            await _made_ahead(groups, make, write)

        async def _open(self, leaf: LazyArray, info, arg):
            """The leaf's zarr array, created with Orbax's spec chunked in ``leaf.tile`` (None off process 0)."""
            await info.await_path_creation()
            ocdbt = info.is_ocdbt_checkpoint
            # the process index an OCDBT write goes under, as the numpy handler chooses it
            process = (self._override_ocdbt_process_id or ocp.multihost.process_index()) if ocdbt else None
            spec = ocp.type_handlers.get_json_tspec_write(
                info=info, arg=arg, global_shape=leaf.shape, local_shape=leaf.shape, dtype=np.dtype(leaf.dtype),
                use_ocdbt=ocdbt, metadata_key=self._metadata_key, process_index=process)
            array_spec = spec["base"] if spec.get("driver") == "cast" else spec
            if leaf.tile != tuple(leaf.shape):
                if "chunks" not in array_spec.get("metadata", {}):
                    raise CheckpointError(f"{info.name}: chunked writes need Orbax's zarr v2 arrays")
                array_spec["metadata"]["chunks"] = list(leaf.tile)
            if ocp.multihost.process_index() != 0:  # as the numpy handler: process 0 writes
                return None
            return await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)

        async def _write_pieces(self, leaf: LazyArray, info, arg):
            t = await self._open(leaf, info, arg)
            if t is None:
                return
            per_tile = int(np.prod(leaf.tile, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
            indices = list(tiles(leaf.shape, leaf.tile))
            step = max(1, STREAM_BYTES // max(per_tile, 1))
            runs = [indices[a:a + step] for a in range(0, len(indices), step)]

            async def write(run, arrays):
                await asyncio.gather(*[t[index].write(a, can_reference_source_data_indefinitely=True)
                                       for index, a in zip(run, arrays)])
            try:
                await _made_ahead(runs, lambda run: [leaf.made_region(index) for index in run], write)
            except CheckpointError as e:  # name the leaf
                raise CheckpointError(f"{info.name}: {e}") from None

    return StreamingHandler(deepcopy_host_arrays=False)


def plain_params(tree: Mapping) -> dict:
    """``tree`` as nested plain dicts (FrozenDicts unfrozen), a lone top-level "params" collection unwrapped."""
    tree = flax.core.unfreeze(tree)
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    return tree


def _params_dir(path: str) -> str:
    """The Orbax directory of a checkpoint: ``path/params``, or ``path`` itself if it is one."""
    version = read_meta(path).get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a cogvlm-jax checkpoint of format version {version}; this cogvlm-jax reads version "
            f"{FORMAT_VERSION} (since version 2 the lm_head kernel is stored [vocab, hidden], as in Hugging Face). "
            "Convert the Hugging Face checkpoint again with `cogvlm-jax convert SRC DST`")
    for p in (os.path.join(path, PARAMS_DIR), path):
        if os.path.isdir(p) and os.path.exists(os.path.join(p, "_METADATA")):
            return os.path.abspath(p)
    raise CheckpointError(f"{path} is not a cogvlm-jax checkpoint (no Orbax {PARAMS_DIR}/ directory); "
                          "convert a Hugging Face checkpoint with `cogvlm-jax convert SRC DST`")


def tree_metadata(directory: str) -> dict:
    """The tree an Orbax PyTree checkpoint directory holds, its leaves Orbax's array metadata (``shape``,
    ``dtype``, ``storage.chunk_shape``): read without reading any data."""
    meta = ocp.StandardCheckpointer().metadata(directory)
    item = getattr(meta, "item_metadata", meta)  # newer Orbax wraps the tree in a StepMetadata
    return getattr(item, "tree", item)


def params_metadata(path: str) -> dict:
    """The stored tree as ``jax.ShapeDtypeStruct`` leaves (no sharding): shapes/dtypes without reading data."""
    tree = tree_metadata(_params_dir(path))
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def subset_reader(path: str) -> tuple[dict[tuple, Any], Callable[[Iterable[tuple]], dict]]:
    """(the stored leaves, ``{path tuple: jax.ShapeDtypeStruct}``; ``read(paths)``) for reading one of
    our checkpoints in pieces: ``read`` returns a nested dict of just those leaves as host numpy arrays.

    The metadata is read once here, not per piece: Orbax's metadata call opens every leaf, and (Orbax
    0.12) keeps about 80 kB per leaf alive each time it is made, which an export in pieces would pile up.
    """
    pdir = _params_dir(path)
    flat = flatten_dict(params_metadata(path))

    def read(subset: Iterable[tuple]) -> dict:
        subset = list(subset)
        if not subset:
            return {}
        unknown = [p for p in subset if p not in flat]
        if unknown:
            raise CheckpointError(f"checkpoint {pdir} has no parameter(s) " + ", ".join("/".join(p) for p in unknown))
        item = unflatten_dict({p: flat[p] for p in subset})
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            pdir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))

    return flat, read


def block_reader(path: str) -> tuple[Callable[[tuple, int], int | None], Callable[[tuple, tuple], np.ndarray]]:
    """(``rows(leaf, axis)``, ``read(leaf, index)``) for reading large leaves of one of our checkpoints in
    blocks along one axis, straight from their tensorstore arrays (no data cache: only the block is held).

    ``rows``: indices of ``axis`` per block such that a block is whole stored chunks and at most
    ``BLOCK_BYTES`` (the converter and the training saver chunk a large leaf in its row blocks, cut further
    where it is sharded); None when the chunks along ``axis`` span more than that (e.g. a leaf saved whole
    from memory), where reading a block would decode whole chunks: read such a leaf whole. ``read``:
    ``leaf[index]`` as a host numpy array in the stored dtype.
    """
    pdir = _params_dir(path)
    with open(os.path.join(pdir, "_METADATA")) as f:
        meta = json.load(f)
    ocdbt = meta.get("use_ocdbt", True)
    # Orbax's context: its OCDBT index-node cache; tensorstore's data cache pool is empty by default
    context = ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)
    opened: dict[tuple, Any] = {}

    def array(leaf: tuple):
        if leaf not in opened:
            opened.clear()  # one leaf at a time
            info = ocp.type_handlers.ParamInfo(name=".".join(map(str, leaf)), parent_dir=epath.Path(pdir),
                                               use_zarr3=meta.get("use_zarr3", False))
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
            opened[leaf] = ts.open(ts.Spec(spec), open=True, context=context).result()
        return opened[leaf]

    def rows(leaf: tuple, axis: int) -> int | None:
        t = array(leaf)
        shape, chunks = tuple(t.shape), tuple(t.chunk_layout.read_chunk.shape)
        # a band: one chunk's extent along ``axis``, all of the others (whole chunks, however they cut them)
        band = t.dtype.numpy_dtype.itemsize * min(chunks[axis], shape[axis]) * int(
            np.prod([n for d, n in enumerate(shape) if d != axis], dtype=np.int64))
        if band > BLOCK_BYTES:
            return None
        return min(shape[axis], chunks[axis] * max(1, BLOCK_BYTES // max(band, 1)))

    def read(leaf: tuple, index: tuple) -> np.ndarray:
        return np.asarray(array(leaf)[index].read().result())

    return rows, read


def restore_params(path: str, target: Any = None, *, subset: Iterable[tuple] | None = None) -> dict:
    """Read the parameter tree of one of our checkpoints.

    ``target=None``: host numpy arrays in the stored dtypes. ``target``: a tree of the same structure
    with ``jax.ShapeDtypeStruct`` leaves; each leaf is restored as a ``jax.Array`` with the leaf's dtype
    (cast if it differs from the stored one) and ``.sharding`` (one device if it has none), so each
    device reads only its shard. Structure or shape differences raise :class:`CheckpointError`.
    ``subset``: only these leaf paths (tuples), as host numpy arrays (a nested dict of just those).
    """
    if subset is not None:
        return subset_reader(path)[1](subset)
    pdir = _params_dir(path)
    stored = params_metadata(path)
    if target is None:
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
        return ocp.PyTreeCheckpointer().restore(pdir, restore_args=args)
    target = plain_params(target)
    _check_target(stored, target, pdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda t: t if getattr(t, "sharding", None) is not None
        else jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device), target)
    return ocp.StandardCheckpointer().restore(pdir, target)


def _check_target(stored, target, where: str) -> None:
    """Name every path the target lacks, adds or shapes differently from the checkpoint."""
    have = flatten_dict(stored, sep="/")
    want = flatten_dict(target, sep="/")
    problems = [f"missing in target: {k}" for k in sorted(set(have) - set(want))]
    problems += [f"not in checkpoint: {k}" for k in sorted(set(want) - set(have))]
    problems += [f"{k}: expected shape {tuple(want[k].shape)}, got {tuple(have[k].shape)}"
                 for k in sorted(set(have) & set(want)) if tuple(have[k].shape) != tuple(want[k].shape)]
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match the target tree:\n  " + "\n  ".join(problems))
