"""Driving: mel features, frame-aligned windows (full == streamed tail), motion vectors, encoder."""

import math

import numpy as np
import pytest
import torch

from model.config import MOTION_FIELDS, DrivingConfig
from model.driving import (LOG_FLOOR, DrivingEncoder, _mel_filterbank, audio_windows, log_mel, motion_vector,
                           window_length)

cfg = DrivingConfig()


def test_tone_peaks_in_the_right_mel_bin_and_silence_is_the_floor():
    t = torch.arange(16000) / 16000
    mel = log_mel(torch.sin(2 * math.pi * 1000 * t), cfg)
    assert mel.shape == (16000 // 160 + 1, cfg.n_mels)
    fb = _mel_filterbank(16000, cfg.n_fft, cfg.n_mels)
    expected_bin = int(fb[round(1000 / 16000 * cfg.n_fft)].argmax())
    assert abs(int(mel[50].argmax()) - expected_bin) <= 1
    silent = log_mel(torch.zeros(3200), cfg)
    assert torch.allclose(silent, torch.full_like(silent, math.log(LOG_FLOOR)))


@pytest.mark.parametrize("fps", [25, 16])
def test_windows_are_centred_on_frame_time(fps):
    # A click at the time of video frame 20 appears in frame 20's window, at the same
    # place relative to the window for any fps.
    audio = torch.zeros(16000 * 3)
    click = round(20 / fps * 16000)
    audio[click:click + 80] = 1.0
    mel = log_mel(audio, cfg)
    win = audio_windows(mel, fps, 0, 40, cfg)
    assert win.shape == (40, window_length(fps, cfg), cfg.n_mels)
    energy = win.mean(-1)  # (frames, win)
    per = 16000 / 160 / fps
    pos = int(energy[20].argmax())
    assert abs(pos - cfg.audio_context_frames * per) <= 2
    # Frames far away do not see it.
    assert energy[2].max() == energy[2].min()


def test_streaming_tail_equals_full_computation():
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(16000 * 4, generator=g) * 0.1
    full = audio_windows(log_mel(audio, cfg), 25, 60, 12, cfg)
    offset = 40 * 640 // 160 - 8  # keep only a tail, hop-aligned, with margin before frame 60's window
    tail_mel = log_mel(audio[(offset - 4) * 160:], cfg)[4:]
    tail = audio_windows(tail_mel, 25, 60, 12, cfg, mel_offset=offset)
    assert torch.allclose(full, tail, atol=1e-4)


def test_out_of_range_reads_as_silence():
    mel = log_mel(torch.randn(1600), cfg)
    win = audio_windows(mel, 25, -5, 3, cfg)
    assert torch.all(win == math.log(LOG_FLOOR))


def test_motion_vector_validation():
    v = motion_vector({"yaw": 0.3, "blink": 1.0})
    assert v.shape == (2 * len(MOTION_FIELDS),)
    assert v[MOTION_FIELDS.index("yaw")] == pytest.approx(0.3)
    assert v[len(MOTION_FIELDS) + MOTION_FIELDS.index("blink")] == 1.0
    assert v[len(MOTION_FIELDS) + MOTION_FIELDS.index("smile")] == 0.0
    for bad, msg in [({"nose": 1}, "unknown"), ({"yaw": "x"}, "number"), ({"blink": 2}, "outside"),
                     ({"smile": float("nan")}, "outside")]:
        with pytest.raises(ValueError, match=msg):
            motion_vector(bad)


def test_encoder_shapes_determinism_and_sensitivity():
    torch.manual_seed(0)
    enc = DrivingEncoder(cfg, 32).eval()
    win = torch.randn(2, 5, window_length(25, cfg), cfg.n_mels)
    mot = torch.zeros(2, 5, cfg.motion_dim)
    out = enc(win, mot)
    assert out.shape == (2, 5, 2, 32)
    assert torch.equal(out, enc(win, mot))
    assert not torch.allclose(enc(win + 1, mot)[:, :, 0], out[:, :, 0])
    mot2 = mot.clone()
    mot2[..., 0] = 0.5
    assert not torch.allclose(enc(win, mot2)[:, :, 1], out[:, :, 1])
