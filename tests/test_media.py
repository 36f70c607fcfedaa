"""Bad input gets a clear MediaError, good input of other rates/layouts is resampled correctly."""

import io
import struct
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from model.media import MediaError, fit_portrait, load_audio, load_image, pcm16_to_float

pytestmark = pytest.mark.timeout(60)


def png_bytes(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), 1).save(buf, format="PNG")
    return buf.getvalue()


def patch_png_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the IHDR width/height (and its CRC) of a small PNG: a cheap decompression bomb."""
    ihdr = bytearray(data[8:8 + 25])  # length(4) type(4) data(13) crc(4)
    ihdr[8:16] = struct.pack(">II", w, h)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return data[:8] + bytes(ihdr) + data[33:]


def wav_bytes(audio: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        s = out.add_stream("pcm_s16le", rate=rate)
        s.layout = "stereo" if channels == 2 else "mono"
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        inter = pcm.T.reshape(1, -1) if channels == 2 else pcm.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(inter, format="s16", layout=s.layout.name)
        frame.sample_rate = rate
        for p in s.encode(frame):
            out.mux(p)
        for p in s.encode():
            out.mux(p)
    return buf.getvalue()


def dominant_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * rate / len(x)


@pytest.mark.parametrize("data, code", [
    (b"this is not an image", "image_unreadable"),
    (b"", "image_empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image_unreadable"),
])
def test_unreadable_images(data, code):
    with pytest.raises(MediaError) as e:
        load_image(data)
    assert e.value.code == code


def test_decompression_bomb_refused_from_header():
    bomb = patch_png_size(png_bytes(8, 8, "1"), 20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(MediaError) as e:
        load_image(bomb)
    assert e.value.code == "image_too_large" and "400000000" in str(e.value)
    # Under Pillow's own limit but over ours: refused from the header too.
    with pytest.raises(MediaError) as e:
        load_image(patch_png_size(png_bytes(8, 8, "1"), 9000, 5000))
    assert e.value.code == "image_too_large" and "9000x5000" in str(e.value)


def test_zero_size_array_and_good_images():
    with pytest.raises(MediaError):
        load_image(np.zeros((0, 10, 3), np.uint8))
    rgba = load_image(png_bytes(30, 20, "RGBA"))
    assert rgba.shape == (20, 30, 3) and rgba.dtype == np.uint8
    gray = load_image(png_bytes(16, 16, "L"))
    assert gray.shape == (16, 16, 3)


def test_fit_portrait_any_aspect():
    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    out = fit_portrait(img, 128, 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("rate, channels", [(8000, 1), (48000, 2), (16000, 1), (22050, 1)])
def test_audio_is_resampled_to_16k_mono(rate, channels):
    t = np.arange(int(rate * 1.5)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    audio = np.stack([tone, tone]) if channels == 2 else tone
    out = load_audio(wav_bytes(audio, rate, channels))
    assert out.dtype == np.float32
    assert abs(len(out) - 24000) <= 16
    assert abs(dominant_hz(out, 16000) - 1000) < 5
    assert 0.3 < np.abs(out).max() <= 0.51


@pytest.mark.parametrize("data, code", [
    (b"RIFF garbage that is not audio at all" * 4, "audio_unreadable"),
    (b"", "audio_empty"),
])
def test_bad_audio(data, code):
    with pytest.raises(MediaError) as e:
        load_audio(data)
    assert e.value.code == code


def test_empty_and_nan_audio_arrays():
    with pytest.raises(MediaError) as e:
        load_audio(np.zeros(0, np.float32), src_rate=16000)
    assert e.value.code == "audio_empty"
    bad = np.zeros(1000, np.float32)
    bad[10] = np.nan
    with pytest.raises(MediaError) as e:
        load_audio(bad, src_rate=16000)
    assert e.value.code == "audio_not_finite"
    with pytest.raises(MediaError):
        load_audio(np.zeros(100, np.float32))  # no src_rate


def test_pcm16():
    x = pcm16_to_float(np.array([0, 16384, -32768], "<i2").tobytes())
    assert np.allclose(x, [0, 0.5, -1.0])
    with pytest.raises(MediaError):
        pcm16_to_float(b"\x00")
