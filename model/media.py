"""Loading and validating what users send: portraits and driving audio.

Every failure is a `MediaError` (a ValueError) with a stable `code`, so the CLI can
print it and exit 2 and the server can answer 4xx with that code.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


class MediaError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------

def _read_bytes(src, max_bytes: int, kind: str) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"{kind}_not_found", f"{kind} file not found: {path}")
        if path.stat().st_size > max_bytes:
            raise MediaError(f"{kind}_too_large", f"{kind} file is over {max_bytes} bytes")
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise MediaError(f"{kind}_too_large", f"{kind} is over {max_bytes} bytes")
    if not data:
        raise MediaError(f"{kind}_empty", f"{kind} is empty")
    return data


def load_image(src: str | os.PathLike | bytes | np.ndarray, *, max_pixels: int = 40_000_000,
               max_bytes: int = 30_000_000) -> np.ndarray:
    """An image (path, encoded bytes or array) -> (H, W, 3) uint8 RGB.

    The pixel count is checked from the header before decoding, so a decompression bomb
    (a tiny file claiming 20000x20000) is refused without allocating it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(src, np.ndarray):
        arr = src
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise MediaError("image_invalid", f"image array must be (H, W, 3|4), got {arr.shape}")
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise MediaError("image_too_large", f"image has {arr.shape[0] * arr.shape[1]} pixels, limit {max_pixels}")
        if arr.dtype != np.uint8:
            raise MediaError("image_invalid", f"image array must be uint8, got {arr.dtype}")
        return np.ascontiguousarray(arr[..., :3])
    data = _read_bytes(src, max_bytes, "image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w == 0 or h == 0:
                raise MediaError("image_empty", "image has zero width or height")
            if w * h > max_pixels:
                raise MediaError("image_too_large", f"image is {w}x{h} = {w * h} pixels, limit {max_pixels}")
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses huge headers itself
        raise MediaError("image_too_large", f"image is too large: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError("image_unreadable", f"not a readable image ({exc.__class__.__name__}: {exc})") from None
    return np.ascontiguousarray(rgb)


def fit_portrait(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop to the target aspect around the face (OpenCV Haar cascade; centre when no face is
    found) and resize to (height, width, 3) uint8."""
    import cv2

    H, W = image.shape[:2]
    cy, cx, size = H / 2, W / 2, None
    cascade_path = os.path.join(getattr(cv2, "data").haarcascades, "haarcascade_frontalface_default.xml") \
        if hasattr(cv2, "data") else None
    if cascade_path and os.path.exists(cascade_path) and min(H, W) >= 48:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        scale = 512 / max(H, W) if max(H, W) > 512 else 1.0
        small = cv2.resize(gray, (int(W * scale), int(H * scale))) if scale < 1 else gray
        faces = _cascade(cascade_path).detectMultiScale(small, 1.1, 5, minSize=(24, 24))
        if len(faces):
            x, y, w, h = max(faces, key=lambda f: f[2] * f[3]) / scale
            cy, cx, size = y + h * 0.55, x + w / 2, max(w, h) * 2.0  # head and shoulders
    aspect = width / height
    if size is None:
        ch = min(H, W / aspect)
    else:
        ch = min(size, H, W / aspect)
    cw = ch * aspect
    y0 = int(round(min(max(cy - ch / 2, 0), H - ch)))
    x0 = int(round(min(max(cx - cw / 2, 0), W - cw)))
    crop = image[y0:y0 + int(round(ch)), x0:x0 + int(round(cw))]
    interp = cv2.INTER_AREA if crop.shape[0] > height else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(crop, (width, height), interpolation=interp))


_CASCADES: dict = {}


def _cascade(path: str):
    import cv2

    if path not in _CASCADES:
        _CASCADES[path] = cv2.CascadeClassifier(path)
    return _CASCADES[path]


# ----------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------

def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian PCM16 mono bytes -> float32 in [-1, 1)."""
    if len(data) % 2:
        raise MediaError("audio_invalid", "PCM16 data must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling (band-limited) of float32 mono."""
    if src_rate == dst_rate:
        return audio.astype(np.float32, copy=False)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(src_rate), int(dst_rate))
    return resample_poly(audio.astype(np.float64), dst_rate // g, src_rate // g).astype(np.float32)


def _finish(audio: np.ndarray, src_rate: int, sample_rate: int, max_seconds: float) -> np.ndarray:
    if audio.size == 0:
        raise MediaError("audio_empty", "audio has no samples")
    if not np.isfinite(audio).all():
        raise MediaError("audio_not_finite", "audio contains NaN or infinite samples")
    if audio.shape[-1] / src_rate > max_seconds:
        raise MediaError("audio_too_long", f"audio is longer than {max_seconds:.0f} s")
    return np.clip(resample(audio, src_rate, sample_rate), -1.0, 1.0)


def load_audio(src: str | os.PathLike | bytes | np.ndarray, *, sample_rate: int = 16000,
               src_rate: int | None = None, max_seconds: float = 600.0,
               max_bytes: int = 200_000_000) -> np.ndarray:
    """Audio (path, encoded bytes, or an array with `src_rate`) -> float32 mono at `sample_rate`.

    Files are decoded with PyAV (wav, mp3, ogg, flac, ...); stereo is averaged; int16
    arrays are scaled to [-1, 1).
    """
    if isinstance(src, np.ndarray):
        if src_rate is None:
            raise MediaError("audio_invalid", "an audio array needs src_rate")
        a = src
        if a.dtype == np.int16:
            a = a.astype(np.float32) / 32768.0
        a = np.asarray(a, dtype=np.float32)
        if a.ndim == 2:  # (channels, samples) or (samples, channels): average the short axis
            a = a.mean(axis=0 if a.shape[0] <= a.shape[1] else 1)
        if a.ndim != 1:
            raise MediaError("audio_invalid", f"audio array must be 1D or 2D, got shape {src.shape}")
        return _finish(a, src_rate, sample_rate, max_seconds)

    import av

    data = _read_bytes(src, max_bytes, "audio")
    chunks, rate = [], None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise MediaError("audio_unreadable", "no audio stream in the file")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            # Planar float at the source rate; channels are averaged here (FFmpeg's own
            # downmix applies -3 dB per channel) and resampling is ours (exact polyphase).
            resampler = av.AudioResampler(format="fltp", rate=rate)
            total = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().mean(axis=0)
                    chunks.append(arr)
                    total += len(arr)
                    if total / rate > max_seconds:
                        raise MediaError("audio_too_long", f"audio is longer than {max_seconds:.0f} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
    except MediaError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise MediaError("audio_unreadable", f"not readable audio ({exc.__class__.__name__})") from None
    if not rate:
        raise MediaError("audio_unreadable", "could not determine the sample rate")
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return _finish(audio, rate, sample_rate, max_seconds)
