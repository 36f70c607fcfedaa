"""A stable crop of the face through the clip, framed as the bundled avatars are.

The bundled avatars (server/avatars.py) are world renders: the head's pivot (the
ellipsoid centre it turns about) sits at (0.5, FRAME_CENTER_Y) of the image and the face
half-height is FACE_H of the image side (means of the world's identities). Each frame's
pose gives the pivot's image position t and the pixels per half-height s, so the crop is
a square of side s / FACE_H around it. The track is smoothed with a Gaussian over time
(zero-phase: the whole clip is known) so landmark noise does not shake the picture, and
the crop follows the head but never rotates with it: turning and tilting stay in the
video as the motion the model renders.
"""

from __future__ import annotations

import numpy as np

FACE_H = 0.335           # mean Identity.face_h of model/train/world.py
FRAME_CENTER_Y = 0.51    # mean Identity.center_y
SMOOTH_SECONDS = 0.2     # Gaussian sigma of the crop track


def crop_track(s: np.ndarray, t: np.ndarray, fps: float, smooth_seconds: float = SMOOTH_SECONDS) -> np.ndarray:
    """Per-frame pose scale (T,) and pivot (T, 3) (NaN where no face) -> (T, 3) crop boxes
    (x0, y0, side) in source pixels, smoothed; frames without a face take their
    neighbours' box. Raises ValueError when no frame has a face."""
    from scipy.ndimage import gaussian_filter1d

    ok = np.isfinite(s) & np.isfinite(t).all(1)
    if not ok.any():
        raise ValueError("no face was found in any frame: nothing to align")
    idx, frames = np.flatnonzero(ok), np.arange(len(s))
    cx = np.interp(frames, idx, t[ok, 0])
    cy = np.interp(frames, idx, t[ok, 1])
    log_side = np.interp(frames, idx, np.log(s[ok] / FACE_H))  # smoothed in log: a zoom is symmetric
    sigma = smooth_seconds * fps
    if sigma > 0 and len(s) > 1:
        cx, cy, log_side = (gaussian_filter1d(v, sigma, mode="nearest") for v in (cx, cy, log_side))
    side = np.exp(log_side)
    return np.stack([cx - 0.5 * side, cy - FRAME_CENTER_Y * side, side], axis=1)


def head_in_crop(s: np.ndarray, t: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per-frame pose scale (T,), pivot (T, 3) and crop boxes (T, 3) -> (T, 3) the motion
    fields head_x, head_y, head_scale: where the head sits in its crop against the place the
    crop is built to hold it (pivot at (0.5, FRAME_CENTER_Y), face half-height FACE_H of the
    side), the offset in crop sides and the log size ratio. The smoothed track leaves the
    head's quick moves in them (NaN where no face)."""
    x0, y0, side = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    return np.stack([(t[:, 0] - x0) / side - 0.5, (t[:, 1] - y0) / side - FRAME_CENTER_Y,
                     np.log(s / (FACE_H * side))], axis=1)


def crop(frame: np.ndarray, box, size: int) -> np.ndarray:
    """(H, W, 3) uint8 frame, box (x0, y0, side) -> (size, size, 3) uint8; outside the
    frame the border pixels are repeated. Downscaling is anti-aliased (area-averaged
    first to at most 1.5x the final scale, then bilinear).

    Geometry by pixel areas: the crop's pixel j covers the source span x0 + [j, j + 1) * side
    / size (a pixel's centre is half a pixel in), so crops of one box at two sizes agree: the
    area-average of a 2 * size crop is the size crop, and the model-size portrait the engine
    makes from the PORTRAIT_SIZE one (model.media.fit_portrait) lands on the frames' pixels
    and landmarks. cv2 puts pixel centres at integers; the half-pixel terms below convert."""
    import cv2

    x0, y0, side = (float(v) for v in box)
    k = size / side
    pre = min(1.0, 1.5 * k)
    if pre < 1.0:
        # INTER_AREA scales pixel spans: the resized image's span [u, u + 1) is the source's
        # [u, u + 1) / pre, so the area coordinates scale by `pre` exactly.
        frame = cv2.resize(frame, None, fx=pre, fy=pre, interpolation=cv2.INTER_AREA)
    kk = k / pre
    # Area coordinates: out = kk * in - k * x0; a cv2 (centre) coordinate is the area one - 0.5.
    half = 0.5 * kk - 0.5
    M = np.array([[kk, 0, half - k * x0], [0, kk, half - k * y0]], np.float64)
    return cv2.warpAffine(frame, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def to_crop(points: np.ndarray, box, size: int) -> np.ndarray:
    """Landmarks (..., 3) in source pixels -> pixels of the (size, size) crop (z scaled alike).
    The landmark model gives area coordinates (x * width: a pixel's centre is half a pixel
    in); crop landmarks are in pixel-centre coordinates (pixel j's centre at j), as the warps
    and the scores sample the crop, on the geometry of `crop`."""
    x0, y0, side = (float(v) for v in box)
    k = size / side
    return (points - np.array([x0, y0, 0.0], np.float32)) * np.float32(k) - np.array([0.5, 0.5, 0.0], np.float32)
