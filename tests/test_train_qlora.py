"""LoRA on a quantized base (QLoRA) on the tiny CogVLM1 fixture: the base held as int8 / int4 while it
trains, the loss going down, the factors' gradients those of the dequantized base, an exact resume
through ``cogvlm-jax train --quantize``, and the float export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import LINEAR_TRAIN, fixture_dir, host_flat, train_batches
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.models import quantize as quant_lib
from cogvlm_jax.models.cogvlm import abstract_params
from cogvlm_jax.parallel.quantized import held_bytes, quantized_paths
from cogvlm_jax.training import lora
from cogvlm_jax.training import trainer as train

FORMATS = ("int8", "int4")
# AdamW with eps=1 at a constant rate 1 (tests/test_train_step.py's LINEAR, which the sharded comparison
# needs); every test that steps uses these settings, and ``cogvlm-jax train`` below gives the same ones, so
# each format's step compiles once for the module.
QLORA = train.TrainConfig(**dict(LINEAR_TRAIN, total_steps=3), trainable="lora", lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory, f32_models):
    d = tmp_path_factory.mktemp("qlora")
    model = f32_models["cogvlm1"]
    batches = train_batches(d, model)
    assert batches.steps_per_epoch == 2
    return d, model, batches


@pytest.mark.parametrize("fmt", FORMATS)
def test_steps_reduce_the_loss_and_the_base_stays_held_quantized(env, fmt):
    _, model, batches = env
    tr = train.Trainer(model.config, dataclasses.replace(QLORA, quantize=fmt))
    state, frozen = tr.init(model.params, seed=1)
    quant = tr.quant
    held = host_flat(frozen)
    paths = quantized_paths(model.config, quant)
    assert paths and all(p[0].startswith("layers_") or p[0] in ("lm_head", "vision") for p in paths)
    assert not any(p[:2] == ("vision", "transformer") for p in paths)  # the ViT stays float (no quantize_vision)
    # Count the bytes: each covered kernel 1 (int8) or 1/2 (int4) byte per weight, its scales float32, the
    # rest float32 as the float model holds it.
    floats = flatten_dict(abstract_params(model.config))
    bits = 8 if fmt == "int8" else 4
    want = 0
    for p, a in floats.items():
        n = int(np.prod(a.shape))
        if p in paths:
            scales = quant_lib.scale_shape(a.shape, quant_lib.in_axis_of(p), fmt)
            want += n * bits // 8 + 4 * int(np.prod(scales))
            assert held[p].dtype == quant.held_dtype() and held[p[:-1] + (quant_lib.SCALE,)].dtype == np.float32, p
        else:
            want += 4 * n
            assert held[p].dtype == np.float32, p
    assert held_bytes(frozen) == want
    float_bytes = sum(4 * int(np.prod(a.shape)) for a in floats.values())
    print(f"\n{fmt} base: {want} bytes held, float32 {float_bytes}")
    assert want < float_bytes
    assert all(v.dtype == np.float32 for v in host_flat(state.trainable).values())  # the factors: float32

    losses = []
    for k in range(6):  # batches 0, 1, 0, 1, 0, 1
        state, m = tr.step(state, frozen, tr.place_batch(batches.batch(k % 2)))
        losses.append(float(m["loss"]))
    print(f"{fmt} QLoRA losses: {', '.join(f'{x:.3f}' for x in losses)}")
    assert losses[4] < losses[2] < losses[0] and losses[5] < losses[3] < losses[1]
    for p, v in host_flat(frozen).items():  # the held base is the same, bit for bit, and still held as it was
        assert v.dtype == held[p].dtype and np.array_equal(v, held[p]), p


def _exact(kernel, scale, in_axis: int):
    """The float64 product ``q * s`` a held kernel stands for (numpy: exact for int8 / int4 values)."""
    q = quant_lib.unpack(kernel, in_axis) if kernel.dtype == np.uint8 else kernel  # int4 packed in pairs
    q, s = np.asarray(q, np.float64), np.asarray(scale, np.float64)
    return np.repeat(s, q.shape[in_axis] // s.shape[in_axis], axis=in_axis) * q  # one scale per group


def _other_rounding(deq: dict, held: dict) -> dict:
    """The dequantized float32 base with every weight that ``q * s`` does not give exactly moved to the other
    float32 neighbour of the exact product: a second correct float32 rounding of the same weights."""
    out = dict(deq)
    for p, v in deq.items():
        scale = held.get(p[:-1] + (quant_lib.SCALE,))
        if scale is None:
            continue
        exact = _exact(held[p], scale, quant_lib.in_axis_of(p))
        assert np.abs(v - exact).max() <= np.abs(exact).max() * 2.0 ** -24, p  # v: a float32 rounding of it
        toward = np.where(v > exact, -np.inf, np.inf).astype(np.float32)
        out[p] = np.where(v == exact, v, np.nextafter(v, toward)).astype(np.float32)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_factor_gradients_are_those_of_the_dequantized_base(env, fmt):
    """The quantized base's products (dequantized inside, int8's scale on the product's output) against a
    float32 model holding the dequantized weights, same factors (``lora_b`` made non-zero so that every factor
    has a gradient), same batch. The bound is float32 rounding, measured in this run: the gradient moves by
    ``spread`` between two correct float32 roundings of the dequantized weights (``_other_rounding``), and
    each of the two computations is within that of the exact one."""
    _, model, batches = env
    cfg = dataclasses.replace(QLORA, quantize=fmt)
    tq = train.Trainer(model.config, cfg)
    state, frozen_q = tq.init(model.params, seed=1)
    held = host_flat(frozen_q)
    deq = host_flat(tq._dequantized(frozen_q))
    assert not any(p[-1] == quant_lib.SCALE for p in deq) and all(v.dtype == np.float32 for v in deq.values())
    tf = train.Trainer(model.config, dataclasses.replace(cfg, quantize=None))
    rng = np.random.default_rng(3)
    factors = {p: (rng.normal(0, 0.05, v.shape).astype(np.float32) if p[-1] == lora.B else v)
               for p, v in host_flat(state.trainable).items()}
    factors = unflatten_dict(factors)
    batch = tq.place_batch(batches.batch(0))

    def grads(trainer, frozen):
        loss, _, g = jax.jit(trainer.loss_and_grads)(factors, frozen, batch)
        return float(loss), host_flat(g)

    loss_q, gq = grads(tq, frozen_q)
    loss_f, gf = grads(tf, unflatten_dict(deq))
    _, go = grads(tf, unflatten_dict(_other_rounding(deq, held)))
    top = max(float(np.abs(v).max()) for v in gf.values())
    # every factor has a gradient but the last layer's vision_expert_dense's (image positions no label reads)
    last = f"layers_{model.config.text.num_layers - 1}"
    assert top > 0 and {p for p in gf if not np.abs(gf[p]).max()} == {(last, "self_attn", "vision_expert_dense", k)
                                                                       for k in (lora.A, lora.B)}
    diff = max(float(np.abs(gq[p] - gf[p]).max()) for p in gf) / top
    spread = max(float(np.abs(go[p] - gf[p]).max()) for p in gf) / top
    print(f"\n{fmt}: factor gradients, quantized vs dequantized base {diff:.1e} of the largest; two float32 "
          f"roundings of the base {spread:.1e}; losses {loss_q:.6f} / {loss_f:.6f}")
    assert spread > 0 and diff <= 2 * spread
    assert abs(loss_q - loss_f) <= 2 * spread * max(abs(loss_f), 1.0)


# ------------------------------------------------------------------------------- cogvlm-jax train --quantize
def _train_args(data, out, fmt):
    d = fixture_dir("cogvlm1")
    return ["train", "--data", str(data), "--model", os.path.join(d, "checkpoint"), "--tokenizer",
            os.path.join(d, "tokenizer"), "--out", str(out), "--trainable", "lora", "--quantize", fmt,
            "--lora-rank", "4", "--lora-alpha", "8", "--steps", "3", "--batch-size", "4", "--lr", "1", "--adam-eps", "1",
            "--max-grad-norm", "0", "--end-lr-ratio", "1", "--save-every", "1", "--keep", "3", "--quiet"]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def test_cli_run_resumes_exactly_and_exports_the_trained_function(env, tmp_path):
    """``cogvlm-jax train --trainable lora --quantize int4``: run.json records it, a copy resumed from the
    step-2 Orbax checkpoint (the base quantized again from the model) ends bit for bit where the run did,
    and the float export computes what the quantized base with the factors computes."""
    import cogvlm_jax
    from cogvlm_jax import cli
    from cogvlm_jax.convert.params import read_params
    from cogvlm_jax.training import run as finetune

    data_dir, model, batches = env
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(_train_args(data_dir / "train.jsonl", a, "int4")) == 0
    saved = finetune.read_run(str(a))
    assert saved.train == dataclasses.replace(QLORA, quantize="int4")  # the settings the other tests compiled
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000003")
    shutil.rmtree(b / "model")
    assert cli.main(["train", "--out", str(b), "--resume", "--quiet"]) == 0
    assert _log(b) == _log(a) and len(_log(a)) == 3
    for name in os.listdir(a / "model"):
        assert (a / "model" / name).read_bytes() == (b / "model" / name).read_bytes(), name

    # The export: float32 weights (the dequantized base with the factors merged) ...
    exported = cogvlm_jax.load(str(a / "model"), progress=False)
    assert all(np.asarray(v).dtype == np.float32 for v in jax.tree.leaves(exported.params))
    assert not any(p[-1] == quant_lib.SCALE for p in flatten_dict(exported.params))
    # ... whose logits are those of the quantized base with the unmerged factors, restored from the checkpoint.
    tr = train.Trainer(model.config, saved.train)
    like, frozen = tr.init(read_params(saved.model, model.config, np.float32, quant=tr.quant), seed=saved.seed)
    state = train.restore_state(str(a / "checkpoints" / "step_00000003"), like)
    batch = batches.batch(0)
    args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["pixel_values"])

    def unmerged(frozen, factors, *args):
        with lora.applied(tr.tc.lora_scale):
            return tr.module.apply({"params": frozen, lora.COLLECTION: factors}, *args)[0]

    want = np.asarray(jax.jit(unmerged)(frozen, state.trainable, *args))
    got = np.asarray(exported.forward(*args))
    base = np.asarray(jax.jit(lambda f, *x: tr.module.apply({"params": f}, *x)[0])(frozen, *args))
    err, change = float(np.abs(got - want).max()), float(np.abs(base - want).max())
    print(f"\nQLoRA export vs quantized base + factors: logits {err:.1e} (the factors moved them by {change:.1e})")
    assert change > 1e-3 and err <= 1e-5


def test_bad_quantized_training_settings_are_named(tmp_path, capsys):
    from cogvlm_jax import cli

    assert cli.main(["train", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--quantize", "int8",
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only LoRA trains beside a quantized base" in err[0] and "--trainable lora" in err[0]
    with pytest.raises(ValueError, match="only LoRA trains beside a quantized base"):
        train.TrainConfig(trainable="full", quantize="int8")
    with pytest.raises(ValueError, match="train.quantize must be one of int8, int4"):
        train.TrainConfig(trainable="lora", quantize="int3")
    with pytest.raises(ValueError, match="quantize_vision needs quantize"):
        train.TrainConfig(trainable="lora", quantize_vision=True)


def test_a_quantized_checkpoint_is_the_same_base_and_other_settings_are_refused(env, tmp_path):
    """A model converted with ``--quantize int8`` read as the base holds what quantizing the float weights at
    init holds, bit for bit; a run of another format, or without one, is refused before it reads weights."""
    from cogvlm_jax.convert.convert_hf import main_convert
    from cogvlm_jax.convert.checkpoint import CheckpointError
    from cogvlm_jax.convert.params import read_params
    from cogvlm_jax.training import run as finetune

    data_dir, model, _ = env
    src = os.path.join(fixture_dir("cogvlm1"), "checkpoint")
    dst = str(tmp_path / "int8")
    assert main_convert(src, dst, quantize="int8", progress=False) == 0
    tr = train.Trainer(model.config, dataclasses.replace(QLORA, quantize="int8"))
    _, from_init = tr.init(model.params, seed=1)
    _, from_checkpoint = tr.init(read_params(dst, model.config, np.float32, quant=tr.quant), seed=1)
    a, b = host_flat(from_init), host_flat(from_checkpoint)
    assert a.keys() == b.keys()
    for p in a:
        assert a[p].dtype == b[p].dtype and np.array_equal(a[p], b[p]), p
    tok = os.path.join(fixture_dir("cogvlm1"), "tokenizer")
    for tc, words in ((dataclasses.replace(QLORA, quantize="int4"), "quantize='int4'"),
                      (QLORA, "quantize=None")):
        run = finetune.RunConfig(data=str(data_dir / "train.jsonl"), model=dst, tokenizer=tok, train=tc, batch_size=4)
        with pytest.raises(CheckpointError, match=f"holds int8-quantized weights.*--quantize int8.*{words}"):
            finetune.fit(str(tmp_path / "run"), run, progress=False)


def test_sharded_qlora_step_equals_one_device(env):
    """data=2, fsdp=2, tensor=2 on 8 CPU devices, int8 base: the integers and their scales placed in their own
    shardings, and after one step the same loss and factors as on one device (the comparison of
    tests/test_train_step.py's sharded test: AdamW with eps=1, lr=1, relative to the largest update)."""
    import cogvlm_jax

    _, model, batches = env
    cfg = dataclasses.replace(QLORA, quantize="int8")
    results = []
    for mesh in (None, cogvlm_jax.make_mesh(2, 2, 2)):
        tr = train.Trainer(model.config, cfg, mesh=mesh)
        state, frozen = tr.init(model.params, seed=1)
        before = host_flat(state.trainable)
        if mesh is not None:
            k = frozen["layers_0"]["mlp"]["language_mlp"]["up_proj"]
            assert k["kernel"].dtype == np.int8 and k["kernel"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
            assert k[quant_lib.SCALE].sharding.spec == jax.sharding.PartitionSpec("tensor", None)  # like its rows
        state, m = tr.step(state, frozen, tr.place_batch(batches.batch(0)))
        results.append((float(m["loss"]), before, host_flat(state.trainable)))
    (loss1, before, one), (loss8, _, eight) = results
    update = max(float(np.abs(one[p] - before[p]).max()) for p in one)
    diff = max(float(np.abs(one[p] - eight[p]).max()) for p in one) / update
    print(f"\nsharded 2x2x2 QLoRA int8 vs one device: loss {abs(loss8 - loss1) / loss1:.1e}, factors {diff:.1e} of "
          "the largest update")
    assert update > 0 and abs(loss8 - loss1) <= 1e-6 * loss1 and diff <= 1e-5
