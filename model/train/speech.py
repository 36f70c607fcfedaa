"""Speech and motion tracks for the avatar world.

Sentences come from a small seeded grammar; Debian's espeak-ng and flite speak them
(several voices and rates). The mouth follows the speech itself: mouth_open from the
loudness envelope of the voiced band, mouth_wide from the spectral balance (bright
vowels like "ee" spread the lips), both per video frame and smoothed for
co-articulation. This is the "loudness envelope" option of issue 4: a deterministic
function of the audio, so a model can learn it from the audio it is given. Idle motion
(blinks, head sway, gaze saccades, occasional smiles and brow raises) is generated
per frame.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

from model.config import MOTION_FIELDS

_F = {name: i for i, name in enumerate(MOTION_FIELDS)}

_SUBJECTS = ["the old man", "my sister", "a small bird", "the teacher", "our neighbour", "the red car", "this machine",
             "a quiet child", "the captain", "every student", "the baker", "her brother", "the tall tree",
             "a lonely cat", "the orchestra", "the river", "his friend", "the doctor", "a clever fox", "the farmer"]
_VERBS = ["carried", "painted", "watched", "found", "opened", "borrowed", "cleaned", "followed", "remembered",
          "counted", "visited", "ignored", "repaired", "described", "sold", "loved", "pushed", "answered"]
_OBJECTS = ["a heavy box", "the blue door", "seven apples", "an old letter", "the morning paper", "a broken clock",
            "the garden gate", "three yellow balloons", "a secret map", "the kitchen window", "a warm blanket",
            "the empty bottle", "a golden ring", "the long road", "two silver coins", "a paper boat"]
_TAILS = ["", "", "yesterday", "before dinner", "in the rain", "with great care", "after the meeting", "at noon",
          "without a word", "on Sunday morning", "near the station", "very slowly", "again and again"]
_QUESTIONS = ["did you see", "why would anyone want", "who gave you", "where did we leave", "can you believe"]

VOICES = [("espeak-ng", "en-us", 150), ("espeak-ng", "en-us", 175), ("espeak-ng", "en-gb", 160),
          ("espeak-ng", "en-us+f3", 165), ("flite", "slt", 0), ("flite", "kal", 0), ("flite", "awb", 0),
          ("flite", "rms", 0)]


def make_sentence(rng: np.random.Generator) -> str:
    if rng.random() < 0.2:
        return f"{rng.choice(_QUESTIONS)} {rng.choice(_OBJECTS)}?".capitalize()
    words = [str(rng.choice(_SUBJECTS)), str(rng.choice(_VERBS)), str(rng.choice(_OBJECTS)), str(rng.choice(_TAILS))]
    return (" ".join(w for w in words if w) + ".").capitalize()


class TTSUnavailable(RuntimeError):
    pass


def tts_available() -> list[str]:
    return [tool for tool in ("espeak-ng", "flite") if shutil.which(tool)]


def synthesize(text: str, voice: tuple[str, str, int] = VOICES[0], sample_rate: int = 16000) -> np.ndarray:
    """Speak `text` offline with espeak-ng or flite -> float32 mono at `sample_rate`."""
    from model.media import load_audio

    tool, name, rate = voice
    if not shutil.which(tool):
        raise TTSUnavailable(f"{tool} is not installed (Debian package '{tool}')")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "speech.wav")
        if tool == "espeak-ng":
            cmd = ["espeak-ng", "-v", name, "-s", str(rate), "-w", out, text]
        else:
            cmd = ["flite", "-voice", name, "-t", text, "-o", out]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return load_audio(out, sample_rate=sample_rate)


def mouth_track(audio: np.ndarray, fps: int, sample_rate: int = 16000, n_frames: int | None = None) -> np.ndarray:
    """Per video frame (mouth_open, mouth_wide) in [0, 1] from the audio.

    Frame v looks at a 40 ms window centred on its time. Open: voiced-band (100-3000 Hz)
    RMS in dB above a -45 dB floor relative to full scale, mapped to [0, 1]. Wide: share of
    2-4 kHz energy among voiced energy (front vowels, "s"). Smoothed with a short
    asymmetric filter (lips open fast, close a little slower).
    """
    n = n_frames if n_frames is not None else int(np.ceil(len(audio) / sample_rate * fps))
    half = int(0.02 * sample_rate)
    win = np.hanning(2 * half)
    freqs = np.fft.rfftfreq(2 * half, 1 / sample_rate)
    voiced = (freqs >= 100) & (freqs <= 3000)
    bright = (freqs >= 2000) & (freqs <= 4000)
    padded = np.pad(audio.astype(np.float32), (half, half + 2 * half))
    out = np.zeros((n, 2), np.float32)
    for v in range(n):
        c = int(round(v * sample_rate / fps)) + half
        seg = padded[c - half:c + half] * win
        spec = np.abs(np.fft.rfft(seg)) ** 2
        e_voiced = spec[voiced].sum() + 1e-12
        db = 10 * np.log10(e_voiced / (half * 2) * 4 + 1e-12)
        out[v, 0] = np.clip((db + 45) / 35, 0, 1)
        out[v, 1] = np.clip(spec[bright].sum() / e_voiced * 3, 0, 1) * min(1.0, out[v, 0] * 3)
    # Smoothing: attack fast, release slower (co-articulation).
    sm = np.zeros_like(out)
    prev = np.zeros(2, np.float32)
    for v in range(n):
        a = np.where(out[v] > prev, 0.7, 0.45)
        prev = a * out[v] + (1 - a) * prev
        sm[v] = prev
    return sm


def idle_motion(n_frames: int, fps: int, rng: np.random.Generator, lively: float = 1.0) -> np.ndarray:
    """(n_frames, len(MOTION_FIELDS)) natural idle motion; mouth fields are left at 0."""
    t = np.arange(n_frames) / fps
    m = np.zeros((n_frames, len(MOTION_FIELDS)), np.float32)
    if n_frames == 0:
        return m
    # Head sway: a few slow sinusoids per axis.
    for name, amp in (("yaw", 0.18), ("pitch", 0.1), ("roll", 0.08)):
        x = np.zeros(n_frames)
        for _ in range(3):
            f = rng.uniform(0.05, 0.4)
            x += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        m[:, _F[name]] = amp * lively * x / 2.0 + rng.uniform(-0.5, 0.5) * amp
    # Blinks: every 2-6 s, ~200 ms, closing fast.
    s = rng.uniform(0, 3)
    while s < t[-1] + 1:
        d = rng.uniform(0.15, 0.25)
        phase = (t - s) / d
        shape = np.where((phase >= 0) & (phase <= 1), np.sin(np.pi * np.clip(phase, 0, 1)) ** 0.7, 0)
        m[:, _F["blink"]] = np.maximum(m[:, _F["blink"]], shape)
        s += rng.uniform(2.0, 6.0)
    # Gaze saccades: hold a target for 0.5-3 s, jump quickly.
    s, gx, gy = 0.0, 0.0, 0.0
    while s < t[-1] + 1:
        e = s + rng.uniform(0.5, 3.0)
        sel = (t >= s) & (t < e)
        m[sel, _F["gaze_x"]] = gx
        m[sel, _F["gaze_y"]] = gy
        gx, gy = (rng.uniform(-0.6, 0.6), rng.uniform(-0.4, 0.4)) if rng.random() < 0.6 else (0.0, 0.0)
        s = e
    # Occasional smile and brow raise, slow ramps.
    for name, base, amp in (("smile", 0.0, 0.8), ("brow", 0.5, 0.4)):
        x = np.full(n_frames, base, np.float32)
        s = rng.uniform(0, 4)
        while s < t[-1]:
            d = rng.uniform(0.8, 2.5)
            phase = np.clip((t - s) / d, 0, 1)
            x += amp * rng.uniform(0.3, 1.0) * np.sin(np.pi * phase) * ((t >= s) & (t <= s + d))
            s += rng.uniform(3, 9)
        m[:, _F[name]] = np.clip(x, 0, 1)
    return m


def speaking_motion(audio: np.ndarray, fps: int, rng: np.random.Generator, sample_rate: int = 16000,
                    n_frames: int | None = None) -> np.ndarray:
    """Idle motion with the mouth driven by `audio`: the ground truth of a talking clip."""
    track = mouth_track(audio, fps, sample_rate, n_frames)
    m = idle_motion(len(track), fps, rng)
    m[:, _F["mouth_open"]] = track[:, 0]
    m[:, _F["mouth_wide"]] = track[:, 1]
    return m
