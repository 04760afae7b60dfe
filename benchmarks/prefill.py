"""Prefill speed against the measured matmul peak.

Prefill (``Generator.start``: ViT + adapter + every decoder layer over the prompt + KV-cache write) is
compute bound, so its limit is FLOPs / peak FLOP/s. The peak is measured, not looked up: a jitted
square matmul (best of N) in the dtype and precision the model's ``Dense`` layers use.

FLOPs are counted two ways. ``model_flops`` (the fraction is taken on these) are the useful ones:
each token through one expert, causal attention counted half, the lm_head on the last position only.
``executed_flops`` are XLA's own count of the compiled function (``cost_analysis``), which includes
work beyond that: the attention computes the full square of scores, and for each routed projection
XLA counts the costlier branch of its ``cond``, the select route (both experts on every token, the
fallback of a batch that mixes text-only rows). An image batch runs the other branch, each expert on
its own tokens (``decoder._route``), so this count overstates what the measured prefill executes.

Axis legend: B batch, L prompt length, D text width, F text mlp width, V vocab, N ViT tokens, W ViT
width, G ViT mlp width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, record
from benchmarks.decode import DecodeBench, image_prompt
from cogvlm_jax.dtypes import DTYPES


# --------------------------------------------------------------------------- the limit
def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5, native: bool = False) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] in the dtype a model loaded in ``dtype`` multiplies in
    (``api.compute_dtype``: float32 on CPU for bfloat16), float32 accumulation, the model's precision.
    ``native``: in ``dtype`` itself, as a program of ``Execution.matmul_dtype`` products multiplies."""
    from cogvlm_jax.api import compute_dtype
    from cogvlm_jax.models.layers import precision_for

    dt = DTYPES[dtype] if native else compute_dtype(DTYPES[dtype])
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32), dt)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, precision=precision_for(dt), preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, b))
    return 2.0 * n ** 3 / best_time(lambda: jax.block_until_ready(f(a, b)), repeats)


# --------------------------------------------------------------------------- FLOPs
def decoder_token_flops(config) -> int:
    """Useful FLOPs of one token through one decoder layer's products (one expert): qkv, dense, the MLP."""
    t = config.text
    d = t.hidden_size
    return 2 * (d * t.qkv_size + d * d + 3 * d * t.intermediate_size)


def prefill_parts(config, length: int) -> dict[str, float]:
    """Useful FLOPs of each part of a prefill of ``length`` tokens with one image: the ViT, the adapter,
    the decoder's projections by expert, its attention and the lm_head (the last position only)."""
    v, t = config.vision, config.text
    n, w = v.num_patches + 1, v.hidden_size
    # ViT: patch conv, then per layer qkv + dense + mlp on N tokens and the full N x N attention.
    vit = 2 * v.num_patches * v.in_channels * v.patch_size ** 2 * w
    vit += v.num_layers * (2 * n * (3 * w * w + w * w + 2 * w * v.intermediate_size) + 4 * n * n * w)
    # Adapter: CogVLM2's 2x2 stride-2 conv, then the GLU (linear_proj D, gate/up F, down D).
    m = v.num_output_tokens
    adapter = (2 * m * 4 * w * w if v.downsample else 0)
    adapter += 2 * m * (w * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    # Decoder: one expert per token (qkv, dense, 3 mlp matmuls) + causal attention (half the square).
    d = t.hidden_size
    per_token = decoder_token_flops(config)
    image = config.num_image_tokens - 1  # the vision expert's tokens: all image tokens but eoi
    return {"vit": vit, "adapter": adapter,
            "vision_expert": t.num_layers * image * per_token,
            "language_expert": t.num_layers * (length - image) * per_token,
            "attention": t.num_layers * 2 * length * length * d, "lm_head": 2 * d * t.vocab_size}


def prefill_flops(config, length: int, batch: int = 1) -> float:
    """Useful FLOPs of a prefill of ``batch`` prompts of ``length`` tokens, each with one image."""
    return float(batch * sum(prefill_parts(config, length).values()))


# --------------------------------------------------------------------------- the benchmark
def measure(bench: DecodeBench, length: int, batch: int, repeats: int) -> dict:
    """Best-of-N wall time of ``Generator.start`` (prefill + cache init) for one-image prompts."""
    from cogvlm_jax.generation.sampling import SamplingParams

    inputs = tuple(jnp.asarray(a) for a in image_prompt(bench.config, batch, length))
    sp = SamplingParams.make(batch)
    kw = dict(max_new_tokens=1, cache_length=length + 16, collect_logits=False)

    def start():
        return jax.block_until_ready(bench.gen.start(bench.params, *inputs, sp, **kw))

    start()  # compile
    t = best_time(start, repeats)
    executed = None
    try:
        cost = bench.gen.start.lower(bench.params, *inputs, sp, **kw).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        executed = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort: not every backend provides it
        pass
    return {"seconds": t, "model_flops": prefill_flops(bench.config, length, batch), "executed_flops": executed}


def run(quick: bool = False, configs=("mid",), dtypes=("float32", "bfloat16"), batch: int = 1,
        length: int | None = None) -> list[dict]:
    """Matmul peak per dtype, then prefill tok/s and its FLOP/s fraction of that peak, per config."""
    recs = []
    length = length or (128 if quick else 256)
    for dtype in dtypes:
        peak = matmul_peak(dtype, n=1024 if quick else 2048, repeats=3 if quick else 5)
        recs.append(record("matmul_peak", peak / 1e9, "GFLOP/s", dtype=dtype,
                           n=1024 if quick else 2048))
        for name in configs:
            bench = DecodeBench(name, dtype)
            m = measure(bench, length, batch, 2 if quick else 5)
            achieved = m["model_flops"] / m["seconds"]
            recs.append(record(
                "prefill", batch * length / m["seconds"], "tok/s", config=name, dtype=dtype, batch=batch,
                fraction_of_limit=achieved / peak, prompt_tokens=length,
                image_tokens=bench.config.num_image_tokens, ms=m["seconds"] * 1e3,
                model_gflop=m["model_flops"] / 1e9, achieved_gflop_s=achieved / 1e9, limit_gflop_s=peak / 1e9,
                executed_gflop=None if m["executed_flops"] is None else m["executed_flops"] / 1e9))
            del bench
    return recs
