"""Hugging Face safetensors checkpoints <-> our parameter tree and Orbax checkpoints.

Reading checks every key and shape against the config before any data is read, so a wrong
checkpoint fails fast with every problem named; then it reads one tensor at a time. A conversion
to our format streams: each tensor is read just before Orbax writes it (``LazyArray`` leaves), so it
holds about two groups of tensors in memory whatever the checkpoint's size (``read_hf_checkpoint``
returns the whole model, in host memory); a tensor larger than ``checkpoint.BLOCK_BYTES`` is read and
written a row block at a time. Writing HF fetches parameters in runs of at most ``FETCH_BYTES`` (from
memory or, on export, from the Orbax checkpoint; a leaf stored in row blocks is read a block at a time)
and writes one tensor (or row block) at a time into shards laid out byte for byte as the
``safetensors`` library lays them out (so a round trip reproduces the published files exactly). Both
directions are atomic (temp directory + rename). Peak memory is thus bounded by the budgets, not by the
largest tensor (the real CogVLM2's embedding and lm_head are 1.05 GB each).

Files are read with the ``safetensors`` library (``safe_open``), which validates each header against
its file; they are written by :func:`write_safetensors`, because the library writes a file only from
tensors that are all in memory at once.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from cogvlm_jax import dtypes
from cogvlm_jax.config import CogVLMConfig, load_config
from cogvlm_jax.convert import checkpoint, mapping
from cogvlm_jax.convert.checkpoint import (
    CheckpointError,
    LazyArray,
    block_reader,
    block_rows,
    is_our_checkpoint,
    plain_params,
    read_meta,
    save_params,
    subset_reader,
    tiles,
    trim_heap,
)
from cogvlm_jax.convert import quantized
from cogvlm_jax.files import atomic_directory, check_destination, copy_files, write_json
from cogvlm_jax.hub import resolve
from cogvlm_jax.inputs.tokenizer import tokenizer_files
from cogvlm_jax.parallel import multihost
from cogvlm_jax.parallel.multihost import to_host
from cogvlm_jax.parallel.sharding import param_shardings

__all__ = [
    "CheckpointError", "read_hf_checkpoint", "write_hf_checkpoint", "convert_hf_to_ours",
    "convert_ours_to_hf", "main_convert",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
FETCH_BYTES = 128 * 2**20  # an export reads at most this much of an Orbax checkpoint at once (or one tensor)
# Files carried through a conversion unchanged (either direction), besides the tokenizer's: generation
# settings and the reference's remote code, which HF's ``trust_remote_code`` loading needs beside the weights.
CARRIED_FILES = ("generation_config.json", "configuration_cogvlm.py", "modeling_cogvlm.py", "visual.py", "util.py")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
_MAX_LISTED = 30  # problems listed in one error message

# safetensors dtype code -> numpy dtype (little endian), in the library's order of dtypes: a file it writes
# holds its tensors sorted by this order, descending, then by name (:func:`_write_order`).
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
}
_RANK = {code: i for i, code in enumerate(DTYPES)}
_CODE = {dt: code for code, dt in DTYPES.items()}
_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}


def as_dtype(dtype: Any) -> np.dtype | None:
    """:func:`cogvlm_jax.dtypes.as_dtype`, an unknown dtype raised as a :class:`CheckpointError` (as every
    converter error is)."""
    try:
        return dtypes.as_dtype(dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _code(dtype: np.dtype, what: str) -> str:
    try:
        return _CODE[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"{what}: dtype {dtype} cannot be stored in safetensors") from None


def _listing(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    return "\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def _nbytes(code: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize


# =========================================================================== safetensors files
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    code: str            # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    index: int           # its place in the file's data, first = 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self.code, self.shape)


class SafetensorsFile:
    """One .safetensors file: its tensors' dtypes and shapes, validated against the file when it is opened;
    tensors and regions of them read on demand, each through the ``safetensors`` library.

    The file is opened anew for every read: the library maps it into memory, and pages read through a
    mapping kept open would stay in this process's resident set (a conversion would grow to the size of
    the checkpoint).
    """

    def __init__(self, path: str):
        self.path = path
        with self._open() as f:
            self.metadata = f.metadata() or {}
            self.tensors: dict[str, TensorInfo] = {}
            for i, name in enumerate(f.offset_keys()):
                s = f.get_slice(name)
                code = s.get_dtype()
                if code not in DTYPES:
                    raise self._corrupt(f"tensor {name} has dtype {code}, which numpy cannot hold")
                self.tensors[name] = TensorInfo(code, tuple(s.get_shape()), i)

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is truncated or not a valid safetensors file: {why}; "
                               "re-download or re-convert it")

    def _open(self):
        try:
            return safe_open(self.path, framework="numpy")
        except SafetensorError as e:
            raise self._corrupt(str(e)) from None

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array in its stored dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
        with self._open() as f:
            out = f.get_tensor(name)
        return out

    def read_region(self, name: str, index) -> np.ndarray:
        """``read(name)[index]`` (``index``: one step-1 slice per axis), reading only the bytes it needs."""
        info = self.tensors[name]
        if len(index) != len(info.shape):
            raise ValueError(f"{name}: region {index} does not match shape {info.shape}")
        bounds = [s.indices(n) for s, n in zip(index, info.shape)]
        if any(step != 1 for _, _, step in bounds):
            raise ValueError(f"{name}: region {index} has a step; only contiguous slices can be read")
        index = tuple(slice(a, max(a, b)) for a, b, _ in bounds)
        if any(s.start == s.stop for s in index):  # nothing to read (the library refuses empty axes)
            return np.empty([s.stop - s.start for s in index], DTYPES[info.code])
        with self._open() as f:
            out = f.get_slice(name)[index]
        return out


@dataclasses.dataclass(frozen=True)
class _OutTensor:
    """One tensor to write: its HF name, dtype code and shape, and where its data comes from."""
    name: str
    code: str
    shape: tuple[int, ...]
    source: tuple | None  # our parameter path; None for the recomputed inv_freq buffer

    @property
    def nbytes(self) -> int:
        return _nbytes(self.code, self.shape)


def _write_order(tensors: list[_OutTensor]) -> list[_OutTensor]:
    """The order the ``safetensors`` library stores tensors in: dtype rank descending, then name."""
    return sorted(tensors, key=lambda t: (-_RANK[t.code], t.name))


def write_safetensors(path: str, tensors: list[_OutTensor],
                      produce: Callable[[_OutTensor], np.ndarray | Iterable[np.ndarray]],
                      metadata: Mapping[str, str] | None = None,
                      progress: Callable[[int], Any] | None = None) -> None:
    """Write one .safetensors file; ``produce(t)`` makes each tensor's data just before it is written: an
    array, or an iterable of consecutive row blocks (slices along the first axis) written as they come.

    Laid out as the ``safetensors`` library lays out a file (so files compare byte for byte): 8-byte
    little-endian header length, the compact JSON header (metadata first, then each tensor's dtype, shape
    and data offsets) padded with spaces to a multiple of 8 bytes, then the data, in :func:`_write_order`.
    """
    order = _write_order(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in order:
        header[t.name] = {"dtype": t.code, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in order:
            data = produce(t)
            want = t.shape or (1,)  # a scalar is written as one row
            rows = 0
            for arr in [data] if isinstance(data, np.ndarray) else data:
                arr = np.asarray(arr)
                block = np.ascontiguousarray(arr if t.shape else arr[None])
                if block.ndim != len(want) or block.shape[1:] != want[1:] or rows + len(block) > want[0] or \
                        block.dtype != DTYPES[t.code]:
                    raise CheckpointError(f"{t.name}: produced {arr.dtype}{arr.shape} at row {rows}, planned "
                                          f"{t.code}{t.shape}")
                f.write(memoryview(block.reshape(-1).view(np.uint8)))
                rows += len(block)
                del arr, block  # before the next block is made
            if rows != want[0]:
                raise CheckpointError(f"{t.name}: produced {rows} rows, planned {t.code}{t.shape}")
            if progress:
                progress(1)


# =========================================================================== reading HF checkpoints
def _no_weights(path: str) -> CheckpointError:
    """The error for a ``path`` without safetensors weights (pickled PyTorch weights: refused, with the fix)."""
    found = sorted({os.path.basename(p) for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat))})
    if found:
        return CheckpointError(
            f"{path} holds PyTorch pickle weights ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}) and no "
            "safetensors; cogvlm-jax never unpickles (it can run arbitrary code). Convert them once with PyTorch: "
            "`from transformers import AutoModelForCausalLM; m = AutoModelForCausalLM.from_pretrained(SRC, "
            "trust_remote_code=True, torch_dtype='auto'); m.save_pretrained(OUT, safe_serialization=True)`, "
            "then convert OUT")
    return CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _weight_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """(the .safetensors files, the index's key -> file map or None) of a checkpoint file or directory."""
    if os.path.isfile(path):
        if path.endswith(".json"):
            path = os.path.dirname(path) or "."
        elif path.endswith(".safetensors"):
            return [path], None
        else:
            raise _no_weights(os.path.dirname(path) or ".")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        weight_map = read_index(index_path)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(
                f"{index_path} names shard file(s) that do not exist: "
                + ", ".join(f"{s} (holds {sum(v == s for v in weight_map.values())} tensors, e.g. "
                            f"{min(k for k, v in weight_map.items() if v == s)})" for s in missing))
        return [os.path.join(path, s) for s in shards], weight_map
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    raise _no_weights(path)


def read_index(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name (a file in
    the same directory), each checked; a bad index is a ``CheckpointError`` naming what is wrong."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{index_path} is not a valid safetensors index: {why}")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(index, dict) or "weight_map" not in index:
        raise bad("expected an object with a 'weight_map'")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad(f"weight_map must be a non-empty object of tensor name -> shard file, got {weight_map!r:.80}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or os.path.basename(shard) != shard \
                or shard.startswith("."):
            raise bad(f"weight_map[{name!r}] must be the name of a .safetensors file beside the index, got {shard!r}")
    return weight_map


def open_tensors(path: str) -> dict[str, tuple[SafetensorsFile, TensorInfo]]:
    """Every tensor of the checkpoint -> (its file, its header entry); cross-checked with the index."""
    files, weight_map = _weight_files(path)
    entries: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
    problems = []
    for p in files:
        st = SafetensorsFile(p)
        for name, info in st.tensors.items():
            if name in entries:
                problems.append(f"{name} is stored twice: in {os.path.basename(entries[name][0].path)} and "
                                f"{os.path.basename(p)}")
            entries[name] = (st, info)
    for name, shard in (weight_map or {}).items():
        if name not in entries:
            problems.append(f"missing key {name}: the index places it in {shard}, which does not hold it")
        elif os.path.basename(entries[name][0].path) != shard:
            problems.append(f"{name}: the index places it in {shard}, "
                            f"but it is in {os.path.basename(entries[name][0].path)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} is inconsistent:" + _listing(problems))
    return entries


def shard_files(entries: Mapping[str, tuple[SafetensorsFile, TensorInfo]]) -> dict[str, str] | None:
    """Tensor name -> the file holding it, for a checkpoint split over several files (an export repeats the
    split); None for one file (an export writes one ``model.safetensors``)."""
    files = {k: os.path.basename(st.path) for k, (st, _) in entries.items()}
    return files if len(set(files.values())) > 1 else None


def check_keys(entries: Mapping[str, tuple[SafetensorsFile, TensorInfo]], config: CogVLMConfig, where: str) -> None:
    """Every missing, unexpected, mis-shaped or non-float tensor, in one error."""
    expected = mapping.expected_hf_keys(config)
    optional = mapping.optional_hf_keys(config)
    problems = [f"missing key {k} (expected shape {expected[k]})"
                for k in expected if k not in entries and k not in optional]
    problems += [f"unexpected key {k} (shape {entries[k][1].shape}, in {os.path.basename(entries[k][0].path)})"
                 for k in sorted(entries) if k not in expected]
    for k, (_, info) in entries.items():
        if k not in expected:
            continue
        if info.shape != expected[k]:
            problems.append(f"{k}: expected shape {expected[k]}, got {info.shape}")
        if info.code not in _FLOAT_CODES:
            problems.append(f"{k}: dtype {info.code} is not a floating-point type")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match its config ({config.family}, "
                              f"{config.text.num_layers} text layers, {config.vision.num_layers} vision layers):"
                              + _listing(problems))


def _check_inv_freq(key: str, stored: np.ndarray, config: CogVLMConfig) -> None:
    """The stored rotary buffer must be the one our config implies (catches a wrong rope_theta)."""
    want = mapping.rotary_inv_freq(config).astype(stored.dtype).astype(np.float64)
    got = stored.astype(np.float64)
    tol = 1e-2 if stored.dtype.itemsize <= 2 else 1e-6
    err = np.max(np.abs(got - want) / np.abs(want)) if want.size else 0.0
    if not err <= tol:
        raise CheckpointError(
            f"{key} does not match rope_theta {config.text.rope_theta} and head_dim {config.text.head_dim} of the "
            f"config (max relative difference {err:.3g}); is the config.json the checkpoint's own?")


def note_inv_freq(key: str, array: np.ndarray, config: CogVLMConfig, facts: dict[str, Any]) -> None:
    """Check a stored rotary buffer and record in ``facts`` how it was stored (an export reproduces it)."""
    _check_inv_freq(key, array, config)
    if "inv_freq_dtype" not in facts:
        facts["inv_freq_dtype"] = array.dtype.name
        if array.tobytes() != mapping.rotary_inv_freq(config).astype(array.dtype).tobytes():
            # within tolerance but not our bits (another pow implementation): keep the source's
            # values so that an export still reproduces them exactly
            facts["inv_freq"] = array.astype(np.float64).tolist()


def load_hf(path: str, config: CogVLMConfig | str | None, dtype, progress: bool, place=None, lazy: bool = False,
             chunks: Mapping[tuple, tuple[int, ...]] | None = None):
    """(config, params, facts about the source an export needs) of an HF checkpoint.

    ``lazy``: the params are :class:`LazyArray` leaves that read (and re-lay out, and cast) their
    tensor when made, in file order, for :func:`save_params` to stream; only the rotary buffers are read
    here. They can also make any region of themselves, reading only the bytes behind it, so a tensor
    larger than ``BLOCK_BYTES``, or one given ``chunks[our path]`` (a chunk shape), is made and written a
    tile at a time. The progress bar then counts the tensors as they are made: close it (the 4th item
    returned) once they are.
    """
    if config is None:
        config = load_config(path if os.path.isdir(path) else (os.path.dirname(path) or "."))
    elif isinstance(config, str):
        config = load_config(config)
    dtype = as_dtype(dtype)
    entries = open_tensors(path)
    check_keys(entries, config, path)
    flat: dict[tuple, Any] = {}
    facts: dict[str, Any] = {}
    files = shard_files(entries)
    if files is not None:
        facts["shards"] = files
    # Read file by file in data order: sequential I/O on large shards.
    order = sorted(entries, key=lambda k: (entries[k][0].path, entries[k][1].index))
    bar = tqdm(total=len(order), desc="converting" if lazy else "reading", unit="tensor", disable=not progress)

    def read(key: str) -> np.ndarray:
        path_ours, array = mapping.to_ours(key, entries[key][0].read(key))
        array = array if dtype is None else array.astype(dtype, copy=False)
        bar.update(1)
        return array

    def read_region(key: str, transform: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """A block of ``key`` in our layout (and dtype), reading only the HF bytes behind it."""
        array = mapping.relayout(transform, entries[key][0].read_region(key, mapping.hf_region(transform, index)))
        array = array if dtype is None else array.astype(dtype, copy=False)
        if all(s.indices(n)[1] == n for s, n in zip(index, shape)):  # the last block: the tensor is done
            bar.update(1)
        return array

    for key in order:
        st, info = entries[key]
        path_ours, transform = mapping.hf_to_ours_key(key)
        if path_ours is None:  # the rotary buffer: check it, remember how it was stored, do not keep it
            note_inv_freq(key, st.read(key), config, facts)
            bar.update(1)
        elif lazy:
            shape = mapping.ours_shape(info.shape, transform)
            flat[path_ours] = LazyArray(shape, dtype or DTYPES[info.code], functools.partial(read, key),
                                        (st.path, info.index), functools.partial(read_region, key, transform, shape),
                                        mapping.rows_axis(transform, len(shape)), (chunks or {}).get(path_ours))
        else:
            array = read(key)
            flat[path_ours] = array if place is None else place(path_ours, array)
    if lazy:
        return config, unflatten_dict(flat), facts, bar
    bar.close()
    return config, unflatten_dict(flat), facts


def read_hf_checkpoint(path: str, config: CogVLMConfig | str | None = None, dtype=None,
                       progress: bool = True, place=None) -> dict:
    """Our parameter tree (nested dict of numpy arrays) from an HF safetensors checkpoint.

    ``path``: a directory with ``model.safetensors`` or shards + ``model.safetensors.index.json`` (or a
    single .safetensors file). ``config``: defaults to the directory's ``config.json``. ``dtype``: None
    keeps the stored dtypes, else every tensor is cast. Raises :class:`CheckpointError` naming every
    missing / unexpected / mis-shaped key, a truncated file, a missing shard, or pickle-only weights.
    ``place(path, array)``: called on each tensor as it is read (e.g. to put it on devices in its
    sharded layout), so the host never holds more than one tensor; its result goes into the tree.
    """
    return load_hf(path, config, dtype, progress, place)[1]


# =========================================================================== writing HF checkpoints
def _natural_key(name: str):
    """Sort "layers.2" before "layers.10", so a shard holds consecutive layers."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


# A parameter source: the (shape, dtype) of every leaf, and a function that materialises a list of leaves
# as host arrays. The writer fetches runs of at most FETCH_BYTES (see _producer), so exporting from an
# Orbax checkpoint never holds much more than that of the model; a leaf larger than BLOCK_BYTES that the
# source can read in blocks is read and written a row block at a time instead.
Specs = dict[tuple, tuple[tuple[int, ...], np.dtype]]
Fetch = Callable[[list[tuple]], dict[tuple, Any]]


@dataclasses.dataclass
class Source:
    specs: Specs
    fetch: Fetch
    # ``block_rows(leaf, axis)``: indices of ``axis`` per block the leaf can be read in, or None (read it whole)
    block_rows: Callable[[tuple, int], int | None] | None = None
    read_block: Callable[[tuple, tuple], np.ndarray] | None = None

    def __post_init__(self):
        self._plans: dict[tuple, tuple[int, int] | None] = {}

    def blocked(self, leaf: tuple) -> tuple[int, int] | None:
        """(our axis that is the HF rows, indices per block) if ``leaf`` is read in blocks, else None."""
        if leaf not in self._plans:
            shape, dtype = self.specs[leaf]
            plan = None
            if self.block_rows is not None and shape and np.prod(shape, dtype=np.int64) * dtype.itemsize > \
                    checkpoint.BLOCK_BYTES:
                axis = mapping.rows_axis(mapping.transform_of(leaf), len(shape))
                rows = self.block_rows(leaf, axis)
                plan = None if rows is None else (axis, rows)
            self._plans[leaf] = plan
        return self._plans[leaf]


def tree_source(params: Mapping) -> Source:
    flat = flatten_dict(plain_params(params))
    # to_host: a parameter sharded over several processes' devices is gathered (all processes fetch the same
    # paths in the same order, see write_hf)
    return Source({p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat.items()},
                   lambda paths: {p: to_host(flat[p]) for p in paths})


def orbax_source(ckpt_dir: str) -> Source:
    stored, read = subset_reader(ckpt_dir)
    rows, read_block = block_reader(ckpt_dir)
    return Source({p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in stored.items()},
                   lambda paths: flatten_dict(read(paths)), rows, read_block)


def lazy_source(params: Mapping) -> Source:
    """A source over a tree of :class:`LazyArray` leaves (an HF checkpoint read lazily): each made when
    fetched, one that can make regions of itself read in blocks along its ``block_axis``."""
    flat = flatten_dict(params)

    def rows(leaf: tuple, axis: int) -> int | None:
        a = flat[leaf]
        return block_rows(a.shape, np.dtype(a.dtype).itemsize, axis) if a.region is not None and \
            axis == a.block_axis else None
    return Source({p: (tuple(a.shape), np.dtype(a.dtype)) for p, a in flat.items()},
                   lambda paths: {p: flat[p].made() for p in paths}, rows,
                   lambda leaf, index: flat[leaf].made_region(index))


def union_source(parts: list[tuple[Source, Mapping[tuple, tuple]]]) -> Source:
    """One source over the leaves of several: each part is a source and {our path: its path there}."""
    where = {p: (src, q) for src, names in parts for p, q in names.items()}
    if len(where) != sum(len(names) for _, names in parts):
        raise CheckpointError("a parameter comes from two sources")

    def fetch(paths: list[tuple]) -> dict[tuple, Any]:
        out = {}
        for src, _ in parts:
            mine = [p for p in paths if where[p][0] is src]
            if mine:
                got = src.fetch([where[p][1] for p in mine])
                out.update({p: got[where[p][1]] for p in mine})
        return out

    def rows(leaf: tuple, axis: int) -> int | None:
        src, q = where[leaf]
        return None if src.block_rows is None else src.block_rows(q, axis)
    return Source({p: src.specs[q] for p, (src, q) in where.items()}, fetch, rows,
                   lambda leaf, index: where[leaf][0].read_block(where[leaf][1], index))


def _plan_outputs(specs: Specs, config: CogVLMConfig, dtype: np.dtype | None,
                  inv_freq: np.ndarray) -> list[_OutTensor]:
    """Check our leaves against the config and list every HF tensor to write, buffers included."""
    expected = mapping.expected_hf_keys(config)
    problems, outs, seen = [], [], set()
    for path, (shape, leaf_dtype) in specs.items():
        name = "/".join(map(str, path))
        try:
            key = mapping.ours_to_hf_key(path)
        except CheckpointError:
            problems.append(f"unexpected parameter {name}")
            continue
        if key not in expected:
            problems.append(f"unexpected parameter {name} (not in a {config.family} model of this config)")
            continue
        want = mapping.ours_shape(expected[key], mapping.hf_to_ours_key(key)[1])
        if shape != want:
            problems.append(f"{name}: expected shape {want}, got {shape}")
            continue
        seen.add(key)
        outs.append(_OutTensor(key, _code(dtype if dtype is not None else leaf_dtype, name), expected[key], path))
    buffers = set(mapping.buffer_hf_keys(config))
    problems += [f"missing parameter {'/'.join(mapping.hf_to_ours_key(k)[0])} ({k})"
                 for k in expected if k not in seen and k not in buffers]
    if problems:
        raise CheckpointError(f"parameters do not match the config ({config.family}):" + _listing(problems))
    code = _code(inv_freq.dtype, "inv_freq")
    outs += [_OutTensor(k, code, inv_freq.shape, None) for k in sorted(buffers)]
    return sorted(outs, key=lambda t: _natural_key(t.name))


def _shard(outs: list[_OutTensor], max_shard_bytes: int) -> list[list[_OutTensor]]:
    """Greedy in order: start a new shard when the next tensor would push this one past the limit."""
    shards: list[list[_OutTensor]] = [[]]
    size = 0
    for t in outs:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _shard_as(outs: list[_OutTensor], files: Mapping[str, str]) -> tuple[list[str], list[list[_OutTensor]]] | None:
    """(file names, their tensors) laid out as ``files`` (tensor name -> file) lays them out, or None if
    ``files`` does not name exactly the tensors to write (the split of another model)."""
    if set(files) != {t.name for t in outs}:
        return None
    names = sorted(set(files.values()), key=_natural_key)
    return names, [[t for t in outs if files[t.name] == name] for name in names]


def write_hf_checkpoint(params: Mapping, config: CogVLMConfig, out_dir: str,
                        max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES, dtype=None, *,
                        inv_freq_dtype=None, inv_freq_values=None, overwrite: bool = False,
                        extra_files: Iterable[str] = (), progress: bool = True,
                        shards: Mapping[str, str] | None = None) -> str:
    """Write our parameter tree (numpy or jax arrays) as a Hugging Face checkpoint with the published names.

    Shards ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` (one shard: a plain
    ``model.safetensors``), filled greedily in natural key order up to ``max_shard_bytes``, or with
    ``max_shard_bytes=None`` split as ``shards`` (HF tensor name -> file name: a source checkpoint's split,
    kept when it names exactly the tensors written; else, or without it, at ``DEFAULT_MAX_SHARD_BYTES``); and
    ``config.json``. ``dtype``: None keeps each parameter's dtype, else casts (and records it as
    ``torch_dtype``). The ``inv_freq`` buffers are recomputed, in ``inv_freq_dtype`` (default float32,
    which both reference fixtures use; the published CogVLM2-19B stores bfloat16), or taken from
    ``inv_freq_values`` when given (an import records them if the source's differ from ours in the last
    bit). ``extra_files`` are copied in. Only one re-laid-out tensor exists at a time. Atomic; a
    non-empty ``out_dir`` is refused unless ``overwrite``. Returns ``out_dir``.

    With several processes (``params`` sharded over all their devices) every process calls this: the
    parameters of one output file at a time are gathered on every process, process 0 writes, and all
    return once the checkpoint is in place.
    """
    return write_hf(tree_source(params), config, out_dir, max_shard_bytes, dtype, inv_freq_dtype,
                     inv_freq_values, overwrite, extra_files, progress, shards)


def _fetch_runs(source: Source, shard: list[_OutTensor]) -> list[list[tuple]]:
    """The leaves of a shard in write order, cut into runs of at most ``FETCH_BYTES`` (or one tensor): the
    fetches an export makes, in order (with several processes every process makes the same ones). Leaves
    read in blocks are not fetched."""
    runs: list[list[tuple]] = [[]]
    size = 0
    for t in _write_order(shard):
        if t.source is None or source.blocked(t.source):
            continue
        shape, dtype = source.specs[t.source]
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if runs[-1] and size + n > FETCH_BYTES:
            runs.append([])
            size = 0
        runs[-1].append(t.source)
        size += n
    return [run for run in runs if run]


def _producer(source: Source, shard: list[_OutTensor],
              inv_freq: np.ndarray) -> Callable[[_OutTensor], np.ndarray | Iterable[np.ndarray]]:
    """Make each tensor of a shard, in write order, from its leaf: device -> host, HF layout, dtype.

    Leaves are fetched in runs of consecutive tensors of at most ``FETCH_BYTES`` (or one tensor), so an
    export from an Orbax checkpoint holds about that much of the model, whatever the shard size; a leaf
    the source reads in blocks comes as HF row blocks, each read, re-laid out and cast on its own.
    """
    runs = _fetch_runs(source, shard)
    run_of = {p: k for k, run in enumerate(runs) for p in run}
    leaves: dict[tuple, Any] = {}

    def row_blocks(t: _OutTensor, axis: int, rows: int) -> Iterable[np.ndarray]:
        shape = source.specs[t.source][0]
        for index in tiles(shape, tuple(rows if d == axis else n for d, n in enumerate(shape))):
            trim_heap()
            yield mapping.to_hf(t.source, source.read_block(t.source, index))[1].astype(DTYPES[t.code], copy=False)

    def produce(t: _OutTensor) -> np.ndarray | Iterable[np.ndarray]:
        if t.source is None:
            return inv_freq
        plan = source.blocked(t.source)
        if plan is not None:
            return row_blocks(t, *plan)
        if t.source not in leaves:
            trim_heap()  # the previous run's memory, before the next run is read
            leaves.update(source.fetch(runs[run_of[t.source]]))
        # pop: the reference to a leaf is dropped as soon as the leaf is written
        array = mapping.to_hf(t.source, np.asarray(leaves.pop(t.source)))[1]
        return array.astype(DTYPES[t.code], copy=False)
    return produce


def write_hf(source: Source, config: CogVLMConfig, out_dir: str, max_shard_bytes: int | None, dtype,
              inv_freq_dtype, inv_freq_values, overwrite: bool, extra_files: Iterable[str], progress: bool,
              shards: Mapping[str, str] | None = None) -> str:
    """Write ``source`` as an HF checkpoint (see :func:`write_hf_checkpoint` for the arguments)."""

    multihost.from_main(lambda: check_destination(out_dir, overwrite) or b"")  # process 0's refusal, on all
    barriers = multihost.Barriers.agreed()
    dtype = as_dtype(dtype)
    if dtype is not None:
        config = config.replace(torch_dtype=dtype.name)
    inv_freq = mapping.rotary_inv_freq(config) if inv_freq_values is None else np.asarray(inv_freq_values, np.float64)
    if inv_freq.shape != (config.text.head_dim // 2,):
        raise CheckpointError(f"inv_freq_values: expected shape {(config.text.head_dim // 2,)}, got {inv_freq.shape}")
    inv_freq = inv_freq.astype(as_dtype(inv_freq_dtype) or np.dtype(np.float32))
    outs = _plan_outputs(source.specs, config, dtype, inv_freq)
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    split = None if max_shard_bytes is not None or not shards else _shard_as(outs, shards)
    if split is None:
        shards = _shard(outs, DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    else:
        names, shards = split
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else names
    if not multihost.is_main_process():  # take part in the gathers; process 0 writes
        for shard in shards:
            for run in _fetch_runs(source, shard):
                source.fetch(run)
        barriers.sync(f"exported {out_dir}")
        return out_dir
    with atomic_directory(out_dir, overwrite) as tmp, \
            tqdm(total=len(outs), desc="writing", unit="tensor", disable=not progress) as bar:
        for name, shard in zip(names, shards):
            produce = _producer(source, shard, inv_freq)
            write_safetensors(os.path.join(tmp, name), shard, produce, {"format": "pt"}, bar.update)
        if n > 1:
            write_json(os.path.join(tmp, INDEX_FILE), {
                "metadata": {"total_size": sum(t.nbytes for t in outs)},
                "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}})
        write_json(os.path.join(tmp, "config.json"), config.to_hf_dict())
        copy_files(extra_files, tmp)
    barriers.sync(f"exported {out_dir}")
    return out_dir


# =========================================================================== conversions
def carried_files(src: str) -> list[str]:
    """The files a conversion copies from ``src``: its tokenizer's (see ``inputs.tokenizer.tokenizer_files``),
    and those of ``CARRIED_FILES`` it holds."""
    return tokenizer_files(src) + [p for p in (os.path.join(src, n) for n in CARRIED_FILES) if os.path.isfile(p)]


def check_not_same(src: str, dst: str) -> None:
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise CheckpointError(f"source and destination are the same directory: {src}")


def convert_hf_to_ours(src: str, dst: str, dtype=None, *, overwrite: bool = False, progress: bool = True,
                       mesh=None, quantize=None, quantize_vision: bool = False) -> str:
    """HF safetensors checkpoint directory ``src`` -> our checkpoint at ``dst`` (see cogvlm_jax.convert.checkpoint).

    Streamed: each tensor is read just before it is written, a tensor larger than ``BLOCK_BYTES`` a row
    block at a time (stored in chunks of those blocks). ``mesh``: store every tensor in chunks of its
    shard on this mesh (cut further to at most ``BLOCK_BYTES``), each read and written on its own, so a
    later load on a mesh whose per-process slices are unions of those shards (the same mesh, one process
    or several) reads only what each process holds. Without a mesh a tensor of at most ``BLOCK_BYTES``
    is one chunk, which every loading process reads whole. Only the mesh's shape matters here: nothing
    is placed on its devices. ``quantize`` ("int8" | "int4") and ``quantize_vision``: the kernels
    ``load(..., quantize=)`` quantizes are stored quantized (``convert/quantized.py``), each one chunk;
    ``load`` reads them back as they are.
    """
    check_not_same(src, dst)
    check_destination(dst, overwrite)  # fail before reading gigabytes
    config, chunks = None, None
    if mesh is not None:
        config = load_config(src)
        shapes = mapping.expected_params_shapes(config)
        chunks = {p: tuple(s.shard_shape(shapes[p])) for p, s in flatten_dict(param_shardings(config, mesh)).items()}
    quant = None if quantize is None else quantized.storage(quantize, quantize_vision)
    config, params, facts, bar = load_hf(src, config, dtype, progress, lazy=True, chunks=chunks)
    if dtype is not None:
        config = config.replace(torch_dtype=as_dtype(dtype).name)
    meta = {"hf": facts}
    if quant is not None:
        params = quantized.quantized_leaves(params, config, quant)
        meta.update(quantized.meta(quant))
    try:
        save_params(dst, params, config, overwrite=overwrite, meta=meta, extra_files=carried_files(src))
    finally:
        bar.close()
    return dst


def convert_ours_to_hf(src: str, dst: str, max_shard_bytes: int | None = None, dtype=None, *,
                       overwrite: bool = False, progress: bool = True) -> str:
    """Our checkpoint ``src`` -> HF safetensors checkpoint at ``dst`` (published names and layout).

    ``max_shard_bytes`` None: the same files as the HF checkpoint ``src`` was converted from (its shards
    and index, or its one file); else (or for a checkpoint with no record of its source's files) shards
    of at most ``max_shard_bytes`` (default ``DEFAULT_MAX_SHARD_BYTES``), a tensor larger than that alone.

    A checkpoint ``cogvlm-jax train`` saved is exported by ``cogvlm_jax.training.export.to_hf``."""
    check_not_same(src, dst)
    check_destination(dst, overwrite)
    if not is_our_checkpoint(src):
        raise CheckpointError(f"{src} is not a cogvlm-jax checkpoint (needs config.json and params/)")
    stored = checkpoint.stored_quantization(src)
    if stored is not None:
        raise CheckpointError(f"{src} holds {stored.format}-quantized weights; a Hugging Face export needs the "
                              "float weights: export the checkpoint it was converted from")
    facts = read_meta(src).get("hf", {})
    shards = facts.get("shards")
    if shards is not None and not (isinstance(shards, dict) and all(isinstance(v, str) for v in shards.values())):
        raise CheckpointError(f"{src}/{checkpoint.FORMAT_FILE}: hf.shards must be an object of tensor name -> file "
                              "name; re-convert the checkpoint")
    return write_hf(orbax_source(src), load_config(src), dst, max_shard_bytes, dtype, facts.get("inv_freq_dtype"),
                     facts.get("inv_freq"), overwrite, carried_files(src), progress, facts.get("shards"))


def main_convert(src: str, dst: str, to: str = "ours", *, dtype=None,
                 max_shard_bytes: int | None = None, overwrite: bool = False,
                 progress: bool = True, mesh=None, revision: str | None = None, quantize=None,
                 quantize_vision: bool = False) -> int:
    """The ``cogvlm-jax convert SRC DST [--to hf] [--quantize int8|int4]`` command. Returns 0; raises
    CheckpointError/ConfigError.

    ``src``: a directory or a Hugging Face Hub id (``revision``: its branch, tag or commit; ``cogvlm_jax.hub``).
    """
    src = resolve(src, revision, progress=progress)
    if not os.path.exists(src):
        raise CheckpointError(f"source checkpoint {src} does not exist")
    if to == "ours" and max_shard_bytes is not None:
        raise CheckpointError("--max-shard-size applies to --to hf (our format stores each tensor in chunks)")
    if to == "ours":
        if is_our_checkpoint(src):
            raise CheckpointError(f"{src} is already a cogvlm-jax checkpoint; use --to hf to export it")
        convert_hf_to_ours(src, dst, dtype, overwrite=overwrite, progress=progress, mesh=mesh, quantize=quantize,
                           quantize_vision=quantize_vision)
    elif to == "hf":
        if quantize is not None:
            raise CheckpointError("--quantize writes a checkpoint of ours; the Hugging Face export (--to hf) "
                                  "holds the float weights")
        convert_ours_to_hf(src, dst, max_shard_bytes, dtype, overwrite=overwrite, progress=progress)
    else:
        raise CheckpointError(f"unknown conversion target {to!r}; expected 'ours' or 'hf'")
    return 0
