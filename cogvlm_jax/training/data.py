"""Training data: JSONL records -> length-bucketed, padded batches of static shapes.

One record per line::

    {"image": "imgs/cat.png", "query": "What is it?", "answer": "A cat.", "history": [["Hi", "Hello!"]]}

``image`` (a path relative to the JSONL file's folder, or absolute) and ``history`` are optional; a
record without an image trains text-only. Every record is checked when the file is read, and a bad one
(not JSON, a missing or wrongly typed field, an unknown field, an unreadable image, longer than the
model's context) raises :class:`DataError` naming ``file:line``.

Batches: each record goes to the smallest length bucket of ``buckets.bucket_length`` (at most the context)
holding prompt + answer + eos; an epoch shuffles the records, cuts each bucket into batches of exactly
``batch_size`` rows and shuffles the batch order. A bucket's last batch is filled up with copies of one
of its records whose labels are all ignored (they add nothing to the loss or the gradient), so every
batch of a bucket has one shape and the train step compiles once per bucket. The order is a pure function
of (seed, epoch), so batch ``k`` of a run is the same after a restart: :meth:`Batches.batch` takes the
global step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from cogvlm_jax.generation.buckets import bucket_length
from cogvlm_jax.inputs.preprocess import (
    IGNORE_INDEX,
    TEMPLATES,
    ImageError,
    ImageTooLargeError,
    build_inputs,
    check_image_pixels,
    pad_batch,
)

FIELDS = ("image", "query", "answer", "history")


class DataError(ValueError):
    """A training record we cannot use; the message starts with ``file:line``."""


@dataclasses.dataclass(frozen=True)
class Record:
    source: str                                # "file.jsonl:LINE"
    query: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()
    image: Optional[str] = None                # absolute path
    length: int = 0                            # tokens of prompt + answer + eos


def _check_fields(obj, where: str) -> tuple[str, str, tuple, Optional[str]]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}; a record has {', '.join(FIELDS)}")
    for key in ("query", "answer"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    history = obj.get("history")
    history = [] if history is None else history  # not `or []`: {}, "" or false are wrongly typed, not empty
    if not isinstance(history, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
        raise DataError(f"{where}: field 'history' must be a list of [question, answer] string pairs")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where}: field 'image' must be a path string or null, got {type(image).__name__}")
    return obj["query"], obj["answer"], tuple(tuple(t) for t in history), image


def _check_image(path: str, where: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as img:
            check_image_pixels(img, path)  # from the header: a small file may declare a huge picture
            img.verify()  # reads the whole file (chunk checksums) without decoding the pixels
    except ImageTooLargeError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # PIL raises many types for a bad file
        raise DataError(f"{where}: cannot read image {path}: {e}") from None


def read_jsonl(path: str, tokenizer, config, template: Optional[str] = None, progress: bool = False) -> list[Record]:
    """Every record of a JSONL file, checked and measured in tokens (see the module docstring); ``progress``:
    a bar over the file's bytes (every record is tokenized and its image checked: long for a large file)."""

    template = config.template_version if template is None else template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if not os.path.isfile(path):
        raise DataError(f"training data {path} not found")
    folder = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, disable=not progress,
                                     desc=f"reading {os.path.basename(path)}") as bar:
        for number, raw in enumerate(f, 1):  # decoded line by line, so that bad bytes are named by their line too
            bar.update(len(raw))
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8: {e}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON: {e}") from None
            query, answer, history, image = _check_fields(obj, where)
            if history and template == "base":
                raise DataError(f"{where}: has a history, but the 'base' template has no place for one")
            if image is not None:
                image = os.path.join(folder, image)
                _check_image(image, where)
            n_text = len(build_inputs(tokenizer, config, query, history, None, template, answer=answer)["input_ids"])
            length = n_text + (config.num_image_tokens if image is not None else 0)
            if length > config.context_length:
                raise DataError(f"{where}: {length} tokens (prompt + answer + eos) exceed the context length "
                                f"{config.context_length}")
            records.append(Record(where, query, answer, history, image, length))
    if not records:
        raise DataError(f"{path}: no records")
    return records


class Batches:
    """Deterministic, bucketed, fixed-shape batches over ``records`` (see the module docstring)."""

    def __init__(self, records: Sequence[Record], tokenizer, config, batch_size: int, seed: int = 0,
                 template: Optional[str] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.config = config
        self.batch_size = batch_size
        self.seed = seed
        self.template = template
        self.with_images = any(r.image is not None for r in self.records)
        self.bucket_of = [min(bucket_length(r.length), config.context_length) for r in self.records]
        counts: dict[int, int] = {}
        for b in self.bucket_of:
            counts[b] = counts.get(b, 0) + 1
        self.buckets = tuple(sorted(counts))
        self.steps_per_epoch = sum(-(-n // batch_size) for n in counts.values())
        self._plan: tuple[int, tuple] = (-1, ())

    def plan(self, epoch: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The epoch's batches in order: (bucket length, record indices) each."""
        if self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.records))
        by_bucket: dict[int, list[int]] = {}
        for i in order:
            by_bucket.setdefault(self.bucket_of[i], []).append(int(i))
        batches = [(length, tuple(idx[k:k + self.batch_size]))
                   for length, idx in sorted(by_bucket.items()) for k in range(0, len(idx), self.batch_size)]
        plan = tuple(batches[j] for j in rng.permutation(len(batches)))
        self._plan = (epoch, plan)
        return plan

    def batch(self, step: int) -> dict:
        """Batch number ``step`` (0-based, counting across epochs) as padded numpy arrays ``[batch_size, ...]``:
        input_ids, token_type_ids, attention_mask, labels and pixel_values (None if no record has an image)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        length, indices = self.plan(epoch)[k]
        rows = [self._inputs(self.records[i]) for i in indices]
        while len(rows) < self.batch_size:  # a bucket's last batch: ignored copies keep the shape static
            filler = dict(rows[0])
            filler["labels"] = np.full_like(filler["labels"], IGNORE_INDEX)
            rows.append(filler)
        out = pad_batch(rows, self.config.pad_token_id, length)
        if self.with_images and out["pixel_values"] is None:
            s = self.config.vision.image_size
            out["pixel_values"] = np.zeros((self.batch_size, self.config.vision.in_channels, s, s), np.float32)
        return out

    def _inputs(self, r: Record) -> dict:
        try:
            return build_inputs(self.tokenizer, self.config, r.query, r.history, r.image, self.template,
                                answer=r.answer)
        except ImageError as e:
            raise DataError(f"{r.source}: {e}") from None
