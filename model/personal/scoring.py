"""The personal eval's metrics on one held-out stretch: the mouth boxes, what the landmarks
measure on frames (mouth opening, head pose) and the scores of a system against the real
frames. Apart from model/personal/evaluate.py so that the fitting data and the fitted
avatar's eval use them without importing the eval that runs them."""

from __future__ import annotations

import math

import numpy as np

MOUTH_MARGIN = 0.3

METRICS = ("PSNR", "SSIM", "mouth PSNR", "mouth-open error", "head-pose error (deg)", "tracked")
BETTER = {"PSNR": "higher", "SSIM": "higher", "mouth PSNR": "higher", "mouth-open error": "lower",
           "head-pose error (deg)": "lower", "tracked": "higher"}


def mouth_boxes(landmarks: np.ndarray, size: int, margin: float = MOUTH_MARGIN) -> list[tuple[int, int, int, int]]:
    """(T, 478, 3) crop-pixel landmarks -> one (x0, y0, x1, y1) box around the lips per frame
    (the previous frame's box where there is no face; the whole frame before any)."""
    from model.personal.landmarks import LIPS

    boxes, last = [], (0, 0, size, size)
    for pts in landmarks:
        lips = pts[list(LIPS), :2]
        if np.isfinite(lips).all():
            (x0, y0), (x1, y1) = lips.min(0), lips.max(0)
            mx, my = margin * (x1 - x0), margin * (y1 - y0)
            last = (max(0, int(math.floor(x0 - mx))), max(0, int(math.floor(y0 - my))),
                    min(size, int(math.ceil(x1 + mx))), min(size, int(math.ceil(y1 + my))))
        boxes.append(last)
    return boxes


def measured(frames: np.ndarray, calibration) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Landmarks tracked on frames (enlarged to 256 px first) -> (mouth_open (T,), R (T, 3, 3), found (T,))."""
    from model.config import MOTION_FIELDS
    from model.personal import landmarks as L
    from model.personal import motion as M

    lms, found = L.track_frames(frames, upscale_to=256)
    if not found.any():
        return np.full(len(frames), np.nan), np.full((len(frames), 3, 3), np.nan), found
    m, poses = M.measure(lms, found, calibration)
    return m[:, MOTION_FIELDS.index("mouth_open")], poses.R, found


# The metrics whose per-frame values a row keeps (PER_FRAME), for the intervals of the gaps
# between systems (model/personal/intervals.py).
FRAME_METRICS = ("PSNR", "SSIM", "mouth-open error")
PER_FRAME = "per frame"


def score(gen: np.ndarray, real: np.ndarray, boxes, real_measure, calibration) -> dict:
    """Every metric of METRICS for one system on one clip's held-out frames (the means over
    the frames), and under PER_FRAME the (T,) values of FRAME_METRICS (NaN where a frame is
    not scored: the mouth opening where either frame has no face)."""
    from model.personal.geometry import angle_between
    from model.train import metrics as Mt

    open_gen, R_gen, found_gen = measured(gen, calibration)
    open_real, R_real, found_real = real_measure
    both = found_gen & found_real
    open_frames = np.where(both, np.abs(open_gen - open_real), np.nan)
    if both.any():
        open_err = float(open_frames[both].mean())
        pose_err = float(np.mean([math.degrees(angle_between(R_gen[i], R_real[i])) for i in np.flatnonzero(both)]))
    else:
        open_err = pose_err = float("nan")
    psnr, ssim = Mt.psnr_frames(gen, real), Mt.ssim_frames(gen, real)
    return {"PSNR": float(psnr.mean()), "SSIM": float(ssim.mean()), "mouth PSNR": Mt.psnr(gen, real, boxes),
            "mouth-open error": open_err, "head-pose error (deg)": pose_err, "tracked": float(found_gen.mean()),
            PER_FRAME: {"PSNR": psnr, "SSIM": ssim, "mouth-open error": open_frames}}
