"""Speech-driven scores of a personal avatar: does the generated mouth follow unseen speech?

The mouth opening is measured on the generated frames by the landmark model (as in the
reenactment scores); the speech envelope is the loudness of the audio around each frame
(RMS in dB over 40 ms centred on the frame's time, all frequencies: not the voiced-band
function that drives the mouth, so the score does not grade the driver by itself). Their
Pearson correlation is taken at every lag up to MAX_LAG frames either way: `r` at lag 0, and
the lag of the highest correlation (the A/V offset: positive when the mouth follows the
sound).

Speech: real voices (wav files, e.g. pyannote.audio's test recordings, fetched by
bench/personal_clips.py --speech) and an offline TTS voice (espeak-ng / flite sentences of
the world's grammar, with pauses), never heard in any fit.
"""

from __future__ import annotations

import numpy as np

MAX_LAG = 10          # frames (400 ms at 25 fps)
WINDOW_S = 0.04
FLOOR_DB = -60.0
TTS_PAUSE_S = 0.4


def envelope(audio: np.ndarray, fps: int, sample_rate: int, n_frames: int) -> np.ndarray:
    """(n_frames,) loudness in dB (floored at FLOOR_DB) of the audio around each frame's time."""
    half = int(WINDOW_S / 2 * sample_rate)
    padded = np.pad(np.asarray(audio, np.float64), (half, half + int(n_frames * sample_rate / fps) + 1))
    out = np.empty(n_frames)
    for v in range(n_frames):
        c = int(round(v * sample_rate / fps)) + half
        seg = padded[c - half:c + half]
        out[v] = 10 * np.log10(max((seg * seg).mean(), 10 ** (FLOOR_DB / 10)))
    return out


def av_sync(mouth: np.ndarray, env: np.ndarray, max_lag: int = MAX_LAG) -> dict[str, float]:
    """{"r": correlation at lag 0, "lag": frames of the best lag (> 0: the mouth follows the
    sound), "r_best": the correlation there}. NaN frames of `mouth` (no face) are left out."""
    from model.train.metrics import correlation

    mouth, env = np.asarray(mouth, np.float64), np.asarray(env, np.float64)
    best, best_lag = -2.0, 0
    r0 = float("nan")
    for lag in range(-max_lag, max_lag + 1):
        m = mouth[max(0, lag):len(mouth) + min(0, lag)]
        e = env[max(0, -lag):len(env) - max(0, lag)]
        ok = np.isfinite(m)
        r = correlation(m[ok], e[ok]) if ok.sum() > 2 else float("nan")
        if lag == 0:
            r0 = r
        if np.isfinite(r) and r > best:
            best, best_lag = r, lag
    return {"r": r0, "lag": float(best_lag), "r_best": best}


def tts_speech(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """`seconds` of offline TTS: world-grammar sentences in turn by every installed voice,
    TTS_PAUSE_S of silence between them. Raises speech.TTSUnavailable without espeak-ng/flite."""
    from model.train import speech as sp

    installed = sp.tts_available()
    voices = [v for v in sp.VOICES if v[0] in installed]
    if not voices:
        raise sp.TTSUnavailable("no offline TTS: install Debian's espeak-ng and/or flite")
    rng = np.random.default_rng(seed)
    parts, n, want = [], 0, int(seconds * sample_rate)
    pause = np.zeros(int(TTS_PAUSE_S * sample_rate), np.float32)
    while n < want:
        said = sp.synthesize(sp.make_sentence(rng), voices[len(parts) // 2 % len(voices)], sample_rate)
        parts += [said, pause]
        n += len(said) + len(pause)
    return np.concatenate(parts)[:want]
