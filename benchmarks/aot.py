"""The published models compiled ahead of time for TPU slices and GPU hosts (``cogvlm_jax.aot``), here,
without any of them: per device memory, flops, bytes, collectives, compile seconds, and the decode time
the HBM bandwidth allows. Each row is one XLA compile for the target (about a minute for a 19B decode on
2 cores; the image prefill, with its 63-block ViT, longer).

    python -m benchmarks.aot                                     # every row (long)
    python -m benchmarks.aot --configs cogvlm2-llama3-chat-19B --targets v5e-8 --programs decode --batches 1
    python -m benchmarks.aot --quick                             # the tiny fixture configs (seconds a row)
    python -m benchmarks.run --only aot                          # the same, through the benchmark runner

Needs the compile-only backends: ``pip install 'cogvlm-jax[aot]'``. Every row compiles on a mesh of all the
target's devices on ``tensor`` (``--mesh`` to change it). A program that does not fit is still reported
(its peak against the HBM), unless XLA refuses to compile it. The ms per token are bandwidth bounds, not
timings: the floor (the program's arguments, weights and KV cache, read once at the HBM bandwidth) and
XLA's bytes accessed at that bandwidth (TPU only; see ``aot.Report`` for what those bytes count).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from benchmarks.common import TINY_NAMES, emit, load_bench_config, record

CONFIGS = ("cogvlm-chat-hf", "cogvlm2-llama3-chat-19B")
TARGETS = ("v5e-8", "v6e-8", "v4-8", "v5p-8", "h100-8")
PROGRAMS = ("decode", "prefill")  # decode: the decode loop at each batch; prefill: one image prompt
CACHE = 8192  # decode KV slots per row (at most the model's context)
PROMPT = 4096  # image prefill tokens per row (at most the context less 256 new tokens)


def _config(name: str):
    from cogvlm_jax.config import preset

    return load_bench_config(name) if name in TINY_NAMES else preset(name)


def cases(configs: Sequence[str], programs: Sequence[str], batches: Sequence[int]) -> list[tuple[str, dict]]:
    """(config name, compile_for keywords) per row, targets aside."""
    out = []
    for name in configs:
        ctx = _config(name).context_length
        for program in programs:
            if program == "decode":
                out += [(name, dict(program="decode", batch=b, cache_length=min(CACHE, ctx))) for b in batches]
            else:
                out.append((name, dict(program="prefill", batch=1, prompt_length=min(PROMPT, ctx - 256), image=True)))
    return out


def run(configs: Sequence[str] = CONFIGS, targets: Sequence[str] = TARGETS, programs: Sequence[str] = PROGRAMS,
        batches: Sequence[int] = (1, 16), mesh: Optional[tuple] = None, dtype: str = "bfloat16",
        out=None, layout: Optional[str] = None) -> list[dict]:
    """One record per (config, program, batch, target): ``value`` the floor in ms per token (decode) or
    prompt (prefill), the program's arguments read once at the HBM bandwidth (``aot.Report.floor_ms``);
    ``fraction_of_limit`` the per-device peak over the HBM; ``extra`` the rest of the report."""
    from cogvlm_jax import aot

    aot.compile_only_process()
    recs = []
    for target in targets:
        if not aot.available(target):
            print(f"benchmarks.aot: {target} skipped: its compile-only backend is missing ({aot.INSTALL})",
                  file=sys.stderr)
            continue
        for name, kw in cases(configs, programs, batches):
            base = dict(config=name, dtype=dtype, batch=kw["batch"], target=target, program=kw["program"])
            try:
                compiled = aot.compile_for(_config(name), target=target, mesh=mesh, dtype=dtype, check_fit=False,
                                           layout=layout, **kw)
            except aot.DoesNotFitError as e:  # XLA refused it at compile time
                rec = record(f"aot_{kw['program']}", 0.0, "ms", **base, fits=False, error=str(e))
            else:
                r = aot.report(compiled)
                rec = record(f"aot_{kw['program']}", r.floor_ms, "ms",
                             fraction_of_limit=r.peak_bytes / r.hbm_bytes, **base, mesh=list(r.mesh),
                             fits=r.fits, peak_gib=r.peak_bytes / 2**30, hbm_gib=r.hbm_bytes / 2**30,
                             argument_gib=r.argument_bytes / 2**30, temp_gib=r.temp_bytes / 2**30,
                             gflop=None if r.flops is None else r.flops / 1e9,
                             gb_accessed=None if r.bytes_accessed is None else r.bytes_accessed / 1e9,
                             hbm_ms=r.hbm_ms, floor_ms=r.floor_ms, xla_ms=r.xla_ms, collectives=r.collectives,
                             layout=r.layout,
                             compile_s=r.compile_seconds, lower_s=r.lower_seconds,
                             cache_length=kw.get("cache_length"), prompt_length=kw.get("prompt_length"))
            emit(rec, out)
            recs.append(rec)
    return recs


def _collectives(c: dict) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "collective-permute": "CP",
             "all-to-all": "A2A"}
    return " ".join(f"{short[k]} {v}" for k, v in c.items() if v) or "none"


def table(recs: Sequence[dict]) -> str:
    lines = ["| config | target | mesh, layout | program | batch | peak GiB / HBM | GFLOP | GB accessed | "
             "collectives | compile s | floor ms | XLA bytes ms | XLA ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in recs:
        e = r["extra"]
        what = e["program"] + (" (image)" if e["program"] == "prefill" else "")
        if "error" in e:
            lines.append(f"| {r['config']} | {e['target']} | | {what} | {r['batch']} | does not fit (XLA) |"
                         + " |" * 7)
            continue
        peak = f"{e['peak_gib']:.2f} / {e['hbm_gib']:.0f}" + ("" if e["fits"] else " NO FIT")
        where = f"{'x'.join(map(str, e['mesh']))} {e.get('layout', '')}"
        lines.append(f"| {r['config']} | {e['target']} | {where} | {what} | {r['batch']} | "
                     f"{peak} | {f(e['gflop'], 1)} | {f(e['gb_accessed'], 2)} | {_collectives(e['collectives'])} | "
                     f"{f(e['compile_s'], 1)} | {f(e['floor_ms'], 2)} | {f(e['hbm_ms'], 2)} | {f(e['xla_ms'], 2)} |")
    return "\n".join(lines)


def _csv(kind):
    return lambda text: [kind(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.aot", description=__doc__.split("\n")[0])
    p.add_argument("--configs", type=_csv(str), help=f"default {','.join(CONFIGS)} (--quick: the tiny fixtures)")
    p.add_argument("--targets", type=_csv(str), default=list(TARGETS))
    p.add_argument("--programs", type=_csv(str), default=list(PROGRAMS), help="decode and/or prefill")
    p.add_argument("--batches", type=_csv(int), default=[1, 16], help="decode batch sizes")
    p.add_argument("--mesh", type=_csv(int), help="DATA,FSDP,TENSOR (default: every device on tensor)")
    p.add_argument("--dtype", default="bfloat16")
    from cogvlm_jax.models.execution import LAYOUTS

    p.add_argument("--layout", choices=LAYOUTS, help="default: the target's (megatron)")
    p.add_argument("--quick", action="store_true", help="the tiny fixture configs")
    p.add_argument("--no-table", action="store_true")
    args = p.parse_args(argv)
    configs = args.configs or (list(TINY_NAMES) if args.quick else list(CONFIGS))
    recs = run(configs, args.targets, args.programs, args.batches, tuple(args.mesh) if args.mesh else None,
               args.dtype, layout=args.layout)
    if not args.no_table:
        print()
        print(table(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
