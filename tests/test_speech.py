"""Speech tracks: phone timings -> visemes, forced alignment on real TTS speech (open while
speaking, closed in silence), the loudness fallback, and idle motion statistics."""

import importlib.util

import numpy as np
import pytest

from model.config import MOTION_FIELDS
from model.train import speech as sp

F = {n: i for i, n in enumerate(MOTION_FIELDS)}
FPS = 25
needs_tts = pytest.mark.skipif(not sp.tts_available(),
                               reason="no offline TTS (apt-get install -y espeak-ng flite)")
needs_aligner = pytest.mark.skipif(importlib.util.find_spec("pocketsphinx") is None,
                                   reason="PyPI package pocketsphinx is not installed")


def test_viseme_track_follows_phones():
    phones = [sp.Phone("SIL", 0.0, 0.4), sp.Phone("M", 0.4, 0.5), sp.Phone("AA", 0.5, 0.9),
              sp.Phone("IY", 0.9, 1.2), sp.Phone("UW", 1.2, 1.5), sp.Phone("SIL", 1.5, 2.0)]
    track = sp.viseme_track(phones, 50, FPS)
    assert track.shape == (50, 2) and track.dtype == np.float32
    at = lambda s: track[int(round(s * FPS))]  # noqa: E731
    assert at(0.2).max() < 1e-6 and at(1.9).max() < 1e-6              # silence: closed
    assert at(0.7)[0] == pytest.approx(0.9, abs=0.02)                  # "aa": open
    assert at(1.04)[1] > 0.7 and at(1.36)[1] < 0.1                     # "ee" spreads, "oo" rounds
    # Co-articulation: the mouth starts opening before the vowel, but is not yet fully open.
    assert 0.05 < at(0.48)[0] < 0.6
    # Gaussian smoothing of a step is symmetric around the border: the reference is the
    # normal CDF of the distance to the border, evaluated in float64.
    from math import erf, sqrt
    border, sigma = 0.5, 0.03
    for t in (0.44, 0.48, 0.52, 0.56):
        cdf = 0.5 * (1 + erf((t - border) / (sigma * sqrt(2))))
        assert at(t)[0] == pytest.approx(0.9 * cdf, abs=0.03)
    with pytest.raises(ValueError, match="unknown phone"):
        sp.viseme_track([sp.Phone("QQ", 0, 1)], 10, FPS)


@needs_tts
@needs_aligner
def test_alignment_opens_mouth_in_speech_and_closes_it_in_silence():
    text = "The old man carried a heavy box yesterday."
    speech = sp.synthesize(text, sp.VOICES[0])
    pad = np.zeros(16000, np.float32)  # one second of silence on each side
    audio = np.concatenate([pad, speech, pad])
    track, source, phones = sp.speech_mouth_track(audio, text, FPS)
    assert source == "alignment"
    assert track.shape == (int(np.ceil(len(audio) / 16000 * FPS)), 2)
    spoken = [p for p in phones if p.name != "SIL"]
    # The phones land on the speech, not in the padding, and in order.
    assert spoken[0].start >= 0.9 and spoken[-1].end <= 1.0 + len(speech) / 16000 + 0.1
    assert all(a.start <= b.start for a, b in zip(spoken, spoken[1:]))
    assert spoken[0].name == "DH"  # "the ..."
    first, last = int(spoken[0].start * FPS), int(np.ceil(spoken[-1].end * FPS))
    silent = np.r_[0:first - 3, last + 3:len(track)]
    assert track[silent, 0].max() < 0.02
    vowels = [p for p in spoken if p.name in ("AA", "AE", "AH", "EH", "OW", "AY")]
    at_vowels = [track[int(round((p.start + p.end) / 2 * FPS)), 0] for p in vowels]
    assert np.mean(at_vowels) > 0.35
    assert track[first:last, 0].mean() > 5 * track[silent, 0].mean() + 0.1
    # Deterministic, whatever was aligned before (a reused decoder would carry state).
    other = sp.synthesize("A clever fox painted seven apples.", sp.VOICES[4])
    sp.align_phones(other, "A clever fox painted seven apples.")
    assert sp.align_phones(audio, text) == phones


@needs_tts
@needs_aligner
def test_alignment_failure_falls_back_to_loudness():
    speech = sp.synthesize("Hello there.", sp.VOICES[0])
    with pytest.raises(sp.AlignmentError):
        sp.align_phones(speech, "zzxqv blorptastic")
    track, source, phones = sp.speech_mouth_track(speech, "zzxqv blorptastic", FPS)
    assert source == "loudness" and phones == []
    np.testing.assert_array_equal(track, sp.mouth_track(speech, FPS))


def test_idle_motion_is_natural_and_seeded():
    n = 60 * FPS
    m = sp.idle_motion(n, FPS, np.random.default_rng(5))
    assert m.shape == (n, len(MOTION_FIELDS))
    np.testing.assert_array_equal(m, sp.idle_motion(n, FPS, np.random.default_rng(5)))
    blink = m[:, F["blink"]]
    onsets = np.nonzero((blink[1:] > 0.5) & (blink[:-1] <= 0.5))[0]
    assert 8 <= len(onsets) <= 35                     # a blink every 2-6 s
    assert (blink > 0.5).mean() < 0.1                 # eyes mostly open
    assert np.abs(m[:, F["yaw"]]).max() < 0.4 and m[:, F["yaw"]].std() > 0.02  # small, moving
    jumps = np.abs(np.diff(m[:, F["gaze_x"]]))
    assert (jumps > 0.05).sum() >= 5 and (jumps > 0).mean() < 0.2  # saccades, then holds
    assert np.all(m[:, F["mouth_open"]] == 0)
