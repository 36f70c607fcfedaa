"""Driving signals -> per-video-frame tokens: log-mel audio windows and motion vectors.

Audio: 16 kHz mono -> log-mel (hop 10 ms, mel frame m centred on sample m * hop) -> for
each video frame v, the mel frames covering video frames
[v - audio_context_frames, v + 1 + lookahead_frames) -> one token.
Motion: one vector per video frame (values + "given" flags, see `MOTION_FIELDS`) -> one token.

Frame/sample rule (documented once, used everywhere here). With R = sample_rate,
H = hop_length and a video rate of fps:
  * video frame v starts at time v / fps, i.e. at sample v * R / fps (`samples_per_frame`
    = R / fps, fractional for e.g. fps 30);
  * one video frame spans R / (fps * H) mel frames (`mel_frames_per_video_frame`; 4 at
    fps 25, 6.25 at fps 16);
  * frame v's window starts at mel frame floor((v - audio_context_frames) * R / (fps * H)),
    the last mel frame centred at or before the window's start time, computed in exact
    integer arithmetic from v (never by accumulating per-frame steps, so rounding cannot
    drift over an endless stream);
  * every window has the same length for a given fps, the longest any frame needs to
    reach its span's end: with span = audio_context_frames + 1 + lookahead_frames and
    R / (fps * H) = p / q in lowest terms, ceil(span * p / q + (q - 1) / q) mel frames
    (16 at fps 25; 26 at fps 16, where the floored start can lose up to 3/4 of a frame).
    So the window holds the mel frame at or before the span start and every mel frame
    centred inside the span [(v - audio_context_frames) / fps, (v + 1 + lookahead_frames) / fps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from model.config import MOTION_FIELDS, DrivingConfig

LOG_FLOOR = 1e-5
# log-mel value of digital silence (and of mel frames outside the received audio).
SILENCE_LOG_MEL = math.log(LOG_FLOOR)

# Accepted range of each motion field (see MOTION_FIELDS in model/config.py for meaning
# and units: pose in radians, the rest normalised).
MOTION_RANGES: dict[str, tuple[float, float]] = {
    "yaw": (-1.2, 1.2), "pitch": (-1.0, 1.0), "roll": (-1.0, 1.0), "blink": (0.0, 1.0),
    "gaze_x": (-1.0, 1.0), "gaze_y": (-1.0, 1.0), "mouth_open": (0.0, 1.0), "mouth_wide": (0.0, 1.0),
    "smile": (0.0, 1.0), "brow": (0.0, 1.0),
    "head_x": (-0.25, 0.25), "head_y": (-0.25, 0.25), "head_scale": (-0.5, 0.5)}


# ----------------------------------------------------------------------------------------
# Log-mel features
# ----------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """(n_fft // 2 + 1, n_mels) triangular HTK-mel filters, area-normalised (Slaney style).

    Filter i rises from mel edge i to i+1 and falls to i+2; edges are evenly spaced on the
    HTK mel scale from 0 Hz to Nyquist. Cached: treat the result as read-only.
    """
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rise = (freqs - lo) / max(mid - lo, 1e-9)
        fall = (hi - freqs) / max(hi - mid, 1e-9)
        # Area normalisation: a wide high-frequency filter does not collect more energy
        # than a narrow low one for the same spectral density.
        fb[:, i] = np.maximum(0, np.minimum(rise, fall)) * 2.0 / (hi - lo)
    return torch.from_numpy(fb).float()


def mel_filterbank(cfg: DrivingConfig) -> Tensor:
    """(n_fft // 2 + 1, n_mels) float32 filterbank `log_mel` uses (a copy; safe to modify)."""
    return _mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels).clone()


def log_mel(audio: Tensor, cfg: DrivingConfig) -> Tensor:
    """(..., S) float 16 kHz audio -> (..., S // hop + 1, n_mels) float32 log-mel.

    Hann window of n_fft samples, power spectrum, mel filterbank, log(clamp(., 1e-5)).
    Mel frame m is centred on sample m * hop_length (torch.stft center=True, reflect
    padding at both ends), so hop 160 at 16 kHz gives 100 mel frames per second. A mel
    frame only depends on samples [m * hop - n_fft/2, m * hop + n_fft/2]: a streaming
    caller recomputing from a hop-aligned tail gets the same frames once it drops the
    first ceil(n_fft / 2 / hop) of them (and the last ones, which see the end padding).
    """
    if not isinstance(audio, Tensor):
        raise ValueError(f"log_mel expects a torch.Tensor of samples, got {type(audio).__name__}")
    if audio.ndim < 1:
        raise ValueError("log_mel expects audio shaped (..., samples), got a 0-d tensor")
    shape = audio.shape[:-1]
    x = audio.reshape(-1, audio.shape[-1]).float()
    if x.shape[-1] < cfg.n_fft // 2 + 1:  # reflect padding needs more samples than half a window
        x = torch.nn.functional.pad(x, (0, cfg.n_fft // 2 + 1 - x.shape[-1]))
    window = torch.hann_window(cfg.n_fft, device=x.device)
    spec = torch.stft(x, cfg.n_fft, cfg.hop_length, window=window, center=True, return_complex=True)
    power = spec.abs() ** 2  # (N, n_fft/2+1, frames)
    fb = _mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels).to(x.device)
    mel = torch.einsum("nft,fm->ntm", power, fb)
    out = torch.log(mel.clamp_min(LOG_FLOOR))
    n = audio.shape[-1] // cfg.hop_length + 1
    return out[:, :n].reshape(*shape, -1, cfg.n_mels)


# ----------------------------------------------------------------------------------------
# Frame <-> sample <-> mel-frame alignment (see the rule in the module docstring)
# ----------------------------------------------------------------------------------------

def _check_fps(fps: int) -> None:
    if not isinstance(fps, (int, np.integer)) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")


def samples_per_frame(fps: int, cfg: DrivingConfig) -> float:
    """Audio samples per video frame, sample_rate / fps (640 at fps 25; 533.33 at fps 30)."""
    _check_fps(fps)
    return cfg.sample_rate / fps


def frame_start_sample(frame: int, fps: int, cfg: DrivingConfig) -> int:
    """First audio sample at or after the start of video frame `frame`: ceil(frame * R / fps),
    exact integer arithmetic (negative frames give negative samples)."""
    _check_fps(fps)
    return -((-frame * cfg.sample_rate) // fps)


def mel_frames_per_video_frame(fps: int, cfg: DrivingConfig) -> float:
    """Mel frames per video frame, R / (fps * hop): 4 at fps 25, 6.25 at fps 16."""
    _check_fps(fps)
    return cfg.sample_rate / cfg.hop_length / fps


def window_length(fps: int, cfg: DrivingConfig) -> int:
    """Mel frames in every video frame's window, fixed for a given fps (16 at fps 25, 26 at fps 16).

    The window starts at a floored mel index, losing a fraction k / q of a mel frame
    (q = denominator of the mel-frames-per-video-frame ratio); the length covers the worst
    case k = q - 1 so every frame's span end is inside its window.
    """
    _check_fps(fps)
    span = cfg.audio_context_frames + 1 + cfg.lookahead_frames
    per = Fraction(cfg.sample_rate, fps * cfg.hop_length)
    return math.ceil(span * per + Fraction(per.denominator - 1, per.denominator))


def window_start(frames: Tensor | int, fps: int, cfg: DrivingConfig) -> Tensor:
    """Mel frame index where each video frame's window starts (int64, same shape as `frames`).

    floor((v - audio_context_frames) * R / (fps * hop)) in integer arithmetic: the last mel
    frame centred at or before the start time of video frame v - audio_context_frames.
    """
    _check_fps(fps)
    v = torch.as_tensor(frames, dtype=torch.int64)
    return torch.div((v - cfg.audio_context_frames) * cfg.sample_rate, fps * cfg.hop_length,
                     rounding_mode="floor")


def audio_windows(mel: Tensor, fps: int, first_frame: int, n_frames: int, cfg: DrivingConfig,
                  mel_offset: int = 0) -> Tensor:
    """Per video frame v in [first_frame, first_frame + n_frames): its mel window.

    mel: (n_mel, n_mels), row 0 = mel frame `mel_offset` of the stream (a streaming caller
    keeps only a tail). Mel frames outside the given rows (before the stream start, or not
    yet received) read as the log-mel of silence.
    Returns (n_frames, window_length(fps, cfg), n_mels), same dtype/device as `mel`.
    """
    if mel.ndim != 2 or mel.shape[1] != cfg.n_mels:
        raise ValueError(f"mel must be (n_mel_frames, {cfg.n_mels}), got {tuple(mel.shape)}")
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    win = window_length(fps, cfg)
    v = torch.arange(first_frame, first_frame + n_frames, dtype=torch.int64)
    idx = window_start(v, fps, cfg)[:, None] + torch.arange(win)[None, :] - mel_offset  # (n_frames, win)
    idx = idx.to(mel.device)
    valid = (idx >= 0) & (idx < mel.shape[0])
    if mel.shape[0] == 0:
        return mel.new_full((n_frames, win, cfg.n_mels), SILENCE_LOG_MEL)
    out = mel[idx.clamp(0, mel.shape[0] - 1)]
    return torch.where(valid[..., None], out, torch.full_like(out, SILENCE_LOG_MEL))


# ----------------------------------------------------------------------------------------
# Motion vectors
# ----------------------------------------------------------------------------------------

def motion_vector(fields: Mapping[str, float] | None) -> np.ndarray:
    """{"yaw": 0.2, ...} -> (2 * len(MOTION_FIELDS),) float32: values, then "given" flags.

    Fields not in `fields` (or given as None, JSON null) are "not given": value 0, flag 0.
    Unknown names, non-numbers and out-of-range or NaN values raise ValueError naming the
    field and the accepted range.
    """
    vec = np.zeros(2 * len(MOTION_FIELDS), dtype=np.float32)
    if fields is None:
        return vec
    if not isinstance(fields, Mapping):
        raise ValueError(f"motion must be a mapping of field name -> number, got {type(fields).__name__}")
    for name, value in fields.items():
        if name not in MOTION_RANGES:
            raise ValueError(f"unknown motion field {name!r}; known: {', '.join(MOTION_FIELDS)}")
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):  # float(True) would silently pass as 1.0
            raise ValueError(f"motion field {name!r} must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"motion field {name!r} must be a number, got {value!r}") from None
        lo, hi = MOTION_RANGES[name]
        if not (lo <= value <= hi):  # also refuses NaN and inf
            raise ValueError(f"motion field {name!r}={value} is outside [{lo}, {hi}]")
        i = MOTION_FIELDS.index(name)
        vec[i] = value
        vec[len(MOTION_FIELDS) + i] = 1.0
    return vec


# ----------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------

class DrivingEncoder(nn.Module):
    """(audio windows, motion) per video frame -> `tokens_per_frame` tokens of width `out_dim`.

    Token 0 of each frame is audio (two 1D convs over the window's time axis, mean+max
    pooled, MLP), token 1 is motion (MLP); each gets a learned per-kind embedding. Every
    video frame is encoded independently of its neighbours (frames only meet inside the
    DiT), so chunked and whole-sequence encoding agree.
    """

    def __init__(self, cfg: DrivingConfig, out_dim: int):
        super().__init__()
        if cfg.tokens_per_frame != 2:
            raise ValueError(f"DrivingEncoder makes 2 tokens per frame (audio, motion); "
                             f"got tokens_per_frame={cfg.tokens_per_frame}, set it to 2")
        if out_dim <= 0:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        self.cfg = cfg
        h = cfg.hidden
        self.audio_conv = nn.Sequential(
            nn.Conv1d(cfg.n_mels, h, 3, padding=1), nn.SiLU(),
            nn.Conv1d(h, h, 3, padding=1, stride=2), nn.SiLU())
        self.audio_out = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, out_dim))
        self.motion_mlp = nn.Sequential(nn.Linear(cfg.motion_dim, h), nn.SiLU(), nn.Linear(h, out_dim))
        self.kind = nn.Parameter(torch.randn(cfg.tokens_per_frame, out_dim) * 0.02)
        # Typical log-mel level and spread of speech at 16 kHz: centres the conv input
        # (silence is log(1e-5) = -11.5, loud speech around 0..4).
        self.mel_shift, self.mel_scale = -6.0, 4.0

    def forward(self, audio_win: Tensor, motion: Tensor) -> Tensor:
        """audio_win (B, Tv, win, n_mels), motion (B, Tv, motion_dim) -> (B, Tv, tokens_per_frame, out_dim)."""
        if audio_win.ndim != 4 or audio_win.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"audio_win must be (B, Tv, win, {self.cfg.n_mels}), got {tuple(audio_win.shape)}")
        B, Tv, win, n = audio_win.shape
        if motion.shape != (B, Tv, self.cfg.motion_dim):
            raise ValueError(f"motion must be ({B}, {Tv}, {self.cfg.motion_dim}) to match audio_win, "
                             f"got {tuple(motion.shape)}")
        x = ((audio_win - self.mel_shift) / self.mel_scale).reshape(B * Tv, win, n).transpose(1, 2)
        x = self.audio_conv(x)  # (B*Tv, h, ceil(win/2))
        x = torch.cat([x.mean(-1), x.amax(-1)], dim=-1)
        audio_tok = self.audio_out(x).view(B, Tv, -1)
        motion_tok = self.motion_mlp(motion)
        tokens = torch.stack([audio_tok, motion_tok], dim=2)  # (B, Tv, 2, out_dim)
        return tokens + self.kind
