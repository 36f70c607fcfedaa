"""Metrics against ground-truth renders. Pure numpy functions; frames are (T, H, W, 3) uint8."""

from __future__ import annotations

import cv2
import numpy as np

PSNR_CAP = 60.0  # identical frames give this instead of infinity


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of per-frame PSNR (dB), capped at PSNR_CAP."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    vals = np.where(mse == 0, PSNR_CAP, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)))
    return float(np.minimum(vals, PSNR_CAP).mean())


def crops(frames: np.ndarray, boxes) -> list[np.ndarray]:
    return [f[y0:y1, x0:x1] for f, (x0, y0, x1, y1) in zip(frames, boxes)]


def psnr_boxes(a: np.ndarray, b: np.ndarray, boxes) -> float:
    """PSNR inside one box per frame (e.g. the mouth)."""
    vals = [psnr(x[None], y[None]) for x, y in zip(crops(a, boxes), crops(b, boxes)) if x.size]
    return float(np.mean(vals)) if vals else float("nan")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames on luma, 11x11 Gaussian window (sigma 1.5), standard constants."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for x, y in zip(a, b):
        x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64)
        y = cv2.cvtColor(y, cv2.COLOR_RGB2GRAY).astype(np.float64)
        blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean())
    return float(np.mean(out))


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either series is constant (no information, not NaN)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.std() < 1e-9 or y.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def boundary_jitter(frames: np.ndarray, borders: list[int]) -> float:
    """Mean frame-difference energy across chunk borders / inside chunks (1 = seamless).

    borders: indices t where frame t starts a new chunk; the difference between t-1 and
    t counts as a border difference."""
    f = np.asarray(frames, np.float64)
    d = ((f[1:] - f[:-1]) ** 2).reshape(len(f) - 1, -1).mean(1)  # d[t-1] = |f[t] - f[t-1]|^2
    is_border = np.zeros(len(d), bool)
    for t in borders:
        if 1 <= t < len(f):
            is_border[t - 1] = True
    if not is_border.any() or is_border.all():
        return float("nan")
    inside = d[~is_border].mean()
    return float(d[is_border].mean() / inside) if inside > 0 else float("nan")
