"""From (image, query, history) to the arrays the model takes, exactly as the reference builds them.

Layout of one prompt (``build_conversation_input_ids`` upstream)::

    [bos] + [image_token_id] * num_image_tokens + encode(prompt)      (+ encode(answer) + [eos])
    token_type_ids: 1 on the image span (boi, patches, eoi), 0 elsewhere

Images: RGB, resized to S x S with PIL bicubic (the aspect ratio is not kept), scaled to [0, 1] and
normalised with the CLIP mean and std. EXIF orientation is not applied, as upstream.
"""

from __future__ import annotations

import io
import os
import re
from typing import Sequence, Union

import numpy as np
from PIL import Image

from cogvlm_jax.inputs import video as video_lib
from cogvlm_jax.inputs.clip_norm import CLIP_MEAN, CLIP_STD


# How each template asks for the answer; "base" is the bare query.
ANSWER_PROMPTS = {"chat": "Answer:", "vqa": "Short answer:"}
TEMPLATES = ("base", *ANSWER_PROMPTS)

IGNORE_INDEX = -100  # label of positions the loss skips (the prompt)

# The most pixels an image file may declare (width x height, read from its header before decoding). Far
# above what the models look at (224, 490 or 1344 px a side), far below PIL's decompression-bomb error
# (about 179 MP): a small, well-compressed file can declare hundreds of MB of pixels.
MAX_IMAGE_PIXELS = 40_000_000

ImageLike = Union[str, os.PathLike, bytes, bytearray, Image.Image]


class ImageError(ValueError):
    """An image we cannot read; the message names the file."""


class ImageTooLargeError(ImageError):
    """An image declaring more pixels than allowed; refused before its pixels are decoded."""


def check_image_pixels(img: Image.Image, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """Refuse an opened (not yet decoded) image of more than ``max_pixels`` pixels (None: no limit of ours)."""
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(f"image {name} is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                                 f"{max_pixels / 1e6:g} megapixels ({max_pixels} pixels)")


# ---------------------------------------------------------------------------------------- images
def load_image(image: ImageLike, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, the bytes of an image file, or a PIL image of any mode.

    A file (path or bytes) declaring more than ``max_pixels`` pixels is refused before it is decoded
    (``ImageTooLargeError``); None lifts the limit (PIL's own decompression-bomb check stays).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (bytes, bytearray)):
        name, source = f"<{len(image)} bytes>", io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        name = source = os.fspath(image)
        if not os.path.isfile(name):
            raise ImageError(f"image file {name} not found" if not os.path.exists(name)
                             else f"image path {name} is not a file")
    else:
        raise TypeError(f"expected an image path, bytes or a PIL image, got {type(image).__name__}")
    try:
        with Image.open(source) as img:  # reads the header only
            check_image_pixels(img, name, max_pixels)
            img.load()  # decode now: Image.open is lazy and a truncated file fails only here
            rgb = _to_rgb(img)
            return rgb.copy() if rgb is img else rgb  # a copy that outlives the closed file
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: where it is an error
        raise _bomb(name, e, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read image {name}: {e}") from None


def _bomb(name: str, e: Exception, max_pixels: int | None) -> ImageTooLargeError:
    """PIL's decompression-bomb check (which ``Image.open`` runs before ours, on the same declared size),
    worded as :func:`check_image_pixels`: the pixels declared and the limit they exceed."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    pixels = int(found.group(1)) if found else None
    what = f"image {name} is {pixels / 1e6:.1f} megapixels" if pixels else f"image {name} declares too many pixels"
    if max_pixels is not None and (pixels is None or pixels > max_pixels):
        return ImageTooLargeError(f"{what}, over the limit of {max_pixels / 1e6:g} megapixels ({max_pixels} pixels)")
    pil = Image.MAX_IMAGE_PIXELS
    limit = (2 * pil if isinstance(e, Image.DecompressionBombError) else pil) if pil else None
    return ImageTooLargeError(f"{what}, over PIL's decompression-bomb limit" + (f" of {limit} pixels" if limit else ""))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Alpha is dropped (not composited), as ``convert("RGB")`` does."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # Integer / float greyscale. 16-bit data (PNG loads as I;16, older Pillow as I) is scaled to
        # 8 bits; convert() would clip it. Values that fit in 0..255 are taken as 8-bit already.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        img = img.convert("LA")
    return img.convert("RGB")


def image_to_pixels(image: ImageLike, image_size: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """``[3, S, S]`` float32 pixels: bicubic resize to S x S, /255, CLIP normalisation (``max_pixels``: see
    :func:`load_image`)."""
    img = load_image(image, max_pixels).resize((image_size, image_size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # [S, S, 3]
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------- prompts
def build_prompt(query: str, history: Sequence[Sequence[str]] = (), template: str = "chat") -> str:
    """The text after the image span.

    base: the query as is (history ignored, as upstream); chat and vqa: one
    ``"Question: {q} Answer: {a}\\n"`` line per past turn, then ``"Question: {query} Answer:"``
    (vqa says ``Short answer:``).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    pairs, _ = split_history(history)
    if template == "base":
        return query
    ask = ANSWER_PROMPTS[template]
    turns = "".join(f"Question: {q} {ask} {a}\n" for q, a in pairs)
    return f"{turns}Question: {query} {ask}"


def _images(image) -> list:
    """One image, None, or a list / tuple of images -> a list of images."""
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def split_history(history) -> tuple[tuple[tuple[str, str], ...], list]:
    """History turns ``(question, answer)`` or ``(question, answer, image)`` (the image of that turn: one,
    a list, or None) -> (the (question, answer) pairs, the turns' images in order)."""
    turns = None if isinstance(history, str) else tuple(history)
    if turns is None or any(isinstance(t, str) or len(t) not in (2, 3) for t in turns):
        raise ValueError(f"history must be a sequence of (question, answer) or (question, answer, image) turns, "
                         f"got {history!r}")
    return tuple((t[0], t[1]) for t in turns), [im for t in turns if len(t) == 3 for im in _images(t[2])]


def build_inputs(tokenizer, config, query: str, history: Sequence[Sequence[str]] = (),
                 image: ImageLike | Sequence[ImageLike] | None = None, template: str | None = None,
                 answer: str | None = None, max_image_pixels: int | None = MAX_IMAGE_PIXELS,
                 video=None, video_strategy: str | None = None) -> dict:
    """One unbatched prompt as numpy arrays.

    Returns ``input_ids``, ``token_type_ids``, ``attention_mask`` ([L] int32) and ``pixel_values``
    ([3, S, S] float32, or None without an image). With ``answer`` (training), the answer and eos are
    appended and ``labels`` ([L] int32, -100 on the prompt) is added. ``template`` defaults to the
    config's ``template_version``. ``max_image_pixels``: the most pixels the image file may declare (see
    :func:`load_image`).

    Several images: ``image`` a list, and history turns ``(q, a, image)``. Every image is its own
    ``[boi, patches, eoi]`` span of ``config.num_image_tokens`` slots; the spans follow bos side by side,
    the history's images first (turn by turn), then the query's, and ``pixel_values`` is ``[N, 3, S, S]``
    in that order. One image, from whichever turn, is the official layout exactly.

    ``video`` (a video model, ``config.video``): uint8 frames (3, T, H, W), a list of PIL frames, or a
    video file (path or bytes) sampled by ``video_strategy`` (``inputs/video.py``; default: ``base`` for
    the base template, else ``chat``). Each frame is a span of ``num_image_tokens`` slots, followed (any
    template but ``base``) by its index as text; ``pixel_values`` is [T, 3, 224, 224]. A video whose
    prompt does not fit the context is a ``VideoError`` saying how many frames would.
    """
    template = config.template_version if template is None else template
    prompt = build_prompt(query, history, template)
    images = split_history(history)[1] + _images(image)
    if video is not None:
        return _video_inputs(tokenizer, config, prompt, template, video, video_strategy, images, answer)
    if getattr(config, "video", False) and images:
        raise ValueError("this is a video model: pass the frames as video=, not image=")
    n_image = config.num_image_tokens * len(images)
    ids = [config.bos_token_id] + [config.image_token_id] * n_image + tokenizer.encode(prompt)
    types = [0] + [1] * n_image + [0] * (len(ids) - 1 - n_image)
    size = config.vision.image_size
    pixels = (None if not images else image_to_pixels(images[0], size, max_image_pixels) if len(images) == 1
              else np.stack([image_to_pixels(im, size, max_image_pixels) for im in images]))
    return _finish(tokenizer, config, ids, types, answer, pixels)


def _video_inputs(tokenizer, config, prompt: str, template: str, video, strategy, images, answer) -> dict:
    if images:
        raise ValueError("give an image or a video, not both")
    if not getattr(config, "video", False):
        raise ValueError("this model takes images, not videos (video= needs a CogVLM2-Video checkpoint)")
    strategy = ("base" if template == "base" else "chat") if strategy is None else strategy
    frames = video_lib.as_frames(video, strategy)
    ids, types = [config.bos_token_id], [0]
    per_frame = []
    for t in range(frames.shape[1]):
        index = [] if template == "base" else tokenizer.encode(str(t))
        per_frame.append(config.num_image_tokens + len(index))
        ids += [config.image_token_id] * config.num_image_tokens + index
        types += [1] * config.num_image_tokens + [0] * len(index)
    text = tokenizer.encode(prompt)
    ids += text
    types += [0] * len(text)
    total = len(ids) + (0 if answer is None else len(tokenizer.encode(answer)) + 1)
    ctx = config.context_length
    if total > ctx:
        room, fits = ctx - 1 - (total - len(ids)) - len(text), 0
        while fits < len(per_frame) and room >= per_frame[fits]:
            room -= per_frame[fits]
            fits += 1
        raise video_lib.VideoError(
            f"a video of {frames.shape[1]} frames makes a prompt of {total} tokens ({config.num_image_tokens} a "
            f"frame{'' if template == 'base' else ' plus its index'}), over the model's context of {ctx} tokens: "
            f"{fits} frames fit")
    return _finish(tokenizer, config, ids, types, answer, video_lib.frames_to_pixels(frames))


def _finish(tokenizer, config, ids: list, types: list, answer, pixels) -> dict:
    out = {}
    if answer is not None:
        # The tokenizer's eos (CogVLM2: <|end_of_text|> 128001, not <|eot_id|>), as upstream.
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else config.eos_token_ids[0]
        answer_ids = tokenizer.encode(answer) + [eos]
        out["labels"] = np.array([IGNORE_INDEX] * len(ids) + answer_ids, np.int32)
        ids += answer_ids
        types += [0] * len(answer_ids)
    out["input_ids"] = np.array(ids, np.int32)
    out["token_type_ids"] = np.array(types, np.int32)
    out["attention_mask"] = np.ones(len(ids), np.int32)
    out["pixel_values"] = pixels
    return out


# --------------------------------------------------------------------------------------- batches
def pad_batch(inputs: Sequence[dict], pad_id: int, length: int | None = None) -> dict:
    """Left-pad prompts from :func:`build_inputs` into ``[B, L]`` arrays.

    Padding has attention_mask 0, token type 0 and (if every row has labels) label -100. ``length``
    defaults to the longest row. ``pixel_values`` is ``[B, 3, S, S]`` with zeros for rows without an
    image, or None when no row has one. Videos (``[T, 3, S, S]`` each) give ``[B, T_max, 3, S, S]``: a
    row of fewer frames has zero frames after its own, which its prompt never reads.
    """
    if not inputs:
        raise ValueError("pad_batch needs at least one prompt")
    longest = max(len(x["input_ids"]) for x in inputs)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest prompt ({longest} tokens)")
    with_labels = sum("labels" in x for x in inputs)
    if with_labels not in (0, len(inputs)):
        raise ValueError(f"{with_labels} of {len(inputs)} prompts have labels; all or none must")

    fills = {"input_ids": pad_id, "token_type_ids": 0, "attention_mask": 0}
    if with_labels:
        fills["labels"] = IGNORE_INDEX
    batch = {key: np.full((len(inputs), length), fill, np.int32) for key, fill in fills.items()}
    for row, x in enumerate(inputs):
        n = len(x["input_ids"])
        for key in fills:
            batch[key][row, length - n:] = x[key]

    images = [x.get("pixel_values") for x in inputs]
    if any(p is not None and p.ndim == 4 for p in images):  # several images in a row: [B, N, 3, S, S]
        images = [p if p is None or p.ndim == 4 else p[None] for p in images]
        most = max(len(p) for p in images if p is not None)
        images = [p if p is None or len(p) == most else np.concatenate([p, np.zeros((most - len(p), *p.shape[1:]),
                                                                                      p.dtype)]) for p in images]
    shapes = {p.shape for p in images if p is not None}
    if len(shapes) > 1 and len({(len(s), s[1:]) for s in shapes}) == 1 and len(next(iter(shapes))) == 4:
        shapes = {max(shapes)}  # videos of different lengths: frames padded at the end
    if len(shapes) > 1:
        raise ValueError(f"prompts have images of different shapes {sorted(shapes)}")
    batch["pixel_values"] = None
    if shapes:
        pixels = np.zeros((len(inputs), *shapes.pop()), np.float32)
        for row, p in enumerate(images):
            if p is not None:
                pixels[row, :len(p)] = p
        batch["pixel_values"] = pixels
    return batch
