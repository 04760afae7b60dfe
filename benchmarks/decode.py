"""Decode speed against the memory-bandwidth roofline.

One decode step of a batch of B rows must read every language-expert weight once (the vision expert
is never used for generated text), the final norm, the lm_head, B embedding rows and the KV cache,
each in the dtype the loop holds it in (``read_dtype``): a bfloat16 model on CPU holds float32 weights
and cache (``cogvlm_jax.api.weights_for_compute``: XLA:CPU widens 16-bit weights to float32 copies
anyway), so its steps read 4 bytes per weight; elsewhere 2.
Our decode step reads the cache up to its filled part: all T slots of a cache no longer than
``attention.CACHE_CHUNK``, else the blocks of that many slots up to the largest write index
(``attention.attend_cache``); we count those slots, averaged over the timed steps (``kv_slots_read``). The limit is
``bytes_per_step / bandwidth``; we report the achieved ``bytes_per_step / step_time`` and its fraction
of the bandwidth probe (``benchmarks.bandwidth``).

What is timed: ``Generator.decode`` (the jitted ``lax.while_loop``) for N steps after one untimed
``Generator.start`` (prefill + cache init); the loop donates its state, so every repetition gets a
fresh state from ``start`` (untimed). Compilation is excluded (one warm-up run). No eos can stop the
loop early: the generator is built with an eos id no token can have.

Axis legend: B batch, T cache length, D model, K kv heads, E head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, last_level_cache_bytes, load_bench_config, record, tree_bytes
from cogvlm_jax.dtypes import DTYPES

NEVER_EOS = -1  # no token id is negative: the loop always runs its N steps
PAIRED_PASSES = 3  # probe passes before each timed repetition (a single pass can land in a dip)


# --------------------------------------------------------------------------- inputs
def image_prompt(config, batch: int, length: int, seed: int = 0):
    """[B, L] ids / token types / mask and [B, 3, S, S] pixels: bos, one image, then random text.

    ``length`` counts every token (no padding); it must leave room for the image and one text token.
    """
    n_img = config.num_image_tokens
    if length < n_img + 2:
        raise ValueError(f"prompt length {length} cannot hold an image of {n_img} tokens plus bos and text")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, min(config.text.vocab_size, 30000), size=(batch, length)).astype(np.int32)
    ids[:, 0] = config.bos_token_id
    ids[:, 1:1 + n_img] = config.image_token_id
    tt = np.zeros((batch, length), np.int32)
    tt[:, 1:1 + n_img] = 1
    am = np.ones((batch, length), np.int32)
    s = config.vision.image_size
    pix = rng.standard_normal((batch, config.vision.in_channels, s, s)).astype(np.float32)
    return ids, tt, am, pix


POOL = 1 << 22  # distinct random values the parameters are tiled from


def make_params(config, dtype: str, seed: int = 0):
    """Random parameters in ``dtype``, shaped like ``cogvlm_jax.models.cogvlm.init_params``'s (normal 0.02, norm
    scales one, biases zero).

    Each leaf is tiled from a pool of 4M normal draws at a random offset: ``init_params`` runs the
    model eagerly and drawing every value is slow on a small CPU (tens of seconds at the mid size).
    Speed does not depend on the values, as long as they are ordinary floats (no denormals).
    """
    from cogvlm_jax.models.cogvlm import abstract_params

    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(POOL, np.float32) * np.float32(0.02)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            x = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            x = np.zeros(leaf.shape, np.float32)
        else:
            x = np.resize(np.roll(pool, int(rng.integers(POOL))), leaf.shape)
        return jnp.asarray(x, leaf.dtype)

    shapes = abstract_params(config, DTYPES[dtype])
    return jax.block_until_ready(jax.tree_util.tree_map_with_path(draw, shapes))


# --------------------------------------------------------------------------- bytes a step reads
_LANGUAGE_LAYER_LEAF = re.compile(r"^layers_\d+/(?!.*vision).*")  # every decoder-layer leaf but the vision expert's


def kv_slots_read(cache_length: int, first_index: int, steps: int) -> float:
    """Cache slots one decode step reads per layer and row, averaged over ``steps`` steps whose first
    writes slot ``first_index`` (the prompt bucket): the rule of ``attention.attend_cache``."""
    from cogvlm_jax.models.attention import CACHE_CHUNK

    if cache_length <= CACHE_CHUNK:
        return float(cache_length)
    blocks = [min(-(-(first_index + s + 1) // CACHE_CHUNK) * CACHE_CHUNK, cache_length) for s in range(steps)]
    return float(np.mean(blocks))


def decode_bytes(config, dtype: str, batch: int, cache_slots: float) -> dict[str, int]:
    """The bytes one decode step must read, by part (from the parameter shapes, nothing allocated), for
    weights and a KV cache stored in ``dtype``: the dtype the loop reads, ``DecodeBench.compute_dtype``
    (float32 for a bfloat16 model on CPU, whose weights ``cogvlm_jax.load`` widens once; see
    ``api.weights_for_compute``). ``cache_slots``: the KV slots read per layer and row (``kv_slots_read``)."""
    from cogvlm_jax.models.cogvlm import abstract_params

    params = abstract_params(config, DTYPES[dtype])
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    layers = sum(tree_bytes(v) for k, v in flat.items() if _LANGUAGE_LAYER_LEAF.match(k))
    head = tree_bytes(flat["lm_head/kernel"]) + tree_bytes(flat["norm/scale"])
    emb = flat["embed_tokens/embedding"]
    embed_rows = batch * emb.shape[1] * np.dtype(emb.dtype).itemsize
    t = config.text
    kv = int(2 * t.num_layers * batch * cache_slots * t.num_kv_heads * t.head_dim * np.dtype(DTYPES[dtype]).itemsize)
    parts = {"layer_weights": layers, "head": head, "embed_rows": embed_rows, "kv_cache": kv}
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------- one case
@dataclasses.dataclass
class DecodeCase:
    config_name: str
    dtype: str
    batch: int
    steps: int  # decode steps timed per repetition
    prompt_length: int
    repeats: int
    do_sample: bool = False  # temperature sampling with top-k/top-p (sorts the vocabulary every step)
    cache_length: Optional[int] = None  # default: as the api sizes it (bucket + steps rounded up to 16)


class DecodeBench:
    """A model, its random params and its generator, reused across the cases of one (config, dtype)."""

    def __init__(self, config_name: str, dtype: str, params=None, quantize: Optional[str] = None,
                 quant_kernel: bool = True):
        from cogvlm_jax.api import compute_dtype, weights_for_compute
        from cogvlm_jax.generation.sampling import Generator
        from cogvlm_jax.models import quantize as quant_lib
        from cogvlm_jax.models.cogvlm import CogVLM
        from cogvlm_jax.parallel import program
        from cogvlm_jax.parallel.quantized import quantize_params

        self.config_name, self.dtype, self.quantize = config_name, dtype, quantize
        self.config = load_bench_config(config_name)
        params = make_params(self.config, dtype) if params is None else params
        # as cogvlm_jax.load(dtype=..., quantize=...) keeps them: on CPU, bfloat16 weights widened to float32
        # once; quantized kernels held as integers (``models/quantize.py``)
        execution = program.execution()
        quant = quant_lib.make(quantize, platform=execution.platform)
        if quant is not None:
            params = quantize_params(params, self.config, quant)
        self.params = weights_for_compute(params, DTYPES[dtype])
        self.compute_dtype = compute_dtype(DTYPES[dtype]).name
        # quant_kernel: the CPU int8/int4 kernel of models/int8_cpu.py (False: the XLA product)
        self.model = CogVLM(self.config, DTYPES[self.compute_dtype],
                            execution=execution.replace(quant=quant, quant_kernel=quant_kernel))
        self.gen = Generator(self.model, (NEVER_EOS,), self.config.pad_token_id)

    def cache_length(self, case: DecodeCase) -> int:
        """As ``cogvlm_jax.api``: the prompt bucket plus max_new_tokens rounded up to 16."""
        from cogvlm_jax.generation.buckets import bucket_length

        if case.cache_length is not None:
            return case.cache_length
        return bucket_length(case.prompt_length) + -(-case.steps // 16) * 16

    def fresh_state(self, case: DecodeCase, inputs):
        from cogvlm_jax.generation.sampling import SamplingParams

        sp = (SamplingParams.make(case.batch, temperature=0.8, top_k=50, top_p=0.9) if case.do_sample
              else SamplingParams.make(case.batch))
        state = self.gen.start(self.params, *inputs, sp, max_new_tokens=case.steps,
                               cache_length=self.cache_length(case), collect_logits=False)
        return jax.block_until_ready(state)

    def run_loop(self, case: DecodeCase, state):
        out = self.gen.decode(self.params, state, jnp.int32(case.steps), do_sample=case.do_sample)
        return jax.block_until_ready(out)

    def measure(self, case: DecodeCase, paired=None) -> dict[str, Any]:
        """Best of ``case.repeats`` timed loops; ``paired`` (a ``bandwidth.PairedProbe``): ``PAIRED_PASSES``
        probe passes before each repetition (untimed), so the probe's best comes from the same minutes."""
        from cogvlm_jax.generation.buckets import bucket_length

        length = bucket_length(case.prompt_length)
        inputs = tuple(jnp.asarray(a) for a in image_prompt(self.config, case.batch, length))
        out = self.run_loop(case, self.fresh_state(case, inputs))  # compile both functions
        steps_done = int(out.step)
        if steps_done != case.steps:
            raise RuntimeError(f"decode ran {steps_done} steps, expected {case.steps}")
        del out
        def setup():
            for _ in range(PAIRED_PASSES if paired is not None else 0):
                paired.once()
            return self.fresh_state(case, inputs)

        t = best_time(lambda s: self.run_loop(case, s), case.repeats, setup=setup)
        step_s = t / case.steps
        cache_len = self.cache_length(case)
        slots = kv_slots_read(cache_len, length, case.steps)
        nbytes = decode_bytes(self.config, self.compute_dtype, case.batch, slots)
        return {"step_s": step_s, "tok_s": case.batch / step_s, "cache_length": cache_len, "cache_slots": slots,
                "bytes": nbytes, "gb_s": nbytes["total"] / step_s / 1e9}

    def compiled_decode_text(self, case: DecodeCase) -> str:
        """The optimised HLO of the decode loop (for ``hlo_findings``)."""
        from cogvlm_jax.generation.buckets import bucket_length

        inputs = tuple(jnp.asarray(a) for a in image_prompt(self.config, case.batch, bucket_length(case.prompt_length)))
        state = self.fresh_state(case, inputs)
        lowered = self.gen.decode.lower(self.params, state, jnp.int32(case.steps), do_sample=case.do_sample)
        return lowered.compile().as_text()


# --------------------------------------------------------------------------- HLO evidence
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|u8|s8)\[([0-9,]*)\]")
_ITEM = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "u8": 1, "s8": 1}


def _shape_bytes(text: str) -> int:
    m = _SHAPE.search(text)
    if not m:
        return 0
    dims = [int(d) for d in m.group(2).split(",") if d]
    return int(np.prod(dims, dtype=np.int64)) * _ITEM[m.group(1)]


def hlo_findings(hlo: str, min_bytes: int = 1 << 16) -> dict[str, Any]:
    """What the decode loop does besides its matmuls: counts (and bytes) of the ops that move memory.

    Scans the whole optimised module: ``copy`` ops of at least ``min_bytes`` (a weight or cache copy
    per step would show here), ``dynamic-slice``/``dynamic-update-slice``/``scatter``/``gather``,
    ``sort`` (top-k/top-p sampling), ``convert`` of big operands (bfloat16 weights widened every step),
    ``dot`` count, and ``while`` loops.
    """
    found: dict[str, Any] = {}
    for op in ("copy", "dynamic-slice", "dynamic-update-slice", "scatter", "gather", "sort", "convert",
               "transpose", "dot", "while", "fusion"):
        pat = re.compile(rf"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+{re.escape(op)}\(", re.M)  # shape may be a tuple
        sizes = [_shape_bytes(m.group(1)) for m in pat.finditer(hlo)]
        big = [s for s in sizes if s >= min_bytes]
        found[op] = {"count": len(sizes), "big": len(big), "big_bytes": int(sum(big))}
    return found


# --------------------------------------------------------------------------- the benchmark
LONG_CACHE = 4096  # the long-context case: a cache 4096 slots long (the mid config's context)


def decode_flops(config, batch: int, cache_slots: float) -> float:
    """FLOPs of one decode step: 2 per weight per row (language expert + lm_head) + attention over the
    cache slots read."""
    t = config.text
    d = t.hidden_size
    weights = t.num_layers * (d * t.qkv_size + d * d + 3 * d * t.intermediate_size) + d * t.vocab_size
    attention = t.num_layers * 4 * cache_slots * t.num_heads * t.head_dim
    return float(batch * (2 * weights + attention))


def run(probe_gb_s: float, quick: bool = False, configs=("mid", "tiny-cogvlm1", "tiny-cogvlm2"),
        dtypes=("float32", "bfloat16"), batches=(1, 8), sample: bool = True,
        steps: Optional[int] = None, peak_flops: Optional[dict] = None, paired=None) -> list[dict]:
    """One measurement per (config, dtype, batch); on the mid config (full runs) also a sampled
    (temperature, top-k, top-p) case and a long-cache case (``LONG_CACHE`` slots) at the first batch size.

    ``fraction_of_limit`` is the roofline fraction: the time the step must take at least, the larger
    of bytes / ``probe_gb_s`` and FLOPs / ``peak_flops[dtype]`` (the measured matmul peak, when given),
    over the time it took. At batch 1 the bytes decide (it is the bandwidth fraction); at batch 8 on a
    small CPU the FLOPs can. ``bandwidth_fraction`` in the extras is always achieved GB/s / probe.

    ``paired`` (a ``bandwidth.PairedProbe``): each case's probe is the best of the probe passes run between
    its own repetitions (``probe_gb_s`` then only names the run's first probe, in ``start_probe_gb_s``).
    """
    recs = []
    llc = last_level_cache_bytes() if jax.default_backend() == "cpu" else None
    for name in configs:
        tiny = name.startswith("tiny")
        n = steps or (8 if quick else (32 if tiny else 64))
        prompt = 128 if not tiny or quick else 64
        for dtype in dtypes:
            bench = DecodeBench(name, dtype)
            cases = [DecodeCase(name, dtype, b, n, prompt, 2 if quick else 5) for b in batches]
            if sample and not quick and not tiny:
                cases.append(DecodeCase(name, dtype, batches[0], n, prompt, 5, do_sample=True))
                cases.append(DecodeCase(name, dtype, batches[0], n, prompt, 3, cache_length=LONG_CACHE))
            for case in cases:
                if paired is not None:
                    paired.reset()
                m = bench.measure(case, paired)
                limit_gb_s = paired.best_gb_s if paired is not None else probe_gb_s
                label = "decode_sample" if case.do_sample else "decode_long" if case.cache_length else "decode"
                flops = decode_flops(bench.config, case.batch, m["cache_slots"])
                memory_s = m["bytes"]["total"] / (limit_gb_s * 1e9)
                peak = (peak_flops or {}).get(dtype)
                compute_s = flops / peak if peak else 0.0
                recs.append(record(
                    label, m["tok_s"], "tok/s", config=name, dtype=dtype,
                    batch=case.batch, fraction_of_limit=max(memory_s, compute_s) / m["step_s"],
                    bound="compute" if compute_s > memory_s else "memory", bandwidth_fraction=m["gb_s"] / limit_gb_s,
                    gflop_per_step=flops / 1e9, limit_gflop_s=None if peak is None else peak / 1e9,
                    ms_per_step=m["step_s"] * 1e3, bytes_per_step=m["bytes"]["total"],
                    weight_bytes=m["bytes"]["layer_weights"] + m["bytes"]["head"], read_dtype=bench.compute_dtype,
                    kv_bytes=m["bytes"]["kv_cache"], embed_bytes=m["bytes"]["embed_rows"], cache_length=m["cache_length"],
                    cache_slots_read=m["cache_slots"], steps=case.steps,
                    achieved_gb_s=m["gb_s"], limit_gb_s=limit_gb_s, start_probe_gb_s=probe_gb_s,
                    probe="paired" if paired is not None else "start",
                    limit_tok_s=case.batch / max(memory_s, compute_s),
                    cache_resident=bool(llc and m["bytes"]["total"] <= 1.5 * llc)))
            del bench
    return recs
