"""Videos for CogVLM2-Video: a file -> sampled frames -> pixels, as the official demo and transform make them.

Sampling (the official ``video_demo`` ``load_video``), over the frames in presentation order:

* ``base``: ``MAX_FRAMES`` frame indices spread evenly (``np.linspace(0, end - 1, 24, dtype=int)``) over
  the first ``BASE_SECONDS`` seconds, ``end = min(frames, int(60 * average fps))``;
* ``chat``: for each whole second ``s`` from 0 to ``round(last frame's timestamp)``, the frame whose
  timestamp is nearest ``s`` (the first of a tie), at most ``MAX_FRAMES`` of them.

The frames are a uint8 array (C, T, H, W). Pixels (``frames_to_pixels``): ``x / 255``, the CLIP mean and
std per channel, the short side scaled to 224 (bilinear, ``align_corners=False``, no antialiasing; the
long side ``floor(long / short * 224)``), a 224 x 224 center crop; -> float32 (T, 3, 224, 224).

Files are read with PyAV (the optional ``[video]`` extra: ``pip install 'cogvlm-jax[video]'``), which
bundles FFmpeg.
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

from cogvlm_jax.inputs.clip_norm import CLIP_MEAN, CLIP_STD

STRATEGIES = ("base", "chat")
MAX_FRAMES = 24  # frames the demo samples
BASE_SECONDS = 60  # the span ``base`` samples from
FRAME_SIZE = 224  # the official code's 64 + 2 slots per frame: the ViT sees 224 px
# The most pixels a file's frames may declare (3840 x 2160), checked before decoding: a small file can
# declare frames of any size, and up to 24 of them are held decoded.
MAX_FRAME_PIXELS = 3840 * 2160

VideoLike = Union[str, os.PathLike, bytes, bytearray, np.ndarray, Sequence[Image.Image]]


class VideoError(ValueError):
    """A video we cannot use: not decodable, no frames, frames of the wrong kind; the message names it."""


# ---------------------------------------------------------------------------------------- sampling
def sample_indices(timestamps: Sequence[float], average_fps: float, strategy: str,
                   num_frames: int = MAX_FRAMES) -> list[int]:
    """The indices of the frames ``strategy`` picks, given every frame's timestamp (seconds, presentation
    order) and the stream's average frame rate (what ``base`` reads)."""
    total = len(timestamps)
    if total == 0:
        raise VideoError("the video has no frames")
    if strategy == "base":
        end = min(total, int(BASE_SECONDS * average_fps))
        if end < 1:
            raise VideoError(f"the video's average frame rate {average_fps} gives no frame in its first "
                             f"{BASE_SECONDS} s")
        return [int(i) for i in np.linspace(0, end - 1, num_frames, dtype=int)]
    if strategy == "chat":
        stamps = [float(t) for t in timestamps]
        picked = []
        for second in range(round(max(stamps)) + 1):
            nearest = min(stamps, key=lambda t: abs(t - second))
            picked.append(stamps.index(nearest))
            if len(picked) >= num_frames:
                break
        return picked
    raise VideoError(f"unknown video sampling strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


# ---------------------------------------------------------------------------------------- files
def _av():
    try:
        import av
    except ImportError:
        raise VideoError("reading a video file needs PyAV: pip install 'cogvlm-jax[video]' (or pip install av)") \
            from None
    return av


def _open(source, name: str):
    av = _av()
    try:
        container = av.open(source, mode="r")
    except av.error.EOFError:  # a stream declared, the file ending before any frame
        raise VideoError(f"video {name} has no frames (the file ends before the first)") from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode video {name}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"video {name} has no video stream")
    return container


def _enough(strategy: str, num_frames: int):
    """Whether the timestamps decoded so far already decide ``strategy``'s choice (frames come in
    presentation order): ``base`` reads only the first 60 s; ``chat`` is decided once a frame at or after
    second ``num_frames - 1`` is seen (every later frame is farther from every second it could pick)."""
    if strategy == "base":
        return lambda stamps, fps: fps > 0 and len(stamps) >= int(BASE_SECONDS * fps)
    return lambda stamps, fps: stamps[-1] >= num_frames - 1


def _decode(source_factory, name: str, keep=None, enough=None, max_pixels: int = MAX_FRAME_PIXELS):
    """Decode the first video stream's frames in order: -> (timestamps, average fps, {index: rgb (H, W, 3)}
    for the indices in ``keep``). Stops after the last index in ``keep``, or once ``enough(stamps, fps)``."""
    av = _av()
    container = _open(source_factory(), name)
    stamps, kept = [], {}
    last = max(keep) if keep else None
    try:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
        if w * h > max_pixels:
            raise VideoError(f"video {name} has frames of {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                             f"{max_pixels / 1e6:g} megapixels")
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        base = stream.time_base
        for frame in container.decode(stream):
            if frame.width * frame.height > max_pixels:
                raise VideoError(f"video {name} has a frame of {frame.width}x{frame.height}, over the limit of "
                                 f"{max_pixels / 1e6:g} megapixels")
            i = len(stamps)
            if keep is not None and i in keep:
                kept[i] = frame.to_ndarray(format="rgb24")
            pts = frame.pts if frame.pts is not None else 0
            stamps.append(float(pts * base) if base is not None else float(frame.time or 0.0))
            if (last is not None and i >= last) or (enough is not None and enough(stamps, fps)):
                break
    except av.FFmpegError as e:
        raise VideoError(f"cannot decode video {name}: {e}") from None
    finally:
        container.close()
    return stamps, fps, kept


def read_video(video, strategy: str = "chat", num_frames: int = MAX_FRAMES,
               max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """The frames ``strategy`` samples from a video file (a path or its bytes): uint8 (C, T, H, W).

    A file that cannot be decoded, holds no video frames, or whose frames are over ``max_pixels`` pixels,
    is a ``VideoError`` naming it."""
    if strategy not in STRATEGIES:
        raise VideoError(f"unknown video sampling strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if isinstance(video, (bytes, bytearray)):
        name = f"<{len(video)} bytes>"
        data = bytes(video)

        def source():
            return io.BytesIO(data)
    elif isinstance(video, (str, os.PathLike)):
        name = os.fspath(video)
        if not os.path.isfile(name):
            raise VideoError(f"video file {name} not found" if not os.path.exists(name)
                             else f"video path {name} is not a file")

        def source():
            return name
    else:
        raise TypeError(f"expected a video path or bytes, got {type(video).__name__}")
    # two passes: the timestamps first (as far as the choice needs them), then only the chosen frames as
    # RGB, so a minute of video never sits in memory decoded
    stamps, fps, _ = _decode(source, name, enough=_enough(strategy, num_frames), max_pixels=max_pixels)
    if not stamps:
        raise VideoError(f"video {name} has no frames")
    picked = sample_indices(stamps, fps, strategy, num_frames)
    _, _, kept = _decode(source, name, keep=set(picked), max_pixels=max_pixels)
    missing = sorted(set(picked) - set(kept))
    if missing:
        raise VideoError(f"video {name}: frames {missing} decoded in the first pass but not the second")
    return np.ascontiguousarray(np.stack([kept[i] for i in picked]).transpose(3, 0, 1, 2))


def as_frames(video: VideoLike, strategy: str = "chat") -> np.ndarray:
    """uint8 frames (C, T, H, W) from such an array, a list of PIL frames, or a video file (path or bytes,
    sampled by ``strategy``)."""
    if isinstance(video, (str, os.PathLike, bytes, bytearray)):
        frames = read_video(video, strategy)
    elif isinstance(video, np.ndarray):
        frames = video
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != 3:
            raise VideoError(f"video frames must be a uint8 array (3, T, H, W), got {frames.dtype} {frames.shape}")
    elif isinstance(video, (list, tuple)) and all(isinstance(f, Image.Image) for f in video):
        if not video:
            raise VideoError("the video has no frames (an empty list)")
        rgb = [np.asarray(f.convert("RGB"), np.uint8) for f in video]
        if len({a.shape for a in rgb}) > 1:
            raise VideoError(f"video frames differ in size: {sorted({a.shape[1::-1] for a in rgb})}")
        frames = np.stack(rgb).transpose(3, 0, 1, 2)
    else:
        raise TypeError("expected a video: a path, bytes, a uint8 array (3, T, H, W) or a list of PIL images, "
                        f"got {type(video).__name__}")
    if frames.shape[1] == 0:
        raise VideoError("the video has no frames")
    return np.ascontiguousarray(frames)


# ---------------------------------------------------------------------------------------- pixels
def _fma(a, b, c):
    """``a * b + c`` in float32 with one rounding (a fused multiply-add: float64 holds the exact product of
    two float32 values), as PyTorch's compiled CPU kernels compute it."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _linear_taps(n_in: int, n_out: int):
    """Source indices and weights of a linear resize ``n_in -> n_out`` with ``align_corners=False``, in
    float32 as PyTorch's CPU kernel computes them (``scale * (i + 0.5) - 0.5`` fused)."""
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    src = _fma(np.full(n_out, scale, np.float32), np.arange(n_out, dtype=np.float32) + np.float32(0.5),
               np.full(n_out, -0.5, np.float32))
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def frames_to_pixels(frames: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """uint8 (C, T, H, W) -> float32 (T, 3, size, size) pixels: the official video transform, one frame at a
    time (a float32 copy of every full-size frame at once would be four times the decoded video)."""
    return np.stack([_frame_pixels(frames[:, t:t + 1], size)[0] for t in range(frames.shape[1])])


def _frame_pixels(frames: np.ndarray, size: int) -> np.ndarray:
    c, t, h, w = frames.shape
    x = frames.astype(np.float32) / np.float32(255.0)
    x = (x - CLIP_MEAN[:, None, None, None]) / CLIP_STD[:, None, None, None]
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    h0, h1, hw0, hw1 = _linear_taps(h, new_h)
    w0, w1, ww0, ww1 = _linear_taps(w, new_w)
    # the blend of the four neighbours in PyTorch's order and fused steps: the fixtures' pixels bit for bit
    rows0, rows1 = x[:, :, h0], x[:, :, h1]
    top = _fma(rows0[..., w0], ww0, rows0[..., w1] * ww1)
    bottom = _fma(rows1[..., w0], ww0, rows1[..., w1] * ww1)
    x = _fma(top, hw0[:, None], bottom * hw1[:, None])
    i, j = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[:, :, i:i + size, j:j + size]
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3), dtype=np.float32)
