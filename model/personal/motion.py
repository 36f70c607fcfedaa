"""Motion parameters in the model's units (`MOTION_FIELDS`), measured from face landmarks.

Each parameter is the geometric quantity the procedural world (model/train/world.py)
draws, measured on the frontalised landmarks (face-local, units of the half-height b,
see `geometry`) and normalised against the person's own neutral face:

  yaw pitch roll   the head pose of `geometry.fit_pose` (radians, absolute)
  mouth_open       inner-lip gap above neutral / 0.32 b     (world: cavity height 0.05 b + 0.32 b * open)
  smile            mouth-corner lift above neutral / 0.07 b (world: corners rise 0.07 b * smile)
  mouth_wide       (width / neutral width - 1 - 0.2 smile + 0.15 open) / 0.35
                                                            (world: width x (1 + 0.35 wide + 0.2 smile - 0.15 open))
  blink            1 - eyelid opening / neutral opening    (world: the lid covers the top `blink` of the eye)
  gaze_x, gaze_y   iris offset from the eye centre, less neutral, / (0.45 r, 0.35 r), r = eye width / 2.6
                                                            (world: iris at c + (0.45 r gx, 0.35 r gy))
  brow             0.5 + (brow-to-eye height - neutral) / 0.2 b (world: brows rise 0.2 b * (brow - 0.5))

Neutral values come from the clip itself: the mouth-gap floor (10th percentile: a talking
person closes the mouth between words), the open-eye level (80th percentile: blinks are
short), and medians over "neutral frames" (mouth nearly closed, eyes open, head near
frontal) for width, corner lift, gaze and brow. `Calibration` keeps them with the
template, so other frames (held-out or generated) are measured in the same units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.config import HEAD_FIELDS, MOTION_FIELDS
from model.driving import MOTION_RANGES
from model.personal import geometry as G
from model.personal import landmarks as L

_F = {name: i for i, name in enumerate(MOTION_FIELDS)}
MAX_TEMPLATE_FRAMES = 200  # frames averaged into the template (evenly spread): plenty for a mean shape
FEATURES = ("gap", "width", "lift", "eye_open", "gaze_x", "gaze_y", "brow")


@dataclass
class Poses:
    """Per-frame similarity pose: pixels = s * R @ template + t (NaN where no face)."""

    s: np.ndarray   # (T,)
    R: np.ndarray   # (T, 3, 3)
    t: np.ndarray   # (T, 3)


@dataclass
class Calibration:
    """What makes one person's landmarks into motion units: template + neutral feature values."""

    template: G.Template
    neutral: dict[str, float] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"template": self.template.points.astype(np.float32),
                "neutral": np.array([self.neutral[k] for k in FEATURES], np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Calibration":
        return cls(G.Template(np.asarray(arrays["template"], np.float64)),
                   dict(zip(FEATURES, (float(v) for v in arrays["neutral"]))))


def fit_poses(landmarks: np.ndarray, found: np.ndarray, template: G.Template) -> Poses:
    T = len(landmarks)
    s, R, t = np.full(T, np.nan), np.full((T, 3, 3), np.nan), np.full((T, 3), np.nan)
    for i in np.flatnonzero(found):
        s[i], R[i], t[i] = G.fit_pose(landmarks[i], template)
    return Poses(s, R, t)


def frontalised(landmarks: np.ndarray, poses: Poses) -> np.ndarray:
    """(T, 478, 3) pixels -> face-local coordinates (NaN where no face)."""
    return np.einsum("tnk,tkj->tnj", landmarks.astype(np.float64) - poses.t[:, None], poses.R) / poses.s[:, None, None]


def raw_features(q: np.ndarray) -> dict[str, np.ndarray]:
    """Frontalised landmarks (T, 478, 3) -> the geometric quantities of the module doc, (T,) each."""
    x, y = q[..., 0], q[..., 1]
    mid_y = (y[:, L.LIP_IN_UP] + y[:, L.LIP_IN_DOWN]) / 2
    eye_open, gx, gy, brow = [], [], [], []
    for outer, inner, up, down, iris, brows in (
            (L.EYE_L_OUTER, L.EYE_L_INNER, L.LID_L_UP, L.LID_L_DOWN, L.IRIS_L, L.BROW_L),
            (L.EYE_R_OUTER, L.EYE_R_INNER, L.LID_R_UP, L.LID_R_DOWN, L.IRIS_R, L.BROW_R)):
        width = np.abs(x[:, inner] - x[:, outer])
        r = width / 2.6  # the world's eye white is 1.3 r wide on each side of its centre
        cx, cy = (x[:, inner] + x[:, outer]) / 2, (y[:, inner] + y[:, outer]) / 2
        eye_open.append((y[:, down] - y[:, up]) / width)
        gx.append((x[:, iris] - cx) / (0.45 * r))
        gy.append((y[:, iris] - cy) / (0.35 * r))
        brow.append(cy - y[:, list(brows)].mean(1))
    return {"gap": y[:, L.LIP_IN_DOWN] - y[:, L.LIP_IN_UP],
            "width": x[:, L.MOUTH_R] - x[:, L.MOUTH_L],
            "lift": mid_y - (y[:, L.MOUTH_L] + y[:, L.MOUTH_R]) / 2,
            "eye_open": np.mean(eye_open, 0), "gaze_x": np.mean(gx, 0), "gaze_y": np.mean(gy, 0),
            "brow": np.mean(brow, 0)}


def _spread(idx: np.ndarray, n: int) -> np.ndarray:
    return idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int)] if len(idx) else idx


def calibrate(landmarks: np.ndarray, found: np.ndarray) -> Calibration:
    """Template and neutral values from a clip's landmarks (T, 478, 3) and found mask (T,).
    Two passes: a template from all faces finds the neutral frames, whose own template
    and feature values are the calibration."""
    idx = np.flatnonzero(found)
    if len(idx) == 0:
        raise ValueError("no face was found in any frame of the clip")
    template = G.build_template(landmarks[_spread(idx, MAX_TEMPLATE_FRAMES)])
    for _ in range(2):
        poses = fit_poses(landmarks, found, template)
        f = raw_features(frontalised(landmarks[idx], Poses(poses.s[idx], poses.R[idx], poses.t[idx])))
        neutral = _neutral_mask(f, poses.R[idx])
        template = G.build_template(landmarks[_spread(idx[neutral], MAX_TEMPLATE_FRAMES)])
    poses = fit_poses(landmarks, found, template)
    f = raw_features(frontalised(landmarks[idx], Poses(poses.s[idx], poses.R[idx], poses.t[idx])))
    neutral = _neutral_mask(f, poses.R[idx])
    values = {k: float(np.median(f[k][neutral])) for k in ("width", "lift", "gaze_x", "gaze_y", "brow")}
    values["gap"] = float(np.percentile(f["gap"], 10))
    values["eye_open"] = float(np.percentile(f["eye_open"], 80))
    return Calibration(template, values)


def _neutral_mask(f: dict[str, np.ndarray], R: np.ndarray) -> np.ndarray:
    """Frames with the mouth nearly closed, the eyes open and the head near frontal; all
    frames when fewer than 5 qualify (a clip of one expression)."""
    ypr = np.array([G.euler(r) for r in R])
    mask = ((f["gap"] <= np.percentile(f["gap"], 40)) & (f["eye_open"] >= np.percentile(f["eye_open"], 30))
            & (np.abs(ypr[:, :2]).max(1) < 0.25))
    return mask if mask.sum() >= 5 else np.ones(len(mask), bool)


def motion_from_features(f: dict[str, np.ndarray], ypr: np.ndarray, neutral: dict[str, float]) -> np.ndarray:
    """Raw features (T,) each + (T, 3) yaw/pitch/roll -> (T, len(MOTION_FIELDS)) float32, clipped
    to MOTION_RANGES."""
    m = np.zeros((len(ypr), len(MOTION_FIELDS)), np.float64)
    m[:, [_F["yaw"], _F["pitch"], _F["roll"]]] = ypr
    opening = np.clip((f["gap"] - neutral["gap"]) / 0.32, 0, 1)
    smile = np.clip((f["lift"] - neutral["lift"]) / 0.07, 0, 1)
    m[:, _F["mouth_open"]] = opening
    m[:, _F["smile"]] = smile
    m[:, _F["mouth_wide"]] = (f["width"] / neutral["width"] - 1 - 0.2 * smile + 0.15 * opening) / 0.35
    m[:, _F["blink"]] = 1 - f["eye_open"] / neutral["eye_open"]
    m[:, _F["gaze_x"]] = f["gaze_x"] - neutral["gaze_x"]
    m[:, _F["gaze_y"]] = f["gaze_y"] - neutral["gaze_y"]
    m[:, _F["brow"]] = 0.5 + (f["brow"] - neutral["brow"]) / 0.2
    lo = np.array([MOTION_RANGES[k][0] for k in MOTION_FIELDS])
    hi = np.array([MOTION_RANGES[k][1] for k in MOTION_FIELDS])
    return np.clip(m, lo, hi).astype(np.float32)


def with_head(motion: np.ndarray, head: np.ndarray, found: np.ndarray) -> np.ndarray:
    """A copy of `motion` (T, len(MOTION_FIELDS)) with the head fields (HEAD_FIELDS) set from
    `head` (T, 3: align.head_in_crop), which needs the crop track `measure` does not know;
    frames without a face take their neighbours' values, as in `measure`."""
    idx = np.flatnonzero(found & np.isfinite(head).all(1))
    if len(idx) == 0:
        raise ValueError("no face was found in any frame")
    out = motion.copy()
    for j, name in enumerate(HEAD_FIELDS):
        lo, hi = MOTION_RANGES[name]
        out[:, _F[name]] = np.clip(np.interp(np.arange(len(head)), idx, head[idx, j]), lo, hi)
    return out


def measure(landmarks: np.ndarray, found: np.ndarray, calibration: Calibration) -> tuple[np.ndarray, Poses]:
    """(T, 478, 3) landmarks + (T,) found -> (T, len(MOTION_FIELDS)) motion and the poses.
    Frames without a face take the motion of the nearest frames (linear interpolation);
    a clip with no face at all raises ValueError. The head fields stay 0 (`with_head` sets
    them where the crop is known)."""
    idx = np.flatnonzero(found)
    if len(idx) == 0:
        raise ValueError("no face was found in any frame")
    poses = fit_poses(landmarks, found, calibration.template)
    sub = Poses(poses.s[idx], poses.R[idx], poses.t[idx])
    f = raw_features(frontalised(landmarks[idx], sub))
    ypr = np.array([G.euler(r) for r in sub.R])
    m = motion_from_features(f, ypr, calibration.neutral)
    full = np.empty((len(landmarks), m.shape[1]), np.float32)
    for j in range(m.shape[1]):
        full[:, j] = np.interp(np.arange(len(landmarks)), idx, m[:, j])
    return full, poses
