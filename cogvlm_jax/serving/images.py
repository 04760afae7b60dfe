"""Image URLs in chat messages: inline ``data:`` URLs, and ``file://`` URLs under the server's image root.

The server never fetches ``http(s)://`` URLs. A ``file://`` URL is read only if the file it opens is a
regular file under ``--image-root`` (links followed, then checked again on the opened file; a directory,
FIFO, device or socket is refused, and every descriptor opened is closed), and no image may exceed
``--max-image-bytes``. Every refusal is an ``APIError`` (400, or 413 for the size).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from typing import Optional
from urllib.parse import unquote, urlsplit

from cogvlm_jax.serving.protocol import APIError


def read_image_url(url: str, image_root: Optional[str], max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URL, or of a ``file://`` URL under ``image_root``; anything else is refused."""
    if url[:5].lower() == "data:":
        return _read_data_url(url[5:], max_bytes)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        raise _bad_url(f"image URLs over {scheme}:// are refused: this server fetches nothing from the network; "
                       "send the image inline as a data: URL")
    if scheme != "file":
        raise _bad_url(f"unsupported image URL scheme {json.dumps(scheme or url[:20])}: send a data: URL")
    if image_root is None:
        raise _bad_url("file:// image URLs are refused: the server was started without --image-root")
    if parts.netloc not in ("", "localhost"):
        raise _bad_url(f"file:// URL with host {parts.netloc!r} refused")
    return _read_file_under(unquote(parts.path), image_root, max_bytes)


def _bad_url(message: str) -> APIError:
    return APIError(400, message, "messages", "invalid_image_url")


def _too_big(n: int, max_bytes: int) -> APIError:
    return APIError(413, f"image of {n} bytes exceeds the limit of {max_bytes} bytes (--max-image-bytes)",
                    "messages", "image_too_large")


def _read_data_url(rest: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URL (``rest``: what follows ``data:``); only base64 is taken."""
    header, comma, data = rest.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise APIError(400, "image data: URLs must be base64 (data:image/...;base64,...)", "messages",
                       "invalid_image")
    if len(data) * 3 // 4 > max_bytes + 2:
        raise _too_big(len(data) * 3 // 4, max_bytes)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image data: URL is not valid base64: {e}", "messages", "invalid_image") from None
    if len(raw) > max_bytes:
        raise _too_big(len(raw), max_bytes)
    return raw


def _read_file_under(asked: str, image_root: str, max_bytes: int) -> bytes:
    """The bytes of the regular file at path ``asked`` if it lies under ``image_root`` (links resolved)."""
    if "\0" in asked:  # the OS cannot take it (os.path raises ValueError): a bad URL, not a server error
        raise _bad_url(f"image path {asked!r} contains a NUL byte")
    root = os.path.realpath(image_root)
    outside = _bad_url(f"image path {asked} is outside --image-root")
    missing = _bad_url(f"image file {asked} not found under --image-root")
    path = os.path.realpath(asked)
    if os.path.commonpath([root, path]) != root:
        raise outside
    try:  # O_NONBLOCK: a FIFO swapped in does not hang the thread in open (fstat refuses it below)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:  # missing, a socket (ENXIO), no permission
        try:
            there = os.stat(path)
        except OSError:
            raise missing from None
        if not stat.S_ISREG(there.st_mode):
            raise _bad_url(f"image path {asked} is not a regular file") from None
        raise _bad_url(f"image file {asked} cannot be opened: {e.strerror or e}") from None
    try:  # the descriptor is closed on every path, the refusals included
        # Between the check and the open a link may have been swapped in (anywhere on the path) and followed.
        # What counts is the file opened: it must be a regular file (not a directory, FIFO, device or
        # socket), the one that now sits at the checked path, under the root.
        opened = os.fstat(fd)
        try:
            there = os.path.realpath(path)
            inside = os.path.commonpath([root, there]) == root and os.path.samestat(opened, os.stat(there))
        except OSError:
            inside = False
        if not inside:
            raise outside
        if not stat.S_ISREG(opened.st_mode):
            raise _bad_url(f"image path {asked} is not a regular file")
        if opened.st_size > max_bytes:
            raise _too_big(opened.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(max_bytes + 1)  # the file may have grown since
    except OSError as e:  # a read error (EIO, a file truncated under us): the URL's problem, not the server's
        raise _bad_url(f"image file {asked} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise _too_big(len(raw), max_bytes)
    return raw
