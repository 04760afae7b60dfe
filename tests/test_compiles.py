"""Slow compiles are said: one line per compile of a model program (what, its shapes, the seconds), from
``program.jit`` for generate's programs, the serving engine's and the train step; none for a call that
finds its program compiled. ``compiles.SLOW_S`` is set to 0 here so that the tiny programs count."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LINEAR_TRAIN, write_train_data

import cogvlm_jax
from cogvlm_jax.generation.buckets import bucket_length
from cogvlm_jax.parallel import compiles, program

LINE = re.compile(r"^compiled (.+) in (\d+\.\d) s$")


def _said(capsys) -> list[str]:
    """What the compile lines named since the last call (their seconds checked and dropped)."""
    out = []
    for line in capsys.readouterr().err.splitlines():
        m = LINE.match(line)
        if m:
            assert float(m.group(2)) >= 0
            out.append(m.group(1))
    return out


@pytest.fixture
def every_compile(monkeypatch):
    monkeypatch.setattr(compiles, "SLOW_S", 0.0)


def test_a_program_says_each_compile_once(every_compile, capsys):
    f = program.jit(lambda x: jnp.sin(x) * 2, describe=lambda x: f"sin ({x.shape[0]} values)")
    f(np.ones(3, np.float32))
    assert _said(capsys) == ["sin (3 values)"]
    f(np.zeros(3, np.float32))  # compiled already: nothing to say
    assert _said(capsys) == []
    f(np.ones(5, np.float32))
    assert _said(capsys) == ["sin (5 values)"]


def test_a_fast_compile_says_nothing(monkeypatch, capsys):
    monkeypatch.setattr(compiles, "SLOW_S", 3600.0)
    program.jit(lambda x: x + 1)(np.ones(7, np.float32))
    assert _said(capsys) == []


def test_a_description_that_fails_does_not_fail_the_call(every_compile, capsys):
    assert program.jit(lambda x: x * 3, describe=lambda x: 1 / 0)(np.ones(2, np.float32)).tolist() == [3, 3]
    assert _said(capsys) == ["a program (not described: ZeroDivisionError: division by zero)"]


@pytest.fixture(scope="module")
def shipped():
    return cogvlm_jax.load(progress=False)


def test_generate_says_its_prefill_and_decode_compiles(shipped, every_compile, capsys):
    # its own, uncompiled programs; no prefix cache (its programs: tests/test_prefix_cache.py)
    model = cogvlm_jax.Model(shipped.config, shipped.params, shipped.tokenizer, prefix_cache_bytes=0)
    capsys.readouterr()
    image = "cogvlm_jax/default_model/example.png"
    assert model.chat(image, "What color is the circle?", max_new_tokens=4) == "red"
    n = len(model.build_inputs("What color is the circle?", image=image)["input_ids"])
    said = _said(capsys)
    fixed = model.config.num_image_tokens  # an image prompt is padded by its text alone
    b = fixed + 16
    assert bucket_length(n, fixed=fixed) == b and b < bucket_length(n), (n, fixed)
    assert said[0] == f"prefill (1 x {b} tokens, images, cache {b + 16})", (n, said)
    assert said[1:] == [f"decode loop (1 row, cache {b + 16}, up to 4 tokens)"], said
    model.chat(image, "What shape is the red object?", max_new_tokens=4)  # the same bucket: compiled
    assert _said(capsys) == []


def test_the_engine_says_its_start_and_each_new_bucket(shipped, every_compile, capsys):
    from cogvlm_jax.serving.engine import Engine

    engine = Engine(shipped, slots=2, max_length=128, prefix_cache_bytes=0)
    assert engine.warm_up_programs() == "the decode chunk for 1, 2 busy slots"
    capsys.readouterr()
    with engine:
        assert _said(capsys) == ["decode chunk (1 of 2 slots, 4 steps)", "decode chunk (2 of 2 slots, 4 steps)"]
        for query, bucket in (("Where is it?", 16), ("Where is it? " * 8, 64), ("Is it here?", 16)):
            engine.complete(shipped.build_inputs(query), 2)
            assert _said(capsys) == ([f"insert (a prompt of bucket {bucket})"] if query != "Is it here?" else [])


def test_generate_and_the_engine_pad_a_long_prompt_to_the_next_multiple_of_64(shipped, every_compile, capsys):
    """A prompt of 129..192 tokens is prefilled at 192 (not at the power of two, 256): by ``generate`` and by
    the serving engine, the programs' own compile lines say so."""
    from cogvlm_jax.serving.engine import Engine

    query = "Where is it?"
    while len(shipped.build_inputs(query)["input_ids"]) <= 140:
        query += " Where is it?"
    n = len(shipped.build_inputs(query)["input_ids"])
    assert 140 < n <= 180, n
    model = cogvlm_jax.Model(shipped.config, shipped.params, shipped.tokenizer, prefix_cache_bytes=0)
    capsys.readouterr()
    model.chat(None, query, max_new_tokens=2)
    assert _said(capsys)[0] == "prefill (1 x 192 tokens, cache 208)"
    engine = Engine(shipped, slots=1, max_length=256, prefix_cache_bytes=0)
    with engine:
        capsys.readouterr()
        engine.complete(shipped.build_inputs(query), 2)
        assert _said(capsys) == ["insert (a prompt of bucket 192)"]


def test_the_first_train_step_says_its_compile(shipped, every_compile, capsys, tmp_path):
    from cogvlm_jax.training import trainer as train
    from cogvlm_jax.training.data import Batches, read_jsonl

    recs = read_jsonl(write_train_data(tmp_path), shipped.tokenizer, shipped.config)
    batches = Batches(recs, shipped.tokenizer, shipped.config, batch_size=2, seed=0)
    tr = train.Trainer(shipped.config, train.TrainConfig(**{**LINEAR_TRAIN, "learning_rate": 0.37}))  # its own step
    state, frozen = tr.init(shipped.params)
    capsys.readouterr()
    length = batches.plan(0)[0][0]
    state, _ = tr.step(state, frozen, tr.place_batch(batches.batch(0)))
    said = _said(capsys)
    assert len(said) == 1 and re.fullmatch(rf"train step \(1 x 2 x {length} tokens(, images)?\)", said[0]), said
