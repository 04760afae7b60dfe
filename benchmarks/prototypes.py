"""Measured prototypes of layout choices (nothing here changes the model code: each prototype patches or
re-implements a piece inside this process only).

* ``vit_kernel_layouts``: the ViT's and the adapter's ``Dense`` kernels stored ``[out, in]``
  (``layers.Dense(out_in=True)``, as the decoder's are, which is faster for one-row decode products)
  instead of ``[in, out]``, timed on the image encoder (ViT + adapter), which only prefill runs.
  Implemented by swapping the ``Dense`` that ``cogvlm_jax.models.vision`` and ``cogvlm_jax.models.adapter``
  use for ``Dense(out_in=True)``. The two layouts time equal within noise (docs/benchmarks.md), so the
  encoder keeps ``[in, out]``.

The decoder's ``[out, in]`` kernels and the heads-major KV cache are in the model itself; ``decode_long``
in ``benchmarks.decode`` measures the cache read directly.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import record

_VIT_MODULES = ("cogvlm_jax.models.vision", "cogvlm_jax.models.adapter")


@contextlib.contextmanager
def vit_out_in():
    """Within the block, models built from ``cogvlm_jax`` store the ViT/adapter kernels ``[out, in]``."""
    import importlib

    from cogvlm_jax.models.layers import Dense

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

    from benchmarks.decode import image_prompt, load_bench_config, make_params
    from cogvlm_jax.dtypes import DTYPES
    from cogvlm_jax.models.cogvlm import CogVLM
    from cogvlm_jax.parallel import program

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
                model = CogVLM(config, DTYPES[dtype], execution=program.execution())
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


def run(probe_gb_s: float, quick: bool = False) -> list[dict]:
    return vit_kernel_layouts(quick)
