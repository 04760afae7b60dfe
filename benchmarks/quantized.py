"""Quantized decode on this CPU: the bytes a model holds and the decode tokens/s, float32 against int8 (and
int4) weights (``cogvlm_jax.load(..., quantize=)``, ``models/quantize.py``).

    python -m benchmarks.quantized                        # the mid config, batch 1, float32 / int8 / int4
    python -m benchmarks.quantized --formats none,int8 --batches 1,8

Each row is one ``benchmarks.decode.DecodeBench`` case (the timed ``Generator.decode`` loop, best of the
repetitions) on random weights, quantized as a quantizing load does. ``held_bytes``: every parameter the
model holds; ``decode_weight_bytes``: those a decode step reads (the language expert of every layer, the
final norm, the lm_head), at the bytes they are held in. The quantized decode products run in the CPU
kernel of ``models/int8_cpu.py`` (``--no-kernel``: as XLA ops, which convert each int8 kernel to a
float32 array inside the product; ``benchmarks/int8_cpu.py`` compares the two).
"""

from __future__ import annotations

import argparse
import re
from typing import Optional, Sequence

from benchmarks.common import emit, record

_DECODE_LEAF = re.compile(r"^(layers_\d+/(?!.*vision)|lm_head/|norm/)")


def _bytes(params, pattern=None) -> int:
    import jax
    from flax.traverse_util import flatten_dict

    from cogvlm_jax.parallel.quantized import held_bytes

    flat = {"/".join(k): v for k, v in flatten_dict(jax.device_get(params)).items()}
    return held_bytes([v for k, v in flat.items() if pattern is None or pattern.match(k)])


def run(config: str = "mid", formats: Sequence[Optional[str]] = (None, "int8", "int4"), batches=(1,),
        steps: int = 32, repeats: int = 3, prompt_length: int = 150, out=None,
        probe_gb_s: Optional[float] = None, quant_kernel: bool = True) -> list[dict]:
    """One record per (format, batch). ``probe_gb_s`` (the bandwidth probe, ``benchmarks.run``): the records'
    ``fraction_of_limit`` is the decode weights' read rate against it. ``quant_kernel``: quantized decode
    products in the CPU kernel of ``models/int8_cpu.py`` (False: XLA's)."""
    from benchmarks.decode import DecodeBench, DecodeCase

    recs = []
    for q in formats:
        bench = DecodeBench(config, "float32", quantize=q, quant_kernel=quant_kernel)
        held, read = _bytes(bench.params), _bytes(bench.params, _DECODE_LEAF)
        for b in batches:
            m = bench.measure(DecodeCase(config, "float32", b, steps, prompt_length, repeats))
            gb_s = read / m["step_s"] / 1e9
            rec = record("quantized_decode", m["tok_s"], "tok/s", config=config, dtype="float32", batch=b,
                         fraction_of_limit=None if probe_gb_s is None else gb_s / probe_gb_s, quantize=q or "none",
                         kernel=quant_kernel and q is not None, step_ms=m["step_s"] * 1e3, held_bytes=held, decode_weight_bytes=read, weight_gb_s=gb_s)
            recs.append(rec)
            if out is not None:
                out(rec)
        del bench
    return recs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mid")
    p.add_argument("--formats", default="none,int8,int4", help="comma-separated: none, int8, int4")
    p.add_argument("--batches", default="1")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-kernel", action="store_true", help="XLA's quantized products, not the CPU kernel's")
    a = p.parse_args(argv)
    formats = [None if f == "none" else f for f in a.formats.split(",")]
    run(a.config, formats, [int(b) for b in a.batches.split(",")], a.steps, a.repeats, out=emit,
        quant_kernel=not a.no_kernel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
