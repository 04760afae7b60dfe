"""Run the benchmarks: one JSON line per measurement, then a markdown table.

    python -m benchmarks.run                       # everything, full sizes (minutes)
    python -m benchmarks.run --quick               # smaller sizes
    python -m benchmarks.run --only decode --tiny  # the tiny fixture configs only

``matvec`` (one-row matmul variants, float32 and bfloat16 weights) and ``prototypes`` (layout
alternatives, patched in-process) are the experiments behind the layout choices. Every JSON line has ``name, config, dtype, batch, value, unit, fraction_of_limit`` (and ``extra``).
``fraction_of_limit`` compares with a limit measured on the same machine in the same run: the
bandwidth probe for decode, the matmul peak for prefill, a plain file copy (MB/s) and 1 GB (RSS)
for the converter; ``serving`` (aggregate tok/s and TTFT at 1/4/16 streams through the HTTP server)
compares with one stream on a one-slot server (``speedup_vs_one_stream``, the median of alternating
rounds); ``ttft`` (time to the first token of an image prompt, and the prefill's parts: ViT, adapter,
decoder by expert) with the matmul peak of the prefill's dtype; ``prefix_cache`` (a follow-up turn's
time to the first token with the prefix cache and without, against the first turn's) with the float32 peak; ``quantized`` (decode tok/s and held bytes
with the weights in each ``--quantize`` format) compares the decode weights' read rate with the bandwidth
probe; ``int8_cpu`` (decode ms/step with float32, int8 and int4 weights, with and without the CPU kernel
of ``models/int8_cpu.py``) does too. Decode, quantized and int8_cpu need the bandwidth probe, so it is run
(and printed) whenever one of them is.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from benchmarks.common import CONFIG_NAMES, TINY_NAMES, emit, machine
from cogvlm_jax.dtypes import DTYPES

BENCHMARKS = ("bandwidth", "matvec", "prototypes", "decode", "prefill", "converter", "serving", "aot", "soak",
              "quantized", "int8_cpu", "startup", "ttft", "prefix_cache")
# on request: prototypes (minutes), aot (compiles for TPU / GPU targets; needs the [aot] extra; long), soak
# (ten minutes of mixed traffic on the default model's server; one with --quick), quantized (decode with
# float32, int8 and int4 weights, benchmarks/quantized.py), int8_cpu (the CPU int8/int4 kernel against
# XLA's product: one product, then decode of the mid config, benchmarks/int8_cpu.py), startup (cold
# processes of generate and serve, benchmarks/startup.py; --quick: generate only), ttft (time to the first
# token of the 274-token image prompt on a mid CogVLM-1 config, float32 and bfloat16 prefill, and its
# parts; benchmarks/ttft.py), prefix_cache (time to the first token of a follow-up turn about an image with
# the prefix cache and without, on the same config; benchmarks/prefix_cache.py)
DEFAULT = ("bandwidth", "matvec", "decode", "prefill", "converter", "serving")
QUANTIZE = ("none", "int8", "int4")


def _csv(kind, choices=None):
    def parse(text: str):
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(map(str, choices))}, "
                                             f"got {text!r}")
        return items
    return parse


def serving_workloads() -> tuple[str, ...]:
    from benchmarks.serving import WORKLOADS

    return WORKLOADS


def build_parser(prog: str = "benchmarks.run") -> argparse.ArgumentParser:
    """The runner's options; ``prog``: the name its usage and errors give (``cogvlm-jax bench`` runs it too)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--only", type=_csv(str, BENCHMARKS), default=list(DEFAULT),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all but prototypes, aot and soak)")
    p.add_argument("--quick", action="store_true", help="smaller arrays, fewer steps and repeats")
    p.add_argument("--tiny", action="store_true", help="decode/prefill on the tiny fixture configs only")
    p.add_argument("--configs", type=_csv(str, CONFIG_NAMES), help=f"decode configs (default: all of {CONFIG_NAMES})")
    p.add_argument("--dtypes", type=_csv(str, tuple(DTYPES)), default=["float32", "bfloat16"])
    p.add_argument("--batches", type=_csv(int), default=[1, 8], help="decode batch sizes")
    p.add_argument("--steps", type=int, help="decode steps timed per repetition (default: by size)")
    p.add_argument("--streams", type=_csv(int), default=[1, 4, 16],
                   help="serving: concurrent streams (the server gets as many slots as the most)")
    p.add_argument("--workloads", type=_csv(str, serving_workloads()), default=list(serving_workloads()),
                   help="serving: request mixes (image: an image per request; text: text-only, decode-bound)")
    p.add_argument("--rounds", type=int, help="serving: alternating rounds of every run (default 3, 1 with --quick)")
    p.add_argument("--prefill-chunk", type=int, default=0, help="serving: the servers' chunked prefill (0: off)")
    p.add_argument("--quantize", type=_csv(str, QUANTIZE),
                   help=f"quantized: the weight formats measured, comma-separated {','.join(QUANTIZE)} (default all)")
    p.add_argument("--probe-gb", type=float, help="bandwidth probe array size (default 1 GB, 0.25 with --quick)")
    p.add_argument("--no-table", action="store_true", help="JSON lines only")
    return p


def _notes(r: dict) -> str:
    """The few extras worth a glance in the table."""
    e = r.get("extra", {})
    if r["name"].startswith("decode"):
        read = f" read as {e['read_dtype']}" if e.get("read_dtype", r["dtype"]) != r["dtype"] else ""
        return (f"{e['ms_per_step']:.2f} ms/step, {e['bytes_per_step'] / 1e6:.1f} MB/step{read} "
                f"(KV {e['kv_bytes'] / 1e6:.1f} MB: {e['cache_slots_read']:.0f} of T={e['cache_length']} slots), {e['achieved_gb_s']:.2f} GB/s "
                f"= {e['bandwidth_fraction']:.0%} of the probe; {e['bound']} bound"
                + (" (fits in the CPU cache: not a DRAM roofline)" if e.get("cache_resident") else ""))
    if r["name"].startswith("proto_vit"):
        return f"image encoder (ViT + adapter), {e['image_tokens']} image tokens"
    if r["name"].startswith("matvec"):
        return f"{e['ms_per_step']:.2f} ms/step over {e['weight_mb']:.0f} MB of weights"
    if r["name"] == "prefill":
        return (f"{e['prompt_tokens']} tokens ({e['image_tokens']} image), {e['ms']:.0f} ms, "
                f"{e['achieved_gflop_s']:.1f} of {e['limit_gflop_s']:.1f} GFLOP/s useful"
                + (f", XLA counts {e['executed_gflop']:.1f} GFLOP executed vs {e['model_gflop']:.1f} useful"
                   if e.get("executed_gflop") else ""))
    if r["name"] in ("convert_throughput", "export_throughput"):
        return (f"{e['checkpoint_mb']:.0f} MB in {e['shards']} shards, {e['layers']} layers, {e['wall_s']:.1f} s; "
                f"plain copy {e['limit_mb_s']:.0f} MB/s")
    if r["name"] in ("convert_peak_rss", "export_peak_rss"):
        return f"limit {e['limit_mb']:.0f} MB; imports alone {e['import_rss_mb']:.0f} MB"
    if r["name"] == "serving":
        chunked = f", prefill chunk {e['prefill_chunk']}" if e.get("prefill_chunk") else ""
        return (f"{e['workload']}: {e['slots']} slots{chunked}, {e['requests']} requests of <= {e['prompt_tokens']} "
                f"prompt + {e['max_tokens']} new tokens; TTFT p50 {e['ttft_p50_ms']:.0f} ms, p95 "
                f"{e['ttft_p95_ms']:.0f} ms; {e['speedup_vs_one_stream']:.2f}x one stream (median of "
                f"{e['rounds']} rounds: {', '.join(f'{x:.2f}' for x in e['speedup_rounds'])})")
    if r["name"].startswith("bandwidth"):
        return f"{e['array_gb']:.2f} GB array" + (f", best kernel {e['kernel']}" if "kernel" in e else "")
    if r["name"].startswith("aot_"):
        if "error" in e:
            return f"{e['target']}: does not fit (XLA refused it)"
        fit = "" if e["fits"] else " (does not fit)"
        return (f"{e['target']} mesh {'x'.join(map(str, e['mesh']))}: peak {e['peak_gib']:.2f} of {e['hbm_gib']:.0f} "
                f"GiB{fit}, floor {e['floor_ms']:.2f} ms, compile {e['compile_s']:.0f} s, "
                + " ".join(f"{k} {v}" for k, v in e["collectives"].items() if v))
    if r["name"] == "soak_requests":
        return (f"{e['wall_s']:.0f} s, {e['failures']} failures; "
                + ", ".join(f"{k[2:]} {v}" for k, v in e.items() if k.startswith("n_")))
    if r["name"] == "soak_latency_p50":
        return f"answered requests; p99 {e['p99_ms']:.0f} ms"
    if r["name"] == "soak_rss_growth":
        return f"after the warm-up, {e['after_warm_up']:.0f} MiB then; second half {e['growth_second_half']:+.1f} MiB"
    if r["name"] == "soak_fds":
        return f"idle after the traffic against before it ({e['before']}); at most {e['max_after_warm_up']} in flight"
    if r["name"] == "quantized_decode":
        return (f"weights {e['quantize']}: {e['step_ms']:.2f} ms/step, held {e['held_bytes'] / 1e6:.1f} MB, decode reads "
                f"{e['decode_weight_bytes'] / 1e6:.1f} MB of weights at {e['weight_gb_s']:.2f} GB/s")
    if r["name"] == "int8_product":
        return f"{e['path']}: [{e['out_in'][0]}, {e['out_in'][1]}] product; XLA widens the int8 kernel: {e['xla_widens']}"
    if r["name"] == "int8_decode":
        speed = "" if e.get("speedup_vs_float32") is None else f", {e['speedup_vs_float32']:.2f}x float32"
        return (f"weights {e['quantize']}, kernel {'on' if e['kernel'] else 'off'}: {e['tok_s']:.1f} tok/s, reads "
                f"{e['decode_weight_bytes'] / 1e6:.1f} MB of weights at {e['weight_gb_s']:.2f} GB/s{speed}")
    if r["name"].startswith("startup_"):
        return f"{e['cache']}, run {e['run']}"
    if r["name"] == "ttft":
        return (f"{e['prompt_tokens']} tokens ({e['image_tokens']} image), {e['model_gflop']:.1f} GFLOP: floor "
                f"{e['floor_ms']:.0f} ms at {e['limit_gflop_s']:.0f} GFLOP/s, {e['achieved_gflop_s']:.0f} achieved")
    if r["name"].startswith("ttft_part_"):
        return (f"{e['gflop']:.2f} GFLOP at {e['achieved_gflop_s']:.0f} GFLOP/s, {e['share_of_ttft']:.0%} of the "
                "TTFT")
    if r["name"] == "ttft_bf16_gap":
        return (f"largest first-token logit gap to the float32 prefill (logits std {e['logit_std']:.2f}); same "
                f"first token: {e['same_first_token']}")
    if r["name"] == "first_turn_ttft":
        return f"{e['prompt_tokens']} prompt tokens, {e['model_gflop']:.1f} GFLOP"
    if r["name"] == "followup_ttft":
        return (f"cache {e['cache']}: {e['cached_tokens']} of {e['prompt_tokens']} prompt tokens kept, "
                f"{e['new_tokens']} prefilled ({e['model_gflop']:.1f} GFLOP); {e['ratio_to_first_turn']:.2f}x the "
                "first turn")
    if r["name"] == "matmul_peak":
        return f"{e['n']}^3 matmul"
    return ""


def table(recs: Sequence[dict], info: dict) -> str:
    lines = [f"machine: {info}", "",
             "| benchmark | config | dtype | batch | value | unit | fraction of limit | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        frac = "" if r["fraction_of_limit"] is None else f"{r['fraction_of_limit']:.0%}"
        lines.append(f"| {r['name']} | {r['config']} | {r['dtype']} | {'' if r['batch'] is None else r['batch']} | "
                     f"{r['value']:.4g} | {r['unit']} | {frac} | {_notes(r)} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "benchmarks.run") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    only = set(args.only)
    if args.quantize is not None and "quantized" not in only:
        parser.error("--quantize chooses the formats of the quantized benchmark: add quantized to --only")
    configs = args.configs or (list(TINY_NAMES) if args.tiny else list(CONFIG_NAMES))
    info = machine()
    recs: list[dict] = []

    def out(new):
        for r in new:
            emit(r)
        recs.extend(new)

    probe = None
    if only & {"bandwidth", "matvec", "prototypes", "decode", "quantized", "int8_cpu"}:
        from benchmarks import bandwidth

        bw = bandwidth.run(args.quick, size_gb=args.probe_gb)
        out(bw)
        probe = bw[-1]["value"]
        probe_spec = (bw[-1]["extra"]["array_gb"], bw[-1]["extra"]["kernel"])
    if "matvec" in only:
        from benchmarks import matvec

        out(matvec.run(probe, args.quick))
    if "prototypes" in only:
        from benchmarks import prototypes

        out(prototypes.run(probe, args.quick))
    if "decode" in only:
        from benchmarks import decode, prefill

        # The compute side of the decode roofline (matters at batch 8 on a small CPU).
        peaks = {dt: prefill.matmul_peak(dt, n=1024 if args.quick else 2048, repeats=3) for dt in args.dtypes}
        # decode fractions against the probe's best kernel timed between each case's own repetitions
        paired = bandwidth.PairedProbe(*probe_spec)
        out(decode.run(probe, args.quick, configs=configs, dtypes=args.dtypes, batches=args.batches,
                       steps=args.steps, peak_flops=peaks, paired=paired))
        del paired
    if "prefill" in only:
        from benchmarks import prefill

        pre_configs = [c for c in configs if c == "mid"] or configs[:1]
        out(prefill.run(args.quick, configs=pre_configs, dtypes=args.dtypes))
    if "converter" in only:
        from benchmarks import converter

        out(converter.run(args.quick))
    if "serving" in only:
        from benchmarks import serving

        serve_config = "mid" if "mid" in configs else configs[0]
        out(serving.run(args.quick, config_name=serve_config, dtype=args.dtypes[0], streams=args.streams,
                        workloads=args.workloads, rounds=args.rounds, prefill_chunk=args.prefill_chunk))
    if "quantized" in only:  # float32 weights against int8 / int4 ones, on the mid config unless --configs
        from benchmarks import quantized

        formats = [None if f == "none" else f for f in (args.quantize or QUANTIZE)]
        q_config = "mid" if "mid" in configs else configs[0]
        out(quantized.run(q_config, formats, args.batches, args.steps or (8 if args.quick else 32),
                          1 if args.quick else 3, probe_gb_s=probe))
    if "int8_cpu" in only:  # the CPU kernel against XLA's int8 product, on the mid config unless --configs
        from benchmarks import int8_cpu

        k_config = "mid" if "mid" in configs else configs[0]
        out(int8_cpu.run(k_config, args.batches, args.steps or (8 if args.quick else 32), 1 if args.quick else 3,
                         probe_gb_s=probe, quick=args.quick))
    if "startup" in only:  # cold processes; also python -m benchmarks.startup
        from benchmarks import startup

        out(startup.run(1, "generate", cache_off=False) if args.quick else startup.run())
    if "ttft" in only:  # the mid CogVLM-1 config of benchmarks/ttft.py, float32 and bfloat16 prefills
        from benchmarks import ttft

        out(ttft.run(args.quick))
    if "prefix_cache" in only:  # a follow-up turn's TTFT, cache on and off (benchmarks/prefix_cache.py)
        from benchmarks import prefix_cache

        out(prefix_cache.run(args.quick))
    if "aot" in only:  # the published configs (--tiny / --quick: the tiny fixtures) on every target
        from benchmarks import aot

        out(aot.run(configs=list(TINY_NAMES) if args.tiny or args.quick else list(aot.CONFIGS)))
    if "soak" in only:  # the default model's server in its own process; also python -m benchmarks.soak
        from benchmarks import soak

        out(soak.records(soak.run(60.0, 100) if args.quick else soak.run()))
    if not args.no_table:
        info["loadavg_1m_end"] = machine().get("loadavg_1m")
        print()
        print(table(recs, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
