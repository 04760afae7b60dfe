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


def test_quick_quantized_on_a_tiny_config(capsys):
    """``--only quantized``: one decode record per weight format, the held and read bytes smaller for int8 and
    smaller again for int4, the fraction taken against the bandwidth probe of the same run."""
    from benchmarks.run import main

    assert main(["--quick", "--only", "quantized", "--configs", "tiny-cogvlm1", "--quantize", "none,int8,int4",
                 "--batches", "1", "--steps", "4", "--probe-gb", "0.125"]) == 0
    out = capsys.readouterr().out
    recs = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    probe = [r for r in recs if r["name"] == "bandwidth"]
    q = [r for r in recs if r["name"] == "quantized_decode"]
    assert len(probe) == 1 and [(r["config"], r["batch"], r["extra"]["quantize"]) for r in q] == [
        ("tiny-cogvlm1", 1, f) for f in ("none", "int8", "int4")]
    for r in q:
        e = r["extra"]
        assert all(k in r for k in REQUIRED) and r["unit"] == "tok/s" and r["value"] > 0, r
        assert abs(r["value"] - 1e3 / e["step_ms"]) < 1e-3 * r["value"] + 1e-3
        assert abs(r["fraction_of_limit"] - e["weight_gb_s"] / probe[0]["value"]) < 1e-3 * r["fraction_of_limit"] + 1e-4
        assert 0 < e["decode_weight_bytes"] < e["held_bytes"]
    held = [r["extra"]["held_bytes"] for r in q]
    read = [r["extra"]["decode_weight_bytes"] for r in q]
    assert held[0] > held[1] > held[2] and read[0] > read[1] > read[2]
    assert "| quantized_decode | tiny-cogvlm1 | float32 | 1 |" in out and "weights int4:" in out  # the table


def test_quantize_outside_the_quantized_benchmark_is_refused(capsys):
    import pytest

    from benchmarks.run import main

    with pytest.raises(SystemExit) as e:
        main(["--only", "decode", "--quantize", "int8"])
    assert e.value.code == 2 and "add quantized to --only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--only", "quantized", "--quantize", "int3"])


def test_quick_startup(capsys):
    """``--only startup --quick``: ``cogvlm-jax generate`` in a cold process into an empty compilation cache,
    then once more reading it (each run checks the answer, ``red``)."""
    from benchmarks.run import main

    assert main(["--quick", "--only", "startup", "--no-table"]) == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert [(r["name"], r["extra"]["run"], r["extra"]["cache"]) for r in recs] == [
        ("startup_generate", 0, "first, empty cache"), ("startup_generate", 1, "cache filled")]
    assert all(all(k in r for k in REQUIRED) and r["unit"] == "s" and r["value"] > 0 for r in recs), recs


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


# ------------------------------------------------------------------------------------- cogvlm-jax bench
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, cwd, path=None):
    """``cogvlm-jax ARGS`` in a child process (``path``: where cogvlm_jax is imported from, first)."""
    import subprocess
    import sys

    code = "import sys; from cogvlm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    if path is not None:
        code = f"import sys; sys.path.insert(0, {path!r}); " + code
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bench_help_lists_the_runner_options_and_documented_options_run(tmp_path):
    """``cogvlm-jax bench --help`` is the runner's help; every option of every bench or runner command in
    README.md and docs/ parses; one cheap run of options goes through from another directory."""
    import re
    import shlex

    from benchmarks.run import build_parser

    r = _cli(["bench", "--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: cogvlm-jax bench"), r.stderr[-2000:]
    options = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert len(options) > 10 and all(o in r.stdout for o in options), r.stdout
    docs = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", f) for f in os.listdir(
        os.path.join(ROOT, "docs"))]
    commands = []
    for path in docs:
        text = open(path, encoding="utf-8").read()
        commands += re.findall(r"(?:cogvlm-jax bench|python -m benchmarks\.run)((?: --?[\w-]+(?: [\w.,-]+)?)*)", text)
    assert any("--only" in c for c in commands) and any("--configs" in c for c in commands), commands
    for c in commands:
        if "--help" in c:
            continue
        build_parser().parse_args(shlex.split(c))  # exits (a failed test) on an unknown option or a bad value
    r = _cli(["bench", "--quick", "--only", "bandwidth", "--probe-gb", "0.01", "--no-table"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["name"] for x in r.stdout.splitlines() if x.startswith("{")][-1] == "bandwidth"


def test_bench_from_an_installed_copy_says_in_one_line_it_needs_a_checkout(tmp_path):
    """The package as ``pip install .`` lays it out (no benchmarks/ or tests/ beside it), run outside a
    checkout: one line on stderr, exit status 2, no traceback, for a run and for --help alike."""
    import shutil

    site = tmp_path / "site-packages"
    shutil.copytree(os.path.join(ROOT, "cogvlm_jax"), site / "cogvlm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    for args in (["bench", "--tiny"], ["bench", "--help"]):
        r = _cli(args, work, str(site))
        lines = [x for x in r.stderr.splitlines() if x.startswith("cogvlm-jax")]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert "need a source checkout" in lines[0] and r.stdout == ""


def test_ttft_parts_count_the_prefills_flops():
    """benchmarks/prefill.py: the parts of the issue's prompt on its CogVLM-1 config (258 image tokens, 16
    text) count its 76.5 GFLOP, the vision expert's the most, with nothing compiled."""
    from benchmarks.prefill import prefill_flops, prefill_parts
    from benchmarks.ttft import PROMPT_TOKENS, ttft_config

    config = ttft_config()
    assert config.family == "cogvlm1" and config.num_image_tokens == 258 and PROMPT_TOKENS == 274
    parts = prefill_parts(config, PROMPT_TOKENS)
    assert set(parts) == {"vit", "adapter", "vision_expert", "language_expert", "attention", "lm_head"}
    assert 76e9 < prefill_flops(config, PROMPT_TOKENS) < 77e9 and prefill_flops(config, PROMPT_TOKENS, 2) == \
        2 * prefill_flops(config, PROMPT_TOKENS)
    assert parts["vision_expert"] > 10 * parts["language_expert"]


def test_the_follow_up_benchmark_counts_only_the_new_tokens_flops():
    """benchmarks/prefix_cache.py: the limit of a follow-up prefilled after a kept prefix counts the new
    tokens' products and their attention over the whole context, far less than the whole prompt's."""
    from benchmarks.prefill import prefill_flops
    from benchmarks.prefix_cache import extension_flops
    from benchmarks.ttft import ttft_config

    config = ttft_config()
    t = config.text
    one = extension_flops(config, 1, 300)
    # one token: the decode step's products plus its attention over 300 slots and the lm_head
    d = t.hidden_size
    assert one == t.num_layers * (2 * (d * t.qkv_size + d * d + 3 * d * t.intermediate_size) + 4 * 300 * d) + \
        2 * d * t.vocab_size
    assert extension_flops(config, 77, 358) < 0.25 * prefill_flops(config, 358)
    assert extension_flops(config, 80, 358) > extension_flops(config, 77, 358)
