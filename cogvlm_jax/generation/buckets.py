"""Prompt lengths and row counts rounded up to a few sizes, so a handful of compiled programs serves every request.

Each distinct shape under ``jit`` is one compile; rounding up to a ladder of sizes bounds their number:
``bucket_length`` for a prompt padded whole, ``answer_length`` for the room of an answer with no set
maximum, ``extension_length`` for the new tokens of a prompt whose prefix is kept, ``decode_sizes`` for the serving engine's decode rows, ``prefill_sizes`` for its chunked-prefill
chunks.
"""

from __future__ import annotations

from typing import Optional

MIN_BUCKET = 16
FINE_FROM = 64  # past this many tokens the ladder steps by 64, and past 1024 by an eighth of the octave


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def ladder_step(n: int) -> int:
    """The step of the ladder at a prompt of ``n`` tokens (``n > FINE_FROM``): 64 up to 1024 tokens, then an
    eighth of the octave ``n`` lies in (128 in 1025..2048, 256 in 2049..4096, ...)."""
    octave = 1 << (n - 1).bit_length()  # the power of two at or above n
    return max(FINE_FROM, octave // 16)


def bucket_length(n: int, limit: Optional[int] = None, fixed: int = 0) -> int:
    """The length a prompt of ``n`` tokens is left-padded to: one compile per bucket.

    The ladder: 16, 32, 64, then multiples of 64 up to 1024, then eight steps per octave (1152, 1280, ...,
    2048, 2304, ...), so a prompt is padded by less than 64 tokens up to 1024 and by less than an eighth
    of its length past it (a power of two pads up to twice the length).
    18 buckets up to 1024, 8 more per octave; each compiles once per process, and once per machine with
    the persistent compilation cache (``parallel/compile_cache.py``).
    ``fixed``: tokens of the prompt whose count never varies (an image's ``num_image_tokens``, when every
    row holds one): only the other ``n - fixed`` go up the ladder, so an image prompt is padded by its
    text's bucket alone (a 274-token prompt with a 258-token image: to 274, not 320). The number of
    buckets stays the same, and an image prompt is a program of its own (pixels) anyway.
    ``limit``: the most slots the prompt may take (the cache or the context less the answer's room). Where
    the ladder passes it, the prompt is padded less, to the first of: a multiple of 16 (``fixed`` plus a
    multiple of 16), ``n`` itself, that fits. So a prompt that fits unpadded is never refused for its
    padding, and near the limit the buckets stay few (a finer step only within one ladder step of it).
    Past ``limit``: ``n``.
    """
    if not 0 <= fixed <= n:
        raise ValueError(f"fixed tokens ({fixed}) must be within the prompt's {n}")
    rest = n - fixed
    if rest <= FINE_FROM:
        b = MIN_BUCKET
        while b < rest:
            b *= 2
    else:
        b = round_up(rest, ladder_step(rest))
    b += fixed
    if limit is None or b <= limit:
        return b
    if fixed + round_up(rest, MIN_BUCKET) <= limit:
        return fixed + round_up(rest, MIN_BUCKET)
    return n


EXTENSION_FINE_UP_TO = 256  # the tokens after a kept prefix step by MIN_BUCKET up to this many


def extension_length(n: int, limit: Optional[int] = None) -> int:
    """The length the ``n`` new tokens of a prompt whose prefix is kept (``generation/prefix_cache.py``)
    are right-padded to: a multiple of 16 up to 256 tokens, ``bucket_length``'s ladder past it. A
    follow-up question and its answer are mostly tens of tokens, and all of them are computed, so they
    are padded by less than 16 (a prompt padded whole, ViT and all, pays for a coarser ladder less
    than for its compiles); 16 compiles cover every extension up to 256 tokens. ``limit``: as in
    ``bucket_length``."""
    if n <= EXTENSION_FINE_UP_TO:
        b = round_up(max(n, 1), MIN_BUCKET)
        return b if limit is None or b <= limit else n
    return bucket_length(n, limit)


def answer_length(n: int, context: int, fixed: int = 0) -> int:
    """The token buffer of an answer that may run to the end of ``context`` after a prompt of ``n``
    tokens (``max_new_tokens=None``): the room the shortest prompt of ``n``'s bucket
    (``bucket_length(n, context, fixed)``) has. The buffer is a static shape: sized by the bucket, every
    prompt of a bucket shares one compile. The answer still stops where its own context ends (the step
    limit is a traced value)."""
    b = bucket_length(n, context, fixed)
    shortest = n
    while shortest > max(fixed, 1) and bucket_length(shortest - 1, context, fixed) == b:
        shortest -= 1
    return context - shortest


def _doubling(first: int, last: int) -> tuple[int, ...]:
    """first, 2 first, 4 first, ... below ``last``, then ``last``."""
    sizes, n = [], first
    while n < last:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (last,)


def decode_sizes(slots: int) -> tuple[int, ...]:
    """The row counts the decode chunk is compiled for: 1, 2, 4, ... below ``slots``, and ``slots``. A
    chunk decodes the first rows up to the last busy slot, rounded up to one of these (requests take the
    lowest free slot), so one stream on a server of 16 slots costs one row, not 16."""
    return _doubling(1, slots)


def prefill_sizes(prefill_chunk: int) -> tuple[int, ...]:
    """The chunk lengths the chunked-prefill step is compiled for: 16, 32, 64, ... below ``prefill_chunk``,
    and ``prefill_chunk`` (none for 0: off). A prompt is prefilled in chunks of ``prefill_chunk`` and its
    rest in the shortest that holds it, so it is padded by less than half its last chunk (and less than 16)."""
    return _doubling(16, prefill_chunk) if prefill_chunk else ()
