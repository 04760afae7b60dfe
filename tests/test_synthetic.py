"""The synthetic visual QA generator (``cogvlm_jax.recipes.synthetic``): reproducible examples whose answers are
right for their scenes, and its JSONL writer for ``cogvlm-jax train``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cogvlm_jax.recipes import synthetic


def test_generator_is_deterministic_and_answers_are_right():
    a, b = synthetic.examples(3, 20), synthetic.examples(3, 20)
    assert a == b
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a[:5], b[:5]))
    assert synthetic.example(3, 7) == a[7]  # random access: example i does not depend on the others
    c = synthetic.examples(4, 20)
    assert [e.query for e in c] != [e.query for e in a]
    for e in synthetic.examples(11, 200):
        kinds = [s.kind for s in e.scene.shapes]
        colors = [s.color for s in e.scene.shapes]
        words = e.query.rstrip("?.").split()
        if e.query.startswith(("How many", "Count")):
            shape = next(s for s in synthetic.SHAPES if s + "s" in words)
            assert e.answer == str(kinds.count(shape))
        elif "color" in words:
            (s,) = [s for s in e.scene.shapes if s.kind in words]
            assert e.answer == s.color and kinds.count(s.kind) == 1
        elif "shape" in words or "Which" in words:
            (s,) = [s for s in e.scene.shapes if s.color in words]
            assert e.answer == s.kind and colors.count(s.color) == 1
        else:
            (s,) = [s for s in e.scene.shapes if s.kind in words]
            assert e.answer == synthetic.region(*s.center)
    assert synthetic.region(0.1, 0.1) == "top left" and synthetic.region(0.5, 0.9) == "bottom"
    assert synthetic.region(0.5, 0.5) == "center" and synthetic.region(0.9, 0.5) == "right"
    assert synthetic.exact_match(" Red.", "red") and not synthetic.exact_match("top", "top left")
    # kind_of names the kind of every wording the generator asks, and refuses anything else
    assert {synthetic.kind_of(q) for q in synthetic.all_questions()} == set(synthetic.QUESTION_KINDS)
    assert [synthetic.kind_of(e.query) for e in synthetic.examples(11, 40, kind="where")] == ["where"] * 40
    with pytest.raises(ValueError, match="not a question the generator asks"):
        synthetic.kind_of("What is the meaning of life?")
    items = synthetic.examples(12, 8)
    by_kind = synthetic.right_by_kind(items, [e.answer if i % 2 else "nonsense" for i, e in enumerate(items)])
    assert sum(len(v) for v in by_kind.values()) == 8 and sum(sum(v) for v in by_kind.values()) == 4
    assert list(by_kind) == sorted(by_kind)


def test_write_jsonl_records(tmp_path):
    path = synthetic.write_jsonl(str(tmp_path), 6, seed=5, history_prob=1.0, progress=False)
    records = [json.loads(line) for line in open(path)]
    assert len(records) == 6
    for i, r in enumerate(records):
        assert set(r) == {"image", "query", "answer", "history"}
        e = synthetic.example(5, i, history_prob=1.0)
        assert (r["query"], r["answer"], r["history"]) == (e.query, e.answer, [list(h) for h in e.history])
        assert len(r["history"]) == 1
        saved = np.asarray(Image.open(os.path.join(tmp_path, r["image"])).convert("RGB"))
        assert np.array_equal(saved, np.asarray(e.image))
