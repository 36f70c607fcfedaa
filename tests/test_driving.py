"""Driving: log-mel against a float64 reference, frame-aligned windows (exact sample times,
full == streamed tail), motion vectors, and the encoder."""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from model.config import MOTION_FIELDS, DrivingConfig
from model.driving import (LOG_FLOOR, MOTION_RANGES, SILENCE_LOG_MEL, DrivingEncoder, audio_windows,
                           frame_start_sample, log_mel, mel_filterbank, mel_frames_per_video_frame,
                           motion_vector, samples_per_frame, window_length, window_start)

pytestmark = pytest.mark.timeout(120)

cfg = DrivingConfig()
SR, HOP = cfg.sample_rate, cfg.hop_length


def reference_log_mel(audio: np.ndarray, cfg: DrivingConfig) -> np.ndarray:
    """float64 numpy log-mel written out by hand: reflect pad, periodic Hann frames, DFT."""
    half = cfg.n_fft // 2
    x = np.pad(audio.astype(np.float64), (half, half), mode="reflect")
    n_frames = len(audio) // cfg.hop_length + 1
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)  # periodic Hann
    frames = np.stack([x[m * cfg.hop_length:m * cfg.hop_length + cfg.n_fft] * window for m in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    fb = mel_filterbank(cfg).double().numpy()
    return np.log(np.maximum(power @ fb, LOG_FLOOR))


# ----------------------------------------------------------------------------------------
# log-mel
# ----------------------------------------------------------------------------------------

def test_log_mel_matches_float64_reference():
    rng = np.random.default_rng(0)
    audio = (0.2 * rng.standard_normal(SR // 2)).astype(np.float32)
    got = log_mel(torch.from_numpy(audio), cfg)
    ref = reference_log_mel(audio, cfg)
    assert got.shape == ref.shape == (len(audio) // HOP + 1, cfg.n_mels)
    assert got.dtype == torch.float32
    assert np.abs(got.numpy() - ref).max() < 1e-3
    # Batched input: each row equals its own computation.
    batch = torch.from_numpy(np.stack([audio, audio[::-1].copy()]))
    out = log_mel(batch, cfg)
    assert out.shape == (2, len(audio) // HOP + 1, cfg.n_mels)
    assert torch.allclose(out[1], log_mel(batch[1], cfg), atol=1e-5)


@pytest.mark.parametrize("hz", [300.0, 1000.0, 2500.0, 6000.0])
def test_pure_tone_peaks_in_the_filter_that_covers_its_frequency(hz):
    t = torch.arange(SR, dtype=torch.float64) / SR
    mel = log_mel(torch.sin(2 * math.pi * hz * t).float(), cfg)
    assert mel.shape == (SR // HOP + 1, cfg.n_mels)
    # The filter with the largest (area-normalised) weight at the tone's frequency, from
    # the mel scale directly: the tone lies between edges i and i+2 of filter i.
    mel_hz = 2595 * math.log10(1 + hz / 700)
    edges = np.linspace(0, 2595 * math.log10(1 + (SR / 2) / 700), cfg.n_mels + 2)
    centre_bin = int(np.argmin(np.abs(edges[1:-1] - mel_hz)))
    peaks = mel[10:-10].argmax(-1)
    assert torch.all((peaks - centre_bin).abs() <= 1), (hz, centre_bin, peaks.unique())


def test_silence_is_the_floor_and_mel_frame_m_is_centred_on_sample_m_hop():
    silent = log_mel(torch.zeros(3200), cfg)
    assert torch.equal(silent, torch.full_like(silent, SILENCE_LOG_MEL))
    assert SILENCE_LOG_MEL == pytest.approx(math.log(1e-5))
    # A click exactly at sample m*hop is seen most strongly (and symmetrically) by frame m.
    audio = torch.zeros(SR)
    audio[37 * HOP] = 1.0
    energy = log_mel(audio, cfg).exp().sum(-1)
    assert int(energy.argmax()) == 37
    assert energy[36] == pytest.approx(float(energy[38]), rel=1e-3)
    # A short input (under half a window) still gives S // hop + 1 frames.
    assert log_mel(torch.ones(50), cfg).shape == (1, cfg.n_mels)


def test_log_mel_bad_input():
    with pytest.raises(ValueError, match="torch.Tensor"):
        log_mel(np.zeros(100, np.float32), cfg)
    with pytest.raises(ValueError, match="0-d"):
        log_mel(torch.tensor(1.0), cfg)


# ----------------------------------------------------------------------------------------
# Alignment of windows to video frames
# ----------------------------------------------------------------------------------------

def test_frame_mel_rules_are_exact_for_any_fps():
    assert samples_per_frame(25, cfg) == 640 and samples_per_frame(30, cfg) == pytest.approx(533.3333333)
    assert mel_frames_per_video_frame(16, cfg) == 6.25
    assert window_length(25, cfg) == 16 and window_length(16, cfg) == 26
    span = cfg.audio_context_frames + 1 + cfg.lookahead_frames
    v = torch.arange(-8, 2_000_000, 997)  # far into an endless stream: no drift
    for fps in (25, 16, 30, 24, 12):
        per = Fraction(SR, fps * HOP)
        worst = max(math.ceil(k / per.denominator + span * per) for k in range(per.denominator))
        assert window_length(fps, cfg) == worst
        starts = window_start(v, fps, cfg)
        ref = [math.floor((int(x) - cfg.audio_context_frames) * per) for x in v]
        assert starts.tolist() == ref
        # The window covers its video frames' time span: the first mel frame is centred at
        # or before the span start (by less than a hop) and every mel frame centred inside
        # the span is in the window.
        for x, s in zip(v[:50].tolist(), starts[:50].tolist()):
            t0 = Fraction(x - cfg.audio_context_frames, fps)
            t1 = Fraction(x + 1 + cfg.lookahead_frames, fps)
            assert Fraction(s * HOP, SR) <= t0 < Fraction((s + 1) * HOP, SR)
            assert Fraction((s + window_length(fps, cfg)) * HOP, SR) >= t1
        assert [frame_start_sample(int(x), fps, cfg) for x in v[:50]] == \
               [math.ceil(Fraction(int(x) * SR, fps)) for x in v[:50]]
    with pytest.raises(ValueError, match="fps"):
        window_length(0, cfg)


@pytest.mark.parametrize("fps, frame", [(25, 20), (25, 33), (16, 20), (16, 21), (16, 23)])
def test_window_of_frame_v_sees_a_click_at_v_time(fps, frame):
    # A click at the start time of video frame `frame` appears in that frame's window at
    # the offset of its own time (audio_context_frames frame-lengths into the window),
    # whatever the fps, including fractional mel-per-frame positions (fps 16, frame 21:
    # 131.25 mel frames).
    audio = torch.zeros(SR * 3)
    click = frame_start_sample(frame, fps, cfg)
    audio[click:click + 40] = 1.0
    mel = log_mel(audio, cfg)
    win = audio_windows(mel, fps, 0, 45, cfg)
    assert win.shape == (45, window_length(fps, cfg), cfg.n_mels)
    energy = win.exp().sum(-1)  # (frames, win)
    expected = float(Fraction(frame * SR, fps * HOP) - int(window_start(frame, fps, cfg)))
    assert abs(int(energy[frame].argmax()) - expected) <= 1
    assert abs(expected - cfg.audio_context_frames * mel_frames_per_video_frame(fps, cfg)) < 1
    # Frames whose windows end well before the click, or start well after it, do not see it.
    before = frame - cfg.lookahead_frames - 3
    after = frame + cfg.audio_context_frames + 3
    for v in (before, after):
        assert torch.all(win[v] == win[v].flatten()[0]) and float(win[v].flatten()[0]) == pytest.approx(SILENCE_LOG_MEL)


@pytest.mark.parametrize("fps", [25, 16])
def test_streaming_tail_equals_full_computation(fps):
    """Chunk by chunk, a streaming caller keeps only a hop-aligned audio tail and passes its
    mel offset: its windows equal the ones from the whole-stream mel."""
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(SR * 4, generator=g) * 0.1
    full_mel = log_mel(audio, cfg)
    margin = math.ceil(cfg.n_fft / 2 / HOP)  # tail mel frames spoiled by the reflect padding
    chunk = 7  # video frames per step
    for first in range(0, 4 * fps - 2 * chunk, chunk):
        full = audio_windows(full_mel, fps, first, chunk, cfg)
        # Audio received so far: up to the end of the last window (plus half an FFT so the
        # last needed mel frame is final).
        last_needed = int(window_start(first + chunk - 1, fps, cfg)) + window_length(fps, cfg)
        received = min(len(audio), last_needed * HOP + cfg.n_fft // 2 + 1)
        keep_from = max(0, int(window_start(first, fps, cfg)) - margin)  # mel frame
        tail_mel = log_mel(audio[keep_from * HOP:received], cfg)
        offset = keep_from + (margin if keep_from else 0)
        tail_mel = tail_mel[offset - keep_from:]
        tail = audio_windows(tail_mel, fps, first, chunk, cfg, mel_offset=offset)
        assert torch.allclose(full, tail, atol=1e-4), (fps, first, (full - tail).abs().max())


def test_out_of_range_mel_frames_read_as_silence():
    mel = log_mel(torch.randn(1600) * 0.3, cfg)  # 0.1 s: 11 mel frames
    before = audio_windows(mel, 25, -5, 3, cfg)
    assert torch.all(before == SILENCE_LOG_MEL)
    # Frame 2's window reaches past the received audio: the missing frames are silence,
    # the received ones are copied.
    w = audio_windows(mel, 25, 2, 1, cfg)[0]  # mel frames [0, 16)
    assert torch.equal(w[:11], mel) and torch.all(w[11:] == SILENCE_LOG_MEL)
    # With an offset, rows before mel_offset are silence too.
    w = audio_windows(mel, 25, 2, 1, cfg, mel_offset=4)[0]
    assert torch.all(w[:4] == SILENCE_LOG_MEL) and torch.equal(w[4:15], mel)
    empty = audio_windows(mel[:0], 16, 0, 2, cfg)
    assert empty.shape == (2, 26, cfg.n_mels) and torch.all(empty == SILENCE_LOG_MEL)
    with pytest.raises(ValueError, match="n_mel_frames"):
        audio_windows(mel[None], 25, 0, 1, cfg)
    with pytest.raises(ValueError, match="n_frames"):
        audio_windows(mel, 25, 0, -1, cfg)


# ----------------------------------------------------------------------------------------
# Motion vectors
# ----------------------------------------------------------------------------------------

def test_motion_vector_values_and_flags():
    assert set(MOTION_RANGES) == set(MOTION_FIELDS)
    v = motion_vector({"yaw": 0.3, "blink": 1.0, "smile": None})
    n = len(MOTION_FIELDS)
    assert v.shape == (2 * n,) and v.dtype == np.float32
    assert v[MOTION_FIELDS.index("yaw")] == pytest.approx(0.3)
    assert v[n + MOTION_FIELDS.index("yaw")] == 1.0 and v[n + MOTION_FIELDS.index("blink")] == 1.0
    assert v[n + MOTION_FIELDS.index("smile")] == 0.0  # null = not given
    # Given 0 differs from not given.
    zero = motion_vector({"mouth_open": 0})
    assert zero[n + MOTION_FIELDS.index("mouth_open")] == 1.0 and zero[:n].sum() == 0
    assert np.array_equal(motion_vector(None), np.zeros(2 * n, np.float32))
    assert np.array_equal(motion_vector({}), np.zeros(2 * n, np.float32))
    # Range ends are accepted.
    for name, (lo, hi) in MOTION_RANGES.items():
        assert motion_vector({name: lo})[MOTION_FIELDS.index(name)] == pytest.approx(lo)
        assert motion_vector({name: np.float64(hi)})[MOTION_FIELDS.index(name)] == pytest.approx(hi)


@pytest.mark.parametrize("bad, msg", [
    ({"nose": 1}, "unknown motion field 'nose'"),
    ({"yaw": "x"}, "'yaw' must be a number"),
    ({"yaw": [0.1]}, "'yaw' must be a number"),
    ({"blink": True}, "'blink' must be a number"),
    ({"blink": 2}, r"'blink'=2.0 is outside \[0.0, 1.0\]"),
    ({"yaw": -1.5}, "'yaw'=-1.5 is outside"),
    ({"smile": float("nan")}, "'smile'=nan is outside"),
    ({"roll": float("inf")}, "'roll'=inf is outside"),
    ([("yaw", 0.1)], "mapping"),
])
def test_motion_vector_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        motion_vector(bad)


# ----------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fps", [25, 16])
def test_encoder_shapes_determinism_and_sensitivity(fps):
    torch.manual_seed(0)
    enc = DrivingEncoder(cfg, 32).eval()
    g = torch.Generator().manual_seed(1)
    win = torch.randn(2, 5, window_length(fps, cfg), cfg.n_mels, generator=g) * 3 - 5
    mot = torch.zeros(2, 5, cfg.motion_dim)
    out = enc(win, mot)
    assert out.shape == (2, 5, cfg.tokens_per_frame, 32)
    assert torch.equal(out, enc(win, mot))
    torch.manual_seed(0)
    assert torch.equal(out, DrivingEncoder(cfg, 32).eval()(win, mot))  # same seed, same weights
    # Audio changes the audio token only; motion the motion token only.
    louder = enc(win + 1, mot)
    assert not torch.allclose(louder[:, :, 0], out[:, :, 0])
    assert torch.equal(louder[:, :, 1], out[:, :, 1])
    mot2 = torch.from_numpy(np.stack([motion_vector({"yaw": 0.5})] * 10)).view(2, 5, -1)
    moved = enc(win, mot2)
    assert not torch.allclose(moved[:, :, 1], out[:, :, 1])
    assert torch.equal(moved[:, :, 0], out[:, :, 0])


def test_encoder_frames_are_independent_and_chunking_does_not_matter():
    torch.manual_seed(0)
    enc = DrivingEncoder(cfg, 16).eval()
    win = torch.randn(1, 8, window_length(25, cfg), cfg.n_mels)
    mot = torch.randn(1, 8, cfg.motion_dim)
    whole = enc(win, mot)
    parts = torch.cat([enc(win[:, :3], mot[:, :3]), enc(win[:, 3:], mot[:, 3:])], dim=1)
    assert torch.allclose(whole, parts, atol=1e-6)
    win2 = win.clone()
    win2[:, 4] += 2.0
    changed = (enc(win2, mot) - whole).abs().amax(dim=(0, 2, 3))
    assert changed[4] > 0 and torch.all(changed[torch.arange(8) != 4] == 0)


def test_encoder_trains_every_parameter_and_validates_inputs():
    torch.manual_seed(0)
    enc = DrivingEncoder(cfg, 8)
    win = torch.randn(2, 3, window_length(25, cfg), cfg.n_mels)
    mot = torch.randn(2, 3, cfg.motion_dim)
    enc(win, mot).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="audio_win"):
        enc(win[..., :40], mot)
    with pytest.raises(ValueError, match="motion must be"):
        enc(win, mot[:, :2])
    with pytest.raises(ValueError, match="tokens_per_frame"):
        DrivingEncoder(dataclasses.replace(cfg, tokens_per_frame=3), 8)
