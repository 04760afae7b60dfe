"""Ahead-of-time compilation for TPU slices and GPU hosts, from any machine: nothing is allocated.

    from cogvlm_jax import aot
    compiled = aot.compile_for("cogvlm2-llama3-chat-19B", target="v5e-8", mesh=(1, 1, 8), program="decode",
                               batch=1, cache_length=8192, dtype="bfloat16")     # a jax.stages.Compiled
    print(aot.report(compiled).format())

``jax.experimental.topologies.get_topology_desc`` gives the compile-only devices of a target (libtpu for
the TPUs; for the H100 the CUDA PJRT plugin with the XLA ``GpuTargetConfigProto`` in ``targets/``; both
come with ``pip install 'cogvlm-jax[aot]'``). ``make_mesh`` lays the (data, fsdp, tensor) mesh over them;
each program is built by the project's own code (``Generator`` in ``generation/sampling.py``, the serving
engine's ``serving.programs.Programs``, ``Trainer.step_program``) and lowered with ``jax.ShapeDtypeStruct`` inputs that
carry the shardings of ``parallel/sharding.py``, as the running code places them. ``.compile()`` then
runs XLA for the target; :func:`report` reads its per-device memory analysis, its cost analysis (TPU only:
XLA:GPU gives none) and the collectives in its HLO.

Programs (``program=``):

* ``prefill``: ``Generator.start``, what ``generate`` runs first: a ``[batch, prompt_length]`` prompt
  (``image=True``: with one image per row) into a fresh KV cache of ``cache_length`` slots.
* ``decode``: ``Generator.decode``, the on-device decode loop (``max_new_tokens`` tokens buffer). XLA
  counts a loop's body once, so its cost is that of one step.
* ``decode_step``: one step of that loop (``sampling.decode_one``) as its own program.
* ``insert``: the serving engine's prefill of one prompt into one of ``batch`` slots.
* ``decode_chunk``: the serving engine's ``chunk`` decode steps of all ``batch`` slots.
* ``train``: ``Trainer``'s step on ``batch`` rows of ``prompt_length`` tokens (``train_config``).

A program whose per-device peak (its inputs, which stay resident, + outputs not aliased to them +
temporaries + code; see :class:`Report`) passes the chip's HBM raises :class:`DoesNotFitError`, as does
XLA's own out-of-memory refusal at compile time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import threading
import time
import weakref
from typing import Any, Optional, Union

# Read when libtpu and the CUDA plugin start (the first use of a backend), so set before that: the
# TPU library skips the GCE metadata queries and the lock file a second libtpu process would wait on;
# the CUDA plugin registers without the CUDA libraries its version check wants (it only compiles here).
# A value the environment already has is kept.
for _name in ("TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"):
    os.environ.setdefault(_name, "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cogvlm_jax.config import CogVLMConfig, load_config  # noqa: E402
from cogvlm_jax.generation.buckets import round_up  # noqa: E402
from cogvlm_jax.parallel import compile_cache  # noqa: E402
from cogvlm_jax.parallel.axes import make_mesh  # noqa: E402
from cogvlm_jax.models.vision import SCAN_SCOPE  # noqa: E402

INSTALL = "pip install 'cogvlm-jax[aot]'"
GiB = 2 ** 30
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
PROGRAMS = ("prefill", "decode", "decode_step", "insert", "decode_chunk", "train")
DECODE_PROGRAMS = ("decode", "decode_step", "decode_chunk")  # one token per row per (loop body) step
_TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")


class AotError(ValueError):
    """A target, mesh or program that cannot be compiled here; the message says why."""


class TargetUnavailableError(AotError):
    """The compile-only backend of a target is not installed (or did not start in this process)."""


class DoesNotFitError(AotError):
    """The program needs more memory per device than the target's chips have."""


# =========================================================================== targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to compile for: its compile-only topology, and each device's HBM and bandwidth."""

    name: str
    platform: str  # "tpu" | "cuda"
    devices: int
    hbm_bytes: int
    hbm_bytes_per_s: float
    topology: tuple  # (key, value) pairs of get_topology_desc's arguments
    target_config: str = ""  # GPU: the GpuTargetConfigProto file in targets/
    note: str = ""

    def topology_kwargs(self) -> dict:
        kw = dict(self.topology)
        if self.target_config:
            with open(os.path.join(_TARGET_DIR, self.target_config)) as f:
                kw["target_config"] = f.read()
        return kw


def _tpu(name, topology_name, chip_config, devices, hbm_gib, gb_s, note=""):
    return Target(name, "tpu", devices, int(hbm_gib * GiB), gb_s * 1e9,
                  (("topology_name", topology_name), ("platform", "tpu"), ("chip_config_name", chip_config),
                   ("chips_per_host_bounds", (2, 2, 1)), ("num_slices", 1), ("wrap", (False, False, False))),
                  note=note)


TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("v5e-8", "v5e:2x4", "default", 8, 16, 819),
    _tpu("v6e-8", "v6e:2x4", "default", 8, 32, 1640),
    # v4 and v5p chips are megacore: one device per chip (two TensorCores), so "-8" (cores) is 4 devices
    _tpu("v4-8", "v4:2x2x1", "megacore", 4, 32, 1228, note="4 megacore chips"),
    _tpu("v5p-8", "v5p:2x2x1", "megacore", 4, 95, 2765, note="4 megacore chips"),
    Target("h100-8", "cuda", 8, 80 * GiB, 3350e9,
           (("topology_name", ""), ("platform", "cuda"), ("topology", "1x1x8")), target_config="h100_sxm.txtpb",
           note="one host of 8 H100 SXM"),
)}


def find_target(name: Union[str, Target]) -> Target:
    """A target by name (``TARGETS``), or the Target given."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise AotError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def _package_of(platform: str) -> str:
    return {"tpu": "libtpu", "cuda": "jax-cuda12-plugin"}[platform]


def _installed(platform: str) -> bool:
    module = {"tpu": "libtpu", "cuda": "jax_plugins.xla_cuda12"}[platform]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_topology_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _devices(t: Target) -> tuple:
    name = t.name
    if not _installed(t.platform):
        raise TargetUnavailableError(f"target {name} needs {_package_of(t.platform)} (compile-only, no "
                                     f"{'TPU' if t.platform == 'tpu' else 'GPU'} needed): {INSTALL}")
    from jax.experimental import topologies

    try:
        with _topology_lock:
            return tuple(topologies.get_topology_desc(**t.topology_kwargs()).devices)
    except NotImplementedError as e:  # the plugin is installed but did not register in this process
        raise TargetUnavailableError(
            f"target {name}: {_package_of(t.platform)} is installed but JAX did not start it in this process "
            f"({e}); its CUDA version check runs when JAX first starts a backend, so import cogvlm_jax.aot (or "
            "set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) before that") from None
    except RuntimeError as e:
        raise TargetUnavailableError(f"target {name}: the compile-only backend did not start: {e} ({INSTALL})") from e


def devices(name: Union[str, Target]) -> tuple:
    """The compile-only devices of a target (raises :class:`TargetUnavailableError` naming what to install)."""
    return _devices(find_target(name))


def available(name: Union[str, Target]) -> bool:
    try:
        devices(name)
    except TargetUnavailableError:
        return False
    return True


def mesh_for(name: Union[str, Target], shape=None):
    """``make_mesh`` of ``shape`` (data, fsdp, tensor; default all devices on tensor) over a target's devices."""
    t = find_target(name)
    shape = (1, 1, t.devices) if shape is None else tuple(int(x) for x in shape)
    if len(shape) != 3 or shape[0] * shape[1] * shape[2] != t.devices:
        raise AotError(f"mesh {shape} does not cover {t.name}'s {t.devices} devices"
                       + (f" ({t.note})" if t.note else "") + "; give (data, fsdp, tensor) whose product is "
                       f"{t.devices}")
    return make_mesh(*shape, devices=devices(t))


def compile_only_process() -> None:
    """Make this process's own backend the CPU (unless JAX_PLATFORMS says otherwise or a backend is already
    up), for a process that only compiles for targets: libtpu and the CUDA plugin then start only as
    compile-only topologies, and do not try (and print their failure) to drive local devices."""
    from jax._src import xla_bridge

    if not os.environ.get("JAX_PLATFORMS") and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


# =========================================================================== the target's platform
# What a program does on its target (16-bit products widened or native, the few-row product order, the
# XLA:CPU compiler option) comes from the mesh's devices: the module is built with
# ``program.execution(mesh)`` and ``program.jit`` picks the compiler options by the same platform, so a
# program compiled here for TPU or GPU devices is that platform's program, not this host's.
def _module(config: CogVLMConfig, mesh, dtype, vit_query_chunk=None, layout=None, quant=None):
    """The flax module as ``api.Model`` makes it on ``mesh`` in ``layout`` (None: the platform's default),
    its kernels quantized as ``quant`` says (``models/quantize.py``; None: not)."""
    from cogvlm_jax.api import compute_dtype
    from cogvlm_jax.models.cogvlm import CogVLM
    from cogvlm_jax.parallel import program

    execution = program.execution(mesh, layout).replace(quant=quant)
    return CogVLM(config, compute_dtype(dtype, execution.platform), vit_query_chunk, execution=execution)


# =========================================================================== abstract inputs
def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(int(x) for x in shape), jnp.dtype(dtype), sharding=sharding)


def _rows(mesh, shape, dtype):
    """A host input ``[B, ...]`` as ``Model`` places it: batch-sharded (``batch_sharding``)."""
    from cogvlm_jax.parallel.sharding import batch_sharding

    return _sds(shape, dtype, batch_sharding(mesh, shape))


def _replicated(mesh, shape, dtype):
    from cogvlm_jax.parallel.sharding import replicated

    return _sds(shape, dtype, replicated(mesh))


def _cache(config: CogVLMConfig, mesh, batch: int, length: int, dtype):
    from cogvlm_jax.models import kv_cache
    from cogvlm_jax.parallel.sharding import cache_shardings

    t = config.text
    shapes = jax.eval_shape(lambda: kv_cache.init_cache(t.num_layers, batch, length, t.num_kv_heads, t.head_dim,
                                                        dtype))
    return jax.tree.map(lambda s, sh: _sds(s.shape, s.dtype, sh), shapes, cache_shardings(shapes, mesh))


def _sampling(mesh, batch: int):
    from cogvlm_jax.generation.sampling import SamplingParams

    return SamplingParams(_rows(mesh, (batch,), jnp.float32), _rows(mesh, (batch,), jnp.int32),
                          _rows(mesh, (batch,), jnp.float32), _rows(mesh, (batch, 2), jnp.uint32))


def _pixels(config: CogVLMConfig, lead: tuple, image) -> tuple:
    """The pixel_values shape after ``lead`` (batch dims): [C, S, S], or a video's [frames, C, S, S]
    (``image`` is then the frame count)."""
    s = config.vision.image_size
    return lead + ((int(image),) if config.video else ()) + (config.vision.in_channels, s, s)


def _prompt(config: CogVLMConfig, put, batch: int, length: int, image):
    """input_ids, token_type_ids, attention_mask [batch, length] int32 and pixel_values (or None)."""
    ints = [put((batch, length), jnp.int32) for _ in range(3)]
    return (*ints, put(_pixels(config, (batch,), image), jnp.float32) if image else None)


# =========================================================================== programs
@dataclasses.dataclass(frozen=True)
class _Spec:
    """What compile_for was asked for (after defaults), kept for the report."""

    config_name: str
    target: str
    mesh: tuple
    program: str
    dtype: str
    batch: int
    cache_length: Optional[int]
    prompt_length: Optional[int]
    image: bool
    layers: int
    detail: str = ""
    layout: str = "exact"
    quantize: Optional[str] = None
    frames: int = 0  # a video model's frames per row (with ``image``)


def _build_generate(program, config, mesh, params, dtype, batch, cache_length, prompt_length, image,
                    max_new_tokens, do_sample, vit_query_chunk, layout, quant):
    from cogvlm_jax.generation import sampling
    from cogvlm_jax.parallel import rows

    module = _module(config, mesh, dtype, vit_query_chunk, layout, quant)
    gen = sampling.Generator(module, config.eos_token_ids, config.pad_token_id, mesh)
    if program == "prefill":
        args = (params, *_prompt(config, functools.partial(_rows, mesh), batch, prompt_length, image),
                _sampling(mesh, batch))
        return gen.start, args, dict(max_new_tokens=max_new_tokens, cache_length=cache_length, collect_logits=False,
                                     every_row_has_image=bool(image))
    v = config.text.vocab_size
    state = sampling.DecodeState(
        tokens=_rows(mesh, (batch, max_new_tokens), jnp.int32), logits=_rows(mesh, (batch, v), jnp.float32),
        step=_replicated(mesh, (), jnp.int32), done=_rows(mesh, (batch,), jnp.bool_),
        position=_rows(mesh, (batch,), jnp.int32), cache=_cache(config, mesh, batch, cache_length, module.dtype),
        sampling=_sampling(mesh, batch))
    if program == "decode":
        return gen.decode, (params, state, _replicated(mesh, (), jnp.int32)), dict(do_sample=do_sample)
    eos, pad = gen.eos_ids, gen.pad_id

    def decode_step(variant, params, state, *, do_sample):
        return sampling.decode_one(variant, params, state, eos, pad, do_sample)

    # jitted as Generator.decode is: its row count picks the compilation, the state is donated
    step = rows.ByRows(decode_step, lambda params, state, **k: state.tokens.shape[0], mesh, module=module,
                       static_argnames=("do_sample",), donate_argnames=("state",))
    return step, (params, state), dict(do_sample=do_sample)


def _build_engine(program, config, mesh, params, dtype, slots, cache_length, prompt_length, image, chunk,
                  vit_query_chunk, layout, quant):
    from cogvlm_jax.serving.programs import Programs

    programs = Programs(_module(config, mesh, dtype, vit_query_chunk, layout, quant), slots, cache_length, chunk,
                        mesh)
    state = jax.tree.map(lambda s, sh: _sds(s.shape, s.dtype, sh), programs.shapes, programs.shardings)
    rep = functools.partial(_replicated, mesh)  # the engine's host inputs are replicated
    if program == "insert":
        scalars = (rep((), jnp.int32), rep((), jnp.float32), rep((), jnp.int32), rep((), jnp.float32),
                   rep((), jnp.uint32))  # slot, temperature, top_k, top_p, seed
        return programs.insert, (params, state, *_prompt(config, rep, 1, prompt_length, image), *scalars), {}
    return programs.decode, (params, state, rep((slots,), jnp.bool_)), dict(active=slots)


def _build_train(config, mesh, params, dtype, batch, prompt_length, image, train_config, vit_query_chunk):
    from cogvlm_jax.training.trainer import TrainConfig, Trainer

    tc = train_config or TrainConfig()
    if batch % tc.accum:
        raise AotError(f"batch {batch} does not split into accum={tc.accum} micro-batches")
    trainer = Trainer(config, tc, dtype, mesh, vit_query_chunk)
    state, frozen = trainer.abstract_init(params)
    micro = (tc.accum, batch // tc.accum)
    shapes = {k: (micro + (prompt_length,), jnp.int32) for k in ("input_ids", "token_type_ids", "attention_mask",
                                                                 "labels")}
    if image:
        shapes["pixel_values"] = (_pixels(config, micro, image), jnp.float32)
    data = {k: _sds(shape, dt, trainer.batch_sharding(shape)) for k, (shape, dt) in shapes.items()}
    return trainer.step_program(state), (state, frozen, data), {}


@dataclasses.dataclass
class _Record:
    spec: _Spec
    lower_seconds: float
    compile_seconds: float
    compiler_options: dict
    input_bytes: int  # per device, every input (read by the program or not)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of the abstract arrays in ``tree`` (its shard of each)."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct)]
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * _bits(x.dtype) // 8 for x in leaves)


def _bits(dtype) -> int:
    """Bits per value as a device holds it: ``jnp.int4`` reports an itemsize of 1 but packs two per byte."""
    return 4 if jnp.dtype(dtype) == jnp.dtype(jnp.int4) else 8 * jnp.dtype(dtype).itemsize


_RECORDS: "weakref.WeakKeyDictionary[Any, _Record]" = weakref.WeakKeyDictionary()


def compile_for(config: Union[str, CogVLMConfig], target: Union[str, Target] = "v5e-8", mesh=None,
                program: str = "decode", *, batch: int = 1, cache_length: Optional[int] = None,
                prompt_length: Optional[int] = None, image: bool = False, dtype: str = "bfloat16",
                max_new_tokens: int = 256, do_sample: bool = False, chunk: Optional[int] = None, train_config=None,
                vit_query_chunk: Optional[int] = None, check_fit: bool = True,
                layout: Optional[str] = None, quantize: Optional[str] = None,
                quantize_vision: bool = False, frames: Optional[int] = None) -> jax.stages.Compiled:
    """Compile ``program`` of ``config`` (a preset name, a checkpoint directory / config.json, or a
    ``CogVLMConfig``) for ``target`` on ``mesh`` (data, fsdp, tensor; default all devices on tensor).

    ``batch``: rows (``insert`` / ``decode_chunk``: the engine's slots; ``train``: rows per step).
    ``cache_length``: KV slots per row (default: ``prefill``, the prompt plus ``max_new_tokens`` rounded up
    to 16, as ``generate`` does; else the model's context). ``prompt_length``: prefill / insert / train
    tokens per row (needed there; with ``image`` at least the image's tokens plus one). ``dtype``: of the
    weights (and, on the target, the products and KV cache). ``chunk``: the engine's decode steps per call.
    ``train_config``: a ``TrainConfig`` (default: its defaults, full fine-tuning). ``layout``: ``"exact"``
    or ``"megatron"`` (``models/execution.py``; default: the target platform's, Megatron on TPU and GPU;
    ``train`` always compiles the trainer's, exact). ``quantize`` (``"int8"`` / ``"int4"``) and
    ``quantize_vision``: the program of a model loaded with them (``cogvlm_jax.load``): its parameters are
    the quantized tree (``models/quantize.py``; int4 as the target holds it). ``train`` with ``quantize``:
    the QLoRA step (``train_config`` LoRA; ``TrainConfig.quantize`` set to it). ``frames``: a video model
    (CogVLM2-Video) with ``frames`` video frames per row, each ``num_image_tokens`` slots of the prompt
    (``image`` with a video model and no ``frames``: the demo's most, 24).

    Returns the ``jax.stages.Compiled``; :func:`report` reads it. Raises :class:`DoesNotFitError` when the
    per-device peak passes the chip's HBM (``check_fit=False``: returned anyway, unless XLA refuses it).
    """
    from cogvlm_jax.dtypes import DTYPES as _DTYPES
    from cogvlm_jax.parallel.sharding import abstract_sharded_params

    t = find_target(target)
    if program not in PROGRAMS:
        raise AotError(f"unknown program {program!r}; expected one of {', '.join(PROGRAMS)}")
    if dtype not in _DTYPES:
        raise AotError(f"dtype {dtype!r} unknown; expected one of {sorted(_DTYPES)}")
    cfg = load_config(config) if isinstance(config, str) else config
    name = cfg.name or (config if isinstance(config, str) else "config")
    if batch < 1 or max_new_tokens < 1:
        raise AotError(f"need batch >= 1 and max_new_tokens >= 1, got {batch}, {max_new_tokens}")
    if frames is not None and not cfg.video:
        raise AotError(f"frames is for a video model (CogVLM2-Video); {name} takes images")
    if frames is not None and frames < 1:
        raise AotError(f"frames must be >= 1, got {frames}")
    if cfg.video and (image or frames):
        from cogvlm_jax.inputs.video import MAX_FRAMES

        frames = MAX_FRAMES if frames is None else frames
        image = frames
    if program in ("prefill", "insert", "train"):
        if prompt_length is None:
            raise AotError(f"program {program} needs prompt_length")
        if cfg.video and image and prompt_length <= frames * cfg.num_image_tokens:
            raise AotError(f"prompt_length {prompt_length} cannot hold {frames} video frames: they take "
                           f"{frames * cfg.num_image_tokens} tokens ({cfg.num_image_tokens} each), plus at least one "
                           "text token")
        if image and prompt_length <= cfg.num_image_tokens:
            raise AotError(f"prompt_length {prompt_length} cannot hold an image: it takes {cfg.num_image_tokens} "
                           "tokens (boi + patches + eoi), plus at least one text token")
    if cache_length is None:
        cache_length = (prompt_length + round_up(max_new_tokens, 16) if program == "prefill"
                        else cfg.context_length)
    if program in ("prefill", "insert") and cache_length < prompt_length:
        raise AotError(f"cache_length {cache_length} is shorter than prompt_length {prompt_length}")
    if program == "decode_chunk" and chunk is None:
        from cogvlm_jax.serving.engine import DEFAULT_CHUNK
        chunk = DEFAULT_CHUNK

    m = mesh_for(t, mesh)
    np_dtype = _DTYPES[dtype]
    from cogvlm_jax.models import quantize as quant_lib
    from cogvlm_jax.parallel import program as program_lib
    from cogvlm_jax.parallel.axes import rules_for
    from cogvlm_jax.parallel.layout import to_program

    if quantize is not None and program == "train":  # QLoRA: the trainer's base held quantized
        import dataclasses

        from cogvlm_jax.training.trainer import TrainConfig

        tc = train_config or TrainConfig()
        if tc.trainable != "lora":
            raise AotError(f"quantize with program='train' compiles a QLoRA step: the trainer trains only LoRA "
                           f"factors beside a quantized base (train_config trainable {tc.trainable!r}; give "
                           "TrainConfig(trainable='lora'))")
        train_config = dataclasses.replace(tc, quantize=quantize, quantize_vision=quantize_vision)
    try:
        quant = quant_lib.make(quantize, quantize_vision, program_lib.platform_of(m))
    except ValueError as e:
        raise AotError(str(e)) from None

    layout = "exact" if program == "train" else (program_lib.default_layout(m) if layout is None else layout)
    spec = _Spec(name, t.name, tuple(m.devices.shape), program, dtype, batch,
                 None if program == "train" else cache_length, prompt_length, bool(image), cfg.text.num_layers,
                 detail=(f"chunk {chunk}" if program == "decode_chunk" else
                         f"trainable {(train_config.trainable if train_config else 'full')}" if program == "train"
                         else f"{max_new_tokens} new tokens" if program == "decode" else ""), layout=layout,
                 quantize=quantize, frames=int(frames or 0) if cfg.video and image else 0)
    t0 = time.perf_counter()
    # the checkpoint's tree as the layout's programs hold it (Megatron: the ViT's blocks stacked)
    params = to_program(abstract_sharded_params(cfg, m, np_dtype, rules_for(layout), quant), cfg, layout, quant)
    if program in ("prefill", "decode", "decode_step"):
        fn, args, kwargs = _build_generate(program, cfg, m, params, np_dtype, batch, cache_length,
                                           prompt_length, image, max_new_tokens, do_sample, vit_query_chunk,
                                           layout, quant)
    elif program in ("insert", "decode_chunk"):
        fn, args, kwargs = _build_engine(program, cfg, m, params, np_dtype, batch, cache_length, prompt_length,
                                         image, chunk, vit_query_chunk, layout, quant)
    else:
        fn, args, kwargs = _build_train(cfg, m, params, np_dtype, batch, prompt_length, image, train_config,
                                        vit_query_chunk)
    lowered = fn.lower(*args, **kwargs)
    t1 = time.perf_counter()
    try:
        with compile_cache.kept_out():
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            raise DoesNotFitError(f"{_describe(spec)} does not fit {t.name}'s {t.hbm_bytes / GiB:.0f} GiB per "
                                  f"device: XLA says {text.splitlines()[0][:600]}") from None
        raise
    t2 = time.perf_counter()
    options = dict(getattr(getattr(lowered, "_lowering", None), "_compiler_options_kvs", ()) or ())
    _RECORDS[compiled] = _Record(spec, t1 - t0, t2 - t1, options, _per_device_bytes(args))
    if check_fit:
        r = report(compiled, t)
        if r.peak_bytes > t.hbm_bytes:
            raise DoesNotFitError(
                f"{_describe(spec)} does not fit {t.name}: it needs {r.peak_bytes / GiB:.2f} GiB per device "
                f"(inputs {r.resident_bytes / GiB:.2f}, outputs {r.output_bytes / GiB:.2f}, aliased "
                f"{r.alias_bytes / GiB:.2f}, temporaries {r.temp_bytes / GiB:.2f}) of its {t.hbm_bytes / GiB:.0f} "
                "GiB HBM; use more devices, more fsdp or tensor, a smaller batch or cache")
    return compiled


def _describe(s: _Spec) -> str:
    parts = [f"{s.config_name} {s.program}", s.dtype + (f" {s.quantize}" if s.quantize else ""), f"batch {s.batch}"]
    if s.prompt_length is not None:
        parts.append(f"prompt {s.prompt_length}" + (f" with {s.frames} video frames" if s.frames else
                                                     " with image" if s.image else ""))
    if s.cache_length is not None:
        parts.append(f"cache {s.cache_length}")
    if s.detail:
        parts.append(s.detail)
    return ", ".join(parts) + f" on mesh data={s.mesh[0]} fsdp={s.mesh[1]} tensor={s.mesh[2]} ({s.layout} layout)"


# =========================================================================== the report
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")  # a computation's first line (column 0)
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CONSTANT = re.compile(r"%([\w.\-]+) = s32\[\][^=]*constant\((\d+)\)")
_BOUND = re.compile(r"ROOT .*compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            m = _HEADER.match(line)
            name = m.group(1) if m else None
            if name is not None:
                comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _trips(cond: list[str]) -> int:
    """A loop condition's ``counter < N`` with N a constant: N trips (a scan's counter starts at 0)."""
    constants = dict(m.groups() for line in cond if (m := _CONSTANT.search(line)))
    for line in cond:
        if (m := _BOUND.search(line)) and m.group(1) in constants:
            return int(constants[m.group(1)])
    return 1


def count_collectives(hlo_text: str) -> dict:
    """Collectives run per step of an HLO module, by kind; an async ``-start`` / ``-done`` pair counts
    once. A loop of ``nn.scan`` over stacked layers or blocks (under the name scope ``SCAN_SCOPE``, with a
    constant trip count) counts its body as many times as it runs; any other loop's body (the decode
    loop's step, the engine's decode chunk, the decode attention's walk over the cache) counts once:
    one step."""
    comps = _computations(hlo_text)
    calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}  # callee -> (caller, trips)
    for caller, lines in comps.items():
        for line in lines:
            loop = _WHILE.search(line)
            if loop and f"/{SCAN_SCOPE}/while\"" not in line:  # the scan's own loop, not one in its body
                loop = None
            trips = _trips(comps.get(loop.group(1), [])) if loop else 1
            for m in _CALLED.finditer(line):
                names = [m.group(1)] if m.group(1) else [n.strip().lstrip("%") for n in m.group(2).split(",")]
                for callee in names:
                    if callee in calls:
                        calls[callee].append((caller, trips if loop and callee == loop.group(2) else 1))
    times: dict[str, int] = {}

    def run(c, seen=()):
        if c not in times:
            callers = [(a, t) for a, t in calls[c] if a not in seen]
            times[c] = sum(run(a, seen + (c,)) * t for a, t in callers) if callers else 1  # the entry: once
        return times[c]

    counts = dict.fromkeys(COLLECTIVES, 0)
    for c, lines in (comps or {"": hlo_text.splitlines()}).items():
        for line in lines:
            m = _OP.search(line)
            if m is not None:
                counts[m.group(1)] += run(c) if c in calls else 1
    return counts


def layer_collectives(config: Union[str, CogVLMConfig], target: Union[str, Target] = "v5e-8", mesh=None,
                      program: str = "decode", **kwargs) -> dict:
    """The collectives one decoder layer adds to ``program``: its count with two decoder layers less its
    count with one (the ViT cut to one block in both). Every layer is the same module, and XLA's fused or
    rewritten collectives need not name the layer they come from, so the difference is what each repeats."""
    cfg = load_config(config) if isinstance(config, str) else config
    counts = []
    for n in (1, 2):
        small = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=n),
                            vision=dataclasses.replace(cfg.vision, num_layers=1))
        counts.append(report(compile_for(small, target, mesh, program, check_fit=False, **kwargs)).collectives)
    return {k: counts[1][k] - counts[0][k] for k in COLLECTIVES}


@dataclasses.dataclass(frozen=True)
class Report:
    """One compiled program on one target; every byte count is per device.

    ``argument_bytes`` is what XLA keeps of the inputs (an input the program never reads, such as the
    vision weights in a decode step, is dropped); ``input_bytes`` is every input, which the process holds
    in HBM all the same (the whole model). The peak is the larger of the two plus the outputs not aliased
    to a donated input, the temporaries and the code.

    ``bytes_accessed`` is XLA's cost analysis (TPU; XLA:GPU gives none), and ``hbm_ms`` those bytes at the
    HBM bandwidth. It is not HBM traffic: it counts every memory space, so weights a TPU program stages
    through on-chip memory count about three times, and it counts a loop's body once, so the decode
    attention's walk over the cache (a loop over blocks of slots) counts one block. ``floor_ms`` is the
    arguments (the weights the program reads and the KV cache) read once at the HBM bandwidth: the time
    a decode step over a full cache cannot beat, on every platform. ``xla_ms`` is XLA:TPU's own estimate
    of the run time (``optimal_seconds``), where it gives a positive one.
    """

    description: str
    target: str
    platform: str
    device_kind: str
    devices: int
    mesh: tuple  # (data, fsdp, tensor)
    program: str
    layers: int
    layout: str
    argument_bytes: int
    input_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: Optional[float]
    bytes_accessed: Optional[float]
    xla_seconds: Optional[float]
    collectives: dict
    lower_seconds: Optional[float]
    compile_seconds: Optional[float]
    compiler_options: dict
    hbm_bytes_per_s: float

    @property
    def resident_bytes(self) -> int:
        return max(self.argument_bytes, self.input_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def hbm_ms(self) -> Optional[float]:
        return None if self.bytes_accessed is None else self.bytes_accessed / self.hbm_bytes_per_s * 1e3

    @property
    def floor_ms(self) -> float:
        return self.argument_bytes / self.hbm_bytes_per_s * 1e3

    @property
    def xla_ms(self) -> Optional[float]:
        return None if self.xla_seconds is None else self.xla_seconds * 1e3

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(resident_bytes=self.resident_bytes, peak_bytes=self.peak_bytes, fits=self.fits, hbm_ms=self.hbm_ms,
                 floor_ms=self.floor_ms, xla_ms=self.xla_ms)
        return d

    def format(self) -> str:
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        lines = [self.description,
                 f"  target {self.target}: {self.devices} x {self.device_kind} ({self.platform})",
                 f"  per device: arguments {g(self.argument_bytes)} GiB (all inputs {g(self.input_bytes)}), outputs "
                 f"{g(self.output_bytes)} GiB (aliased {g(self.alias_bytes)}), temporaries {g(self.temp_bytes)} GiB, "
                 f"code {g(self.code_bytes)} GiB",
                 f"  peak {g(self.peak_bytes)} GiB of {g(self.hbm_bytes)} GiB HBM "
                 f"({self.peak_bytes / self.hbm_bytes:.0%}){'' if self.fits else ': DOES NOT FIT'}"]
        bw = f"{self.hbm_bytes_per_s / 1e9:.0f} GB/s"
        per = " per token (one decode step)" if self.program in DECODE_PROGRAMS else ""
        if self.flops is None:
            lines.append("  cost: XLA gives no cost analysis on this platform")
        else:
            lines.append(f"  cost: {self.flops / 1e9:.3f} GFLOP, {self.bytes_accessed / 1e9:.3f} GB accessed (every "
                         f"memory space) = {self.hbm_ms:.3f} ms at {bw}{per}")
        lines.append(f"  HBM floor: arguments {self.argument_bytes / 1e9:.3f} GB read once = {self.floor_ms:.3f} ms at "
                     f"{bw}{per}" + ("" if self.xla_ms is None else f"; XLA's estimate {self.xla_ms:.3f} ms"))
        fmt = lambda c: ", ".join(f"{k} {v}" for k, v in c.items() if v) or "none"  # noqa: E731
        lines.append(f"  collectives ({self.layers} decoder layers): {fmt(self.collectives)}")
        if self.compile_seconds is not None:
            lines.append(f"  lower {self.lower_seconds:.1f} s, compile {self.compile_seconds:.1f} s")
        lines.append(f"  compiler options: {self.compiler_options or 'none'}")
        return "\n".join(lines)


def report(compiled: jax.stages.Compiled, target: Union[str, Target, None] = None) -> Report:
    """Memory (per device), cost, collectives and compile time of a program from :func:`compile_for`
    (``target``: defaults to the one it was compiled for; required for other Compiled objects)."""
    rec = _RECORDS.get(compiled)
    if target is None:
        if rec is None:
            raise AotError("report needs the target of a program compile_for did not make")
        target = rec.spec.target
    t = find_target(target)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    get = lambda key: None if not cost or key not in cost else float(cost[key])  # noqa: E731
    return Report(
        description=_describe(rec.spec) if rec else "a compiled program", target=t.name, platform=t.platform,
        device_kind=devices(t)[0].device_kind, devices=t.devices, mesh=rec.spec.mesh if rec else (), program=rec.spec.program if rec else "?",
        layers=rec.spec.layers if rec else 0, layout=rec.spec.layout if rec else "?", argument_bytes=mem.argument_size_in_bytes,
        input_bytes=rec.input_bytes if rec else mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes, hbm_bytes=t.hbm_bytes, flops=get("flops"),
        bytes_accessed=get("bytes accessed"), xla_seconds=xla if (xla := get("optimal_seconds")) and xla > 0 else None,
        collectives=count_collectives(compiled.as_text() or ""),
        lower_seconds=rec.lower_seconds if rec else None, compile_seconds=rec.compile_seconds if rec else None,
        compiler_options=rec.compiler_options if rec else {}, hbm_bytes_per_s=t.hbm_bytes_per_s)


def format_fit(r: Report) -> str:
    """The memory lines the planner adds for a compiled program: what shapes alone do not tell."""
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    return (f"  compiled {r.program} for {r.target} ({r.layout} layout), per device: temporaries {g(r.temp_bytes)} "
            f"GiB, outputs not aliased {g(r.output_bytes - r.alias_bytes)} GiB, code {g(r.code_bytes)} GiB\n"
            f"  peak {g(r.peak_bytes)} GiB of {g(r.hbm_bytes)} GiB HBM ({r.peak_bytes / r.hbm_bytes:.0%})"
            + ("" if r.fits else ": DOES NOT FIT"))


__all__ = ["AotError", "COLLECTIVES", "DoesNotFitError", "PROGRAMS", "Report", "TARGETS", "Target",
           "TargetUnavailableError", "available", "compile_for", "compile_only_process", "count_collectives",
           "devices", "find_target", "format_fit", "layer_collectives", "mesh_for", "report"]
