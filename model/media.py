"""Loading and validating what users send: portraits and driving audio.

Every failure is a `MediaError` (a ValueError) with a stable machine-readable `code`, so
the CLI can print it and exit 2 and the server can answer 4xx with that code:

  image_not_found, image_empty, image_too_large, image_unreadable, image_invalid,
  audio_not_found, audio_empty, audio_too_large, audio_unreadable, audio_invalid,
  audio_bad_rate, audio_not_finite, audio_out_of_range, audio_too_long.
"""

from __future__ import annotations

import io
import os
import threading
from math import gcd
from pathlib import Path

import numpy as np


class MediaError(ValueError):
    """Bad user media. `code` is stable (API responses, tests); the message is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"MediaError({self.code!r}, {str(self)!r})"


def _read_bytes(src, max_bytes: int, kind: str) -> bytes:
    """Path or bytes-like -> bytes, refusing missing, empty and oversized input (size checked
    with stat before reading a file)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"{kind}_not_found", f"{kind} file not found: {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise MediaError(f"{kind}_too_large", f"{kind} file is {size} bytes, limit {max_bytes}")
        data = path.read_bytes()
    else:
        raise MediaError(f"{kind}_invalid", f"{kind} must be a path, bytes or a numpy array, "
                                            f"got {type(src).__name__}")
    if len(data) > max_bytes:
        raise MediaError(f"{kind}_too_large", f"{kind} is {len(data)} bytes, limit {max_bytes}")
    if not data:
        raise MediaError(f"{kind}_empty", f"{kind} is empty (0 bytes)")
    return data


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------

# Decoders we let Pillow use. Everything else (EPS, which runs Ghostscript; obscure
# formats with little-tested decoders) is refused as unreadable.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG covers MPO (phone photos)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8: transparent areas become white, not whatever
    colour the encoder left under alpha 0 (often black)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None when `data` is not a PNG. Pillow
    refuses a zero-size PNG as "cannot identify"; this lets us say what is wrong."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _pil_to_rgb(im) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: Pillow's convert("RGB") would clip everything over 255 to
        # white. Scale by the value range the mode implies instead.
        g = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and g.max() <= 1.0 else (255.0 if g.max() <= 255 else 65535.0)
        g = np.clip(np.round(g * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    has_alpha = "A" in im.getbands() or "transparency" in im.info
    if has_alpha:
        return _composite_on_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))


def _image_from_array(arr: np.ndarray, max_pixels: int) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise MediaError("image_invalid", f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
                                          f"got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MediaError("image_empty", f"image has zero width or height: {arr.shape}")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise MediaError("image_too_large", f"image is {arr.shape[1]}x{arr.shape[0]} = "
                                            f"{arr.shape[0] * arr.shape[1]} pixels, limit {max_pixels}")
    if arr.dtype != np.uint8:
        raise MediaError("image_invalid", f"image array must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = _composite_on_white(arr)
    return np.ascontiguousarray(arr)


def load_image(src: str | os.PathLike | bytes | np.ndarray, *, max_pixels: int = 40_000_000,
               max_bytes: int = 30_000_000) -> np.ndarray:
    """An image (path, encoded bytes or uint8 array) -> (H, W, 3) uint8 RGB.

    The pixel count is read from the header and checked before anything is decoded, so a
    decompression bomb (a tiny file claiming 20000x20000) is refused without allocating
    it. Grey, palette, 16-bit and CMYK images become RGB; transparency is composited on
    white; the EXIF orientation is applied (phone photos come out upright); animated
    images give their first frame.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(src, np.ndarray):
        return _image_from_array(src, max_pixels)
    data = _read_bytes(src, max_bytes, "image")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:  # reads the header only
            w, h = im.size
            if w == 0 or h == 0:
                raise MediaError("image_empty", f"image has zero width or height ({w}x{h})")
            if w * h > max_pixels:
                raise MediaError("image_too_large", f"image is {w}x{h} = {w * h} pixels, limit {max_pixels}")
            im.load()
            rgb = _pil_to_rgb(ImageOps.exif_transpose(im))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses absurd headers in open() itself
        raise MediaError("image_too_large", f"image is too large: {exc}") from None
    except MemoryError:
        raise MediaError("image_too_large", "image is too large to decode") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        size = _png_header_size(data)
        if size is not None and 0 in size:
            raise MediaError("image_empty", f"image has zero width or height ({size[0]}x{size[1]})") from None
        raise MediaError("image_unreadable", f"not a readable image ({exc.__class__.__name__}: {exc}); "
                                             f"send PNG, JPEG, WebP, GIF, BMP or TIFF") from None
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise MediaError("image_empty", f"image decoded to zero size {rgb.shape}")
    return np.ascontiguousarray(rgb)


# ----------------------------------------------------------------------------------------
# Portrait crop
# ----------------------------------------------------------------------------------------

_local = threading.local()  # one CascadeClassifier per thread: OpenCV's is not thread-safe


def _cascade():
    import cv2

    cascade = getattr(_local, "cascade", None)
    if cascade is None:
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise RuntimeError(f"OpenCV's Haar face cascade could not be loaded from {path}; "
                               "opencv-python(-headless) 4.x ships it")
        _local.cascade = cascade
    return cascade


def find_face(image: np.ndarray) -> tuple[float, float, float, float] | None:
    """(H, W, 3) uint8 RGB -> the largest frontal face (x, y, w, h) in pixels, or None.

    OpenCV's Haar cascade on a grey copy at most 512 px on its long side (faces in a
    portrait are large; a small copy keeps detection cheap).
    """
    import cv2

    H, W = image.shape[:2]
    if min(H, W) < 48:
        return None
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    scale = min(1.0, 512 / max(H, W))
    if scale < 1:
        gray = cv2.resize(gray, (max(1, int(W * scale)), max(1, int(H * scale))), interpolation=cv2.INTER_AREA)
    faces = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return x / scale, y / scale, w / scale, h / scale


def fit_portrait(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8: crop to the target aspect, then resize.

    Face-aware: when a face is found (`find_face`) the crop is a head-and-shoulders box
    (2x the face, centred a little below the face centre) clamped to the image; otherwise
    the largest centred crop of the target aspect (the fallback). Downscaling uses area
    interpolation (no aliasing), upscaling bicubic.
    """
    import cv2

    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"fit_portrait expects an (H, W, 3) uint8 image, got "
                         f"{getattr(image, 'shape', type(image).__name__)} {getattr(image, 'dtype', '')}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"fit_portrait got an empty image {image.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    H, W = image.shape[:2]
    aspect = width / height
    face = find_face(image)
    if face is None:
        cy, cx, ch = H / 2, W / 2, min(H, W / aspect)
    else:
        x, y, w, h = face
        cy, cx = y + 0.55 * h, x + w / 2
        ch = min(2.0 * max(w, h), H, W / aspect)
    cw = ch * aspect
    ch_i, cw_i = max(1, min(H, int(round(ch)))), max(1, min(W, int(round(cw))))
    y0 = int(round(min(max(cy - ch_i / 2, 0), H - ch_i)))
    x0 = int(round(min(max(cx - cw_i / 2, 0), W - cw_i)))
    crop = image[y0:y0 + ch_i, x0:x0 + cw_i]
    interp = cv2.INTER_AREA if crop.shape[0] >= height else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(crop, (width, height), interpolation=interp))


# ----------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------

MIN_RATE, MAX_RATE = 1000, 384_000


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM mono bytes -> (n,) float32 in [-1, 1)."""
    if len(data) % 2:
        raise MediaError("audio_invalid", f"PCM16 data must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def _check_rate(rate, what: str) -> int:
    try:
        r = int(rate)
        ok = r == rate and MIN_RATE <= r <= MAX_RATE
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise MediaError("audio_bad_rate", f"{what} must be an integer in [{MIN_RATE}, {MAX_RATE}] Hz, got {rate!r}")
    return r


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """(n,) mono -> (ceil(n * dst_rate / src_rate),) float32: band-limited polyphase
    resampling (scipy's Kaiser-windowed FIR, anti-aliased when downsampling)."""
    if src_rate == dst_rate:
        return audio.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = gcd(int(src_rate), int(dst_rate))
    return resample_poly(audio.astype(np.float64), dst_rate // g, src_rate // g).astype(np.float32)


def _finish(audio: np.ndarray, src_rate: int, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Validate decoded float mono, resample to `sample_rate`, clip to [-1, 1]."""
    if audio.size == 0:
        raise MediaError("audio_empty", "audio has no samples")
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise MediaError("audio_not_finite", f"audio contains {bad} NaN or infinite samples")
    if audio.shape[-1] / src_rate > max_seconds:
        raise MediaError("audio_too_long", f"audio is {audio.shape[-1] / src_rate:.1f} s, limit {max_seconds:.0f} s")
    # Resampling can overshoot by a few percent near full scale; clip that, not the source.
    return np.clip(resample(audio, src_rate, sample_rate), -1.0, 1.0)


def _audio_from_array(a: np.ndarray) -> np.ndarray:
    """int16 / int32 / uint8 / float array, mono or (channels, samples) / (samples, channels)
    -> (n,) float32 mono (channels averaged)."""
    if a.ndim == 2:
        ch_axis = 0 if a.shape[0] <= a.shape[1] else 1
        if a.shape[ch_axis] > 8:
            raise MediaError("audio_invalid", f"audio array must be (samples,) or (channels, samples) with at most "
                                              f"8 channels, got shape {a.shape}")
    elif a.ndim != 1:
        raise MediaError("audio_invalid", f"audio array must be 1D or 2D, got shape {a.shape}")
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    elif a.dtype == np.int32:
        a = (a.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif a.dtype == np.uint8:  # 8-bit WAV convention: unsigned, 128 = zero
        a = (a.astype(np.float32) - 128.0) / 128.0
    elif a.dtype in (np.float32, np.float64, np.float16):
        a = a.astype(np.float32)
        finite = a[np.isfinite(a)]
        if finite.size and np.abs(finite).max() > 2.0:
            raise MediaError("audio_out_of_range", f"float audio must be in [-1, 1], peak is "
                                                   f"{np.abs(finite).max():.4g} (integer PCM stored as float? "
                                                   f"pass the int16 array or divide by 32768)")
    else:
        raise MediaError("audio_invalid", f"audio array dtype must be int16, int32, uint8 or float, got {a.dtype}")
    if a.ndim == 2:
        a = a.mean(axis=0 if a.shape[0] <= a.shape[1] else 1)
    return a


def sniff_audio_format(data: bytes) -> str | None:
    """The container of encoded audio from its first bytes: 'wav', 'ogg', 'flac', 'mp3' or None."""
    head = data[:12]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    # MPEG audio: an ID3 tag, or a frame sync whose layer bits are set (ADTS AAC has layer 0).
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06):
        return "mp3"
    return None


def load_audio(src: str | os.PathLike | bytes | np.ndarray, *, sample_rate: int = 16000,
               src_rate: int | None = None, max_seconds: float = 600.0,
               max_bytes: int = 200_000_000, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """Audio (path, encoded bytes, or an array with `src_rate`) -> (n,) float32 mono in
    [-1, 1] at `sample_rate`.

    Files and bytes are decoded with PyAV (wav, mp3, ogg/vorbis, opus, flac, aac, the audio
    of an mp4, ...); channels are averaged; resampling is band-limited polyphase. Arrays
    need `src_rate`; int16/int32/uint8 arrays are scaled to [-1, 1]. NaN/inf, empty,
    over-long and non-audio input raise MediaError. `formats` (of `sniff_audio_format`)
    limits the containers: anything else is MediaError `audio_unreadable`, and the
    demuxer is chosen from the bytes, never probed (FFmpeg's probing would try playlist
    and other demuxers that open further files).
    """
    sample_rate = _check_rate(sample_rate, "sample_rate")
    if isinstance(src, np.ndarray):
        if src_rate is None:
            raise MediaError("audio_invalid", "an audio array needs src_rate (its sample rate in Hz)")
        rate = _check_rate(src_rate, "src_rate")
        return _finish(_audio_from_array(src), rate, sample_rate, max_seconds)

    import av

    data = _read_bytes(src, max_bytes, "audio")
    demuxer = None
    if formats is not None:
        demuxer = sniff_audio_format(data)
        if demuxer not in formats:
            raise MediaError("audio_unreadable", f"audio must be a {', '.join(formats)} file (its first bytes "
                                                 f"are none of these) or raw PCM16 sent as audio/pcm")
    chunks, rate = [], None
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            if not container.streams.audio:
                raise MediaError("audio_unreadable", "no audio stream in the data (is it an audio file?)")
            stream = container.streams.audio[0]
            rate = _check_rate(stream.rate or stream.codec_context.sample_rate, "the file's sample rate")
            # Planar float at the source rate; channels are averaged here (FFmpeg's own
            # downmix lowers each channel by 3 dB) and resampling is ours (polyphase).
            resampler = av.AudioResampler(format="fltp", rate=rate)
            total = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().mean(axis=0)
                    chunks.append(arr)
                    total += len(arr)
                    if total / rate > max_seconds:  # stop decoding early: a small file can hold hours
                        raise MediaError("audio_too_long", f"audio is longer than {max_seconds:.0f} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError, UnicodeDecodeError, EOFError) as exc:
        raise MediaError("audio_unreadable", f"not readable audio ({exc.__class__.__name__}: {exc})") from None
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return _finish(audio, rate, sample_rate, max_seconds)
