"""Speech and motion tracks for the avatar world.

Sentences come from a small seeded grammar; Debian's espeak-ng and flite speak them
(several voices and rates). The mouth follows the speech itself: mouth_open from the
loudness envelope of the voiced band, mouth_wide from the spectral balance (bright
vowels like "ee" spread the lips), both per video frame and smoothed for
co-articulation: a deterministic function of the audio, so a model can learn it from
the audio it is given. Idle motion (blinks, head sway, gaze saccades, occasional smiles
and brow raises) is generated per frame.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

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


# ------------------------------------------------------------------------------------------
# Mouth shapes from phone timings: pocketsphinx forced alignment -> visemes -> per frame.
# ------------------------------------------------------------------------------------------

# CMU/pocketsphinx phone -> (mouth_open, mouth_wide) target. Bilabials close the lips,
# open vowels open them, front vowels and sibilants spread them, rounded vowels narrow.
PHONE_VISEMES: dict[str, tuple[float, float]] = {
    "SIL": (0.0, 0.0), "P": (0.0, 0.0), "B": (0.0, 0.0), "M": (0.0, 0.0),
    "F": (0.1, 0.3), "V": (0.1, 0.3),
    "W": (0.15, 0.0), "UW": (0.25, 0.0), "UH": (0.3, 0.05), "OW": (0.45, 0.0), "OY": (0.5, 0.1),
    "AO": (0.6, 0.05), "AW": (0.75, 0.15),
    "AA": (0.9, 0.3), "AE": (0.75, 0.55), "AH": (0.6, 0.3), "AY": (0.8, 0.4), "EH": (0.55, 0.55),
    "ER": (0.35, 0.2), "EY": (0.5, 0.6), "IH": (0.4, 0.6), "IY": (0.3, 0.8),
    "TH": (0.25, 0.4), "DH": (0.25, 0.4), "T": (0.25, 0.35), "D": (0.25, 0.35), "N": (0.25, 0.35),
    "L": (0.3, 0.35), "S": (0.15, 0.6), "Z": (0.15, 0.6), "SH": (0.25, 0.15), "ZH": (0.25, 0.15),
    "CH": (0.25, 0.15), "JH": (0.25, 0.15), "R": (0.25, 0.2), "Y": (0.25, 0.6),
    "K": (0.35, 0.35), "G": (0.35, 0.35), "NG": (0.3, 0.35), "HH": (0.45, 0.3),
}
# Alignment attempts, in order: (dither RMS, seconds of silence padded on both sides).
# TTS silence is exact zeros, whose log energy derails the aligner's search; a little
# seeded noise fixes most sentences, and the search is sensitive to both settings, so a
# failure is retried with others. Measured on 48 sentences over all 8 voices: no dither
# 22/40 (espeak-ng only), first attempt 45/48, all three 46-47/48.
_ALIGN_ATTEMPTS = ((5e-5, 0.5), (2e-4, 0.2), (1e-3, 0.5))


@dataclass(frozen=True)
class Phone:
    name: str      # CMU phone ("AA", "M", ...) or "SIL"
    start: float   # seconds from sample 0 of the aligned audio
    end: float


class AlignmentError(RuntimeError):
    """Forced alignment could not place the text on the audio (unknown word, no speech...)."""


def _pocketsphinx():
    try:
        import pocketsphinx
    except ImportError as e:
        raise ImportError("forced alignment needs the PyPI package 'pocketsphinx' (5.1.1 ships en-us models)") from e
    return pocketsphinx


@functools.lru_cache(maxsize=1)
def _pronunciations() -> dict[str, list[str]]:
    """word -> its pronunciation lines ("word PH PH ...", "word(2) ...") of the bundled cmudict."""
    ps = _pocketsphinx()
    path = os.path.join(ps.get_model_path(), "en-us", "cmudict-en-us.dict")
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            out.setdefault(head.split("(", 1)[0], []).append(line.rstrip("\n"))
    return out


def _decoder(words: list[str], sample_rate: int, tmp: str):
    """A fresh decoder that knows only `words` and has no language model.

    Fresh per call because a reused decoder carries state from one utterance to the next
    (measured: results then depend on what was aligned before, and fewer sentences align);
    with a few-word dictionary and no language model it starts in ~20 ms instead of 0.6 s."""
    ps = _pocketsphinx()
    prons = _pronunciations()
    unknown = sorted({w for w in words if w not in prons})
    if unknown:
        raise AlignmentError(f"words not in the pronouncing dictionary: {unknown}")
    path = os.path.join(tmp, "words.dict")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(line for w in sorted(set(words)) for line in prons[w]) + "\n")
    return ps.Decoder(samprate=sample_rate, dict=path, lm=None, loglevel="FATAL")


def _normalise_text(text: str) -> str:
    words = re.sub(r"[^a-z' ]+", " ", text.lower()).split()
    if not words:
        raise AlignmentError(f"no words to align in {text!r}")
    return " ".join(words)


def align_phones(audio: np.ndarray, text: str, sample_rate: int = 16000) -> list[Phone]:
    """Phone timings of `text` spoken in `audio` ((S,) float32 mono) by pocketsphinx forced
    alignment (10 ms resolution). Deterministic. Raises AlignmentError when the text cannot
    be aligned (unknown word, or the search fails with every setting in _ALIGN_ATTEMPTS)."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (S,), got {audio.shape}")
    words = _normalise_text(text)
    for i, (dither, pad_s) in enumerate(_ALIGN_ATTEMPTS):
        try:
            return _align_once(audio, words, sample_rate, dither, pad_s)
        except AlignmentError as e:
            if i == len(_ALIGN_ATTEMPTS) - 1 or "dictionary" in str(e):
                raise


def _align_once(audio: np.ndarray, words: str, sample_rate: int, dither: float, pad_s: float) -> list[Phone]:
    pad = np.zeros(int(pad_s * sample_rate), np.float32)
    x = np.concatenate([pad, audio, pad])
    x = x + dither * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = _decoder(words.split(), sample_rate, tmp)
            d.set_align_text(words)
            for second_pass in (False, True):  # word alignment, then phone alignment
                if second_pass:
                    d.set_alignment()
                d.start_utt()
                d.process_raw(pcm, full_utt=True)
                d.end_utt()
            alignment = d.get_alignment()
    except AlignmentError:
        raise
    except RuntimeError as e:
        raise AlignmentError(f"pocketsphinx could not align {words!r}: {e}") from e
    if alignment is None:
        raise AlignmentError(f"pocketsphinx returned no alignment for {words!r}")
    frame_s = 0.01  # pocketsphinx frame rate: 100 frames per second
    duration = len(audio) / sample_rate
    phones = []
    for word in alignment:
        for p in word:
            name = "SIL" if p.name.startswith("+") else p.name
            start = p.start * frame_s - pad_s
            end = start + p.duration * frame_s
            if end > 0 and start < duration:
                phones.append(Phone(name, max(0.0, start), min(end, duration)))
    if not any(p.name != "SIL" for p in phones):
        raise AlignmentError(f"alignment of {words!r} placed no phones inside the audio")
    return phones


def viseme_track(phones: list[Phone], n_frames: int, fps: int, smooth_s: float = 0.03) -> np.ndarray:
    """(n_frames, 2) per-video-frame (mouth_open, mouth_wide) from phone timings.

    Targets are laid out at 100 Hz, blended across phone borders with a Gaussian of
    `smooth_s` seconds (co-articulation: lips move towards the next shape early), then
    read at each frame's time v / fps. Time not covered by a phone is silence (closed)."""
    rate = 100
    n = int(math.ceil(n_frames / fps * rate)) + 1
    target = np.zeros((n, 2), np.float64)
    for p in phones:
        if p.name not in PHONE_VISEMES:
            raise ValueError(f"unknown phone {p.name!r}; expected one of {sorted(PHONE_VISEMES)}")
        a, b = int(round(p.start * rate)), int(round(p.end * rate))
        target[max(0, a):max(0, min(n, b))] = PHONE_VISEMES[p.name]
    sigma = smooth_s * rate
    k = np.arange(-int(3 * sigma) - 1, int(3 * sigma) + 2)
    kernel = np.exp(-0.5 * (k / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(target, ((len(k) // 2, len(k) // 2), (0, 0)))
    smooth = np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(2)], -1)
    t = np.arange(n_frames) / fps * rate - 0.5  # sample i holds the interval [i, i + 1) / rate
    return np.stack([np.interp(t, np.arange(n), smooth[:, c]) for c in range(2)], -1).astype(np.float32)


def speech_mouth_track(audio: np.ndarray, text: str, fps: int, sample_rate: int = 16000,
                       n_frames: int | None = None) -> tuple[np.ndarray, str, list[Phone]]:
    """(n_frames, 2) mouth track of `text` spoken in `audio`, and which source made it:
    "alignment" (pocketsphinx phones -> visemes) or, when alignment fails, the named
    fallback "loudness" (`mouth_track`, the voiced-band envelope). Also the phones ([] on
    the fallback)."""
    n = n_frames if n_frames is not None else int(np.ceil(len(audio) / sample_rate * fps))
    try:
        phones = align_phones(audio, text, sample_rate)
    except AlignmentError:
        return mouth_track(audio, fps, sample_rate, n), "loudness", []
    return viseme_track(phones, n, fps), "alignment", phones
