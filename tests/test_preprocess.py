"""Prompt building and image preprocessing against the reference fixtures."""

import io
import json
import os
import re

import numpy as np
import pytest
from conftest import huge_png
from PIL import Image

from cogvlm_jax.config import load_config
from cogvlm_jax.inputs.preprocess import (
    IGNORE_INDEX,
    MAX_IMAGE_PIXELS,
    ImageError,
    ImageTooLargeError,
    build_inputs,
    build_prompt,
    image_to_pixels,
    load_image,
    pad_batch,
)
from cogvlm_jax.inputs.tokenizer import load_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("cogvlm1", "cogvlm2")


def _cases():
    """Every fixture case of both families as (family, case) test parameters."""
    params = []
    for family in FAMILIES:
        with open(os.path.join(FIXTURES, family, "cases.json")) as f:
            params += [pytest.param(family, case, id=f"{family}-{case['name']}") for case in json.load(f)]
    return params


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


_loaded = {}


def _family(family):
    """(tokenizer, config) of a fixture family, loaded once."""
    if family not in _loaded:
        root = os.path.join(FIXTURES, family)
        _loaded[family] = (load_tokenizer(root), load_config(os.path.join(root, "checkpoint")))
    return _loaded[family]


def _image_path(family, name):
    return os.path.join(FIXTURES, family, "images", name)


def _build(family, case, **kw):
    tokenizer, config = _family(family)
    image = _image_path(family, case["image"]) if case["image"] else None
    return build_inputs(tokenizer, config, case["query"], history=case["history"], image=image,
                        template=case["template"], **kw)


# ------------------------------------------------------------------------------- fixture parity
@pytest.mark.parametrize("family,case", _cases())
def test_build_inputs_matches_reference(family, case):
    ref = np.load(os.path.join(FIXTURES, family, "cases", f"{case['name']}.npz"))
    got = _build(family, case)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert got[key].dtype == np.int32
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    assert len(got["input_ids"]) == case["prompt_tokens"]
    if case["image"]:
        assert got["pixel_values"].dtype == np.float32
        np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
    else:
        assert got["pixel_values"] is None and "pixel_values" not in ref


@pytest.mark.parametrize("family,case", [p for p in _cases() if "answer" in p.values[1]])
def test_training_inputs_match_reference(family, case):
    ref = np.load(os.path.join(FIXTURES, family, "cases", f"{case['name']}.npz"))
    got = _build(family, case, answer=case["answer"])
    np.testing.assert_array_equal(got["input_ids"], ref["train_input_ids"])
    np.testing.assert_array_equal(got["token_type_ids"], ref["train_token_type_ids"])
    np.testing.assert_array_equal(got["labels"], ref["train_labels"])
    np.testing.assert_array_equal(got["attention_mask"], np.ones_like(ref["train_input_ids"]))


def test_template_defaults_to_config(family):
    tokenizer, config = _family(family)
    default = build_inputs(tokenizer, config, "Why?")
    explicit = build_inputs(tokenizer, config, "Why?", template=config.template_version)
    np.testing.assert_array_equal(default["input_ids"], explicit["input_ids"])


def test_preprocess_224(family):
    ref = np.load(os.path.join(FIXTURES, family, "cases", "preprocess_224.npz"))["pixel_values"]
    got = image_to_pixels(_image_path(family, "preprocess.png"), 224)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- prompts
def test_prompt_templates():
    history = [("Q1?", "A1."), ("Q2?", "A2.")]
    assert build_prompt("Hi", history, "base") == "Hi"
    assert build_prompt("Hi", history, "chat") == "Question: Q1? Answer: A1.\nQuestion: Q2? Answer: A2.\nQuestion: Hi Answer:"
    assert build_prompt("Hi", (), "vqa") == "Question: Hi Short answer:"


def test_unknown_template_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"'chatml'.*base, chat, vqa"):
        build_prompt("Hi", template="chatml")


# -------------------------------------------------------------------------------------- images
def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "I", "F"])
def test_load_image_converts_any_mode_to_rgb(mode):
    img = Image.new("RGB", (5, 3), (200, 100, 50)).convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (5, 3)
    if mode in ("L", "I", "F"):  # 8-bit grey in a wider mode keeps its value
        assert out.getpixel((0, 0)) == (img.convert("L").getpixel((0, 0)),) * 3


def test_load_image_scales_16_bit_grey():
    data = _png_bytes(Image.fromarray(np.full((3, 5), 65535, np.uint16)))  # 16-bit white
    assert load_image(data).getpixel((0, 0)) == (255, 255, 255)  # not clipped, not wrapped


def test_load_image_drops_alpha_like_convert():
    img = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert load_image(img).getpixel((0, 0)) == (10, 20, 30)


def test_load_image_from_bytes_and_path(tmp_path):
    img = Image.new("P", (4, 4), 3)
    data = _png_bytes(img)
    path = tmp_path / "palette.png"
    path.write_bytes(data)
    from_bytes, from_path = load_image(data), load_image(path)
    assert from_bytes.mode == from_path.mode == "RGB"
    assert from_bytes.tobytes() == from_path.tobytes()
    np.testing.assert_array_equal(image_to_pixels(data, 8), image_to_pixels(str(path), 8))


def test_load_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        load_image(missing)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(str(text))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(truncated)
    with pytest.raises(ImageError, match="12 bytes"):
        load_image(b"garbage data")
    with pytest.raises(ImageError, match=str(tmp_path)):
        load_image(tmp_path)  # a directory


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    data = huge_png(7000, 6000)  # 42 MP (126 MB as RGB) in a file of about 40 kB
    assert len(data) < 100_000 and 7000 * 6000 > MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    for source, name in ((data, f"<{len(data)} bytes>"), (str(path), str(path))):
        with pytest.raises(ImageTooLargeError, match=rf"image {re.escape(name)} is 7000x6000 = 42.0 megapixels, "
                                                     rf"over the limit of 40 megapixels \(40000000 pixels\)"):
            image_to_pixels(source, 28)
    assert decoded == []  # refused from the header: nothing was decoded
    monkeypatch.undo()
    small = _png_bytes(Image.new("RGB", (100, 50), (1, 2, 3)))
    assert load_image(small, max_pixels=5000).size == (100, 50)  # the limit itself is allowed
    with pytest.raises(ImageTooLargeError, match="100x50"):
        load_image(small, max_pixels=4999)
    assert isinstance(ImageTooLargeError("x"), ImageError)  # callers that catch ImageError still do


# ------------------------------------------------------------------------------------- batching
def test_pad_batch_left_pads(family):
    tokenizer, config = _family(family)
    with_image = build_inputs(tokenizer, config, "What is it?", image=_image_path(family, "img0.png"),
                              answer="a dot")
    text_only = build_inputs(tokenizer, config, "Hi", answer="yes")
    batch = pad_batch([with_image, text_only], config.pad_token_id, length=len(with_image["input_ids"]) + 2)
    length = len(with_image["input_ids"]) + 2
    for key in ("input_ids", "token_type_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2, length) and batch[key].dtype == np.int32
    for row, x in enumerate([with_image, text_only]):
        n = len(x["input_ids"])
        for key in ("input_ids", "token_type_ids", "attention_mask", "labels"):
            np.testing.assert_array_equal(batch[key][row, length - n:], x[key])
        assert (batch["input_ids"][row, :length - n] == config.pad_token_id).all()
        assert (batch["attention_mask"][row, :length - n] == 0).all()
        assert (batch["token_type_ids"][row, :length - n] == 0).all()
        assert (batch["labels"][row, :length - n] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (2, 3, config.vision.image_size, config.vision.image_size)
    np.testing.assert_array_equal(batch["pixel_values"][0], with_image["pixel_values"])
    assert not batch["pixel_values"][1].any()


def test_pad_batch_without_images_or_labels():
    rows = [{"input_ids": np.array([1, 5, 6], np.int32), "token_type_ids": np.zeros(3, np.int32),
             "attention_mask": np.ones(3, np.int32), "pixel_values": None},
            {"input_ids": np.array([1, 7], np.int32), "token_type_ids": np.zeros(2, np.int32),
             "attention_mask": np.ones(2, np.int32), "pixel_values": None}]
    batch = pad_batch(rows, pad_id=0)
    assert batch["pixel_values"] is None and "labels" not in batch
    np.testing.assert_array_equal(batch["input_ids"], [[1, 5, 6], [0, 1, 7]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="shorter"):
        pad_batch(rows, pad_id=0, length=2)
    with pytest.raises(ValueError, match="labels"):
        pad_batch([rows[0], {**rows[1], "labels": np.array([-100, 7], np.int32)}], pad_id=0)


def test_history_that_is_not_pairs_is_named():
    assert build_prompt("Q?", iter([("a?", "b")])) == "Question: a? Answer: b\nQuestion: Q? Answer:"
    for bad in ("red", ["red"], [("q", "a", "cat.png", "extra")], [["q"]]):
        with pytest.raises(ValueError, match="history must be a sequence of \\(question, answer\\) or "
                                             "\\(question, answer, image\\) turns"):
            build_prompt("Q?", bad)
