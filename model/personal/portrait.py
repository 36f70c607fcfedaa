"""Choosing the clean portrait of a clip: the frame the personal avatar starts from.

Each frame with a face gets a cost (lower is better), a sum of terms in the model's
motion units, each divided by how much of it still looks clean:
  head turned      (|yaw| + |pitch| + |roll|) / 0.1 rad
  eyes closing     blink / 0.1
  mouth open       mouth_open / 0.05 (the model opens the mouth from a closed one)
  expression       smile / 0.2 + |brow - 0.5| / 0.2 + |mouth_wide| / 0.3
  gaze away        (|gaze_x| + |gaze_y|) / 0.4
  blur             2 x log2(clip median sharpness / frame sharpness), when below the median
Sharpness is the variance of the Laplacian of the grey face region, relative to the
clip's median (motion blur and focus hunting lower it). Frames without a face never win.
"""

from __future__ import annotations

import numpy as np

from model.config import MOTION_FIELDS

_F = {name: i for i, name in enumerate(MOTION_FIELDS)}


def sharpness(frame: np.ndarray, pts: np.ndarray | None) -> float:
    """Variance of the Laplacian of the grey face region (the landmarks' bounding box);
    NaN when there is no face."""
    import cv2

    if pts is None or not np.isfinite(pts).all():
        return float("nan")
    H, W = frame.shape[:2]
    x0, y0 = np.clip(np.floor(pts[:, :2].min(0)).astype(int), 0, [W, H])
    x1, y1 = np.clip(np.ceil(pts[:, :2].max(0)).astype(int), 0, [W, H])
    if x1 - x0 < 8 or y1 - y0 < 8:
        return float("nan")
    grey = cv2.cvtColor(np.ascontiguousarray(frame[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def costs(motion: np.ndarray, sharp: np.ndarray, found: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame cost terms (T,) each, and their sum under "total" (inf where no face)."""
    m = np.asarray(motion, np.float64)
    sharp = np.asarray(sharp, np.float64)
    median = np.nanmedian(sharp[found]) if found.any() else np.nan
    ratio = np.where(np.isfinite(sharp) & (sharp > 0), median / np.maximum(sharp, 1e-9), np.inf)
    terms = {
        "head turned": np.abs(m[:, [_F["yaw"], _F["pitch"], _F["roll"]]]).sum(1) / 0.1,
        "eyes closing": m[:, _F["blink"]] / 0.1,
        "mouth open": m[:, _F["mouth_open"]] / 0.05,
        "expression": (m[:, _F["smile"]] / 0.2 + np.abs(m[:, _F["brow"]] - 0.5) / 0.2
                       + np.abs(m[:, _F["mouth_wide"]]) / 0.3),
        "gaze away": (np.abs(m[:, _F["gaze_x"]]) + np.abs(m[:, _F["gaze_y"]])) / 0.4,
        "blur": 2 * np.maximum(0.0, np.log2(ratio)),
    }
    total = sum(terms.values())
    terms["total"] = np.where(found, total, np.inf)
    return terms


def choose(motion: np.ndarray, sharp: np.ndarray, found: np.ndarray) -> tuple[int, dict[str, float]]:
    """Index of the cleanest frame and its cost terms. ValueError when no frame has a face."""
    if not np.any(found):
        raise ValueError("no face was found in any frame: no portrait to choose")
    terms = costs(motion, sharp, found)
    i = int(np.argmin(terms["total"]))
    return i, {k: float(v[i]) for k, v in terms.items()}


def clip_colour(portrait: np.ndarray, frame: np.ndarray, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The portrait (H, W, 3) uint8 with each channel moved by the clip's mean minus the
    portrait frame's: `frame` is that frame at the clip's crop size, `clip` (T, h, w, 3) the
    frames the portrait was chosen from. One frame's exposure and white balance are those of
    an instant (a webcam hunts; the light changes); the avatar should have the person's
    colour over the clip. Everything the avatar draws starts from the portrait (its warp, the
    decoder's reference), so its colour is the stream's: on the three real clips of
    docs/benchmarks.md the shift is 1-16 grey levels, and the held-out stream is that much
    nearer the real frames. -> (the shifted portrait, the shift per channel)."""
    shift = clip.reshape(-1, 3).mean(0, dtype=np.float64) - frame.reshape(-1, 3).mean(0, dtype=np.float64)
    out = np.clip(np.round(portrait.astype(np.float64) + shift), 0, 255).astype(np.uint8)
    return out, shift.astype(np.float32)


# The open-mouth portrait (model/motion_warp.py `set_open`): among the fitting frames whose
# opening is in the top OPEN_SHARE, the lowest cost of the terms above that an open mouth does
# not raise, plus how much less it opens than the widest (/ OPEN_SCALE); none when it opens
# less than OPEN_MIN more than the portrait (a clip that never speaks).
OPEN_SHARE = 0.05
OPEN_SCALE = 0.1
OPEN_MIN = 0.2   # mouth_open units: a fifth of the widest opening the model knows


def choose_open(motion: np.ndarray, frames: np.ndarray, landmarks: np.ndarray, found: np.ndarray,
                portrait_index: int) -> int | None:
    """Index of the open-mouth portrait among `frames` (T, S, S, 3) with their `landmarks`
    and `motion`, or None (see OPEN_SHARE / OPEN_MIN)."""
    opening = np.where(found, np.asarray(motion, np.float64)[:, _F["mouth_open"]], -np.inf)
    if not found.any():
        return None
    wide = np.flatnonzero(found & (opening >= np.quantile(opening[found], 1 - OPEN_SHARE)))
    sharp = np.full(len(frames), np.nan)
    for i in wide:
        sharp[i] = sharpness(frames[i], landmarks[i])
    terms = costs(motion[wide], sharp[wide], found[wide])
    clean = (terms["head turned"] + terms["eyes closing"] + terms["gaze away"] + terms["blur"]
             + (opening[wide].max() - opening[wide]) / OPEN_SCALE)
    k = int(wide[np.argmin(np.where(np.isfinite(clean), clean, np.inf))])
    return k if opening[k] - motion[portrait_index, _F["mouth_open"]] >= OPEN_MIN else None
