"""The CPU int8/int4 kernel (``models/int8_cpu.py``, ``csrc/int8_cpu.cc``) against XLA's product, on this CPU.

    python -m benchmarks.int8_cpu                      # the mid config, batch 1 and 4
    python -m benchmarks.int8_cpu --batches 1 --repeats 5

Two parts:

* ``int8_product``: one decoder-sized product (an MLP projection, ``[2816, 1024]`` ``[out, in]``) at 1 and 4
  rows, in microseconds a call: float32 weights, XLA's int8 product (``quantize.product_kernel``: the
  optimized HLO is read for a ``convert`` of the whole kernel to float32, ``xla_widens``), that convert
  alone, and the kernel. The weight is 2.9 MB as int8 and may sit in the CPU's cache: these say what
  each product costs in arithmetic and writes, not in DRAM reads.
* ``int8_decode``: decode ms/step of the mid config (``benchmarks.decode.DecodeBench``: the timed
  ``Generator.decode`` loop, best of the repetitions, random weights) with float32, int8 and int4
  weights, the quantized ones with and without the kernel (``Execution.quant_kernel``), at each batch;
  ``speedup_vs_float32`` at the same batch, and ``fraction_of_limit``: the decode weights' read rate
  against the bandwidth probe (``benchmarks.run`` measures it first).
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

from benchmarks.common import emit, record

PRODUCT = (2816, 1024)  # [out, in]: the mid config's gate/up projection


def _best_us(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def products(rows: Sequence[int] = (1, 4), repeats: int = 200) -> list[dict]:
    """``int8_product`` records: one ``PRODUCT`` product by each path, microseconds a call."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cogvlm_jax.models import int8_cpu
    from cogvlm_jax.models import quantize as quant_lib

    quant = quant_lib.make("int8", platform="cpu")
    rng = np.random.default_rng(0)
    w = rng.standard_normal(PRODUCT).astype(np.float32)
    q, s = quant_lib.quantize(w, 1, "int8")
    k, s, wf = jnp.asarray(q), jnp.asarray(s), jnp.asarray(w)

    def xla_int8(x, k, s):  # as a quantized Dense multiplies without the kernel
        kk, out_scale, xx = quant_lib.product_kernel(k, s, x, 1, quant, jnp.float32)
        return jnp.einsum("rd,fd->rf", xx, kk, precision=jax.lax.Precision.HIGHEST) * out_scale

    def convert_only(x, k):  # the widening XLA does before its dot: the whole kernel written as float32
        k, x = jax.lax.optimization_barrier((k, x))
        return k.astype(jnp.float32)

    xla = jax.jit(xla_int8)
    recs = []
    for r in rows:
        x = jnp.asarray(rng.standard_normal((r, PRODUCT[1])).astype(np.float32))
        hlo = xla.lower(x, k, s).compile().as_text()
        widens = any("convert" in line and f"f32[{PRODUCT[0]},{PRODUCT[1]}]" in line for line in hlo.splitlines())
        paths = {
            "float32": (jax.jit(lambda x, w: jnp.einsum("rd,fd->rf", x, w, precision=jax.lax.Precision.HIGHEST)),
                        (x, wf)),
            "xla_int8": (xla, (x, k, s)),
            "xla_convert_only": (jax.jit(convert_only), (x, k)),
        }
        if int8_cpu.available():
            paths["kernel_int8"] = (jax.jit(lambda x, k, s: int8_cpu.matmul(x, k, s, quant)), (x, k, s))
        for name, (fn, args) in paths.items():
            us = _best_us(fn, args, repeats)
            recs.append(record("int8_product", us, "us", config="mid", dtype="float32", batch=r, path=name,
                               out_in=list(PRODUCT), xla_widens=widens))
    return recs


def decode(config: str = "mid", batches: Sequence[int] = (1, 4), steps: int = 32, repeats: int = 3,
           prompt_length: int = 150, probe_gb_s: Optional[float] = None, out=None) -> list[dict]:
    """``int8_decode`` records: float32, then int8 and int4 with the kernel and without, at each batch."""
    from benchmarks.decode import DecodeBench, DecodeCase
    from benchmarks.quantized import _DECODE_LEAF, _bytes
    from cogvlm_jax.models import int8_cpu

    cases = [(None, False), ("int8", True), ("int8", False), ("int4", True), ("int4", False)]
    if not int8_cpu.available():
        cases = [c for c in cases if not c[1]]
    recs, f32_ms = [], {}
    for q, kernel in cases:
        bench = DecodeBench(config, "float32", quantize=q, quant_kernel=kernel)
        read = _bytes(bench.params, _DECODE_LEAF)
        for b in batches:
            m = bench.measure(DecodeCase(config, "float32", b, steps, prompt_length, repeats))
            ms = m["step_s"] * 1e3
            if q is None:
                f32_ms[b] = ms
            gb_s = read / m["step_s"] / 1e9
            rec = record("int8_decode", ms, "ms/step", config=config, dtype="float32", batch=b,
                         fraction_of_limit=None if probe_gb_s is None else gb_s / probe_gb_s,
                         quantize=q or "none", kernel=kernel, tok_s=m["tok_s"], decode_weight_bytes=read,
                         weight_gb_s=gb_s, speedup_vs_float32=f32_ms[b] / ms if b in f32_ms else None)
            recs.append(rec)
            if out is not None:
                out(rec)
        del bench
    return recs


def run(config: str = "mid", batches: Sequence[int] = (1, 4), steps: int = 32, repeats: int = 3,
        probe_gb_s: Optional[float] = None, quick: bool = False, out=None) -> list[dict]:
    recs = products(repeats=50 if quick else 200)
    if out is not None:
        for r in recs:
            out(r)
    return recs + decode(config, batches, steps, repeats, probe_gb_s=probe_gb_s, out=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mid")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    run(a.config, [int(b) for b in a.batches.split(",")], a.steps, a.repeats, out=emit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
