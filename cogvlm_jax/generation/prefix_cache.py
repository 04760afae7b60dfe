"""A prefix cache: the keys and values of recent prompts (and answers), and the ViT features of recent images.

A follow-up turn of a conversation repeats the whole earlier conversation: the image span, the earlier
questions and answers, then the new question. Its prefill would run the ViT and every earlier token again.
Instead, ``Model.chat`` and the serving engine keep, after each answer, the KV cache row of what they fed
(prompt and answer tokens) as an entry here, and a new prompt that starts with an entry's tokens (and the
same images) prefills only the tokens after that prefix (``CogVLM.extend``). The features of each image
are kept too, keyed by its pixels, so a new conversation about the same picture skips the ViT.

What may be reused is decided token by token (:func:`reusable_length`): the longest common prefix of token
ids and token types, cut at the first image whose pixels differ, then cut back to end on a text token:
an image token's expert and position depend on the token after it (``models/positions.py``), so a prefix
that ends inside or at the end of an image span is not fixed by itself. The new tokens must all be text
(the extension runs the language expert only), and at least one must remain (its logits choose the
first answer token). A text token's position and key depend only on the tokens before it, so the kept
keys are those the whole prompt's prefill would write (up to float rounding of a different program).

Entries are bounded by bytes, least recently used first out. An entry whose tokens are a prefix of a
newer one is dropped when the newer one is kept (a conversation keeps one entry, its latest turn). The
values are opaque here (device arrays, or an engine's ids for them); ``on_evict`` hears of each value
dropped.

Axis legend: L prompt length, I one image's tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from typing import Any, Callable, Optional

import numpy as np

from cogvlm_jax.generation.buckets import extension_length
from cogvlm_jax.models.positions import VISION, position_ids

DEFAULT_BYTES = 1 << 30  # what ``Model.chat`` and the serving engine keep by default (device memory)
MIN_REUSE = 16  # fewer shared tokens than this are not worth a program of their own: prefilled whole


def image_digests(pixel_values) -> tuple[bytes, ...]:
    """One digest per image (or video frame) of a prompt's pixels: [3, S, S], [N, 3, S, S] or None."""
    if pixel_values is None:
        return ()
    pv = np.ascontiguousarray(pixel_values)
    pv = pv[None] if pv.ndim == 3 else pv
    return tuple(hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in pv)


@dataclasses.dataclass(eq=False)
class Entry:
    """The keys and values of ``ids`` (token types ``types``, images ``images`` in span order), held as
    ``value`` (``nbytes`` of memory)."""

    ids: np.ndarray  # [P] int32
    types: np.ndarray  # [P] int32
    images: tuple[bytes, ...]
    value: Any
    nbytes: int


def reusable_length(ids, types, images, entry: Entry, image_tokens: int) -> int:
    """How many leading tokens of a prompt (``ids``, ``types`` [L], image digests ``images``) the keys and
    values of ``entry`` may stand for (the module docstring's rules): 0 if fewer than ``MIN_REUSE``."""
    n = len(ids)
    k = min(len(entry.ids), n - 1)  # at least one new token, to choose the answer's first
    if k < MIN_REUSE:
        return 0
    same = (entry.ids[:k] == ids[:k]) & (entry.types[:k] == types[:k])
    m = k if same.all() else int(np.argmin(same))
    vision = types == VISION
    # every image with a token before m must be the same picture: else m ends where the first that is not begins
    first_tokens = np.flatnonzero(vision)[::image_tokens]  # each image's first token (image i: its i-th)
    for i, j in enumerate(first_tokens[first_tokens < m]):
        if i >= len(images) or i >= len(entry.images) or images[i] != entry.images[i]:
            m = int(j)
            break
    while m > 0 and types[m - 1] == VISION:  # end on a text token
        m -= 1
    if vision[m:].any() or m < MIN_REUSE:  # the new tokens are text only
        return 0
    return m


def new_tokens(ids, types, attention_mask, kept: int, pad_id: int, position_span=None, limit=None):
    """The tokens of one prompt ``ids``, ``types``, ``attention_mask`` [L] after its first ``kept`` (which a
    kept entry stands for), as ``CogVLM.extend`` takes them -> (ids [1, P], their positions in the whole
    prompt [1, P], right padded to ``buckets.extension_length(L - kept, limit)``)."""
    n = len(ids)
    pos = np.asarray(position_ids(np.asarray(types)[None], np.asarray(attention_mask)[None], position_span))[0]
    rest = extension_length(n - kept, limit)
    new = np.full((1, rest), pad_id, np.int32)
    new_pos = np.zeros((1, rest), np.int32)
    new[0, :n - kept], new_pos[0, :n - kept] = ids[kept:], pos[kept:]
    return new, new_pos


class PrefixCache:
    """Entries (:class:`Entry`) and image features, at most ``max_bytes`` of them together, LRU.

    ``image_tokens``: one image's span (``config.num_image_tokens``). ``on_evict(value)``: called with
    every value dropped. Thread-safe."""

    def __init__(self, max_bytes: int, image_tokens: int, on_evict: Optional[Callable[[Any], None]] = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.image_tokens = int(image_tokens)
        self.on_evict = on_evict
        self._items: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0  # prompts that reused an entry
        self.cached_tokens = 0  # tokens they did not prefill
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        with self._lock:
            kv = sum(1 for key in self._items if key[0] == "kv")
            return {"entries": kv, "images": len(self._items) - kv, "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "cached_tokens": self.cached_tokens, "evicted": self.evicted}

    # ------------------------------------------------------------------ prompts
    def match(self, ids, types, images=(), count: bool = True) -> tuple[Optional[Entry], int]:
        """The entry that stands for the most leading tokens of a prompt, and how many (0: none).
        ``count``: the prompt will use it (the entry becomes the most recently used, the hit is counted)."""
        ids, types = np.asarray(ids, np.int32), np.asarray(types, np.int32)
        with self._lock:
            best, m = None, 0
            for key, (entry, _) in self._items.items():
                if key[0] == "kv":
                    k = reusable_length(ids, types, images, entry, self.image_tokens)
                    if k > m:
                        best, m = entry, k
            if best is not None and count:
                self._items.move_to_end(("kv", id(best)))
                self.hits += 1
                self.cached_tokens += m
            return best, m

    def worth_keeping(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.max_bytes

    def put(self, ids, types, images, value, nbytes: int) -> Optional[Entry]:
        """Keep ``value``, the keys and values of ``ids`` -> its entry, or None if it is larger than the whole
        cache or an entry already holds these tokens (then ``value`` is dropped at once: ``on_evict``).
        Entries it extends are dropped, then the least recently used until it fits."""
        ids, types = np.asarray(ids, np.int32).copy(), np.asarray(types, np.int32).copy()
        entry = Entry(ids, types, tuple(images), value, int(nbytes))
        dropped = []
        with self._lock:
            held = [e for key, (e, _) in self._items.items() if key[0] == "kv"]
            if not self.worth_keeping(nbytes) or any(_covers(e, entry) for e in held):
                dropped.append(value)
                entry = None
            else:
                for e in held:
                    if _covers(entry, e):
                        dropped.append(self._pop(("kv", id(e))))
                self._items[("kv", id(entry))] = (entry, entry.nbytes)
                self.bytes += entry.nbytes
                dropped += self._fit()
        self._evicted(dropped)
        return entry

    # ------------------------------------------------------------------ images
    def features(self, digest: bytes):
        """The kept features of the image with this digest, or None."""
        with self._lock:
            got = self._items.get(("image", digest))
            if got is None:
                return None
            self._items.move_to_end(("image", digest))
            return got[0]

    def put_features(self, digest: bytes, value, nbytes: int) -> bool:
        """Keep an image's features -> whether they were kept (not larger than the whole cache, not held)."""
        dropped = []
        with self._lock:
            key = ("image", digest)
            kept = self.worth_keeping(nbytes) and key not in self._items
            if kept:
                self._items[key] = (value, int(nbytes))
                self.bytes += int(nbytes)
                dropped = self._fit(keep=key)
            else:
                dropped = [value]
        self._evicted(dropped)
        return kept and ("image", digest) in self._items

    # ------------------------------------------------------------------ bookkeeping
    def clear(self) -> None:
        with self._lock:
            dropped = [self._pop(key) for key in list(self._items)]
        self._evicted(dropped)

    def _pop(self, key):
        value, nbytes = self._items.pop(key)
        self.bytes -= nbytes
        return value.value if isinstance(value, Entry) else value

    def _fit(self, keep=None) -> list:
        """Drop the least recently used items until the bytes fit (``self._lock`` held) -> their values."""
        dropped = []
        while self.bytes > self.max_bytes:
            key = next(k for k in self._items if k != keep)
            dropped.append(self._pop(key))
            self.evicted += 1
        return dropped

    def _evicted(self, values) -> None:
        if self.on_evict is not None:
            for v in values:
                self.on_evict(v)


def _covers(a: Entry, b: Entry) -> bool:
    """Whether entry ``a`` holds every token of ``b`` (and its images): ``b`` adds nothing."""
    n = len(b.ids)
    return (len(a.ids) >= n and np.array_equal(a.ids[:n], b.ids) and np.array_equal(a.types[:n], b.types)
            and a.images[:len(b.images)] == b.images)
