"""Grounding answers: CogVLM's box text <-> pixel boxes, and the picture with the boxes drawn.

The grounding checkpoints (``cogvlm-grounding-generalist-hf``, ``cogvlm-grounding-base-hf``: CogVLM-17B
weights, the ``base`` template, so the query is the whole prompt) write each box as ``[[x0,y0,x1,y1]]``
and the several boxes of one phrase as ``[[x0,y0,x1,y1;x0,y0,x1,y1]]``. A coordinate is an integer in
0-999 relative to the image: x in thousandths of its width, y of its height, origin top left.

Coordinate rule (one number names one thousandth ``[c/1000, (c+1)/1000)`` of a side): a pixel box is the
smallest one that covers the thousandths named, ``x0 = floor(c0 * W / 1000)`` and
``x1 = ceil((c1 + 1) * W / 1000)``, with ``x1``, ``y1`` exclusive (PIL's crop convention). So
``[[000,000,999,999]]`` is the whole image and every box is at least one pixel wide. A coordinate above
999 (a model writing 1000) is clamped to 999; corners given in the wrong order are put in order. Box
text that does not parse (not four integers of one to four digits, an unclosed bracket, a point
``[[x,y]]``) is skipped: parsing never fails on a model's answer.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from PIL import Image, ImageDraw

# The model cards' prompts: a caption with a box for every object it mentions, and the box of one
# referring expression.
CAPTION_PROMPT = ("Can you provide a description of the image and include the coordinates [[x0,y0,x1,y1]] for "
                  "each mentioned object?")
LOCATE_PROMPT = "Where is {}? answer in [[x0,y0,x1,y1]] format."

SCALE = 1000  # coordinates run 0..SCALE-1
_GROUP = re.compile(r"\[\[([^\[\]]*)\]\]")
_BOX = re.compile(r"\s*([0-9]{1,4})\s*,\s*([0-9]{1,4})\s*,\s*([0-9]{1,4})\s*,\s*([0-9]{1,4})\s*")  # ASCII digits
# Outline colours, cycled over the boxes of one picture.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))

Box = tuple[int, int, int, int]


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        w, h = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise ValueError(f"image_size must be two positive integers (width, height), got {image_size!r}")
    return w, h


def is_grounding(config) -> bool:
    """Whether a config names one of the grounding checkpoints (their ``_name_or_path``)."""
    return config.family == "cogvlm1" and "grounding" in config.name


def parse_relative(text: str) -> list[tuple[int, int, int, int]]:
    """The boxes of ``text`` in 0-999 coordinates, in order, clamped and ordered as the module says."""
    if not isinstance(text, str):
        raise TypeError(f"expected the answer's text, got {type(text).__name__}")
    boxes = []
    for group in _GROUP.finditer(text):
        for member in group.group(1).split(";"):
            found = _BOX.fullmatch(member)
            if found is None:
                continue
            x0, y0, x1, y1 = (min(int(v), SCALE - 1) for v in found.groups())
            boxes.append((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return boxes


def parse_boxes(text: str, image_size: Sequence[int]) -> list[Box]:
    """Pixel boxes ``(x0, y0, x1, y1)`` (ends exclusive) of every box in a grounding answer, in order.

    ``image_size`` is ``(width, height)`` of the picture the question was about (``PIL.Image.size``), not
    the model's input size: the coordinates are relative. Malformed box text is skipped.
    """
    w, h = _check_size(image_size)
    return [(x0 * w // SCALE, y0 * h // SCALE, -(-(x1 + 1) * w // SCALE), -(-(y1 + 1) * h // SCALE))
            for x0, y0, x1, y1 in parse_relative(text)]


def format_boxes(boxes: Iterable[Sequence[int]], image_size: Sequence[int]) -> str:
    """Pixel boxes as one ``[[x0,y0,x1,y1;...]]`` group in 0-999 coordinates (three digits, as the models
    write them): the thousandths that hold each box, so :func:`parse_boxes` gives back a box that covers it.
    For a region in a prompt (``Can you give me a description of the region [[...]]?``) or a test."""
    w, h = _check_size(image_size)
    parts = []
    for box in boxes:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"box {tuple(box)} is not inside a {w}x{h} image with x0 < x1 and y0 < y1")
        c = (x0 * SCALE // w, y0 * SCALE // h, -(-x1 * SCALE // w) - 1, -(-y1 * SCALE // h) - 1)
        parts.append(",".join(f"{v:03d}" for v in c))
    if not parts:
        raise ValueError("format_boxes needs at least one box")
    return "[[" + ";".join(parts) + "]]"


def draw_boxes(image: Image.Image, boxes: Iterable[Sequence[int]], width: int | None = None) -> Image.Image:
    """An RGB copy of ``image`` with each pixel box's outline drawn inside its edges, colours cycled from
    ``PALETTE``. ``width`` defaults to about 1/200 of the shorter side (at least 2 pixels)."""
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    w, h = out.size
    width = max(2, round(min(w, h) / 200)) if width is None else width
    if width < 1:
        raise ValueError(f"width must be at least 1 pixel, got {width}")
    draw = ImageDraw.Draw(out)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=PALETTE[i % len(PALETTE)], width=width)
    return out
