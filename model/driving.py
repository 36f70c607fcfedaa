"""Driving signals -> per-video-frame tokens: log-mel audio windows and motion vectors.

Audio: 16 kHz mono -> log-mel (hop 10 ms) -> for each video frame v, the mel frames
covering video frames [v - audio_context_frames, v + 1 + lookahead_frames) -> one token.
Window positions come from exact sample times (fps 16 gives 6.25 mel frames per video
frame), never from accumulated rounding. Motion: one vector per video frame (values +
"given" flags, see `MOTION_FIELDS`) -> one token.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from model.config import MOTION_FIELDS, DrivingConfig

LOG_FLOOR = 1e-5


@lru_cache(maxsize=8)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """(n_fft // 2 + 1, n_mels) triangular HTK-mel filters, area-normalised (Slaney style)."""
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
        fb[:, i] = np.maximum(0, np.minimum(rise, fall)) * 2.0 / (hi - lo)
    return torch.from_numpy(fb).float()


def log_mel(audio: Tensor, cfg: DrivingConfig) -> Tensor:
    """(..., S) float 16 kHz -> (..., S // hop + 1, n_mels) log-mel; frame m is centred on sample m * hop."""
    shape = audio.shape[:-1]
    x = audio.reshape(-1, audio.shape[-1]).float()
    if x.shape[-1] < cfg.n_fft // 2 + 1:  # reflect padding needs a few samples
        x = torch.nn.functional.pad(x, (0, cfg.n_fft // 2 + 1 - x.shape[-1]))
    window = torch.hann_window(cfg.n_fft, device=x.device)
    spec = torch.stft(x, cfg.n_fft, cfg.hop_length, window=window, center=True, return_complex=True)
    power = spec.abs() ** 2  # (N, n_fft/2+1, frames)
    mel = torch.einsum("nft,fm->ntm", power, _mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels).to(x.device))
    out = torch.log(mel.clamp_min(LOG_FLOOR))
    n = audio.shape[-1] // cfg.hop_length + 1
    return out[:, :n].reshape(*shape, -1, cfg.n_mels)


def mel_frames_per_video_frame(fps: int, cfg: DrivingConfig) -> float:
    return cfg.sample_rate / cfg.hop_length / fps


def window_length(fps: int, cfg: DrivingConfig) -> int:
    """Mel frames in one video frame's window (fixed for a given fps)."""
    frames = cfg.audio_context_frames + 1 + cfg.lookahead_frames
    return int(math.ceil(frames * mel_frames_per_video_frame(fps, cfg)))


def audio_windows(mel: Tensor, fps: int, first_frame: int, n_frames: int, cfg: DrivingConfig,
                  mel_offset: int = 0) -> Tensor:
    """Per video frame v in [first_frame, first_frame + n_frames): its mel window.

    mel: (n_mel, n_mels), row 0 = mel frame `mel_offset` of the stream. Mel frames outside
    the given rows (before the stream, or not yet received) read as silence (log floor).
    Returns (n_frames, window_length, n_mels).
    """
    per = mel_frames_per_video_frame(fps, cfg)
    win = window_length(fps, cfg)
    v = torch.arange(first_frame, first_frame + n_frames, dtype=torch.float64)
    start = torch.floor((v - cfg.audio_context_frames) * per).long()  # exact sample times, no accumulation
    idx = start[:, None] + torch.arange(win)[None, :] - mel_offset  # (n_frames, win)
    valid = (idx >= 0) & (idx < mel.shape[0])
    out = mel[idx.clamp(0, max(mel.shape[0] - 1, 0))] if mel.shape[0] else mel.new_zeros(n_frames, win, cfg.n_mels)
    return torch.where(valid[..., None], out, torch.full_like(out, math.log(LOG_FLOOR)))


_RANGES = {"yaw": (-1.2, 1.2), "pitch": (-1.0, 1.0), "roll": (-1.0, 1.0), "blink": (0.0, 1.0),
           "gaze_x": (-1.0, 1.0), "gaze_y": (-1.0, 1.0), "mouth_open": (0.0, 1.0), "mouth_wide": (0.0, 1.0),
           "smile": (0.0, 1.0), "brow": (0.0, 1.0)}


def motion_vector(fields: dict[str, float] | None) -> np.ndarray:
    """{"yaw": 0.2, ...} -> (2 * len(MOTION_FIELDS),) float32: values then "given" flags.

    Unknown names, non-numbers and out-of-range values raise ValueError naming the field.
    """
    vec = np.zeros(2 * len(MOTION_FIELDS), dtype=np.float32)
    for name, value in (fields or {}).items():
        if name not in _RANGES:
            raise ValueError(f"unknown motion field {name!r}; known: {', '.join(MOTION_FIELDS)}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"motion field {name!r} must be a number, got {value!r}") from None
        lo, hi = _RANGES[name]
        if not (lo <= value <= hi):  # also refuses NaN
            raise ValueError(f"motion field {name!r}={value} is outside [{lo}, {hi}]")
        i = MOTION_FIELDS.index(name)
        vec[i] = value
        vec[len(MOTION_FIELDS) + i] = 1.0
    return vec


class DrivingEncoder(nn.Module):
    """(audio windows, motion) per video frame -> `tokens_per_frame` tokens of width `out_dim`."""

    def __init__(self, cfg: DrivingConfig, out_dim: int):
        super().__init__()
        if cfg.tokens_per_frame != 2:
            raise ValueError("DrivingEncoder makes 2 tokens per frame (audio, motion); set tokens_per_frame=2")
        self.cfg = cfg
        h = cfg.hidden
        # Audio: a small 1D conv over time of the mel window, pooled, then an MLP.
        self.audio_conv = nn.Sequential(
            nn.Conv1d(cfg.n_mels, h, 3, padding=1), nn.SiLU(),
            nn.Conv1d(h, h, 3, padding=1, stride=2), nn.SiLU())
        self.audio_out = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, out_dim))
        self.motion_mlp = nn.Sequential(nn.Linear(cfg.motion_dim, h), nn.SiLU(), nn.Linear(h, out_dim))
        self.kind = nn.Parameter(torch.randn(cfg.tokens_per_frame, out_dim) * 0.02)
        # Mel input statistics for speech at 16 kHz (log power): centres the input.
        self.mel_shift, self.mel_scale = -6.0, 4.0

    def forward(self, audio_win: Tensor, motion: Tensor) -> Tensor:
        """audio_win (B, Tv, win, n_mels), motion (B, Tv, motion_dim) -> (B, Tv, tokens_per_frame, out_dim)."""
        B, Tv, win, n = audio_win.shape
        x = ((audio_win - self.mel_shift) / self.mel_scale).reshape(B * Tv, win, n).transpose(1, 2)
        x = self.audio_conv(x)  # (B*Tv, h, win/2)
        x = torch.cat([x.mean(-1), x.amax(-1)], dim=-1)
        audio_tok = self.audio_out(x).view(B, Tv, -1)
        motion_tok = self.motion_mlp(motion)
        tokens = torch.stack([audio_tok, motion_tok], dim=2)  # (B, Tv, 2, out_dim)
        return tokens + self.kind
