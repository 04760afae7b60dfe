"""The benchmark runner works end to end (a smoke test: no timing thresholds, just sane records)."""

from __future__ import annotations

import json
import math
import os

REQUIRED = ("name", "config", "dtype", "batch", "value", "unit", "fraction_of_limit")


def test_quick_decode_on_a_tiny_config(capsys):
    from benchmarks.run import main

    assert main(["--quick", "--only", "decode", "--configs", "tiny-cogvlm1", "--dtypes", "float32",
                 "--batches", "1,2", "--steps", "4", "--probe-gb", "0.125"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    recs = [json.loads(ln) for ln in lines]
    for r in recs:
        assert all(k in r for k in REQUIRED), r
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    assert [r["name"] for r in recs if r["name"] == "bandwidth"] == ["bandwidth"]
    decode = [r for r in recs if r["name"] == "decode"]
    assert [(r["config"], r["dtype"], r["batch"]) for r in decode] == [
        ("tiny-cogvlm1", "float32", 1), ("tiny-cogvlm1", "float32", 2)]
    for r in decode:
        assert r["unit"] == "tok/s" and 0 < r["fraction_of_limit"] < 100, r
        e = r["extra"]
        assert e["ms_per_step"] > 0 and e["cache_length"] >= e["steps"] == 4
        assert e["bytes_per_step"] == e["weight_bytes"] + e["kv_bytes"] + e["embed_bytes"]
        assert abs(r["value"] - r["batch"] * 1e3 / e["ms_per_step"]) < 1e-3 * r["value"] + 1e-3
        # the fraction is taken against the probe passes run between this case's own repetitions
        assert e["probe"] == "paired" and e["limit_gb_s"] > 0
        assert e["start_probe_gb_s"] == next(b["value"] for b in recs if b["name"] == "bandwidth")
        assert abs(e["bandwidth_fraction"] - e["achieved_gb_s"] / e["limit_gb_s"]) < 1e-3
    # A bigger batch reads a bigger KV cache but the same weights.
    assert decode[1]["extra"]["kv_bytes"] == 2 * decode[0]["extra"]["kv_bytes"]
    assert decode[1]["extra"]["weight_bytes"] == decode[0]["extra"]["weight_bytes"]


def test_quick_serving_on_a_tiny_config():
    """The serving benchmark through a real HTTP server, both workloads: the 1-slot one-stream baseline, then 2
    streams on 2 slots.

    Run in its own process, as users run it: the server's threads and logging then cannot outlive
    pytest's output capture (in-process, a later test crashed writing to a closed stderr)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", "serving", "--configs",
                           "tiny-cogvlm1", "--dtypes", "float32", "--streams", "2", "--no-table"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [(r["name"], r["extra"]["workload"], r["batch"], r["extra"]["slots"]) for r in recs] == [
        ("serving", w, c, s) for w in ("image", "text") for c, s in ((1, 1), (2, 2))]
    image, text = recs[:2], recs[2:]
    # the text-only prompts have different lengths (the image ones, one image and one question each, do not)
    assert text[1]["extra"]["mean_prompt_tokens"] < text[1]["extra"]["prompt_tokens"]
    for r in recs:
        base = (image if r in image else text)[0]["value"]
        assert all(k in r for k in REQUIRED) and r["unit"] == "tok/s" and r["value"] > 0, r
        e = r["extra"]
        assert e["requests"] == r["batch"] and e["max_tokens"] == 16  # quick: one request of 16 tokens per stream
        assert 0 < e["ttft_p50_ms"] <= e["ttft_p95_ms"] < 1e3 * e["wall_s"]
        assert e["rounds"] == 1 and e["speedup_rounds"] == [round(e["speedup_vs_one_stream"], 2)]  # quick: one round
        assert abs(e["speedup_vs_one_stream"] - r["value"] / base) < 1e-3 * e["speedup_vs_one_stream"] + 1e-3
