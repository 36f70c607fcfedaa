"""Bad media gets a clear MediaError code (and nothing hangs); good media of other formats,
modes, rates and layouts comes out right (checked against analytic references)."""

import io
import math
import struct
import zlib

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from model.media import MediaError, find_face, fit_portrait, load_audio, load_image, pcm16_to_float

# Every test here must finish quickly; a hang (a decoder stuck on bad input) fails instead
# of blocking the suite.
pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------------------------------
# Fixtures made in code (no media files in the repository)
# ----------------------------------------------------------------------------------------

def png_bytes(w, h, mode="RGB", color=1):
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def patch_png_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the IHDR width/height (and its CRC) of a small PNG: a cheap decompression bomb."""
    ihdr = bytearray(data[8:8 + 25])  # length(4) type(4) data(13) crc(4)
    ihdr[8:16] = struct.pack(">II", w, h)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return data[:8] + bytes(ihdr) + data[33:]


def encode_audio(audio: np.ndarray, rate: int, codec: str = "pcm_s16le", fmt: str = "wav") -> bytes:
    """(channels, samples) float in [-1, 1] -> an encoded file (PyAV converts the sample
    format and frames it to the codec's frame size)."""
    audio = np.atleast_2d(audio).astype(np.float32)
    layout = {1: "mono", 2: "stereo"}[audio.shape[0]]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for p in stream.encode(frame):
            out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return buf.getvalue()


def wav_bytes(audio: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """16-bit WAV of mono (samples,) or stereo (2, samples) audio (tests/test_cli.py uses it)."""
    audio = np.asarray(audio)
    if (audio.ndim == 2) != (channels == 2):
        raise ValueError(f"wav_bytes: channels={channels} does not match audio shape {audio.shape}")
    return encode_audio(audio, rate)


def empty_wav(rate=16000) -> bytes:
    """A valid 16-bit mono WAV header with a zero-length data chunk."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt))
            + fmt + b"data" + struct.pack("<I", 0))


def tone(rate: int, seconds: float, hz: float = 1000.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return amp * np.sin(2 * np.pi * hz * t)


def dominant_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))
    return np.argmax(spec) * rate / (8 * len(x))


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(MediaError) as e:
        fn(*args, **kw)
    assert str(e.value), "a MediaError must carry a message for people"
    assert isinstance(e.value, ValueError)
    return e.value.code


# ----------------------------------------------------------------------------------------
# Images: bad input
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, code", [
    (b"this is not an image", "image_unreadable"),
    (b"", "image_empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image_unreadable"),  # PNG signature, garbage after
    (png_bytes(64, 64, "RGB", (10, 200, 30))[:60], "image_unreadable"),  # truncated
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "image_unreadable"),  # EPS: decoder not allowed
    (patch_png_size(png_bytes(8, 8), 0, 10), "image_empty"),  # zero width
    (patch_png_size(png_bytes(8, 8), 10, 0), "image_empty"),  # zero height
])
def test_bad_image_bytes(data, code):
    assert code_of(load_image, data) == code


def test_bad_image_sources(tmp_path):
    assert code_of(load_image, tmp_path / "missing.png") == "image_not_found"
    assert code_of(load_image, 12345) == "image_invalid"
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(64, 64))
    assert code_of(load_image, big, max_bytes=100) == "image_too_large"  # refused by size on disk
    assert code_of(load_image, np.zeros((0, 10, 3), np.uint8)) == "image_empty"
    assert code_of(load_image, np.zeros((10, 10, 3), np.float32)) == "image_invalid"
    assert code_of(load_image, np.zeros((10, 10, 2), np.uint8)) == "image_invalid"
    assert code_of(load_image, np.zeros((100, 100, 3), np.uint8), max_pixels=5000) == "image_too_large"


def test_decompression_bombs_are_refused_from_the_header(monkeypatch):
    # Decoding is made impossible: the only way to pass is to refuse from the header.
    from PIL import ImageFile

    def no_decode(self, *a, **k):
        raise AssertionError("a bomb must be refused before decoding")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    bomb = patch_png_size(png_bytes(8, 8, "1"), 20000, 20000)
    assert len(bomb) < 200  # a tiny file claiming 400 Mpixel (1.2 GB as RGB)
    with pytest.raises(MediaError) as e:
        load_image(bomb)
    assert e.value.code == "image_too_large" and "400000000" in str(e.value)
    # Under Pillow's own limit but over ours: our header check says what was wrong.
    with pytest.raises(MediaError) as e:
        load_image(patch_png_size(png_bytes(8, 8, "1"), 9000, 5000))
    assert e.value.code == "image_too_large" and "9000x5000" in str(e.value)
    # The limit is the caller's: a real 100x100 image over max_pixels, refused undecoded.
    assert code_of(load_image, png_bytes(100, 100), max_pixels=9999) == "image_too_large"


# ----------------------------------------------------------------------------------------
# Images: good input of every mode becomes (H, W, 3) uint8 RGB
# ----------------------------------------------------------------------------------------

def test_image_modes_become_rgb(tmp_path):
    rgb = load_image(png_bytes(30, 20, "RGB", (10, 200, 30)))
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8 and np.all(rgb == [10, 200, 30])
    gray = load_image(png_bytes(16, 12, "L", 77))
    assert gray.shape == (12, 16, 3) and np.all(gray == 77)
    # Transparency is composited on white: opaque pixels keep their colour, transparent
    # ones turn white, half-transparent ones are half way.
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[0] = (200, 0, 0, 255)
    rgba[1] = (0, 0, 0, 0)
    rgba[2] = (0, 0, 0, 128)
    rgba[3] = (0, 100, 0, 255)
    out = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.all(out[0] == [200, 0, 0]) and np.all(out[1] == 255) and np.all(out[3] == [0, 100, 0])
    assert np.all(np.abs(out[2].astype(int) - 127) <= 1)
    # Palette image with a transparent index.
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = load_image(encode(pal, "PNG", transparency=1))
    assert np.all(out[0, 0] == 255) and np.all(out[1, 1] == [255, 0, 0])
    # 16-bit grey keeps its brightness (a plain convert("RGB") would clip it to white).
    g16 = Image.fromarray(np.full((5, 5), 32896, np.uint16))  # 50 % grey
    out = load_image(encode(g16, "PNG"))
    assert np.all(np.abs(out.astype(int) - 128) <= 1)
    # CMYK JPEG, 1-bit, GIF, BMP, WebP, TIFF, from a path too.
    cmyk = load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert np.all(np.abs(cmyk.astype(int) - [255, 0, 0]) <= 8)
    assert np.all(load_image(png_bytes(9, 9, "1", 1)) == 255)
    for fmt in ("GIF", "BMP", "WEBP", "TIFF"):
        img = load_image(encode(Image.new("RGB", (7, 5), (0, 0, 250)), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        assert img.shape == (5, 7, 3) and np.all(np.abs(img.astype(int) - [0, 0, 250]) <= 4), fmt
    path = tmp_path / "face.png"
    path.write_bytes(png_bytes(11, 13))
    assert load_image(path).shape == (13, 11, 3) and load_image(str(path)).shape == (13, 11, 3)
    # Arrays: grey, single channel, RGBA.
    assert load_image(np.full((3, 4), 9, np.uint8)).shape == (3, 4, 3)
    assert load_image(np.full((3, 4, 1), 9, np.uint8)).shape == (3, 4, 3)
    arr = np.zeros((2, 2, 4), np.uint8)
    assert np.all(load_image(arr) == 255)  # fully transparent -> white


def test_exif_orientation_is_applied():
    # Stored 40 wide x 20 high, left half red; EXIF orientation 6 says "rotate 90 deg
    # clockwise to display": the shown image is 20 wide x 40 high with red on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60   # top: red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom: blue


# ----------------------------------------------------------------------------------------
# Portrait crop
# ----------------------------------------------------------------------------------------

def test_fit_portrait_centre_crop_fallback_is_exact():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)  # noise: no face
    assert find_face(img) is None
    out = fit_portrait(img, 128, 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    expected = cv2.resize(img[:, 100:400], (128, 128), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out, expected)
    # Other aspects, up- and downscaling.
    assert fit_portrait(img, 480, 832).shape == (480, 832, 3)
    assert fit_portrait(img[:40, :30], 64, 48).shape == (64, 48, 3)
    assert fit_portrait(img[:1, :1], 8, 8).shape == (8, 8, 3)


def test_fit_portrait_crops_around_the_face():
    from model.train import world

    # A procedural face the Haar cascade finds at several sizes (identity 0; some cartoon
    # identities are not detected, which is the fallback path tested above).
    face = world.render_frame(world.identity_from_seed(0), world.neutral_motion(), 160)  # (160, 160, 3)
    canvas = np.full((480, 900, 3), 120, np.uint8)
    canvas[260:420, 40:200] = face  # face centre ~(340, 120); a centre crop (x 210..690) misses it
    box = find_face(canvas)
    assert box is not None
    x, y, w, h = box
    assert abs(x + w / 2 - 120) < 25 and abs(y + h / 2 - 340) < 35
    out = fit_portrait(canvas, 128, 128)
    # The crop holds the face, near its centre.
    assert out.std() > 20
    inner = find_face(out)
    assert inner is not None
    ix, iy, iw, ih = inner
    assert abs(ix + iw / 2 - 64) < 20 and iw > 30
    centre = fit_portrait(np.full((480, 900, 3), 120, np.uint8), 128, 128)
    assert centre.std() == 0


def test_fit_portrait_validates_its_input():
    with pytest.raises(ValueError, match="uint8"):
        fit_portrait(np.zeros((10, 10), np.uint8), 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        fit_portrait(np.zeros((10, 10, 3), np.float32), 8, 8)
    with pytest.raises(ValueError, match="positive"):
        fit_portrait(np.zeros((10, 10, 3), np.uint8), 0, 8)


# ----------------------------------------------------------------------------------------
# Audio: rates, layouts and formats
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate, channels", [(8000, 1), (48000, 2), (16000, 1), (22050, 1), (44100, 2)])
def test_wav_is_resampled_to_16k_mono(rate, channels):
    src = tone(rate, 1.5)
    audio = np.stack([src, src]) if channels == 2 else src
    out = load_audio(encode_audio(audio, rate))
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == math.ceil(len(src) * 16000 / rate)  # exact duration: 1.5 s
    assert abs(dominant_hz(out, 16000) - 1000) < 1
    # Against the analytic tone at the new sample times (float64), away from the filter's
    # edge transients: only int16 quantisation and the resampler's ripple remain.
    ref = tone(16000, 1.5)
    inner = slice(800, len(ref) - 800)
    assert np.abs(out[inner] - ref[inner]).max() < 5e-3


def test_stereo_channels_are_averaged():
    a = tone(48000, 1.0)
    cancel = load_audio(encode_audio(np.stack([a, -a]), 48000))
    assert np.abs(cancel).max() < 1e-3  # L + R cancel: averaging, not "take the left channel"
    half = load_audio(encode_audio(np.stack([a, np.zeros_like(a)]), 48000))
    assert np.abs(half[800:-800] - tone(16000, 1.0)[800:-800] / 2).max() < 5e-3
    # Arrays: (channels, samples) and (samples, channels) agree.
    st = np.stack([a, 0.5 * a]).astype(np.float32)
    assert np.allclose(load_audio(st, src_rate=48000), load_audio(st.T.copy(), src_rate=48000))


@pytest.mark.parametrize("codec, fmt, rate", [("flac", "flac", 16000), ("libmp3lame", "mp3", 44100),
                                               ("libopus", "ogg", 48000), ("aac", "adts", 22050)])
def test_compressed_formats_decode(codec, fmt, rate):
    data = encode_audio(tone(rate, 1.5), rate, codec, fmt)
    out = load_audio(data)
    # Lossy codecs add priming/padding samples: duration within 0.1 s.
    assert abs(len(out) - 24000) < 1600
    assert abs(dominant_hz(out, 16000) - 1000) < 2
    assert 0.4 < np.abs(out).max() <= 0.6


def test_arrays_int16_uint8_and_custom_rate():
    pcm = (tone(8000, 0.5) * 32767).astype(np.int16)
    out = load_audio(pcm, src_rate=8000)
    assert len(out) == 8000 and abs(np.abs(out).max() - 0.5) < 0.01
    u8 = np.array([128, 255, 0], np.uint8)
    assert np.allclose(load_audio(u8, src_rate=16000), [0, 127 / 128, -1])
    out = load_audio(tone(16000, 0.5).astype(np.float32), src_rate=16000, sample_rate=24000)
    assert len(out) == 12000 and abs(dominant_hz(out, 24000) - 1000) < 1


# ----------------------------------------------------------------------------------------
# Audio: bad input
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, code", [
    (b"RIFF garbage that is not audio at all" * 4, "audio_unreadable"),
    (bytes(range(256)) * 64, "audio_unreadable"),
    (png_bytes(16, 16), "audio_unreadable"),  # an image: no audio stream
    (b"", "audio_empty"),
    (empty_wav(), "audio_empty"),  # a valid WAV with no samples
])
def test_bad_audio_bytes(data, code):
    assert code_of(load_audio, data) == code


def test_bad_audio_arrays_and_sources(tmp_path):
    nan = np.zeros(1000, np.float32)
    nan[10] = np.nan
    assert code_of(load_audio, nan, src_rate=16000) == "audio_not_finite"
    inf = np.zeros((2, 1000), np.float32)
    inf[1, 5] = np.inf
    assert code_of(load_audio, inf, src_rate=48000) == "audio_not_finite"
    assert code_of(load_audio, np.zeros(0, np.float32), src_rate=16000) == "audio_empty"
    assert code_of(load_audio, np.zeros(100, np.float32)) == "audio_invalid"  # no src_rate
    assert code_of(load_audio, np.zeros(100, np.float32), src_rate=0) == "audio_bad_rate"
    assert code_of(load_audio, np.zeros(100, np.float32), src_rate=44100.5) == "audio_bad_rate"
    assert code_of(load_audio, np.zeros((2, 3, 100), np.float32), src_rate=16000) == "audio_invalid"
    assert code_of(load_audio, np.zeros((100, 100), np.float32), src_rate=16000) == "audio_invalid"
    assert code_of(load_audio, np.zeros(100, np.complex64), src_rate=16000) == "audio_invalid"
    # int16 values stored as float would be clipped into a square wave: refused instead.
    assert code_of(load_audio, tone(16000, 0.1) * 32767, src_rate=16000) == "audio_out_of_range"
    assert code_of(load_audio, np.zeros(16000 * 3, np.float32), src_rate=16000, max_seconds=2) == "audio_too_long"
    assert code_of(load_audio, encode_audio(tone(8000, 3.0), 8000), max_seconds=2) == "audio_too_long"
    assert code_of(load_audio, tmp_path / "missing.wav") == "audio_not_found"
    assert code_of(load_audio, encode_audio(tone(8000, 1.0), 8000), max_bytes=1000) == "audio_too_large"
    assert code_of(load_audio, 3.5) == "audio_invalid"


def test_audio_from_a_path(tmp_path):
    path = tmp_path / "speech.wav"
    path.write_bytes(encode_audio(tone(8000, 1.0), 8000))
    assert len(load_audio(path)) == 16000 and len(load_audio(str(path))) == 16000


def test_pcm16():
    x = pcm16_to_float(np.array([0, 16384, -32768, 32767], "<i2").tobytes())
    assert x.dtype == np.float32 and np.allclose(x, [0, 0.5, -1.0, 32767 / 32768])
    assert pcm16_to_float(b"").shape == (0,)
    with pytest.raises(MediaError) as e:
        pcm16_to_float(b"\x00")
    assert e.value.code == "audio_invalid"
