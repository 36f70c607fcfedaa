"""Metrics of generated video against ground-truth renders. Pure numpy (+ OpenCV filters).

Conventions: a clip is (T, H, W, 3) uint8 RGB; a box is (x0, y0, x1, y1) in pixels,
end-exclusive, one per frame. Every metric returns a finite float for constant or
identical inputs (see each function for the convention it uses), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

# Identical frames have infinite PSNR; they score this instead. Beyond ~60 dB 8-bit
# frames differ by a few least-significant bits in a few pixels: invisible.
PSNR_CAP = 60.0
# SSIM constants of Wang et al. 2004 for 8-bit data, and their Gaussian window.
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
# Frame-difference energies below this (mean squared 8-bit difference) count as "no
# motion": a static clip has jitter 1, not 0/0.
JITTER_EPS = 1e-6

Box = tuple[int, int, int, int]


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two clips (T, H, W, 3) of the same shape; return them unconverted (metrics
    work frame by frame in float64, so a minutes-long clip never exists in float64)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"clips must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim != 4 or a.shape[-1] != 3 or len(a) == 0:
        raise ValueError(f"clips must be (T, H, W, 3) with T >= 1, got {a.shape}")
    return a, b


def _boxes(boxes: Sequence[Box] | Box, n: int) -> list[Box]:
    """One box for every frame (a single box is repeated)."""
    if len(np.shape(boxes)) == 1:
        boxes = [tuple(boxes)] * n
    if len(boxes) != n:
        raise ValueError(f"need one box per frame: {n} frames, {len(boxes)} boxes")
    return [tuple(int(v) for v in b) for b in boxes]


# ------------------------------------------------------------------------------------------
# Fidelity: PSNR and SSIM, whole frame or inside a box
# ------------------------------------------------------------------------------------------


def psnr_frames(a: np.ndarray, b: np.ndarray, boxes: Sequence[Box] | Box | None = None) -> np.ndarray:
    """Per-frame PSNR in dB, capped at PSNR_CAP. a, b: (T, H, W, 3) uint8; boxes: None
    (whole frame) or one box per frame (only the pixels inside count; an empty box scores
    PSNR_CAP, as there is nothing to differ). Returns (T,) float64."""
    a, b = _pair(a, b)
    boxes = [(0, 0, a.shape[2], a.shape[1])] * len(a) if boxes is None else _boxes(boxes, len(a))
    mse = np.zeros(len(a))
    for t, (x0, y0, x1, y1) in enumerate(boxes):
        if y1 > y0 and x1 > x0:
            d = a[t, y0:y1, x0:x1].astype(np.float64) - b[t, y0:y1, x0:x1]  # (h, w, 3)
            mse[t] = (d * d).mean()
    with np.errstate(divide="ignore"):
        vals = 10 * np.log10(255.0 ** 2 / mse)  # inf where mse == 0
    return np.minimum(vals, PSNR_CAP)


def psnr(a: np.ndarray, b: np.ndarray, boxes: Sequence[Box] | Box | None = None) -> float:
    """Mean over frames of the per-frame PSNR (dB) of `psnr_frames`."""
    return float(psnr_frames(a, b, boxes).mean())


def luma(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) float64 luma, ITU-R BT.601 weights (as SSIM is usually reported)."""
    f = np.asarray(frame, np.float64)
    return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114


def ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM of Wang et al. 2004 at every pixel. x, y: (H, W) float64 in [0, 255].

    Local statistics use the 11x11 Gaussian window (sigma 1.5); borders are filled by
    reflection (OpenCV's default) so the map has the image's size. Returns (H, W)."""
    blur = lambda z: cv2.GaussianBlur(z, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    return ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2))


def ssim_frames(a: np.ndarray, b: np.ndarray, boxes: Sequence[Box] | Box | None = None) -> np.ndarray:
    """Per-frame SSIM on luma. a, b: (T, H, W, 3) uint8; boxes: None (mean of the whole
    map) or one box per frame (mean of the map inside it, computed on the whole frame so
    the window is never cut by the box; an empty box scores 1). Returns (T,) float64."""
    _pair(a, b)
    boxes = None if boxes is None else _boxes(boxes, len(a))
    out = np.empty(len(a))
    for t in range(len(a)):
        s = ssim_map(luma(a[t]), luma(b[t]))
        if boxes is not None:
            x0, y0, x1, y1 = boxes[t]
            s = s[y0:y1, x0:x1]
        out[t] = s.mean() if s.size else 1.0
    return out


def ssim(a: np.ndarray, b: np.ndarray, boxes: Sequence[Box] | Box | None = None) -> float:
    """Mean over frames of `ssim_frames`."""
    return float(ssim_frames(a, b, boxes).mean())


# ------------------------------------------------------------------------------------------
# Lip sync
# ------------------------------------------------------------------------------------------


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two (T,) series. Convention: 0 when either series is
    constant (or shorter than 2): a constant series carries no information to follow."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(f"series must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    nx, ny = np.sqrt((dx * dx).sum()), np.sqrt((dy * dy).sum())
    # Relative threshold: float round-off of a constant series is not a signal.
    if nx <= 1e-9 * (np.abs(x).max() + 1) or ny <= 1e-9 * (np.abs(y).max() + 1):
        return 0.0
    return float(np.clip((dx * dy).sum() / (nx * ny), -1.0, 1.0))


def lip_sync(generated: np.ndarray, truth: np.ndarray, boxes: Sequence[Box] | Box) -> float:
    """Correlation of the mouth opening measured (world.measure_mouth_open, the dark mouth
    cavity in the box) in generated vs ground-truth frames. Clips (T, H, W, 3) uint8, one
    mouth box per frame (the ground truth's). A mouth that never moves in either scores 0."""
    from model.train.world import measure_mouth_open

    _pair(generated, truth)
    boxes = _boxes(boxes, len(truth))
    return correlation(measure_mouth_open(generated, boxes), measure_mouth_open(truth, boxes))


# ------------------------------------------------------------------------------------------
# Temporal: chunk seams and identity drift
# ------------------------------------------------------------------------------------------


def chunk_starts(sizes: Sequence[int]) -> list[int]:
    """Frame index at which each chunk starts, from the frames each step returned."""
    return [int(s) for s in np.concatenate([[0], np.cumsum(sizes)[:-1]])] if len(sizes) else []


def step_energy(frames: np.ndarray) -> np.ndarray:
    """Frame-difference energy (T - 1,): mean squared 8-bit difference of each step t-1 -> t
    (frame by frame, so a long clip never needs a float copy of itself)."""
    f = np.asarray(frames)
    energy = np.zeros(max(0, len(f) - 1))
    for t in range(1, len(f)):
        d = f[t].astype(np.float64) - f[t - 1]
        energy[t - 1] = (d * d).mean()
    return energy


def boundary_jitter(frames: np.ndarray, starts: Sequence[int]) -> float:
    """Chunk-seam visibility: mean frame-difference energy across chunk borders divided by
    the mean inside chunks. 1 = borders look like any other frame step; > 1 = visible seams.

    frames: (T, H, W, 3); starts: frame indices where a chunk begins (0 and indices
    outside [1, T) are ignored). The step t-1 -> t is a border step when t starts a chunk.
    Energy is the mean squared 8-bit difference; JITTER_EPS is added to both means so a
    static clip scores 1. Raises ValueError when there is no border step or no inside step.
    """
    f = np.asarray(frames)
    if f.ndim != 4 or len(f) < 3:
        raise ValueError(f"need a clip (T >= 3, H, W, C), got {f.shape}")
    energy = step_energy(f)  # energy[t-1]: step t-1 -> t
    border = np.zeros(len(energy), bool)
    for t in starts:
        if 1 <= t < len(f):
            border[t - 1] = True
    if not border.any() or border.all():
        raise ValueError(f"need both border and inside steps; chunk starts {list(starts)} in {len(f)} frames")
    return float((energy[border].mean() + JITTER_EPS) / (energy[~border].mean() + JITTER_EPS))


@dataclass
class Drift:
    """PSNR-to-ground-truth at the start and the end of one long clip (dB)."""

    first: float   # mean over the first window
    last: float    # mean over the last window
    change: float  # last - first; negative = the identity drifted away


def identity_drift(per_frame_psnr: np.ndarray, window: int) -> Drift:
    """Identity drift of one long clip from its per-frame PSNR to ground truth (T,):
    the first and the last `window` frames are averaged (e.g. minute 0 vs minute 5)."""
    p = np.asarray(per_frame_psnr, np.float64).ravel()
    if window < 1 or 2 * window > len(p):
        raise ValueError(f"window must be in [1, T/2] = [1, {len(p) // 2}], got {window}")
    first, last = float(p[:window].mean()), float(p[-window:].mean())
    return Drift(first, last, last - first)
