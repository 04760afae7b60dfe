"""Measured prototypes of layout choices (nothing here changes the model code: each prototype patches or
re-implements a piece inside this process only).

* ``vit_kernel_layouts``: the ViT's and the adapter's ``Dense`` kernels stored ``[out, in]``
  (``layers.Dense(out_in=True)``, as the decoder's are since it measured faster for one-row decode
  products) instead of ``[in, out]``, timed on the image encoder (ViT + adapter), which only prefill
  runs. Implemented by swapping the ``Dense`` that ``cogvlm_jax.vision`` and ``cogvlm_jax.adapter``
  use for ``Dense(out_in=True)``. Measured equal within noise (float32 68 vs 72 ms, bfloat16 100 vs
  98 ms on the 2-core VM), so they stay ``[in, out]``.
* ``attention``: one decode step's attention reads over a long KV cache, for 8 layers, in the current
  cache layout ``[B, T, K, E]`` (through ``cogvlm_jax.attention.attend``, as the model does) and in
  a heads-major layout ``[B, K, T, E]`` whose einsums read the cache without transposing it.

Axis legend: B batch, T cache length, K kv heads, G query heads per kv head, E head dim, D in, F out.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time, record

_VIT_MODULES = ("cogvlm_jax.vision", "cogvlm_jax.adapter")


@contextlib.contextmanager
def vit_out_in():
    """Within the block, models built from ``cogvlm_jax`` store the ViT/adapter kernels ``[out, in]``."""
    import importlib

    from cogvlm_jax.layers import Dense

    mods = [importlib.import_module(m) for m in _VIT_MODULES]
    saved = [m.Dense for m in mods]
    try:
        for m in mods:
            m.Dense = functools.partial(Dense, out_in=True)
        yield
    finally:
        for m, d in zip(mods, saved):
            m.Dense = d


def vit_kernel_layouts(quick: bool = False, dtypes=("float32", "bfloat16"), rounds: int = 15) -> list[dict]:
    """ms of the mid config's image encoder (ViT + adapter, jitted ``CogVLM.encode_images`` on one image)
    with the ViT/adapter kernels ``[in, out]`` (as shipped) and ``[out, in]``.

    The two layouts are timed in alternation, best of ``rounds`` each, so a load that comes and goes on
    a shared machine hits both alike.
    """
    import time

    from benchmarks.decode import DTYPES, image_prompt, load_bench_config, make_params
    from cogvlm_jax.model import CogVLM

    recs = []
    config = load_bench_config("mid")
    pixels = jnp.asarray(image_prompt(config, 1, config.num_image_tokens + 2)[3])
    rounds = 3 if quick else rounds
    for dtype in dtypes:
        # The shapes come from the shipped model (jax caches the abstract evaluation of an equal model);
        # the ViT/adapter linear kernels are transposed for the patched one.
        base = make_params(config, dtype)
        runs = {}
        for layout in ("in_out", "out_in"):
            params = base
            if layout == "out_in":
                params = dict(base, vision=jax.tree_util.tree_map_with_path(
                    lambda p, x: x.T if x.ndim == 2 and str(getattr(p[-1], "key", "")) == "kernel" else x,
                    base["vision"]))
            with vit_out_in() if layout == "out_in" else contextlib.nullcontext():
                model = CogVLM(config, DTYPES[dtype])
                encode = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x, method=m.encode_images))
                jax.block_until_ready(encode(params, pixels))  # compile under the patch
            runs[layout] = functools.partial(lambda f, p: jax.block_until_ready(f(p, pixels)), encode, params)
        best = {k: float("inf") for k in runs}
        for _ in range(rounds):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
        for k, secs in best.items():
            recs.append(record(f"proto_vit_{k}", secs * 1e3, "ms", config="mid", dtype=dtype, batch=1,
                               image_tokens=config.num_image_tokens))
    return recs


# --------------------------------------------------------------------------- attention over the cache
def _attend_heads_major(q, k, v, mask):
    """One query position against a heads-major cache: q [B, 1, H, E]; k, v [B, K, T, E]; mask [B, 1, T]."""
    b, _, h, e = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, h // kh, e)
    s = jnp.einsum("bkge,bkte->bkgt", qg, k, precision=jax.lax.Precision.HIGHEST) / math.sqrt(e)
    s = jnp.where(mask[:, 0][:, None, None, :], s, -1e30)
    o = jnp.einsum("bkgt,bkte->bkge", jax.nn.softmax(s, axis=-1), v, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, 1, h, e)


def attention_layouts(quick: bool = False, cache_length: int = 4096, batch: int = 1, layers: int = 8,
                      heads: int = 16, kv_heads: int = 4, head_dim: int = 64, steps: int = 16) -> list[dict]:
    """ms per decode step of the attention reads alone (``layers`` layers, no cache write), float32:
    the current ``[B, T, K, E]`` cache through ``cogvlm_jax.attention.attend`` vs a ``[B, K, T, E]`` one."""
    from cogvlm_jax.attention import attend

    recs = []
    t = 1024 if quick else cache_length
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, head_dim), np.float32))
    mask = jnp.ones((batch, 1, t), bool)
    kv_bytes = 2 * layers * batch * t * kv_heads * head_dim * 4
    for layout, fn, shape in (("current", attend, (batch, t, kv_heads, head_dim)),
                              ("heads_major", _attend_heads_major, (batch, kv_heads, t, head_dim))):
        ks = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2 * layers)]

        @jax.jit
        def loop(q, ks):
            def body(_, x):  # each step's query depends on the last: nothing can be hoisted
                for i in range(layers):
                    x = x + 1e-3 * fn(x, ks[2 * i], ks[2 * i + 1], mask)
                return x
            return jax.lax.fori_loop(0, steps, body, q)

        jax.block_until_ready(loop(q, ks))
        secs = best_time(lambda: jax.block_until_ready(loop(q, ks)), 2 if quick else 5) / steps
        recs.append(record(f"proto_attention_{layout}", secs * 1e3, "ms/step", config=f"{layers}L T={t}",
                           dtype="float32", batch=batch, kv_mb=kv_bytes / 1e6, kv_gb_s=kv_bytes / secs / 1e9))
    return recs


def run(probe_gb_s: float, quick: bool = False) -> list[dict]:
    return vit_kernel_layouts(quick) + attention_layouts(quick)
