"""Grounding: box text <-> pixel boxes, drawing them, the grounding presets, and ``generate --boxes-out``."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax import cli
from cogvlm_jax.config import preset
from cogvlm_jax.grounding import (CAPTION_PROMPT, LOCATE_PROMPT, PALETTE, draw_boxes, format_boxes, is_grounding,
                                  parse_boxes, parse_relative)
from cogvlm_jax.inputs.preprocess import build_prompt
from conftest import fixture_dir


# ------------------------------------------------------------------------------------------ parsing
def test_one_box_maps_thousandths_to_the_pixels_that_cover_them():
    # 2000 x 1000: a thousandth is 2 pixels wide and 1 high; x1, y1 are exclusive ends.
    assert parse_boxes("a dog [[100,200,299,699]] sits", (2000, 1000)) == [(200, 200, 600, 700)]
    assert parse_boxes("[[000,000,999,999]]", (490, 333)) == [(0, 0, 490, 333)]  # the whole picture
    # 490 wide: 0.49 pixels per thousandth, floored at the start, ceiled at the end
    assert parse_boxes("[[001,001,001,001]]", (490, 490)) == [(0, 0, 1, 1)]
    assert parse_boxes("[[500,500,509,509]]", (490, 490)) == [(245, 245, 250, 250)]


def test_multi_box_groups_and_several_groups_keep_their_order():
    text = "Two cats [[010,020,300,400;600,100,990,500]] on a sofa [[000,500,999,999]]."
    assert parse_relative(text) == [(10, 20, 300, 400), (600, 100, 990, 500), (0, 500, 999, 999)]
    assert parse_boxes(text, (1000, 1000)) == [(10, 20, 301, 401), (600, 100, 991, 501), (0, 500, 1000, 1000)]


def test_out_of_range_is_clamped_and_swapped_corners_are_ordered():
    assert parse_relative("[[1000,0,1234,5]]") == [(999, 0, 999, 5)]
    assert parse_relative("[[ 300 , 400 ,100,200 ]]") == [(100, 200, 300, 400)]
    assert parse_boxes("[[999,999,999,999]]", (100, 50)) == [(99, 49, 100, 50)]


@pytest.mark.parametrize("text", [
    "", "no boxes here", "[[]]", "[[1,2,3]]", "[[1,2,3,4,5]]", "[[a,b,c,d]]", "[[1.5,2,3,4]]", "[[-1,0,5,5]]",
    "[[12345,0,1,1]]", "[[1,2,3,4", "1,2,3,4]]", "[1,2,3,4]", "[[1,2;3,4]]", "[[10,20]]", "[[1,,2,3,4]]",
    "[[1,2,3,4,]]", "[[\n]]", "[[;;;]]", "[[" * 500, "[[\u0663,1,2,3]]",
])
def test_malformed_box_text_is_ignored(text):
    assert parse_boxes(text, (640, 480)) == []


def test_a_malformed_member_drops_only_itself():
    assert parse_relative("[[10,20,30,40;bad;5,6;50,60,70,80]] [[x]] [[1,1,2,2]]") == [
        (10, 20, 30, 40), (50, 60, 70, 80), (1, 1, 2, 2)]


def test_random_text_never_raises_and_boxes_stay_inside_the_picture():
    rng = random.Random(0)
    alphabet = "[[]],;;0123456789 9a-.\n"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        size = (rng.randint(1, 3000), rng.randint(1, 3000))
        for x0, y0, x1, y1 in parse_boxes(text, size):
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1], (text, size)


@pytest.mark.parametrize("size", [(0, 10), (10,), "640x480", (10.0, 10), (True, 5), None])
def test_a_bad_image_size_names_itself(size):
    with pytest.raises(ValueError, match="image_size"):
        parse_boxes("[[1,2,3,4]]", size)


def test_a_non_text_answer_is_a_type_error():
    with pytest.raises(TypeError, match="text"):
        parse_boxes(b"[[1,2,3,4]]", (10, 10))


# --------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("size", [(1000, 1000), (2000, 3000), (4000, 1000)])
def test_text_round_trips_exactly_where_thousandths_are_whole_pixels(size):
    text = "[[086,540,400,760;000,000,999,999;500,001,501,002]]"
    assert format_boxes(parse_boxes(text, size), size) == text


@pytest.mark.parametrize("size", [(490, 490), (1344, 1344), (37, 911), (1, 1)])
def test_pixel_boxes_round_trip_to_a_covering_box_within_a_thousandth(size):
    w, h = size
    rng = np.random.default_rng(sum(size))
    boxes = []
    for _ in range(50):
        xs, ys = np.sort(rng.integers(0, w + 1, 2)), np.sort(rng.integers(0, h + 1, 2))
        if xs[0] < xs[1] and ys[0] < ys[1]:
            boxes.append(tuple(int(v) for v in (xs[0], ys[0], xs[1], ys[1])))
    boxes.append((0, 0, w, h))
    back = parse_boxes(format_boxes(boxes, size), size)
    assert len(back) == len(boxes)
    for (x0, y0, x1, y1), (a0, b0, a1, b1) in zip(boxes, back):
        assert a0 <= x0 and b0 <= y0 and a1 >= x1 and b1 >= y1  # covers the box
        # each edge moves out by less than a thousandth of its side plus the pixel the rounding takes
        assert max(x0 - a0, a1 - x1) < w / 1000 + 1 and max(y0 - b0, b1 - y1) < h / 1000 + 1


def test_format_refuses_a_box_outside_the_picture():
    with pytest.raises(ValueError, match="not inside a 100x50 image"):
        format_boxes([(0, 0, 101, 10)], (100, 50))
    with pytest.raises(ValueError, match="x0 < x1"):
        format_boxes([(5, 0, 5, 10)], (100, 50))


def test_drawn_outlines_lie_on_the_box_edges_and_nowhere_else():
    grey = (128, 128, 128)
    img = Image.new("RGB", (400, 300), grey)
    text = "[[100,100,499,499;600,600,899,899]]"
    boxes = parse_boxes(text, img.size)
    assert boxes == [(40, 30, 200, 150), (240, 180, 360, 270)]
    out = np.asarray(draw_boxes(img, boxes, width=3))
    assert out.shape == (300, 400, 3) and (np.asarray(img) == grey).all()  # the input is left as it was
    drawn = np.zeros((300, 400), bool)
    for (x0, y0, x1, y1), colour in zip(boxes, PALETTE):
        ring = np.zeros((300, 400), bool)
        ring[y0:y1, x0:x1] = True
        ring[y0 + 3:y1 - 3, x0 + 3:x1 - 3] = False
        assert (out[ring] == colour).all()
        drawn |= ring
    assert (out[~drawn] == grey).all()


def test_drawing_keeps_the_size_and_mode_of_any_picture():
    img = Image.new("L", (33, 17), 200)
    out = draw_boxes(img, parse_boxes("[[000,000,999,999]]", img.size))
    assert out.size == (33, 17) and out.mode == "RGB" and out.getpixel((0, 0)) == PALETTE[0]
    assert out.getpixel((16, 8)) == (200, 200, 200)


# ---------------------------------------------------------------------------------- the checkpoints
@pytest.mark.parametrize("name", ["cogvlm-grounding-generalist-hf", "cogvlm-grounding-base-hf"])
def test_grounding_checkpoints_are_cogvlm1_with_the_bare_query_as_prompt(name):
    cfg = preset(name)
    assert cfg.family == "cogvlm1" and cfg.template_version == "base" and is_grounding(cfg)
    assert cfg.num_image_tokens == 1227 and cfg.eos_token_ids == (2,)
    assert build_prompt(CAPTION_PROMPT, (), cfg.template_version) == CAPTION_PROMPT
    assert LOCATE_PROMPT.format("the red cup") == "Where is the red cup? answer in [[x0,y0,x1,y1]] format."


def test_chat_checkpoints_are_not_grounding():
    assert not is_grounding(preset("cogvlm-chat-hf")) and not is_grounding(preset("cogvlm2-llama3-chat-19B"))


# --------------------------------------------------------------------------------------------- CLI
def _generate_args(image, *extra):
    d = fixture_dir("cogvlm1")
    return ["generate", "--model", os.path.join(d, "checkpoint"), "--tokenizer", os.path.join(d, "tokenizer"),
            "--image", image, "--prompt", "Where is the dog?", "--max-new-tokens", "2", *extra]


def test_generate_boxes_out_draws_the_answers_boxes_on_the_input_picture(tmp_path, monkeypatch, capsys):
    """The fixture model's answer replaced by a grounding answer: the file is the input picture, at its
    size, with outlines exactly where the boxes are."""
    import cogvlm_jax.api

    answer = "A dog [[100,200,499,699]] and a ball [[600,600,799,899]]."
    monkeypatch.setattr(cogvlm_jax.api.Model, "stream", lambda self, *a, **k: iter([answer[:9], answer[9:]]))
    src = Image.new("RGB", (300, 200), (250, 250, 250))
    src.save(tmp_path / "in.png")
    out = tmp_path / "boxes.png"
    args = cli.build_parser().parse_args(_generate_args(str(tmp_path / "in.png"), "--boxes-out", str(out)))
    assert cli.cmd_generate(args) == 0
    captured = capsys.readouterr()
    assert captured.out == answer + "\n" and f"2 boxes drawn in {out}" in captured.err
    got = Image.open(out)
    assert got.size == src.size
    assert np.array_equal(np.asarray(got), np.asarray(draw_boxes(src, parse_boxes(answer, src.size))))
    changed = np.any(np.asarray(got) != np.asarray(src), axis=-1)
    (x0, y0, x1, y1), (u0, v0, u1, v1) = parse_boxes(answer, src.size)
    assert changed[y0, x0] and changed[y1 - 1, x1 - 1] and changed[v0, u1 - 1] and changed.sum() > 0
    changed[y0:y1, x0:x1] = changed[v0:v1, u0:u1] = False
    assert not changed.any()  # nothing drawn outside the boxes
    assert set(os.listdir(tmp_path)) == {"in.png", "boxes.png"}  # no temporary left beside it


@pytest.mark.parametrize("extra, message", [
    ([], "--boxes-out needs --image"),
    (["--image", "IMG"], "unknown image extension"),
    (["--image", "IMG"], "does not exist"),
])
def test_boxes_out_mistakes_are_named_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, message):
    img = os.path.join(fixture_dir("cogvlm1"), "images", "img0.png")
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model loaded before the mistake was named"))
    monkeypatch.setattr(cli.compile_cache, "enable", lambda: None)
    dest = {"unknown image extension": tmp_path / "out.txt", "does not exist": tmp_path / "no" / "out.png"}
    argv = ["generate", "--prompt", "hi", "--boxes-out", str(dest.get(message, tmp_path / "out.png"))]
    argv += [img if a == "IMG" else a for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm-jax generate: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.png").exists()
