"""Ahead-of-time compilation (``cogvlm_jax.aot``) for TPU and GPU targets on a machine with neither: the
programs compile for the target's devices with the target's choices (bfloat16 products, no XLA:CPU option),
their collectives are counted, and a program too big for the chips is refused by name.

The model is the published CogVLM2-19B's layer structure at small widths (compiles take seconds)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the TPU targets need libtpu: pip install 'cogvlm-jax[aot]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cogvlm_jax import aot  # noqa: E402
from cogvlm_jax.config import preset  # noqa: E402


def tiny(layers: int = 2):
    """CogVLM2-19B's structure, small: 16 query heads on 8 kv heads (tensor=8 splits the kv heads as it
    does the published 32 on 8), head dim 8, a one-block ViT on 56 px images (4 image tokens)."""
    base = preset("cogvlm2-llama3-chat-19B")
    return base.replace(
        name="tiny-cogvlm2", bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, image_token_id=0,
        text=dataclasses.replace(base.text, hidden_size=128, intermediate_size=256, num_heads=16, num_kv_heads=8,
                                 num_layers=layers, vocab_size=1024, max_position_embeddings=512),
        vision=dataclasses.replace(base.vision, hidden_size=64, intermediate_size=128, num_heads=4, num_layers=1,
                                   image_size=56, num_positions=17))


# batch 4: a row count XLA:CPU would compile the few-row way (rows.py), which a TPU program must not
DECODE = dict(target="v5e-8", mesh=(1, 1, 8), program="decode_step", batch=4, cache_length=512, dtype="bfloat16")


@pytest.fixture(scope="module")
def decode_v5e():
    return aot.compile_for(tiny(), **DECODE)


def test_the_decode_step_compiles_for_the_tpu_devices(decode_v5e):
    devices = {d for s in jax.tree.leaves(decode_v5e.input_shardings) for d in s.device_set}
    assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}, devices
    assert {d.device_kind for d in devices} == {"TPU v5 lite"}
    r = aot.report(decode_v5e)
    assert (r.platform, r.devices, r.target) == ("tpu", 8, "v5e-8")
    assert r.fits and 0 < r.peak_bytes < r.hbm_bytes == 16 * 2 ** 30
    assert r.flops > 0 and r.bytes_accessed > 0 and r.hbm_ms > 0 and r.compile_seconds > 0
    assert "collectives" in r.format() and "v5e-8" in r.format()


def test_the_tpu_program_makes_the_tpu_choices(decode_v5e):
    """No XLA:CPU compiler option, bfloat16 KV cache and products (no float32 widening), no few-row barrier."""
    r = aot.report(decode_v5e)
    assert not any(k.startswith("xla_cpu") for k in r.compiler_options), r.compiler_options
    assert r.compiler_options == {}
    cache = decode_v5e.out_info.cache
    assert {cache.k.dtype, cache.v.dtype} == {jnp.dtype(jnp.bfloat16)}
    assert "opt-barrier" not in decode_v5e.as_text()


def test_collectives_per_decoder_layer(record_property):
    """The TPU default, Megatron: one all-reduce per attention and per MLP, nothing else per layer (the fused
    QKV is head-grouped, so no activation moves between devices)."""
    per = aot.layer_collectives(tiny(), **DECODE)
    record_property("collectives_per_layer", json.dumps(per))
    print("decode step, v5e-8 mesh (1, 1, 8), megatron, collectives per decoder layer:", per)
    assert set(per) == set(aot.COLLECTIVES)
    assert per == {**dict.fromkeys(aot.COLLECTIVES, 0), "all-reduce": 2}, per


@pytest.mark.parametrize("program,extra,per_layer", [
    ("decode", {}, 2),  # generate's decode loop
    ("decode_chunk", {}, 2),  # the serving engine's decode
    ("insert", dict(prompt_length=64), 2),  # the engine's prefill of a text prompt into a slot
    # image prompts: each expert on its own tokens (every row holds an image), their partial sums added at once
    ("insert", dict(prompt_length=64, image=True), 2),
    ("prefill", dict(prompt_length=64, image=True), 2),
], ids=["decode", "decode_chunk", "insert_text", "insert_image", "prefill_image"])
def test_generate_and_serving_programs_keep_the_layout_bounds(program, extra, per_layer):
    per = aot.layer_collectives(tiny(), **{**DECODE, "program": program, **extra})
    print(f"{program} {extra}, v5e-8 mesh (1, 1, 8), megatron, collectives per decoder layer:", per)
    assert per == {**dict.fromkeys(aot.COLLECTIVES, 0), "all-reduce": per_layer}, per


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 4, 1)])
def test_fsdp_gathers_weights_and_never_adds_partial_sums(mesh):
    """fsdp shards every weight; a product gathers it whole first, in both layouts: no all-reduce per layer."""
    for layout in ("megatron", "exact"):
        per = aot.layer_collectives(tiny(), **{**DECODE, "mesh": mesh, "layout": layout})
        print(f"decode step, v5e-8 mesh {mesh}, {layout}, collectives per decoder layer:", per)
        assert per["all-reduce"] == 0 and per["all-gather"] > 0, (layout, per)


def test_the_decode_loop_reads_only_the_weights_a_text_step_uses():
    """The decode loop's arguments are the language weights and the cache: the decoder's stacked layers
    under ``nn.scan`` (Megatron) keep no vision-expert leaf as an argument, as the unrolled layers do not."""
    args = {layout: aot.report(aot.compile_for(tiny(), **{**DECODE, "program": "decode", "layout": layout}))
            for layout in ("megatron", "exact")}
    assert args["megatron"].argument_bytes <= args["exact"].argument_bytes, {
        k: (r.argument_bytes, r.input_bytes) for k, r in args.items()}


def test_the_exact_layout_stays_selectable():
    """The exact layout splits no contraction (no all-reduce of partial sums), on the TPU target too."""
    per = aot.layer_collectives(tiny(), **{**DECODE, "layout": "exact"})
    print("decode step, v5e-8 mesh (1, 1, 8), exact, collectives per decoder layer:", per)
    assert per["all-reduce"] == 0 and per["all-gather"] > 0, per


def test_a_program_too_big_for_the_chips_is_refused_by_name():
    # 32 GiB of KV cache per device against v5e's 16 GiB (XLA refuses it)
    with pytest.raises(aot.DoesNotFitError, match="does not fit v5e-8"):
        aot.compile_for(tiny(), **{**DECODE, "batch": 4096, "cache_length": 131072})


def test_a_mesh_that_does_not_cover_the_target_is_refused():
    with pytest.raises(aot.AotError, match="4 devices"):
        aot.compile_for(tiny(), target="v4-8", mesh=(1, 1, 8), program="decode_step")


def test_the_compile_verb_prints_the_report(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny().to_hf_dict()))
    r = subprocess.run([sys.executable, "-m", "cogvlm_jax.cli", "compile", "--config", str(config), "--target",
                        "v5e-8", "--mesh", "1,1,8", "--program", "decode_step", "--batch", "1", "--cache-length",
                        "512"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "v5e-8: 8 x TPU v5 lite" in r.stdout and "peak" in r.stdout and "collectives" in r.stdout, r.stdout


def test_h100_compiles_without_a_gpu():
    pytest.importorskip("jax_plugins.xla_cuda12", reason="h100-8 needs the CUDA plugin: pip install 'cogvlm-jax[aot]'")
    compiled = aot.compile_for(tiny(), **{**DECODE, "target": "h100-8"})
    devices = {d for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set}
    assert len(devices) == 8 and {d.platform for d in devices} == {"gpu"}
    r = aot.report(compiled)
    assert r.fits and r.flops is None and r.floor_ms > 0  # XLA:GPU gives no cost analysis
    assert sum(r.collectives.values()) > 0 and r.compiler_options == {}
    with pytest.raises(aot.DoesNotFitError, match="does not fit h100-8"):  # 128 GiB of KV cache per device
        aot.compile_for(tiny(), **{**DECODE, "target": "h100-8", "batch": 16384, "cache_length": 131072})


def test_a_missing_backend_names_the_extra(monkeypatch):
    monkeypatch.setattr(aot, "_installed", lambda platform: False)
    missing = dataclasses.replace(aot.TARGETS["v6e-8"], name="v6e-8-without-libtpu")
    with pytest.raises(aot.TargetUnavailableError, match=r"libtpu .*pip install 'cogvlm-jax\[aot\]'"):
        aot.devices(missing)
    assert not aot.available(missing)


def test_the_benchmark_row(capsys):
    from benchmarks import aot as bench

    recs = bench.run(configs=["tiny-cogvlm2"], targets=["v5e-8"], programs=["decode"], batches=[1])
    (rec,) = recs
    e = rec["extra"]
    assert (rec["name"], rec["unit"], e["target"], e["mesh"]) == ("aot_decode", "ms", "v5e-8", [1, 1, 8])
    assert rec["value"] == e["floor_ms"] > 0 and e["fits"] and 0 < rec["fraction_of_limit"] < 1
    assert e["gb_accessed"] > 0 and e["compile_s"] > 0 and sum(e["collectives"].values()) > 0
    assert "| tiny-cogvlm2 | v5e-8 | 1x1x8 megatron | decode | 1 |" in bench.table(recs)


def test_the_image_prefill_attends_without_the_vit_scores():
    """On TPU the ViT attention is the Pallas flash kernel inside shard_map (heads over ``tensor``): no
    ``[.., N, N]`` score array of the ViT's N tokens appears in the program."""
    cfg = tiny()
    n = cfg.vision.grid ** 2 + 1
    compiled = aot.compile_for(cfg, target="v5e-8", mesh=(1, 1, 8), program="prefill", batch=1,
                               prompt_length=cfg.num_image_tokens + 8, image=True, dtype="bfloat16")
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    assert f",{n},{n}]" not in text and f"[{n},{n}]" not in text, "a ViT score array is materialised"


def test_a_quantized_decode_step_reads_the_quantized_weights():
    """``compile_for(..., quantize=)``: the decode step's arguments are the integer kernels (int8, and int4
    as ``s4``, which the TPU holds two per byte) and their scales: int8 reads at most 0.55x the bfloat16
    bytes, int4 less again, and no temporary holds a dequantized copy of the weights."""
    kw = dict(DECODE, batch=1, cache_length=16)
    t = tiny().text  # wide enough that the weights, not the embedding table and cache, are most of the bytes
    cfg = tiny().replace(text=dataclasses.replace(t, hidden_size=512, intermediate_size=1024, vocab_size=512))
    reports, texts = {}, {}
    for q in (None, "int8", "int4"):
        c = aot.compile_for(cfg, quantize=q, **kw)
        reports[q], texts[q] = aot.report(c), c.as_text()
    bf16, int8, int4 = (reports[q].argument_bytes for q in (None, "int8", "int4"))
    print(f"\ntiny 19B-structure decode step argument bytes: bf16 {bf16}, int8 {int8} ({int8 / bf16:.3f}x), "
          f"int4 {int4} ({int4 / bf16:.3f}x)")
    assert int8 <= 0.55 * bf16 and int4 < 0.75 * int8
    assert "s8[" in texts["int8"] and "s4[" in texts["int4"] and "s8[" not in texts[None]
    for q in ("int8", "int4"):  # the CPU kernel of models/int8_cpu.py is never part of a TPU program
        assert "cogvlm_int" not in texts[q] and "custom_call_target=\"cogvlm" not in texts[q]
    for q in ("int8", "int4"):  # a dequantized copy of every weight would add about the bfloat16 arguments
        extra = reports[q].temp_bytes - reports[None].temp_bytes
        print(f"{q}: temporaries {reports[q].temp_bytes} bytes, bfloat16 {reports[None].temp_bytes}")
        assert extra < 0.5 * bf16
    assert "int8" in reports["int8"].format()
    with pytest.raises(aot.AotError, match="quantize must be one of"):
        aot.compile_for(cfg, quantize="int2", **kw)
    with pytest.raises(aot.AotError, match="trains only LoRA factors beside a quantized base"):
        aot.compile_for(cfg, target="v5e-8", mesh=(1, 1, 8), program="train", batch=8, prompt_length=16,
                        quantize="int8")


def test_a_qlora_train_step_holds_the_base_quantized_on_the_target():
    """``compile_for(program="train", quantize=, train_config=LoRA)``: the QLoRA step's arguments hold the base
    as int4 (``s4``, two per byte on TPU) and cost less than half the float LoRA step's bfloat16 base."""
    from cogvlm_jax.training.trainer import TrainConfig

    t = tiny().text
    cfg = tiny().replace(text=dataclasses.replace(t, hidden_size=512, intermediate_size=1024, vocab_size=512))
    kw = dict(target="v5e-8", mesh=(1, 1, 8), program="train", batch=8, prompt_length=16,
              train_config=TrainConfig(trainable="lora"))
    plain, quantized = (aot.compile_for(cfg, quantize=q, **kw) for q in (None, "int4"))
    a, b = aot.report(plain).argument_bytes, aot.report(quantized).argument_bytes
    print(f"\ntiny LoRA train step arguments: bfloat16 base {a} bytes, int4 base {b} ({b / a:.3f}x)")
    assert re.search(r"\bs4\[", quantized.as_text()) and not re.search(r"\bs4\[", plain.as_text())
    assert b < 0.55 * a  # measured 0.503: the embedding, norms, ViT, factors and optimizer state stay float


def test_plan_with_a_target_reports_the_compiled_temporaries(tmp_path):
    """``plan --target`` adds what the shapes leave out: the compiled decode loop's temporaries and peak."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny().to_hf_dict()))
    r = subprocess.run([sys.executable, "-m", "cogvlm_jax.cli", "plan", "--config", str(config), "--mesh", "1,1,8",
                        "--batch", "2", "--context", "256", "--target", "v5e-8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = aot.report(aot.compile_for(tiny(), target="v5e-8", mesh=(1, 1, 8), program="decode", batch=2,
                                      cache_length=256, dtype="bfloat16"))
    assert "parameters:" in r.stdout and "compiled decode for v5e-8 (megatron layout)" in r.stdout, r.stdout
    assert f"temporaries {want.temp_bytes / 2 ** 30:.2f} GiB" in r.stdout, r.stdout
    assert f"peak {want.peak_bytes / 2 ** 30:.2f} GiB of 16.00 GiB" in r.stdout, r.stdout


def test_a_target_compiles_again_without_the_compile_cache(tmp_path):
    """The persistent compilation cache is on here (conftest): a target's program is never written to it, as
    JAX could not load it back on a compile-only backend (a warning, every time), and every compile reports
    XLA's own seconds. The cache stays on for the local programs."""
    import warnings

    assert jax.config.jax_compilation_cache_dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seconds = [aot.report(aot.compile_for(tiny(1), **{**DECODE, "batch": 3})).compile_seconds for _ in range(2)]
    assert not [str(w.message) for w in caught if "compilation cache" in str(w.message)]
    assert all(s > 0 for s in seconds), seconds
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def test_a_video_prefill_compiles_with_its_frames():
    """``compile_for(frames=)``: a CogVLM2-Video prefill takes [B, T, 3, 224, 224] pixels (the ViT over the
    frames as one batch), its decoder holds no vision expert, and the report says the frames."""
    base = preset("cogvlm2-video-llama3-chat")
    cfg = base.replace(
        name="tiny-video", text=dataclasses.replace(base.text, hidden_size=128, intermediate_size=256, num_heads=16,
                                                    num_kv_heads=8, num_layers=1, vocab_size=1024,
                                                    max_position_embeddings=512),
        vision=dataclasses.replace(base.vision, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=1),
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, image_token_id=0)
    compiled = aot.compile_for(cfg, target="v5e-8", mesh=(1, 1, 8), program="prefill", batch=1, frames=2,
                               prompt_length=2 * 66 + 8, dtype="bfloat16")
    shapes = [a.shape for a in jax.tree_util.tree_leaves(compiled.args_info)]
    assert (1, 2, 3, 224, 224) in shapes
    names = jax.tree_util.keystr(compiled.args_info)
    assert "language_expert_query_key_value" in names and "vision_expert" not in names and "vision_mlp" not in names
    assert "with 2 video frames" in aot.report(compiled).format()
    with pytest.raises(aot.AotError, match="cannot hold 2 video frames"):
        aot.compile_for(cfg, target="v5e-8", mesh=(1, 1, 8), program="prefill", batch=1, frames=2, prompt_length=100)
    with pytest.raises(aot.AotError, match="frames is for a video model"):
        aot.compile_for(tiny(), target="v5e-8", mesh=(1, 1, 8), program="prefill", batch=1, frames=2,
                        prompt_length=100)
