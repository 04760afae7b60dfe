"""Several images in one conversation: one ``[boi, patches, eoi]`` span per image, each with the
single-image position and expert rules; one image stays the official layout."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.inputs.preprocess import image_to_pixels, pad_batch
from cogvlm_jax.models import positions
from conftest import fixture_dir

IMG0, IMG1 = (os.path.join(fixture_dir("cogvlm2"), "images", f"img{i}.png") for i in (0, 1))


# ----------------------------------------------------------------------------------- pure functions
def test_side_by_side_spans_each_keep_the_single_image_rules():
    #        bos boi p  p  eoi boi p  p  eoi t
    tt = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    am = jnp.ones_like(tt)
    assert positions.position_ids(tt, am, 4).tolist() == [[0, 1, 2, 2, 3, 4, 5, 5, 6, 7]]
    assert positions.vision_expert_mask(tt, 4).astype(int).tolist() == [[0, 1, 1, 1, 0, 1, 1, 1, 0, 0]]
    # without the span length the two images read as one: what the span-aware rules exist for
    assert positions.position_ids(tt, am).tolist() != positions.position_ids(tt, am, 4).tolist()


def test_one_span_and_spans_apart_are_unchanged_by_the_span_length():
    n_img, length = 4, 24
    pos, route = jax.jit(positions.position_ids, static_argnums=2), jax.jit(positions.vision_expert_mask, static_argnums=1)
    rng = np.random.default_rng(0)
    tts, ams = [], []
    for _ in range(16):
        text = [int(rng.integers(1, 4)) for _ in range(3)]
        row = [0] * text[0] + [1] * n_img + [0] * text[1] + [1] * n_img * int(rng.integers(0, 2)) + [0] * text[2]
        tts.append([0] * (length - len(row)) + row)
        ams.append([0] * (length - len(row)) + [1] * len(row))
    tt, am = jnp.array(tts), jnp.array(ams)
    assert pos(tt, am, n_img).tolist() == pos(tt, am, None).tolist()
    assert route(tt, n_img).tolist() == route(tt, None).tolist()


# ------------------------------------------------------------------------------------------- inputs
def test_build_inputs_lays_out_one_span_per_image_after_bos(f32_models):
    m = f32_models["cogvlm2"]
    n, s = m.config.num_image_tokens, m.config.vision.image_size
    one = m.build_inputs("What is it?", image=IMG0)
    assert one["pixel_values"].shape == (3, s, s)
    same = m.build_inputs("What is it?", image=[IMG0])  # a list of one is the official single-image prompt
    for k in one:
        np.testing.assert_array_equal(same[k], one[k])
    two = m.build_inputs("Which is red?", [("Look", "Yes", IMG0)], image=IMG1)
    text = m.tokenizer.encode("Question: Look Answer: Yes\nQuestion: Which is red? Answer:")
    assert two["input_ids"].tolist() == [m.config.bos_token_id] + [m.config.image_token_id] * 2 * n + text
    assert two["token_type_ids"].tolist() == [0] + [1] * 2 * n + [0] * len(text)
    assert two["pixel_values"].shape == (2, 3, s, s)
    np.testing.assert_array_equal(two["pixel_values"][0], image_to_pixels(IMG0, s))
    np.testing.assert_array_equal(two["pixel_values"][1], image_to_pixels(IMG1, s))
    # one image from an earlier turn is the official layout: the span after bos
    hist = m.build_inputs("Which is red?", [("Look", "Yes", IMG0)])
    ref = m.build_inputs("Which is red?", [("Look", "Yes")], image=IMG0)
    for k in ref:
        np.testing.assert_array_equal(hist[k], ref[k])
    batch = pad_batch([one, two], m.config.pad_token_id)
    assert batch["pixel_values"].shape == (2, 2, 3, s, s) and not batch["pixel_values"][0, 1].any()


def test_malformed_image_runs_are_refused(f32_models):
    m = f32_models["cogvlm2"]
    x = m.build_inputs("Hi", image=[IMG0, IMG1])
    n = m.config.num_image_tokens
    tt = x["token_type_ids"].copy()
    tt[1], tt[2 + 2 * n] = 0, 1  # the first span one token short, a stray image token past the second
    with pytest.raises(InputError, match="not whole images"):
        m.forward(x["input_ids"][None], tt[None], x["attention_mask"][None], x["pixel_values"][None])
    with pytest.raises(InputError, match=r"pixel_values must have shape \(1, 2, 3"):
        m.forward(x["input_ids"][None], x["token_type_ids"][None], x["attention_mask"][None], x["pixel_values"][:1])


# ------------------------------------------------------------------------------------------ forward
@pytest.fixture(scope="module")
def two_images(f32_models):
    m = f32_models["cogvlm2"]
    x = m.build_inputs("Which one is red?", image=[IMG0, IMG1])
    return m, x, m.forward(x["input_ids"][None], x["token_type_ids"][None], x["attention_mask"][None],
                           x["pixel_values"][None])[0]


def test_the_first_span_computes_as_a_single_image_prompt_up_to_its_eoi(two_images):
    """Causal attention: up to the first eoi, the two-image prompt is the one-image prompt; the same logits
    there test the first span's positions and that its eoi takes the language expert (not the vision
    expert, as a boi right after it would make it under the one-image rule)."""
    m, x, logits = two_images
    n = m.config.num_image_tokens
    one = m.build_inputs("Which one is red?", image=IMG0)
    ref = m.forward(one["input_ids"][None], one["token_type_ids"][None], one["attention_mask"][None],
                    one["pixel_values"][None])[0]
    np.testing.assert_allclose(logits[:1 + n], ref[:1 + n], rtol=0, atol=1e-5)
    assert np.abs(logits[1 + 2 * n:] - ref[1 + n:]).max() > 1e-3  # the second image is seen


def test_the_second_span_holds_the_second_images_features_and_routes_per_span(two_images):
    m, x, logits = two_images
    n = m.config.num_image_tokens
    module, params = m.module, m.params
    tt = jnp.asarray(x["token_type_ids"][None])
    mask = positions.vision_expert_mask(tt, n)[0]
    assert mask.astype(int).tolist() == [0] + ([1] * (n - 1) + [0]) * 2 + [0] * (len(tt[0]) - 1 - 2 * n)
    pos = positions.position_ids(tt, jnp.ones_like(tt), n)[0].tolist()
    assert pos[:1 + 2 * n + 1] == [0, 1] + [2] * (n - 2) + [3, 4] + [5] * (n - 2) + [6, 7]
    # the decoder's input (the spliced embeddings) on the second span: the second image's features
    def spliced_and_second(p, ids, tt, pv):
        second = module.apply({"params": p}, pv[0, 1:2], method=type(module).encode_images)
        return module.apply({"params": p}, ids, tt, jnp.ones_like(tt), pv, return_hidden=True)[2][0], second

    inputs, feats = jax.jit(spliced_and_second)(params, jnp.asarray(x["input_ids"][None]), tt,
                                                jnp.asarray(x["pixel_values"][None]))
    np.testing.assert_allclose(np.asarray(inputs[0, 1 + n:1 + 2 * n]), np.asarray(feats[0]), rtol=0, atol=1e-6)


def test_chat_greedy_first_token_follows_the_forward_logits(two_images):
    """chat builds the same two-span prompt from a list of images, and its prefill's next position and
    routing give the token the forward's last logits choose."""
    m, x, logits = two_images
    first = int(np.argmax(logits[-1]))
    want = "" if first in m.config.eos_token_ids else m.tokenizer.decode([first])
    assert m.chat([IMG0, IMG1], "Which one is red?", max_new_tokens=1) == want


def test_generate_takes_image_repeated_in_order(monkeypatch, capsys):
    import cogvlm_jax.api
    from cogvlm_jax import cli
    from PIL import Image

    seen = []
    monkeypatch.setattr(cogvlm_jax.api.Model, "stream", lambda self, image, *a, **k: seen.append(image) or iter(["ok"]))
    d = fixture_dir("cogvlm2")
    base = ["generate", "--model", os.path.join(d, "checkpoint"), "--tokenizer", os.path.join(d, "tokenizer"),
            "--prompt", "Which?"]
    assert cli.cmd_generate(cli.build_parser().parse_args(base + ["--image", IMG1, "--image", IMG0])) == 0
    assert capsys.readouterr().out == "ok\n"
    assert [np.asarray(im).tolist() for im in seen[0]] == [np.asarray(Image.open(p).convert("RGB")).tolist()
                                                          for p in (IMG1, IMG0)]
    with pytest.raises(ValueError, match="--boxes-out draws on one picture; 2 --image given"):
        cli.cmd_generate(cli.build_parser().parse_args(base + ["--image", IMG1, "--image", IMG0, "--boxes-out", "x.png"]))
