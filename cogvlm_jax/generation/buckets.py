"""Prompt and batch lengths padded to a few sizes, so a handful of compiled programs serves every request.

Each distinct shape under ``jit`` is one compile; padding to a ladder of lengths bounds their number.
"""

from __future__ import annotations

from typing import Optional

MIN_BUCKET = 16


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def bucket_length(n: int, limit: Optional[int] = None) -> int:
    """The length a prompt of ``n`` tokens is left-padded to: one compile per bucket.

    The next power of two (at least 16). ``limit``: the most slots the prompt may take (the cache or the
    context less the answer's room). Where the power of two passes it, the prompt is padded less, to the
    first of: a multiple of an eighth of that power of two, a multiple of 16, ``n`` itself, that fits.
    So a prompt that fits unpadded is never refused for its padding, and near the limit the buckets stay
    few (eight per octave, a finer step only within 16 tokens of it). Past ``limit``: ``n``.
    """
    b = MIN_BUCKET
    while b < n:
        b *= 2
    if limit is None or b <= limit:
        return b
    for step in (max(MIN_BUCKET, b // 8), MIN_BUCKET):
        if round_up(n, step) <= limit:
            return round_up(n, step)
    return n
