"""Reading a person's clip: frames at the model's frame rate, and its speech.

Frames are retimed to the model's fps by the nearest source frame (source frame i, shown
at i / source_fps, covers the half-frame either side of it; a 24 fps clip at 25 fps
shows one frame twice a second). The source rate is the stream's average rate, so a
variable-rate phone clip is retimed as if its frames were evenly spaced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.media import MediaError, load_audio

MAX_SECONDS = 600.0       # a personal clip is a minute or two; this bounds frames kept in memory
MAX_PIXELS = 4096 * 2160  # per source frame (4K)
MAX_BYTES = 2_000_000_000


def _open(path: str | Path):
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError("video_not_found", f"video file not found: {path}")
    if path.stat().st_size > MAX_BYTES:
        raise MediaError("video_too_large", f"video file is {path.stat().st_size} bytes, limit {MAX_BYTES}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError("video_unreadable", f"not a readable video ({exc.__class__.__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise MediaError("video_unreadable", f"{path} has no video stream")
    return container


def probe(path: str | Path) -> dict:
    """{"fps", "width", "height", "seconds", "has_audio"} of a clip (seconds may be an
    estimate from the container)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        seconds = float(container.duration / 1e6) if container.duration else (
            float(stream.frames / rate) if stream.frames and rate else 0.0)
        return {"fps": rate, "width": stream.codec_context.width, "height": stream.codec_context.height,
                "seconds": seconds, "has_audio": bool(container.streams.audio)}


def iter_frames(path: str | Path, fps: int, max_seconds: float = MAX_SECONDS) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames of the clip at `fps`, at most `max_seconds` of them
    (a longer clip raises MediaError video_too_long rather than being cut silently)."""
    import av

    limit = int(math.floor(max_seconds * fps))
    with _open(path) as container:
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0)
        if not src_fps > 0:
            raise MediaError("video_invalid", "the video stream has no frame rate")
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > MAX_PIXELS:
            raise MediaError("video_too_large", f"video is {w}x{h}, limit {MAX_PIXELS} pixels")
        out = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                # Output frames k with k / fps inside [i - 1/2, i + 1/2) / src_fps.
                end = math.ceil((i + 0.5) / src_fps * fps)
                if end > out:
                    image = frame.to_ndarray(format="rgb24")
                    while out < end:
                        if out >= limit:
                            raise MediaError("video_too_long", f"video is longer than {max_seconds:g} s")
                        yield image
                        out += 1
        except av.error.FFmpegError as exc:
            raise MediaError("video_unreadable", f"video decoding failed ({exc})") from None


def load_speech(path: str | Path, sample_rate: int, max_seconds: float = MAX_SECONDS) -> np.ndarray | None:
    """The clip's audio as (n,) float32 mono at `sample_rate` (PyAV demux, polyphase
    resampling), from the start of its stream (taken as the first video frame: clips
    whose audio starts late are not shifted); None when the clip has no audio stream."""
    with _open(path) as container:
        if not container.streams.audio:
            return None
    return load_audio(path, sample_rate=sample_rate, max_seconds=max_seconds, max_bytes=MAX_BYTES)
