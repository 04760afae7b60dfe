"""Weight-only quantization (``models/quantize.py``): the formats' error bounds, what a quantized model holds,
its numbers on the fixtures against float32, quantized checkpoints, and sharded quantized programs.

The fixture numbers (``cogvlm_jax.load(..., quantize=)`` against the float32 model of the same checkpoint,
every case of a family left-padded into one batch; docs/sharding-and-numerics.md lists them):

=========  ======  ==================  ===========================================
family     format  max |logits error|  greedy ids equal to float32 (16 steps)
=========  ======  ==================  ===========================================
cogvlm1    int8    0.2514 (|logit| 8.2)  rows 2-4 all 16; row 1 the first 15
cogvlm2    int8    0.2777 (|logit| 12)   rows 1, 3, 4 all 16; row 2 the first 5
cogvlm1    int4    3.126                 the first 2, 1, 0, 0 of the rows
cogvlm2    int4    6.195                 the first 2, 3, 0, 2 of the rows
=========  ======  ==================  ===========================================

The fixtures' weights are random and 64 wide (int4: one group of 64 per input), their greedy margins small
(cases.json ``greedy_min_margin``): int4 rounds each weight to one of 15 levels of its group, which moves
these logits by about half their range. The bounds below are the measured values rounded up by 1%.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, cases, fixture_dir, left_pad_batch
from flax.traverse_util import flatten_dict, unflatten_dict

import cogvlm_jax
from cogvlm_jax.convert.convert_hf import main_convert
from cogvlm_jax.files import CheckpointError
from cogvlm_jax.models import quantize as ql
from cogvlm_jax.parallel.axes import make_mesh
from cogvlm_jax.parallel.quantized import held_bytes, quantized_paths

LOGITS_BOUND = {("cogvlm1", "int8"): 0.254, ("cogvlm2", "int8"): 0.281,
                ("cogvlm1", "int4"): 3.16, ("cogvlm2", "int4"): 6.26}
# per row of the left-padded batch: how many leading greedy ids equal float32's, at least (of 16)
GREEDY_PREFIX = {("cogvlm1", "int8"): [15, 16, 16, 16], ("cogvlm2", "int8"): [16, 5, 16, 16],
                 ("cogvlm1", "int4"): [2, 1, 0, 0], ("cogvlm2", "int4"): [2, 3, 0, 2]}
DEQUANT_BOUND = 1e-4  # |quantized model - float model on the dequantized weights| logits (float32 sums)


def _paths(fam):
    return os.path.join(fixture_dir(fam), "checkpoint"), os.path.join(fixture_dir(fam), "tokenizer")


@pytest.fixture(scope="module")
def quantized():
    """{(family, format): the fixture checkpoint loaded quantized, on one device}."""
    out = {}
    for fam in FAMILIES:
        ck, tok = _paths(fam)
        for fmt in ql.FORMATS:
            out[fam, fmt] = cogvlm_jax.load(ck, tokenizer=tok, progress=False, quantize=fmt)
    return out


@pytest.fixture(scope="module")
def batches(f32_models):
    """{family: (the left-padded batch of its cases, float32 logits, float32 greedy ids for 16 steps)}."""
    out = {}
    for fam in FAMILIES:
        m = f32_models[fam]
        batch = left_pad_batch(cases(fam), m.config.pad_token_id)
        out[fam] = batch, m.forward(*batch), m.generate(*batch, max_new_tokens=16)
    return out


# --------------------------------------------------------------------------- the formats
@pytest.mark.parametrize("width,group", [(64, 64), (128, 128), (256, 128), (384, 128), (200, 100), (96, 96),
                                         (130, 65), (127, 127), (1, 1)])
def test_int4_group_is_128_or_the_largest_divisor_below(width, group):
    assert ql.group_size(width) == group


@pytest.mark.parametrize("fmt,packed", [("int8", False), ("int4", False), ("int4", True)])
@pytest.mark.parametrize("shape,in_axis", [((48, 64), 1), ((64, 48), 0), ((24, 384), 1), ((200, 16), 0),
                                           ((10, 96), 1), ((7, 256), 1)])
def test_round_trip_error_within_half_a_step(fmt, packed, shape, in_axis):
    """|w - dequantize(quantize(w))| <= scale / 2 per weight, held packed or not, scales of the documented
    shape; a zero row quantizes to zeros (scale 1)."""
    rng = np.random.default_rng(sum(shape) + in_axis)
    w = (rng.standard_t(3, size=shape) * 0.05).astype(np.float32)
    zero = [slice(None)] * 2
    zero[1 - in_axis] = 0
    w[tuple(zero)] = 0.0  # one whole output channel of zeros
    quant = ql.Quantization(fmt, packed=packed)
    q, scale = ql.quantize(jnp.asarray(w), in_axis, fmt)
    assert scale.shape == ql.scale_shape(shape, in_axis, fmt) and scale.dtype == jnp.float32
    qmax = 127 if fmt == "int8" else 7
    assert int(jnp.abs(q).max()) == qmax  # the largest weight of some group lands on the end of the range
    h = ql.held(q, in_axis, quant)
    assert h.dtype == quant.held_dtype()
    back = np.asarray(ql.dequantize(h, scale, in_axis, quant))
    g = shape[in_axis] // scale.shape[in_axis]
    step = np.repeat(np.asarray(scale), g, axis=in_axis)
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-6)), float(np.max(np.abs(back - w) / step))
    assert np.all(back[tuple(zero)] == 0)


def test_int4_pairs_pack_and_unpack_every_value():
    vals = np.array(np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))).reshape(2, -1).T.astype(np.int8)  # [256, 2]
    for axis, q in ((1, vals), (0, vals.T.copy())):
        p = ql.pack(q, axis)
        assert p.dtype == np.uint8 and p.shape[axis] == 1
        np.testing.assert_array_equal(ql.unpack(p, axis), q)
        np.testing.assert_array_equal(np.asarray(ql.unpack(ql.pack(jnp.asarray(q), axis), axis)), q)
    assert len(set(ql.pack(vals, 1).ravel().tolist())) == 256


def test_bad_quantize_settings_are_refused():
    with pytest.raises(ValueError, match="quantize must be one of"):
        cogvlm_jax.load(quantize="int3", progress=False)
    with pytest.raises(ValueError, match="quantize_vision needs quantize"):
        cogvlm_jax.load(quantize_vision=True, progress=False)
    with pytest.raises(ValueError, match="input width 5 is odd"):
        ql.pack(np.zeros((3, 5), np.int8), 1)


# --------------------------------------------------------------------------- what a quantized model holds
@pytest.mark.parametrize("fmt", ql.FORMATS)
def test_held_params_are_the_quantized_integers(fmt, quantized, f32_models):
    """Every decoder projection (both experts), the lm_head and the adapter's GLU are held as integers with
    float32 scales; the ViT, norms and embeddings stay float32; the bytes held are what that makes."""
    model, base = quantized["cogvlm2", fmt], f32_models["cogvlm2"]
    flat, fl = flatten_dict(model.params), flatten_dict(base.params)
    covered = set(quantized_paths(model.config, ql.make(fmt)))
    want = {p for p in fl if p[-1] == "kernel" and (p[0].startswith("layers_") or p[0] == "lm_head"
                                                    or p[:2] == ("vision", "linear_proj")) and len(fl[p].shape) == 2}
    assert covered == want and len(covered) == 2 * 2 * 5 + 1 + 4  # 2 layers x 2 experts x 5, lm_head, GLU
    expect = 0
    for p, a in flat.items():
        if p in covered:
            assert a.dtype == (jnp.int8 if fmt == "int8" else jnp.uint8), p  # int4: packed pairs on CPU
            n = fl[p].size
            assert a.size == (n if fmt == "int8" else n // 2), p
            assert flat[p[:-1] + (ql.SCALE,)].dtype == jnp.float32
            expect += a.size
        elif p[-1] == ql.SCALE:
            kshape = fl[p[:-1] + ("kernel",)].shape
            ax = ql.in_axis_of(p)
            groups = 1 if fmt == "int8" else kshape[ax] // ql.group_size(kshape[ax])
            assert a.size == fl[p[:-1] + ("kernel",)].size // kshape[ax] * groups, p
            expect += 4 * a.size
        else:
            assert a.dtype == jnp.float32 and a.shape == fl[p].shape, p
            expect += 4 * a.size
    assert held_bytes(model.params) == expect == sum(a.nbytes for a in flat.values())
    assert held_bytes(model.params) < held_bytes(base.params)
    print(f"\ncogvlm2 fixture {fmt}: held {held_bytes(model.params)} bytes, float32 {held_bytes(base.params)}")


def test_quantize_vision_quantizes_the_vit_too(f32_models):
    base = f32_models["cogvlm1"]
    m = cogvlm_jax.Model(base.config, base.params, quantize="int8", quantize_vision=True)
    flat = flatten_dict(m.params)
    vit = [p for p in flat if p[:2] == ("vision", "transformer") and p[-1] == "kernel"]
    assert vit and all(flat[p].dtype == jnp.int8 for p in vit)
    assert flatten_dict(m.params)[("embed_tokens", "embedding")].dtype == jnp.float32
    assert flat[("vision", "patch_embedding", "proj", "kernel")].dtype == jnp.float32  # the convolution
    ids = np.array([[1, 5, 7, 9]], np.int32)
    assert m.generate(ids, np.zeros_like(ids), np.ones_like(ids), max_new_tokens=3).shape == (1, 3)


# --------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("fmt", ql.FORMATS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_quantized_model_computes_the_float_model_of_its_dequantized_weights(fam, fmt, quantized, batches):
    """The products read the held integers and scales and nothing else: the float32 model given the
    dequantized weights computes the same logits."""
    model = quantized[fam, fmt]
    quant = model.module.execution.quant
    flat = flatten_dict(model.params)
    deq = {}
    for p, a in flat.items():
        if p[-1] == ql.SCALE:
            continue
        if p[-1] == "kernel" and p[:-1] + (ql.SCALE,) in flat:
            a = ql.dequantize(a, flat[p[:-1] + (ql.SCALE,)], ql.in_axis_of(p), quant)
        deq[p] = a
    f = cogvlm_jax.Model(model.config, unflatten_dict(deq))
    batch = batches[fam][0]
    err = float(np.abs(model.forward(*batch) - f.forward(*batch)).max())
    print(f"\n{fam} {fmt}: max |quantized - float on dequantized| = {err:.2e}")
    assert err <= DEQUANT_BOUND


@pytest.mark.parametrize("fmt", ql.FORMATS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_fixture_logits_and_greedy_ids_against_float32(fam, fmt, quantized, batches):
    batch, ref, ids = batches[fam]
    model = quantized[fam, fmt]
    am = batch[2].astype(bool)
    err = float(np.abs(model.forward(*batch) - ref)[am].max())
    got = model.generate(*batch, max_new_tokens=16)
    prefix = [int(np.argmax(a != b)) if (a != b).any() else 16 for a, b in zip(got, ids)]
    print(f"\n{fam} {fmt}: max |logits - float32| = {err:.4g}; greedy prefix equal {prefix}")
    assert err <= LOGITS_BOUND[fam, fmt]
    assert all(p >= w for p, w in zip(prefix, GREEDY_PREFIX[fam, fmt])), prefix
    if fmt == "int8":
        assert err > 1e-3  # the weights really are rounded: int8 moves these logits measurably


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ql.FORMATS)
def test_quantized_checkpoint_loads_byte_identical(fmt, tmp_path, quantized):
    """``convert --quantize`` writes the integers and scales a quantizing load holds; ``load`` reads them
    back as they are (its format from checkpoint.json) and refuses another format."""
    ck, tok = _paths("cogvlm2")
    dst = str(tmp_path / fmt)
    assert main_convert(ck, dst, quantize=fmt, progress=False) == 0
    back = cogvlm_jax.load(dst, tokenizer=tok, progress=False)
    assert back.quantize == fmt
    a, b = flatten_dict(back.params), flatten_dict(quantized["cogvlm2", fmt].params)
    assert a.keys() == b.keys()
    for p in a:
        assert a[p].dtype == b[p].dtype and a[p].shape == b[p].shape, p
        assert np.asarray(a[p]).tobytes() == np.asarray(b[p]).tobytes(), p
    other = "int4" if fmt == "int8" else "int8"
    with pytest.raises(CheckpointError, match=f"holds {fmt} weights"):
        cogvlm_jax.load(dst, quantize=other, progress=False)
    with pytest.raises(CheckpointError, match="--to hf"):
        main_convert(dst, str(tmp_path / "hf"), to="hf", quantize=fmt, progress=False)
    with pytest.raises(CheckpointError, match="a Hugging Face export needs the float weights"):
        main_convert(dst, str(tmp_path / "hf"), to="hf", progress=False)
    from cogvlm_jax.convert.params import read_params
    with pytest.raises(CheckpointError, match=f"holds {fmt}-quantized weights .* this reads float weights"):
        read_params(dst, back.config, np.float32)  # what training reads
    assert not os.path.exists(tmp_path / "hf")


def test_quantized_checkpoint_on_a_mesh(tmp_path, quantized):
    ck, _ = _paths("cogvlm1")
    dst = str(tmp_path / "q")
    main_convert(ck, dst, quantize="int4", progress=False)
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    m = cogvlm_jax.load(dst, mesh=mesh, progress=False)
    one = quantized["cogvlm1", "int4"]
    for p, a in flatten_dict(m.params).items():
        assert np.asarray(a).tobytes() == np.asarray(flatten_dict(one.params)[p]).tobytes(), p


# --------------------------------------------------------------------------- meshes
@pytest.mark.parametrize("layout,shape", [("exact", (2, 2, 2)), ("megatron", (2, 1, 4))])
def test_sharded_int8_equals_one_device_int8(layout, shape, quantized, batches):
    """Scales sharded like their weights (a fused QKV's reordered with its rows in the Megatron layout):
    the same greedy ids as one device, logits within float32 summation noise."""
    mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    for fam in FAMILIES:
        one = quantized[fam, "int8"]
        batch = batches[fam][0]
        m = cogvlm_jax.Model(one.config, cogvlm_jax.load(_paths(fam)[0], progress=False).params, mesh=mesh,
                             layout=layout, quantize="int8")
        flat = flatten_dict(m.params)
        # the Megatron layout holds the decoder's layers stacked on a leading axis (``layers``)
        layer, out = (("layers",), 1) if layout == "megatron" else (("layers_0",), 0)
        k = flat[layer + ("mlp", "language_mlp", "gate_proj", "kernel")]
        s = flat[layer + ("mlp", "language_mlp", "gate_proj", ql.SCALE)]
        assert k.dtype == jnp.int8 and len(k.sharding.device_set) == int(np.prod(shape))
        split = lambda x: (tuple(x.sharding.spec) + (None,) * x.ndim)[out]  # noqa: E731
        assert split(s) == split(k)  # the output channels' split
        err = float(np.abs(m.forward(*batch) - one.forward(*batch)).max())
        print(f"\n{fam} {layout} {shape} int8: max |sharded - one device| = {err:.2e}")
        assert err <= 1e-4
        np.testing.assert_array_equal(m.generate(*batch, max_new_tokens=8), one.generate(*batch, max_new_tokens=8))


# --------------------------------------------------------------------------- the CLI
def test_cli_convert_generate_and_plan_with_quantize(tmp_path, capsys):
    from cogvlm_jax import cli

    ck, tok = _paths("cogvlm1")
    dst = str(tmp_path / "q8")
    assert cli.main(["convert", ck, dst, "--quantize", "int8"]) == 0
    gen = ["generate", "--tokenizer", tok, "--prompt", "hi there", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert cli.main(gen + ["--model", dst]) == 0
    stored = capsys.readouterr().out
    assert cli.main(gen + ["--model", ck, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out == stored and stored.strip()
    assert cli.main(gen + ["--model", dst, "--quantize", "int4"]) == 2
    assert "holds int8 weights" in capsys.readouterr().err
    assert cli.main(["convert", ck, str(tmp_path / "v"), "--quantize-vision"]) == 2
    assert "--quantize-vision needs --quantize" in capsys.readouterr().err

    def total_gib(*extra):
        assert cli.main(["plan", "--config", "cogvlm2-llama3-chat-19B", "--mesh", "1,1,8", *extra]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "parameters:" in x)
        return float(line.split()[1])

    bf16, int8, int4 = total_gib(), total_gib("--quantize", "int8"), total_gib("--quantize", "int4")
    print(f"\n19B parameters: bfloat16 {bf16} GiB, int8 {int8} GiB, int4 {int4} GiB")
    assert int4 < int8 < 0.65 * bf16


# --------------------------------------------------------------------------- serving
def test_a_live_server_on_int8_weights_answers_as_the_model_does(quantized):
    """The serving engine on a quantized model: concurrent requests (batched decode), streamed and not, each
    answer the quantized model's own greedy chat; a bad request fails alone with an OpenAI error."""
    import concurrent.futures
    import json
    import urllib.error
    import urllib.request

    openai = pytest.importorskip("openai")
    from cogvlm_jax.serving.engine import Engine
    from cogvlm_jax.serving.server import BackgroundServer, ServerConfig

    model = quantized["cogvlm2", "int8"]
    img = os.path.join(fixture_dir("cogvlm2"), "images", "img0.png")
    with open(img, "rb") as f:
        import base64
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    queries = [("Describe the image.", img), ("What is it?", None), ("Hello there", None), ("Colours?", img)]
    want = [model.chat(im, q, max_new_tokens=8) for q, im in queries]
    eng = Engine(model, slots=4, max_length=256, max_queue=16).start()
    srv = BackgroundServer(eng, ServerConfig("q8"), manage_engine=False).start()
    try:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(i, stream):
            q, im = queries[i]
            content = q if im is None else [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": q}]
            kw = dict(model="q8", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0)
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in cl.chat.completions.create(stream=True, **kw)
                               if c.choices)
            return cl.chat.completions.create(**kw).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda a: ask(*a), [(i, s) for s in (False, True) for i in range(len(queries))]))
        assert got == want + want
        req = urllib.request.Request(srv.url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "q8", "messages": [{"role": "user", "content": "hi"}],
                                                      "temperature": -1}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400
        err = json.loads(e.value.read())["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == "temperature"
        assert ask(1, False) == want[1]  # still serving
    finally:
        srv.stop()
        eng.shutdown()


def test_int4_held_as_jnp_int4_computes_what_packed_pairs_do(quantized, batches):
    """The form TPU and GPU hold (``jnp.int4``, ``Quantization.packed`` False), run here on CPU: the same
    integers unpacked from the packed pairs give the same logits (within float32 summation order)."""
    from cogvlm_jax.models.cogvlm import CogVLM

    packed = quantized["cogvlm2", "int4"]
    q = packed.module.execution.quant
    assert q.packed
    unpacked_q = ql.Quantization("int4", q.vision, packed=False)
    flat = flatten_dict(packed.params)
    held = {p: (ql.from_stored(a, ql.in_axis_of(p), unpacked_q)
                if p[-1] == "kernel" and p[:-1] + (ql.SCALE,) in flat else a) for p, a in flat.items()}
    k = held[("lm_head", "kernel")]
    assert k.dtype == jnp.int4 and k.shape == flatten_dict(quantized["cogvlm2", "int8"].params)[("lm_head", "kernel")].shape
    module = CogVLM(packed.config, packed.module.dtype, execution=packed.module.execution.replace(quant=unpacked_q))
    batch = batches["cogvlm2"][0]
    got = jax.jit(lambda p, *b: module.apply({"params": p}, *b)[0])(unflatten_dict(held), *batch)
    np.testing.assert_allclose(np.asarray(got), packed.forward(*batch), rtol=0, atol=DEQUANT_BOUND)  # float32 sums
    back = ql.stored(held[("lm_head", "kernel")], 1, unpacked_q)
    assert np.asarray(back).tobytes() == np.asarray(flat[("lm_head", "kernel")]).tobytes()


def test_megatron_with_a_quantized_vit_equals_one_device(f32_models, batches):
    """``quantize_vision`` in the Megatron layout: the ViT's quantized kernels and scales are stacked for its
    scanned blocks (``parallel/layout.py``) and its fused QKV scales reordered; one device's numbers."""
    base = f32_models["cogvlm2"]
    one = cogvlm_jax.Model(base.config, base.params, quantize="int8", quantize_vision=True)
    mesh = make_mesh(1, 1, 4, devices=jax.devices()[:4])
    m = cogvlm_jax.Model(base.config, base.params, mesh=mesh, layout="megatron", quantize="int8", quantize_vision=True)
    vit = [a for p, a in flatten_dict(m.params).items() if p[:2] == ("vision", "transformer") and p[-1] == "kernel"]
    assert vit and all(a.dtype == jnp.int8 for a in vit)
    batch = batches["cogvlm2"][0]
    err = float(np.abs(m.forward(*batch) - one.forward(*batch)).max())
    print(f"\ncogvlm2 megatron (1, 1, 4) int8 with the ViT: max |sharded - one device| = {err:.2e}")
    assert err <= 1e-4
