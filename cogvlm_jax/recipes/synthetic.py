"""Synthetic visual question answering: scenes of coloured shapes, questions about them, short answers.

Every example is a pure function of ``(seed, index)``: ``example(seed, i)`` draws its scene and question
from ``numpy.random.default_rng([seed, i])``, so a data set is reproducible, can be read in any order,
and a different seed gives fresh questions.

Scenes: 1-3 shapes (circle, square, triangle) in six colours, filled or outlined, of varied sizes, on
a white, grey or pastel background, with optional light pixel noise, drawn with PIL on a canvas of
56-160 pixels (supersampled, so edges are anti-aliased). Object centres keep clear of the lines that
split the picture into thirds, so "where" has one right answer.

Questions (answers are one or two lowercase words)::

    What color is the circle?            -> red              (the shape is unique in the scene)
    What shape is the blue object?       -> triangle         (the colour is unique in the scene)
    How many squares are there?          -> 2                (0-3)
    Where is the circle?                 -> top right        (left / right / top / bottom / center / corners)

``write_jsonl`` writes a data set as PNGs plus JSONL records ``{"image", "query", "answer", "history"}``;
``score`` answers a list of examples in batches through ``Model.generate`` and counts exact matches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from cogvlm_jax import files
from cogvlm_jax.inputs.preprocess import build_prompt, pad_batch

SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> base RGB; each object jitters it a little
    "red": (220, 30, 35),
    "green": (35, 160, 55),
    "blue": (35, 70, 220),
    "yellow": (240, 205, 25),
    "orange": (245, 135, 25),
    "purple": (140, 45, 185),
}
COUNT_WORDS = ("0", "1", "2", "3")
QUESTION_KINDS = ("color", "shape", "count", "where")
MAX_OBJECTS = 3
CANVAS_RANGE = (56, 160)
SUPERSAMPLE = 2

_PLURAL = {s: s + "s" for s in SHAPES}
_TEMPLATES = {
    "color": ("What color is the {shape}?", "Which color is the {shape}?", "What is the color of the {shape}?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?", "What is the {color} shape?"),
    "count": ("How many {shapes} are there?", "How many {shapes} are in the picture?", "Count the {shapes}."),
    "where": ("Where is the {shape}?", "Where is the {shape} in the picture?", "In which part of the image is the {shape}?"),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # one of COLORS
    rgb: tuple[int, int, int]
    center: tuple[float, float]  # (x, y) as fractions of the canvas width / height
    size: float  # outer diameter as a fraction of the canvas side
    outline: float  # 0 = filled, else the stroke width as a fraction of the size


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    canvas: int  # side in pixels
    noise: float  # standard deviation of the added pixel noise (0-255 scale)
    noise_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Example:
    scene: Scene
    query: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()

    @property
    def image(self) -> Image.Image:
        return render(self.scene)


# ----------------------------------------------------------------------------------------- scenes
def region(x: float, y: float) -> str:
    """The answer to "where": the third of the picture the point (x, y) lies in, as words."""
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    return " ".join(w for w in (row, col) if w) or "center"


def _clear_of_thirds(v: float, margin: float) -> bool:
    return abs(v - 1 / 3) > margin and abs(v - 2 / 3) > margin


def random_scene(rng: np.random.Generator, num_shapes: int | None = None, max_shapes: int = MAX_OBJECTS) -> Scene:
    """A scene of ``num_shapes`` objects (default: uniform in 1..max_shapes)."""
    n = int(rng.integers(1, max_shapes + 1)) if num_shapes is None else num_shapes
    lo, hi = {1: (0.25, 0.6), 2: (0.2, 0.38)}.get(n, (0.18, 0.3))
    shapes: list[Shape] = []
    names = list(COLORS)
    tries = 0
    while len(shapes) < n:
        tries += 1
        if tries % 500 == 0:  # boxed in: start the layout again
            shapes = []
        size = float(rng.uniform(lo, hi))
        r = size / 2
        x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
        if not (_clear_of_thirds(x, 0.05) and _clear_of_thirds(y, 0.05)):
            continue
        if any(math.hypot(x - s.center[0], y - s.center[1]) < r + s.size / 2 + 0.03 for s in shapes):
            continue
        color = names[int(rng.integers(len(names)))]
        rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
        outline = float(rng.uniform(0.12, 0.22)) if rng.random() < 0.25 else 0.0
        shapes.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], color, rgb, (x, y), size, outline))
    u = rng.random()
    if u < 0.4:
        background = (255, 255, 255)
    elif u < 0.6:
        g = int(rng.integers(200, 250))
        background = (g, g, g)
    else:  # a pale tint
        background = tuple(int(v) for v in rng.integers(205, 256, size=3))
    canvas = int(rng.integers(CANVAS_RANGE[0], CANVAS_RANGE[1] + 1))
    noise = float(rng.uniform(2, 10)) if rng.random() < 0.4 else 0.0
    return Scene(tuple(shapes), background, canvas, noise, int(rng.integers(2**31)))


def shape_polygon(kind: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Vertices of an upright square or an upward triangle with corners at ``radius`` from the centre."""
    first, n = {"square": (45, 4), "triangle": (-90, 3)}[kind]
    return [(cx + radius * math.cos(math.radians(first + 360 * k / n)),
             cy + radius * math.sin(math.radians(first + 360 * k / n))) for k in range(n)]


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image of ``scene.canvas`` pixels a side."""
    big = scene.canvas * SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, radius = s.center[0] * big, s.center[1] * big, s.size * big / 2
        if s.kind == "square":
            radius *= 0.85  # a square's corners reach further than a circle of the same size
        width = 0 if s.outline == 0 else max(SUPERSAMPLE, round(s.outline * s.size * big))
        if s.kind == "circle":
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            draw.ellipse(box, fill=None if width else s.rgb, outline=s.rgb if width else None, width=width)
        else:
            pts = shape_polygon(s.kind, cx, cy, radius)
            if width:
                draw.line(pts + pts[:1], fill=s.rgb, width=width, joint="curve")
            else:
                draw.polygon(pts, fill=s.rgb)
    img = img.resize((scene.canvas, scene.canvas), Image.BOX)
    if scene.noise:
        rng = np.random.default_rng(scene.noise_seed)
        noise = rng.standard_normal((scene.canvas, scene.canvas, 3), np.float32) * np.float32(scene.noise)
        arr = np.asarray(img, np.float32) + noise
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


# -------------------------------------------------------------------------------------- questions
def answerable(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every (query slot, answer) the scene supports, per question kind (unique referents only)."""
    kinds = [s.kind for s in scene.shapes]
    colors = [s.color for s in scene.shapes]
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in QUESTION_KINDS}
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            out["color"].append((s.kind, s.color))
            out["where"].append((s.kind, region(*s.center)))
        if colors.count(s.color) == 1:
            out["shape"].append((s.color, s.kind))
    for kind in SHAPES:
        out["count"].append((kind, COUNT_WORDS[kinds.count(kind)]))
    return out


def ask(kind: str, slot: str, template: int = 0) -> str:
    return _TEMPLATES[kind][template].format(shape=slot, color=slot, shapes=_PLURAL.get(slot, slot))


def _question(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, str] | None:
    options = answerable(scene)
    kinds = [k for k in QUESTION_KINDS if options[k]] if kind is None else [kind]
    kind = kinds[int(rng.integers(len(kinds)))]
    if not options[kind]:
        return None
    if kind == "count":  # ask mostly about shapes that are there, sometimes about one that is not
        present = [o for o in options[kind] if o[1] != "0"]
        pool = present if present and rng.random() < 0.85 else options[kind]
    else:
        pool = options[kind]
    slot, answer = pool[int(rng.integers(len(pool)))]
    template = 0 if rng.random() < 0.6 else int(rng.integers(len(_TEMPLATES[kind])))
    return ask(kind, slot, template), answer


def example(seed: int, index: int, kind: str | None = None, history_prob: float = 0.0,
            max_shapes: int = MAX_OBJECTS, turns: int = 1) -> Example:
    """Example ``index`` of the data set ``seed``: a scene, a question about it, its answer.

    ``kind`` fixes the question kind of the last question (the scene is redrawn until it supports
    one). ``turns`` > 1 puts ``turns - 1`` earlier questions about the same scene, answered correctly,
    in the history; with probability ``history_prob`` there is at least one. ``max_shapes`` caps the
    number of objects (a training curriculum starts with easy scenes).
    """
    rng = np.random.default_rng([seed, index])
    while True:
        scene = random_scene(rng, max_shapes=max_shapes)
        qa = _question(scene, rng, kind)
        if qa is not None:
            break
    n_history = turns - 1
    if history_prob and rng.random() < history_prob:
        n_history = max(n_history, 1)
    history = tuple(_question(scene, rng) for _ in range(n_history))
    return Example(scene, qa[0], qa[1], history)


def examples(seed: int, n: int, start: int = 0, **kw) -> list[Example]:
    return [example(seed, i, **kw) for i in range(start, start + n)]


def all_questions() -> list[str]:
    """Every question the generator can ask, each wording."""
    slots = {"color": SHAPES, "shape": tuple(COLORS), "count": SHAPES, "where": SHAPES}
    return [ask(kind, slot, t) for kind, fills in slots.items() for t in range(len(_TEMPLATES[kind])) for slot in fills]


def kind_of(query: str) -> str:
    """The question kind (one of ``QUESTION_KINDS``) of a query the generator asks."""
    if not _KIND_OF:
        slots = {"color": SHAPES, "shape": tuple(COLORS), "count": SHAPES, "where": SHAPES}
        _KIND_OF.update({ask(k, slot, t): k for k, fills in slots.items() for t in range(len(_TEMPLATES[k]))
                         for slot in fills})
    if query not in _KIND_OF:
        raise ValueError(f"{query!r} is not a question the generator asks")
    return _KIND_OF[query]


_KIND_OF: dict[str, str] = {}


def all_answers() -> list[str]:
    """Every answer the generator can give."""
    regions = sorted({region(x, y) for x in (0.1, 0.5, 0.9) for y in (0.1, 0.5, 0.9)})
    return [*COLORS, *SHAPES, *COUNT_WORDS, *regions]


def corpus() -> Iterator[str]:
    """The task's text in the prompt templates, with and without a history turn (the tokenizer's
    training text), and every answer on its own (as the answer follows the prompt)."""

    answers = all_answers()
    for q in all_questions():
        for template in ("chat", "vqa"):
            yield build_prompt(q, (), template)
            for a in answers:
                yield build_prompt(q, ((q, a),), template) + " " + a
    yield from answers


def example_picture(canvas: int = 224) -> Image.Image:
    """The README's picture: one red circle in the middle of a white canvas."""
    circle = Shape("circle", "red", COLORS["red"], (0.5, 0.5), 0.5, 0.0)
    return render(Scene((circle,), (255, 255, 255), canvas, 0.0))


# ---------------------------------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """Lowercase, outer whitespace and a final full stop removed, inner whitespace collapsed."""
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def answer_batch(model, queries: Sequence[tuple], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers to ``(image, query[, history])`` tuples, as one left-padded batch through
    ``model.generate``."""

    inputs = [model.build_inputs(q[1], q[2] if len(q) > 2 else (), image=q[0]) for q in queries]
    batch = pad_batch(inputs, model.config.pad_token_id)
    ids = model.generate(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                         batch["pixel_values"], max_new_tokens=max_new_tokens)
    return [model.tokenizer.decode(model._text_stop(row)) for row in ids]


def score(model, items: Sequence[Example], batch_size: int = 25, max_new_tokens: int = 4):
    """(fraction answered exactly right, predictions) for ``items``, answered in batches."""
    preds: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        preds += answer_batch(model, [(render(e.scene), e.query, e.history) for e in chunk], max_new_tokens)
    right = sum(exact_match(p, e.answer) for p, e in zip(preds, items))
    return right / max(len(items), 1), preds


def right_by_kind(items: Sequence[Example], preds: Sequence[str]) -> dict[str, list[bool]]:
    """Whether each prediction is right, grouped by its question's kind (``kind_of``), kinds sorted."""
    right: dict[str, list[bool]] = {}
    for e, pred in zip(items, preds):
        right.setdefault(kind_of(e.query), []).append(exact_match(pred, e.answer))
    return dict(sorted(right.items()))


# ------------------------------------------------------------------------------------------ JSONL
def write_jsonl(out_dir: str, n: int, seed: int, history_prob: float = 0.0, progress: bool = True) -> str:
    """Write ``n`` examples as ``out_dir/images/NNNNNN.png`` and ``out_dir/data.jsonl`` (atomically).

    Records: ``{"image": "images/NNNNNN.png", "query": ..., "answer": ..., "history": [[q, a], ...]}``;
    image paths are relative to the JSONL file. Returns the JSONL path.
    """

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "data.jsonl")
    with files.atomic_file(path) as f:
        for i in tqdm(range(n), desc="writing examples", disable=not progress):
            e = example(seed, i, history_prob=history_prob)
            name = f"images/{i:06d}.png"
            render(e.scene).save(os.path.join(out_dir, name))
            f.write(json.dumps({"image": name, "query": e.query, "answer": e.answer,
                                "history": [list(h) for h in e.history]}) + "\n")
    return path
