"""JSONL training data: every bad record is named by file and line; batches are static, complete, exact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import fixture_dir, huge_png
from PIL import Image

from cogvlm_jax.config import load_config
from cogvlm_jax.inputs.preprocess import IGNORE_INDEX, build_inputs, pad_batch
from cogvlm_jax.inputs.tokenizer import load_tokenizer
from cogvlm_jax.training.data import Batches, DataError, read_jsonl

GOOD = [
    {"image": "imgs/red.png", "query": "What color is it?", "answer": "red"},
    {"query": "Say hi to everyone", "answer": "hi there all of you", "history": [["a", "b"]]},
    {"image": "imgs/blue.png", "query": "Is it blue?", "answer": "yes, it is blue"},
    {"query": "Count to three", "answer": "one two three", "image": None},
    {"image": "imgs/red.png", "query": "Is it blue?", "answer": "no"},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    os.makedirs(d / "imgs")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(d / "imgs" / "red.png")
    Image.new("RGB", (30, 40), (0, 0, 255)).save(d / "imgs" / "blue.png")
    (d / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "imgs" / "huge.png").write_bytes(huge_png(7000, 6000))
    tok = load_tokenizer(os.path.join(fixture_dir("cogvlm1"), "tokenizer"))
    cfg = load_config(os.path.join(fixture_dir("cogvlm1"), "checkpoint"))
    return d, tok, cfg


def _write(path, lines):
    """A JSONL file of ``lines``: objects (as JSON), strings, or bytes written as they are."""
    with open(path, "wb") as f:
        for line in lines:
            line = line if isinstance(line, (str, bytes)) else json.dumps(line)
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return str(path)


def test_records_read_and_measured(env):
    d, tok, cfg = env
    path = _write(d / "good.jsonl", GOOD[:2] + [""] + GOOD[2:])  # a blank line is skipped
    recs = read_jsonl(path, tok, cfg)
    assert [r.source for r in recs] == [f"{path}:{n}" for n in (1, 2, 4, 5, 6)]
    assert recs[0].image == str(d / "imgs" / "red.png") and recs[1].image is None
    assert recs[1].history == (("a", "b"),)
    for r in recs:  # the length is what build_inputs makes, image slots included
        x = build_inputs(tok, cfg, r.query, r.history, r.image, answer=r.answer)
        assert r.length == len(x["input_ids"])


BAD = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"answer": "x"}, "missing field 'query'"),
    ({"query": "q", "answer": 3}, "field 'answer' must be a string"),
    ({"query": "q", "answer": "a", "history": [["only one"]]}, "field 'history' must be a list"),
    ({"query": "q", "answer": "a", "history": {}}, "field 'history' must be a list"),
    ({"query": "q", "answer": "a", "picture": "x.png"}, "unknown field(s) picture"),
    ({"query": "q", "answer": "a", "image": 5}, "field 'image' must be a path"),
    ({"query": "q", "answer": "a", "image": "imgs/missing.png"}, "not found"),
    ({"query": "q", "answer": "a", "image": "imgs/broken.png"}, "cannot read image"),
    ({"query": "q", "answer": "a", "image": "imgs/huge.png"}, "is 7000x6000 = 42.0 megapixels, over the limit"),
    ({"query": "q", "answer": "word " * 3000}, "exceed the context length 2048"),
    (b'{"query": "caf\xe9", "answer": "a"}', "not valid UTF-8"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_record_names_file_and_line(env, bad, message):
    d, tok, cfg = env
    path = _write(d / "bad.jsonl", [GOOD[0], GOOD[1], bad, GOOD[2]])
    with pytest.raises(DataError) as e:
        read_jsonl(path, tok, cfg)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)


def test_history_with_base_template_and_empty_file(env):
    d, tok, cfg = env
    path = _write(d / "base.jsonl", [GOOD[0], GOOD[1]])
    with pytest.raises(DataError, match=r"base.jsonl:2: has a history"):
        read_jsonl(path, tok, cfg, template="base")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(_write(d / "empty.jsonl", ["", "  "]), tok, cfg)


def test_batches_static_complete_and_exact(env):
    d, tok, cfg = env
    recs = read_jsonl(_write(d / "good.jsonl", GOOD), tok, cfg)
    batches = Batches(recs, tok, cfg, batch_size=2, seed=3)
    lengths = sorted({r.length for r in recs})
    assert batches.buckets == tuple(sorted({max(16, 1 << (n - 1).bit_length()) for n in lengths}))  # all <= 64
    plan = batches.plan(0)
    assert len(plan) == batches.steps_per_epoch
    assert sorted(i for _, idx in plan for i in idx) == list(range(len(recs)))  # each record once an epoch
    assert batches.plan(0) == Batches(recs, tok, cfg, 2, seed=3).plan(0)         # a function of (seed, epoch)
    assert batches.plan(1) != plan or batches.plan(2) != plan
    seen = 0
    for k, (length, idx) in enumerate(plan):
        b = batches.batch(k)
        assert b["input_ids"].shape == b["labels"].shape == (2, length)
        assert b["pixel_values"].shape == (2, 3, 28, 28)  # always present: one shape per bucket
        rows = [build_inputs(tok, cfg, recs[i].query, recs[i].history, recs[i].image, answer=recs[i].answer)
                for i in idx]
        want = pad_batch(rows, cfg.pad_token_id, length)
        for key in ("input_ids", "token_type_ids", "attention_mask", "labels"):
            np.testing.assert_array_equal(b[key][:len(idx)], want[key][:len(idx)])
        if len(idx) < 2:  # the filler row trains nothing
            assert (b["labels"][len(idx):] == IGNORE_INDEX).all()
            assert b["attention_mask"][len(idx):].sum() > 0
        seen += len(idx)
    assert seen == len(recs)
    # Global step k of epoch 1 is batch k - steps_per_epoch of plan(1).
    k = batches.steps_per_epoch
    length, idx = batches.plan(1)[0]
    assert batches.batch(k)["input_ids"].shape[1] == length


def test_image_unreadable_at_batch_time_names_the_line(env):
    d, tok, cfg = env
    img = d / "imgs" / "late.png"
    Image.new("RGB", (8, 8), (0, 255, 0)).save(img)
    path = _write(d / "late.jsonl", [{"image": "imgs/late.png", "query": "q", "answer": "a"}])
    batches = Batches(read_jsonl(path, tok, cfg), tok, cfg, batch_size=1)
    img.write_bytes(b"gone bad")
    with pytest.raises(DataError, match=r"late.jsonl:1: cannot read image"):
        batches.batch(0)


def test_reading_shows_progress(env, capsys):
    d, tok, cfg = env
    path = _write(d / "progress.jsonl", GOOD)
    assert len(read_jsonl(path, tok, cfg, progress=True)) == len(GOOD)
    err = capsys.readouterr().err
    assert "reading progress.jsonl" in err and "100%" in err, err
    read_jsonl(path, tok, cfg)
    assert capsys.readouterr().err == ""


def test_long_records_are_bucketed_by_the_ladder(env, tmp_path):
    """Past 64 tokens a record is padded to the next multiple of 64 (not to the next power of two)."""
    d, tok, cfg = env
    lines = [{"query": "Count", "answer": " ".join(["one"] * k)} for k in (70, 110, 150)]
    recs = read_jsonl(_write(tmp_path / "long.jsonl", lines), tok, cfg)
    batches = Batches(recs, tok, cfg, batch_size=1, seed=0)
    lengths = [r.length for r in recs]
    assert all(64 < n for n in lengths) and max(lengths) < cfg.context_length, lengths
    assert batches.buckets == tuple(sorted({-(-n // 64) * 64 for n in lengths})), (lengths, batches.buckets)
