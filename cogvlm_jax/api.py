"""The stable public surface: ``load()`` and ``Model`` (forward, generate, build_inputs, chat, stream).

Everything here takes and returns host numpy; the jitted work lives in ``model.py`` and ``sampling.py``.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cogvlm_jax.config import CogVLMConfig, load_config
from cogvlm_jax.convert.checkpoint import stored_quantization
from cogvlm_jax.convert.params import read_params, stored_inv_freq
from cogvlm_jax.dtypes import LOADABLE, REFERENCE, model_dtype
from cogvlm_jax.files import CheckpointError
from cogvlm_jax.generation import prefix_cache as prefix_lib, sampling
from cogvlm_jax.generation.buckets import answer_length, bucket_length, round_up
from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.hub import resolve
from cogvlm_jax.inputs.preprocess import MAX_IMAGE_PIXELS, build_inputs
from cogvlm_jax.inputs.tokenizer import StreamDecoder, find_tokenizer, load_tokenizer
from cogvlm_jax.models.cogvlm import CogVLM
from cogvlm_jax.models import quantize as quant_lib
from cogvlm_jax.models.layers import accumulation, widens_on_cpu
from cogvlm_jax.parallel import program
from cogvlm_jax.parallel.layout import to_program
from cogvlm_jax.parallel.multihost import to_global, to_host
from cogvlm_jax.parallel.quantized import quantize_params
from cogvlm_jax.parallel.sharding import batch_sharding, param_shardings, replicated

# The small model shipped in the package (``recipes/default_model.py`` made it): ``load()`` with no path.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
DEFAULT_MODEL_NAME = "cogvlm-jax-shapes"  # the id the server gives it
STREAM_CHUNK = 4  # tokens generated on device between two stream yields
# what ``chat`` / ``stream`` keep of recent conversations (keys and values, image features) by default
PREFIX_CACHE_BYTES = prefix_lib.DEFAULT_BYTES


def is_reference(dtype) -> bool:
    """Whether ``dtype`` (a name or a dtype) is the float64 reference mode's (``dtypes.REFERENCE``)."""
    return np.dtype(model_dtype(dtype, LOADABLE) if isinstance(dtype, str) else dtype) in REFERENCE.values()


def check_reference_mode(dtype, platform: str, quantize: Optional[str] = None) -> None:
    """A ValueError saying what is missing when a model in ``dtype`` cannot run on ``platform``: the float64
    reference mode computes everything in float64, which needs JAX's 64-bit mode (without it JAX would
    silently make every float64 array float32), runs on CPU only (accelerators have no fast float64, and
    the mode is for checking numbers, not for speed) and holds the checkpoint's own weights (no
    ``quantize``). Any other dtype passes."""
    if not is_reference(dtype):
        return
    if platform != "cpu":
        raise ValueError(f"dtype='float64' is a reference mode for CPU; this model would run on {platform!r} devices: "
                         "load it without a mesh of accelerators (JAX_PLATFORMS=cpu), or in float32 / bfloat16")
    if quantize is not None:
        raise ValueError(f"dtype='float64' computes with the checkpoint's own weights; quantize={quantize!r} cannot "
                         "be combined with it")
    if not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs JAX's 64-bit mode, which is off: set JAX_ENABLE_X64=1 in the "
                         "environment before Python starts, or call jax.config.update(\"jax_enable_x64\", True) "
                         "before loading (and keep it on while the model runs)")


def compute_dtype(dtype, platform: Optional[str] = None):
    """The dtype a model loaded in ``dtype`` computes in on ``platform`` (default: the default device's):
    float32 on CPU for bfloat16 / float16 (see :func:`weights_for_compute`), else ``dtype``."""

    platform = program.platform_of() if platform is None else platform
    return jnp.dtype(jnp.float32) if widens_on_cpu(dtype, platform) else jnp.dtype(dtype)


def weights_for_compute(params, dtype, platform: Optional[str] = None):
    """``params`` as a model loaded in ``dtype`` keeps them: rounded to ``dtype`` once, stored in
    :func:`compute_dtype`.

    On CPU a bfloat16 / float16 model holds float32 weights whose values are rounded to ``dtype``, and
    computes in float32. XLA:CPU has no 16-bit matmul (without AVX512-BF16 or AMX): given 16-bit weights
    it widens them to float32 inside every jitted call, and in the decode loop that widening is
    loop-invariant and hoisted, so every call first converts the whole model and every step then reads
    the float32 copies (4 bytes per weight) anyway: short calls pay the conversion again and again.
    Widened once here, a step costs what a float32 step costs whatever the call length; widening inside
    every step instead (no hoisting) is slower still than reading float32 (docs/benchmarks.md, "Weights
    in bfloat16 on CPU"). The rounding keeps the part of a 16-bit run's error that matters, the weights'
    (see tests/test_model_parity.py). Other backends multiply 16-bit operands natively: there the weights
    are ``params`` as given. ``platform``: the one the model runs on (default: the default device's).
    """
    if compute_dtype(dtype, platform) == jnp.dtype(dtype):
        return params
    rounded = jax.jit(lambda a: a.astype(dtype).astype(jnp.float32))
    # a quantized model's integer kernels and float32 scales (``models/quantize.py``) are held as they are
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a if _held_as_is(path, a) else rounded(a), params)


PREFILL_DTYPES = ("bfloat16",)


def prefill_weights(params, dtype):
    """The weights a prefill of 16-bit products (``Model(prefill_dtype=...)``) reads: every float
    ``kernel`` but the lm_head's rounded to ``dtype`` once, here; norms, biases, embeddings and the
    lm_head (one row at prefill) are the arrays of ``params`` themselves, not copies. Held beside
    ``params`` (which the decode loop reads), they cost half the kernels' float32 bytes more memory;
    converted inside every prefill instead, each would read and write every kernel (about 60 ms per
    prefill of the mid config on a 2-core CPU, docs/benchmarks.md)."""
    cast = jax.jit(lambda a: a.astype(dtype))

    def leaf(path, a):
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] == "kernel" and keys[0] != "lm_head" and jnp.issubdtype(a.dtype, jnp.floating):
            return cast(a)
        return a

    return jax.tree_util.tree_map_with_path(leaf, params)


def _check_prefill_dtype(prefill_dtype, quantize, dtype) -> None:
    if prefill_dtype is not None and prefill_dtype not in PREFILL_DTYPES:
        raise ValueError(f"prefill_dtype must be one of {PREFILL_DTYPES} or None, got {prefill_dtype!r}")
    if prefill_dtype is not None and is_reference(dtype):
        raise ValueError("prefill_dtype cannot be combined with dtype='float64': the reference mode computes "
                         "everything in float64")
    if prefill_dtype is not None and quantize is not None:
        raise ValueError("prefill_dtype and quantize cannot be combined: a quantized model's products "
                         "dequantize into its own compute dtype")


def _held_as_is(path, a) -> bool:
    return not jnp.issubdtype(a.dtype, jnp.floating) or getattr(path[-1], "key", None) == quant_lib.SCALE


class Model:
    """A loaded CogVLM / CogVLM2: ``config``, ``params`` (a pytree), ``tokenizer`` (or None).

    ``layout``: how the programs split over ``mesh`` (``"exact"`` or ``"megatron"``, see
    ``models/execution.py``; default: exact on CPU and one device, Megatron on a TPU / GPU mesh).
    ``params`` is given in checkpoint order; ``self.params`` is what the programs read (in the Megatron
    layout the fused QKV rows are head-grouped: ``parallel.layout.to_checkpoint`` gives them back).

    ``dtype``: the weights' precision. On CPU a bfloat16 / float16 model keeps its weights rounded to it
    but stored, and multiplied, in float32 (``weights_for_compute``: XLA:CPU has no 16-bit matmul).

    ``quantize`` (``"int8"``, ``"int4"`` or None) and ``quantize_vision``: the model holds its decoder,
    lm_head and adapter kernels (and the ViT's with ``quantize_vision``) quantized (``models/quantize.py``);
    float kernels in ``params`` are quantized here, kernels already quantized are kept.

    ``prefill_dtype`` (``"bfloat16"`` or None): the prefill of ``generate`` / ``chat`` / ``stream`` (the
    ViT, the adapter and the decoder over the prompt) multiplies operands rounded to it, accumulated in
    float32 (``Execution.matmul_dtype``), reading a copy of the kernels held in it (``prefill_weights``);
    the decode loop, ``forward`` and the lm_head stay in the model's dtype. On a CPU with native bfloat16
    dots (AVX512_BF16, AMX) that halves the prefill's matmul time; elsewhere it may be slower. The first
    token's logits then differ from the float32 prefill's by bfloat16 rounding (docs/benchmarks.md, "Time
    to first token"). None: the prefill computes as the rest of the model does.

    ``dtype="float64"``: the reference mode (:func:`check_reference_mode`): every computation in float64,
    logits float64. ``rope_inv_freq``: the decoder's rotary inverse frequencies (``load`` passes a float64
    model the checkpoint's stored buffer, ``convert.params.stored_inv_freq``); None: computed from the
    config's ``rope_theta`` in the model's wide dtype (``layers.accumulation``).

    ``prefix_cache_bytes``: ``chat`` and ``stream`` keep the keys and values of each conversation's latest
    turn and the ViT features of its images, up to this many bytes of device memory, least recently used
    first out (``self.prefix_cache``, ``generation/prefix_cache.py``); a follow-up question then
    prefills only its new tokens, and a new question about a kept image skips the ViT. 0: off.
    ``generate`` and ``forward`` never use it.
    """

    def __init__(self, config: CogVLMConfig, params, tokenizer=None, dtype="float32", vit_query_chunk=None,
                 mesh=None, layout=None, quantize=None, quantize_vision=False, prefill_dtype=None,
                 rope_inv_freq=None, prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        want = model_dtype(dtype, LOADABLE)
        check_reference_mode(want, program.platform_of(mesh), quantize)
        _check_prefill_dtype(prefill_dtype, quantize, want)
        self.config = config
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.mesh = mesh
        # the mesh's (or the default device's) platform; the layout (default: exact on CPU and one device,
        # Megatron on a TPU / GPU mesh) and its sharding rules
        execution = program.execution(mesh, layout)
        quant = quant_lib.make(quantize, quantize_vision, execution.platform)
        execution = execution.replace(quant=quant)
        self.layout = execution.layout
        self.quantize = quantize
        if quant is not None:  # each float kernel quantized, into its own sharding on a mesh
            params = quantize_params(params, config, quant, mesh, execution.rules)
        if mesh is not None:  # place (or re-place) every parameter in its sharded layout
            params = jax.device_put(params, param_shardings(config, mesh, execution.rules, quant))
        # ``params`` are in checkpoint order; the programs of the Megatron layout read the fused QKV
        # rows head-grouped (``parallel/layout.py``)
        self.params = weights_for_compute(to_program(params, config, execution.layout, quant), want,
                                          execution.platform)
        self.module = CogVLM(config, compute_dtype(want, execution.platform), vit_query_chunk, execution=execution,
                             rope_inv_freq=None if rope_inv_freq is None else tuple(float(f) for f in rope_inv_freq))
        self.logits_dtype = np.dtype(accumulation(self.module.dtype))  # float32; float64 in the reference mode
        self._forward = program.jit(lambda p, ids, tt, am, pv: self.module.apply({"params": p}, ids, tt, am, pv)[0],
                                    mesh, describe=lambda p, ids, tt, am, pv: f"forward ({ids.shape[0]} x "
                                    f"{ids.shape[1]} tokens{', images' if pv is not None else ''})")
        self.prefill_dtype = prefill_dtype
        prefill_module = None
        self._prefill_params = self.params
        if prefill_dtype is not None:
            prefill_module = self.module.clone(execution=execution.replace(matmul_dtype=prefill_dtype))
            self._prefill_params = prefill_weights(self.params, model_dtype(prefill_dtype))
        self._generator = sampling.Generator(self.module, config.eos_token_ids, config.pad_token_id, mesh,
                                             prefill_model=prefill_module)
        self.prefix_cache = (prefix_lib.PrefixCache(prefix_cache_bytes, config.num_image_tokens)
                             if prefix_cache_bytes else None)
        self.last_cached_tokens = 0  # prompt tokens the last chat / stream took from the prefix cache

    def _place(self, *arrays):
        """Host inputs -> device arrays, batch-sharded over the mesh when there is one.

        On a mesh spanning several processes every process passes the same host arrays and supplies the
        slices of its own devices (``multihost.to_global``).
        """
        if self.mesh is None:
            return arrays

        return tuple(None if a is None else to_global(a, batch_sharding(self.mesh, a.shape)) for a in arrays)

    def _scalar(self, x):
        """A host scalar as a program input: replicated over the mesh when there is one."""
        return x if self.mesh is None else to_global(np.asarray(x), replicated(self.mesh))

    # ------------------------------------------------------------------ checks
    def _check(self, input_ids, token_type_ids, attention_mask, pixel_values):
        check_reference_mode(self.module.dtype, self.module.execution.platform, self.quantize)  # x64 still on
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, length], got shape {ids.shape}")
        tt = np.asarray(token_type_ids)
        am = np.asarray(attention_mask)
        for name, a in (("token_type_ids", tt), ("attention_mask", am)):
            if a.shape != ids.shape:
                raise InputError(f"{name} has shape {a.shape}, input_ids {ids.shape}")
        v = self.config.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= v):
            raise InputError(f"input_ids outside the vocabulary [0, {v}): min {ids.min()}, max {ids.max()}")
        n_img = self.config.num_image_tokens
        tt = np.where(am.astype(bool), tt, 0)
        counts = tt.sum(axis=1)
        if ids.shape[1] > self.config.context_length:
            images = f" ({counts.max() // n_img} images of {n_img} tokens each)" if counts.any() else ""
            raise InputError(f"prompt of {ids.shape[1]} tokens{images} exceeds max_length {self.config.context_length}")
        most = self._check_spans(tt, counts, n_img)
        pv = None
        if counts.any():
            if pixel_values is None:
                raise InputError("token_type_ids mark image tokens but pixel_values is None")
            pv = np.asarray(pixel_values, np.float64 if is_reference(self.module.dtype) else np.float32)
            s = self.config.vision.image_size
            one = (ids.shape[0], self.config.vision.in_channels, s, s)
            if pv.ndim == 5 and pv.shape[0] == one[0] and pv.shape[1] >= most and pv.shape[2:] == one[1:]:
                pass  # several images or frames per row: [B, N, 3, S, S], N at least the most a row holds
            elif self.config.video:
                raise InputError(f"pixel_values must have shape ({ids.shape[0]}, T, "
                                 f"{self.config.vision.in_channels}, {s}, {s}) with T >= {most} (the most "
                                 f"frames a row's prompt holds), got {pv.shape}")
            elif pv.shape != one or most > 1:
                want = one if most == 1 else (one[0], most, *one[1:])
                raise InputError(f"pixel_values must have shape {want}, got {pv.shape}")
        return ids.astype(np.int32), tt.astype(np.int32), am.astype(np.int32), pv

    def _check_spans(self, tt, counts, n_img) -> int:
        """Each maximal run of a row's image tokens holds whole images (or video frames) of ``n_img`` slots
        side by side. -> the most images (frames) a row holds."""
        what = "video frame" if self.config.video else "image"
        for row, c in enumerate(counts):
            if c % n_img:
                raise InputError(f"row {row} has {c} image tokens (token_type_ids == 1); one {what} takes exactly "
                                 f"{n_img} (boi + {n_img - 2} + eoi), text-only rows none")
            if c:
                edges = np.diff(np.concatenate([[0], tt[row], [0]]))
                runs = np.flatnonzero(edges < 0) - np.flatnonzero(edges > 0)
                if np.any(runs % n_img):
                    raise InputError(f"row {row}: a run of {runs[runs % n_img != 0][0]} image tokens is not whole "
                                     f"{what}s of {n_img}")
        return int(counts.max(initial=0)) // n_img

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, token_type_ids, attention_mask, pixel_values=None) -> np.ndarray:
        """Logits [B, L, V] for [B, L] inputs (left padding: pads neither count nor are attended): float32,
        float64 in the reference mode."""
        ids, tt, am, pv = self._check(input_ids, token_type_ids, attention_mask, pixel_values)
        return to_host(self._forward(self.params, *self._place(ids, tt, am, pv))).astype(self.logits_dtype, copy=False)

    # ------------------------------------------------------------------ generate
    def _start(self, input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens, temperature,
               top_k, top_p, seed, collect_logits=False, kept=None):
        """The prefilled ``DecodeState`` -> (state, whether it samples, the most new tokens it may take).

        ``max_new_tokens=None``: until eos or the context is full (``context_length`` less the longest
        prompt), in a token buffer sized by the prompt's bucket (``answer_length``): the bucket, not the
        prompt's exact length, decides what compiles.

        ``kept`` (a dict; one unpadded row): use ``self.prefix_cache`` for this prompt, and record in
        ``kept`` what ``_keep`` needs to keep its keys and values afterwards."""
        ids, tt, am, pv = self._check(input_ids, token_type_ids, attention_mask, pixel_values)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not am[:, -1].all():
            raise InputError("generate needs left-padded prompts: every row's last attention_mask must be 1")
        longest = int(am.sum(axis=1).max())
        ctx = self.config.context_length
        b, n = ids.shape
        # _check: each row is whole images; the model takes the one-run split only with one image per row
        every_row = pv is not None and bool((tt.sum(axis=1) > 0).all())
        # Only the text is padded to the ladder: the image tokens every row holds are left out of it.
        fixed = int(tt.sum(axis=1).min()) if every_row else 0
        if max_new_tokens is None:
            limit = ctx - longest
            if limit < 1:
                raise InputError(f"prompt of {longest} tokens fills the model's context of {ctx} tokens: no room "
                                 "for an answer")
            buffer, length = max(answer_length(n, ctx, fixed), limit), bucket_length(n, ctx, fixed)
        else:
            if longest + max_new_tokens > ctx:
                raise InputError(f"prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds max_length "
                                 f"{ctx}")
            limit = buffer = max_new_tokens
            length = bucket_length(n, ctx - max_new_tokens, fixed)
        sampling.check_sampling(temperature, top_k, top_p, seed)
        prompt = ids, tt, am  # unpadded
        pad = length - n
        pad2 = ((0, 0), (pad, 0))
        ids = np.pad(ids, pad2, constant_values=self.config.pad_token_id)
        tt, am = np.pad(tt, pad2), np.pad(am, pad2)
        sp = sampling.SamplingParams.make(b, temperature, top_k, top_p, seed)
        if self.mesh is not None:  # per-row settings live with their rows
            sp = jax.tree.map(lambda x: self._place(np.asarray(x))[0], sp)
        if kept is not None and self.prefix_cache is not None:
            state = self._start_kept(kept, *prompt, pv, sp, buffer, collect_logits)
            if state is not None:
                return state, temperature > 0, limit
            kept["start"] = pad  # the prompt's first slot, after its left padding
        features, keep = None, kept is not None and pv is not None and self.prefix_cache is not None
        if keep:  # every image's kept features stand in for the pixels; else the prefill's are kept
            held = [self.prefix_cache.features(d) for d in kept["images"]]
            if all(f is not None for f in held):
                features, pv, keep = held[0] if len(held) == 1 else jnp.concatenate(held, axis=1), None, False
        state = self._generator.start(self._prefill_params, *self._place(ids, tt, am, pv), sp, max_new_tokens=buffer,
                                      cache_length=length + round_up(buffer, 16), collect_logits=collect_logits,
                                      every_row_has_image=every_row, image_features=features, keep_features=keep)
        if keep:
            n_img = self.config.num_image_tokens
            for i, d in enumerate(kept["images"]):
                one = state.image_features[:, i * n_img:(i + 1) * n_img]
                self.prefix_cache.put_features(d, one, one.nbytes)
            state = state.replace(image_features=None)
        return state, temperature > 0, limit

    def _start_kept(self, kept, ids, tt, am, pv, sp, buffer, collect_logits):
        """The prefilled state of one prompt that begins with an entry of ``self.prefix_cache``, only the
        rest of it prefilled (``CogVLM.extend``), or None if no entry stands for enough of it."""
        kept.update(ids=ids[0], types=tt[0], images=prefix_lib.image_digests(None if pv is None else pv[0]),
                    start=0, cached=0)
        entry, m = self.prefix_cache.match(ids[0], tt[0], kept["images"])
        if entry is None:
            return None
        n = ids.shape[1]
        new, new_pos = prefix_lib.new_tokens(ids[0], tt[0], am[0], m, self.config.pad_token_id,
                                             self.config.position_span)
        k, v = entry.value
        kept["cached"] = m
        return self._generator.resume(self._prefill_params, k, v, self._scalar(np.int32(m)),
                                      *self._place(new, new_pos, np.array([n - m], np.int32)), sp,
                                      max_new_tokens=buffer, cache_length=k.shape[3] + new.shape[1] + round_up(buffer, 16),
                                      collect_logits=collect_logits)

    def _keep(self, kept, state) -> None:
        """Keep the keys and values one row's prompt and answer wrote (``state`` after ``_start(kept=...)``)
        in ``self.prefix_cache``, for a later prompt that begins the same way."""
        if self.prefix_cache is None or "ids" not in kept:
            return
        g = int(to_host(state.step))
        answer = to_host(state.tokens)[0, :g]
        if g and int(answer[-1]) in self.config.eos_token_ids:  # its keys are kept, but no prompt repeats it
            answer = answer[:-1]
            g -= 1
        ids = np.concatenate([kept["ids"], answer]).astype(np.int32)
        types = np.concatenate([kept["types"], np.zeros(g, np.int32)])
        length = min(bucket_length(len(ids)), state.cache.length)
        per_slot = 2 * state.cache.k[:1].nbytes // state.cache.length
        if not self.prefix_cache.worth_keeping(per_slot * length):
            return
        k, v = self._generator.take(state.cache, self._scalar(np.int32(kept["start"])), length=length)
        self.prefix_cache.put(ids, types, kept["images"], (k, v), k.nbytes + v.nbytes)

    def generate(self, input_ids, token_type_ids, attention_mask, pixel_values=None, *, max_new_tokens=None,
                 temperature=0.0, top_k=None, top_p=None, seed=0) -> np.ndarray:
        """Token ids [B, max_new_tokens]; after a row's eos, the pad id. ``max_new_tokens=None``: until
        every row's eos or the context is full, [B, context_length - the longest prompt]."""
        state, limit = self._generate(input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens,
                                      temperature, top_k, top_p, seed, False)
        return to_host(state.tokens)[:, :limit]

    def generate_state(self, input_ids, token_type_ids, attention_mask, pixel_values=None, *, max_new_tokens=None,
                       temperature=0.0, top_k=None, top_p=None, seed=0, collect_logits=False):
        """Like ``generate`` but returns the final ``DecodeState`` (tokens, chosen logits if collected); with
        ``max_new_tokens=None`` its buffers may run past the tokens generated (``answer_length``)."""
        return self._generate(input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens, temperature,
                              top_k, top_p, seed, collect_logits)[0]

    def _generate(self, input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens, temperature, top_k,
                  top_p, seed, collect_logits):
        """-> (the final ``DecodeState``, the most tokens it generated)."""
        state, do_sample, limit = self._start(input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens,
                                              temperature, top_k, top_p, seed, collect_logits)
        return self._generator.decode(self.params, state, np.int32(limit), do_sample=do_sample), limit

    def generate_chunks(self, input_ids, token_type_ids, attention_mask, pixel_values=None, *, max_new_tokens=None,
                        temperature=0.0, top_k=None, top_p=None, seed=0, chunk=STREAM_CHUNK) -> Iterator[np.ndarray]:
        """Yield the new ids [B, k]: the first token alone, as soon as the prefill has chosen it (the time to
        the first token is the prefill's and one step's, not a chunk's), then every ``chunk`` tokens (the
        same compiled loop as ``generate``: the step limit is a traced value)."""
        for new, _ in self._chunks(input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens,
                                   temperature, top_k, top_p, seed, chunk, None):
            yield new

    def _chunks(self, input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens, temperature, top_k,
                top_p, seed, chunk, kept):
        """``generate_chunks``, each chunk with the state after it; ``kept``: see ``_start``."""
        state, do_sample, limit = self._start(input_ids, token_type_ids, attention_mask, pixel_values, max_new_tokens,
                                              temperature, top_k, top_p, seed, kept=kept)
        emitted = 0
        while emitted < limit:
            stop = 1 if emitted == 0 else min(emitted + chunk, limit)
            state = self._generator.decode(self.params, state, np.int32(stop), do_sample=do_sample)
            step = int(to_host(state.step))
            yield to_host(state.tokens)[:, emitted:step], state
            if step == emitted or bool(np.all(to_host(state.done))):
                return
            emitted = step

    # ------------------------------------------------------------------ text
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise InputError(f"{what} needs a tokenizer: none was found beside the checkpoint; pass "
                             "cogvlm_jax.load(path, tokenizer=PATH) with a tokenizer.model or tokenizer.json, or a "
                             "Hub id (CogVLM1 uses Vicuna's: tokenizer=\"lmsys/vicuna-7b-v1.5\")")
        return self.tokenizer

    def build_inputs(self, query, history=(), image=None, template=None, *, max_image_pixels=MAX_IMAGE_PIXELS,
                     video=None, video_strategy=None):
        """dict of input_ids, token_type_ids, attention_mask ([L] int32) and pixel_values ([3, S, S] or None).
        ``image``: one image or a list (``[N, 3, S, S]`` pixels, one span each); ``history`` turns may
        carry their image as ``(q, a, image)`` (see ``inputs.preprocess.build_inputs``).

        ``max_image_pixels``: an image file declaring more pixels is refused before it is decoded
        (``preprocess.ImageTooLargeError``); None: no limit but PIL's own. ``video`` (a CogVLM2-Video
        model): uint8 frames (3, T, H, W), a list of PIL frames or a video file, sampled by
        ``video_strategy`` (``"base"`` or ``"chat"``, default by the template: ``inputs/video.py``);
        pixel_values is then [T, 3, 224, 224].
        """

        tok = self._need_tokenizer("build_inputs")
        return build_inputs(tok, self.config, query, history=history, image=image, template=template,
                            max_image_pixels=max_image_pixels, video=video, video_strategy=video_strategy)

    def _text_stop(self, ids: Sequence[int]) -> list[int]:
        out = []
        for i in ids:
            if int(i) in self.config.eos_token_ids:
                break
            out.append(int(i))
        return out

    def chat(self, image=None, query=None, history=(), template=None, *, max_new_tokens=None, temperature=0.0,
             top_k=None, top_p=None, seed=0, video=None, video_strategy=None) -> str:
        """The answer to ``query`` about ``image`` (None, one, or a list) after ``history`` [(q, a) or
        (q, a, image), ...]; without ``max_new_tokens``, until eos or the context is full. A video model
        takes ``video=`` (see ``build_inputs``) in place of the image."""
        return "".join(self.stream(image, query, history, template, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, video=video,
                                   video_strategy=video_strategy))

    def stream(self, image=None, query=None, history=(), template=None, *, max_new_tokens=None, temperature=0.0,
               top_k=None, top_p=None, seed=0, chunk=STREAM_CHUNK, video=None, video_strategy=None) -> Iterator[str]:
        """The answer as text pieces, as it is generated."""
        if query is None:
            raise InputError("chat/stream need a query (the question to answer)")
        inputs = self.build_inputs(query, history, image, template, video=video, video_strategy=video_strategy)
        ids = inputs["input_ids"]
        pv = None if inputs["pixel_values"] is None else inputs["pixel_values"][None]
        decoder = StreamDecoder(self.tokenizer)
        kept, state = {}, None
        self.last_cached_tokens = 0
        for new, state in self._chunks(ids[None], inputs["token_type_ids"][None], inputs["attention_mask"][None],
                                       pv, max_new_tokens, temperature, top_k, top_p, seed, chunk, kept):
            self.last_cached_tokens = kept.get("cached", 0)
            row = [int(i) for i in new[0]]
            text_ids = self._text_stop(row)
            for i in text_ids:
                piece = decoder.add(i)
                if piece:
                    yield piece
            if len(text_ids) < len(row):  # eos
                break
        if state is not None:
            self._keep(kept, state)
        tail = decoder.flush()
        if tail:
            yield tail


def load(path: Optional[str] = None, dtype: str = "float32", tokenizer: Optional[str] = None, mesh=None,
         progress: bool = True, layout: Optional[str] = None, revision: Optional[str] = None,
         quantize: Optional[str] = None, quantize_vision: bool = False,
         prefill_dtype: Optional[str] = None, prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> Model:
    """Load a CogVLM checkpoint: an HF directory (safetensors), one written by ``cogvlm-jax convert``, or a
    Hugging Face Hub id such as ``"THUDM/cogvlm2-llama3-chat-19B"`` (``revision``: its branch, tag or
    commit), read from the Hugging Face cache or downloaded into it (``cogvlm_jax.hub``; a local directory
    of the same spelling wins).

    Without ``path``: the small default model shipped in the package (trained from scratch on the
    coloured-shapes task of ``cogvlm_jax.recipes.synthetic``; see docs/default-model.md), with its tokenizer.
    ``dtype``: the weights' precision ("bfloat16" halves their memory on accelerators; on CPU they are
    rounded to it and kept in float32, see :func:`weights_for_compute`). "float64" is the reference mode
    (:func:`check_reference_mode`: CPU, JAX's 64-bit mode on): every computation in float64 and the rotary
    frequencies the checkpoint stores, for checking a port against ours (docs/sharding-and-numerics.md).
    ``tokenizer``: a tokenizer file, directory or Hub id (a ``TokenizerError`` naming it if it holds none;
    CogVLM1 checkpoints ship none: they use ``"lmsys/vicuna-7b-v1.5"``'s); by default the checkpoint
    directory (or its ``tokenizer/``) is searched. Without one, ``forward``/``generate`` on ids still work.
    The tokenizer is found before the weights are read.
    ``mesh`` (``make_mesh``): every parameter goes straight into its sharded layout and each process
    reads only the slices its own devices hold: from HF safetensors region by region
    (``convert/hf_sharded.py``), from our Orbax format by restoring into the sharded abstract tree.
    On a mesh over several processes (after ``jax.distributed.initialize``) every process calls this.
    ``layout``: how the programs split over the mesh (``Model``); the weights are read straight into it.
    ``quantize`` ("int8" | "int4" | None) and ``quantize_vision``: hold the kernels quantized (``Model``;
    ``models/quantize.py``), each quantized as it is read. A checkpoint written by ``cogvlm-jax convert
    --quantize`` is read back as it is stored; ``quantize`` then defaults to its format and must match it.
    ``prefill_dtype`` ("bfloat16" | None): the prompt's prefill multiplies in it (``Model``).
    ``prefix_cache_bytes``: what ``chat`` / ``stream`` keep of recent conversations (``Model``; 0: nothing).
    """
    want = model_dtype(dtype, LOADABLE)
    check_reference_mode(want, program.platform_of(mesh), quantize)  # before anything is read
    _check_prefill_dtype(prefill_dtype, quantize, want)
    path = resolve(path, revision, progress=progress)
    tokenizer_dir = resolve(tokenizer, kind="tokenizer", progress=progress)
    if path is None:
        path = DEFAULT_MODEL
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"the default model is missing from this installation ({path}); make it with "
                                    f"`python -m cogvlm_jax.recipes.default_model --out {path}` or pass a path")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    config = load_config(path)
    # the tokenizer before the weights: a bad tokenizer path fails in a moment, not after minutes of reading
    tok = load_tokenizer(tokenizer_dir) if tokenizer is not None else find_tokenizer(path)
    execution = program.execution(mesh, layout)
    stored = stored_quantization(path)
    if stored is not None:
        quantize, quantize_vision = _stored_quantize(path, stored, quantize, quantize_vision)
        check_reference_mode(want, execution.platform, quantize)
    quant = quant_lib.make(quantize, quantize_vision, execution.platform)
    params = read_params(path, config, want, mesh=mesh, progress=progress, rules=execution.rules or None,
                         quant=quant)
    rope = stored_inv_freq(path, config) if is_reference(want) else None
    return Model(config, params, tok, dtype, mesh=mesh, layout=execution.layout, quantize=quantize,
                 quantize_vision=quantize_vision, prefill_dtype=prefill_dtype, rope_inv_freq=rope,
                 prefix_cache_bytes=prefix_cache_bytes)


def _stored_quantize(path, stored, quantize, quantize_vision):
    """The (quantize, quantize_vision) of a load of a quantized checkpoint: its own; asking for others fails."""
    if quantize is not None and quantize != stored.format or quantize_vision and not stored.vision:
        raise CheckpointError(f"{path} holds {stored.format} weights (quantize_vision={stored.vision}); it cannot be "
                              f"loaded with quantize={quantize!r}, quantize_vision={quantize_vision}: load it "
                              "without quantize, or convert the original checkpoint again")
    return stored.format, stored.vision
