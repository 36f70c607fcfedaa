"""Speech -> mouth motion for personal avatars.

A personal avatar learns motion -> face from the person's clip (which may be silent); its
speech comes through the mouth fields instead of the DiT's audio path: the procedural
world's own mouth function of the speech (`model.train.speech.mouth_track`: voiced-band
loudness for the opening, spectral brightness for the width, smoothed for
co-articulation), scaled to this person, becomes mouth_open / mouth_wide wherever the
session gives no mouth of its own.

Scale: the loudest speech (a mouth_track value of 1) opens the mouth as far as the person
opened it in the clip (the 95th percentile of the measured mouth_open; the same for the
width), so a person who barely opens their mouth to talk keeps doing so.
"""

from __future__ import annotations

import numpy as np

from model.config import MOTION_FIELDS
from model.timeline import Timeline

QUANTILE = 95
_OPEN, _WIDE = MOTION_FIELDS.index("mouth_open"), MOTION_FIELDS.index("mouth_wide")
_N = len(MOTION_FIELDS)


def gains(motion: np.ndarray) -> tuple[float, float]:
    """(mouth_open, mouth_wide) gains from a person's measured motion (T, fields)."""
    if len(motion) == 0:
        raise ValueError("no motion to take the person's mouth range from")
    return (float(np.percentile(motion[:, _OPEN], QUANTILE)), float(np.percentile(motion[:, _WIDE], QUANTILE)))


def fill(motion: np.ndarray, audio: np.ndarray | None, audio_from: int, first_frame: int, timeline: Timeline,
         mouth_gains: tuple[float, float]) -> np.ndarray:
    """Driving vectors (F, 2 * fields) of frames first_frame.. with mouth_open and mouth_wide
    filled in from the speech in the rows where each is not given (its flag 0). audio: samples from stream sample
    `audio_from` (None: silence, a closed mouth). Frames before the stream start stay as
    they are. Returns a new array."""
    from model.train.speech import mouth_track

    out = np.array(motion, np.float32, copy=True)
    started = np.arange(len(out)) + first_frame >= 0
    if not any(((out[:, _N + i] == 0) & started).any() for i in (_OPEN, _WIDE)):
        return out
    track = np.zeros((len(out), 2), np.float32)
    if audio is not None and len(audio):
        # mouth_track reads frame v's window around sample v * rate / fps from its array's start.
        shift = timeline.sample_of(first_frame) - audio_from
        a = np.asarray(audio, np.float32)
        a = a[shift:] if shift >= 0 else np.concatenate([np.zeros(-shift, np.float32), a])
        # Audio not known yet (a stream's input may end early) reads as silence.
        a = np.pad(a, (0, max(0, timeline.sample_of(len(out) + 1) - len(a))))
        track = mouth_track(a, timeline.fps, timeline.sample_rate, n_frames=len(out))
    for k, (field, gain) in enumerate(zip((_OPEN, _WIDE), mouth_gains)):
        free = (out[:, _N + field] == 0) & started
        out[free, field] = np.clip(gain * track[free, k], 0, 1)
        out[free, _N + field] = 1.0
    return out
