"""Where the body below the chin sits in each frame of a person's clip, for the portrait warp.

The aligned crop follows the head, so the shoulders and neck move in it whenever the person
leans or turns (a few pixels at 128 px). The warp (model/motion_warp.py, `set_torso`)
regresses that displacement on the motion, as it does the face's landmarks; this module
measures it: the dense optical flow (OpenCV's Farneback) from the portrait frame to each
frame, its median in a small patch around each of `torso_columns` points on a line halfway
between the portrait's chin and the bottom of the frame. A median of a patch keeps a
passing hand or a collar's edge from carrying a point.
"""

from __future__ import annotations

import numpy as np

TORSO_POINTS = 5      # body points along the line (ModelConfig.warp_torso)
MIN_BODY_PX = 8.0     # below the chin, at the model's size: less and the clip shows no body to track
PATCH = 5             # half side (px) of the patch whose median flow a point takes
CHIN = 152            # the face mesh's chin landmark


def body_line(portrait_landmarks: np.ndarray, size: int) -> float | None:
    """The y (crop pixels) of the portrait's chin, below which the body moves; None when the
    frame shows less than MIN_BODY_PX of body under it (or no face)."""
    chin = float(portrait_landmarks[CHIN, 1])
    if not np.isfinite(chin) or size - 1 - chin < MIN_BODY_PX:
        return None
    return chin


def track(frames: np.ndarray, portrait: np.ndarray, line: float, n: int = TORSO_POINTS) -> np.ndarray:
    """frames (T, S, S, 3) uint8, the portrait frame (S, S, 3), the chin line -> (T, n, 2) the
    displacement (crop pixels) of each body point from the portrait to each frame."""
    import cv2

    from model.motion_warp import torso_columns

    size = portrait.shape[0]
    y = int(round(line + 0.5 * (size - 1 - line)))
    xs = np.round(torso_columns(n, size)).astype(int)
    y0, y1 = max(0, y - PATCH), min(size, y + PATCH + 1)
    first = cv2.cvtColor(np.ascontiguousarray(portrait), cv2.COLOR_RGB2GRAY)
    out = np.zeros((len(frames), n, 2), np.float32)
    for t, frame in enumerate(frames):
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        # pyramid 3 levels of 1/2, a 21 px window: a few pixels of shift on a smooth sweater
        flow = cv2.calcOpticalFlowFarneback(first, gray, None, 0.5, 3, 21, 3, 5, 1.1, 0)
        for k, x in enumerate(xs):
            patch = flow[y0:y1, max(0, x - PATCH):min(size, x + PATCH + 1)]
            out[t, k] = np.median(patch.reshape(-1, 2), axis=0)
    return out
