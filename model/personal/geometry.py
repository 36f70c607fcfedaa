"""Head pose from face landmarks, against a neutral face template of the person.

Conventions are those of the procedural world (`model.train.world._Pose`), so a measured
pose means what the model was trained on: face-local coordinates x right, y down, z toward
the viewer, in units of the face's half-height `b`; the camera sees
    p_image = s * R @ p_face + t,   R = Rz(roll) @ Rx(pitch) @ Ry(yaw)
(orthographic, as the renderer). yaw > 0 turns the nose to the image's right, pitch > 0
lifts it, roll > 0 turns the face clockwise on screen.

The template is the person's own neutral face: landmarks of neutral frames aligned on
the rigid points (generalised Procrustes), averaged, then put in face-local coordinates:
the left-right axis from mirror pairs of landmarks, the down axis from the eyes to the
mouth, the unit and origin from the world's layout (eyes at v = -0.12 and the mouth at
v = 0.55 of the half-height, the head turning about a pivot behind the eyes). Each
frame's pose is then one similarity fit (Umeyama) of the template's rigid points to the
frame's, and its translation is where the pivot is in the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model.personal import landmarks as L

# The world's face layout (model/train/world.py), in face half-heights b / half-widths a.
EYE_V, MOUTH_V = -0.12, 0.55       # eye and mouth heights
EYE_GAP_A = 0.41                   # half distance between the eyes, mean of Identity.eye_gap
WIDTH_PER_HEIGHT = 0.275 / 0.335   # a / b for the mean face (face_w, face_h)
PIVOT_DEPTH_A = 0.83               # ellipsoid centre behind the eyes: 0.9 a * sqrt(1 - 0.85 r^2) at the eyes
# Pitch zero. mediapipe's depth is a learned human prior: on world renders at pitch 0 it
# puts the mouth ahead of the eyes, the eye -> mouth line leaning forward by this angle
# (radians; mean over 16 world clips, seeds 0-7 and 100-107 of `model.personal.check`).
# The template's down axis is tilted by it, so a frontal world head reads pitch 0
# through the same landmark model.
MOUTH_LEAN = 0.106


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity dst ~ s * R @ src + t of (N, 3) point sets (Umeyama 1991);
    R is a proper rotation (det +1). Returns (s, R (3, 3), t (3,))."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    var = (xs * xs).sum() / len(src)
    s = float(np.trace(np.diag(S) @ D) / max(var, 1e-12))
    return s, R, mu_d - s * R @ mu_s


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) @ Rx(pitch) @ Ry(yaw), exactly as model.train.world._Pose builds it."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def euler(R: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `rotation`: (yaw, pitch, roll) in radians. Row 2 of Rz Rx Ry is
    (-cos p sin y, sin p, cos p cos y) (roll does not touch it); column 1 of rows 0-1
    is cos p * (-sin r, cos r)."""
    pitch = math.asin(float(np.clip(R[2, 1], -1.0, 1.0)))
    yaw = math.atan2(-R[2, 0], R[2, 2])
    roll = math.atan2(-R[0, 1], R[1, 1])
    return yaw, pitch, roll


def angle_between(Ra: np.ndarray, Rb: np.ndarray) -> float:
    """Geodesic angle (radians) between two rotations."""
    c = (np.trace(Ra.T @ Rb) - 1.0) / 2.0
    return float(math.acos(float(np.clip(c, -1.0, 1.0))))


@dataclass
class Template:
    """The person's neutral face in face-local coordinates (units of b, origin at the pivot)."""

    points: np.ndarray    # (478, 3) float64

    @property
    def rigid(self) -> np.ndarray:
        return self.points[list(L.RIGID)]


def _face_axes(pts: np.ndarray) -> np.ndarray:
    """(478, 3) landmarks -> (3, 3) rotation whose columns are the face's right, down and
    toward-the-viewer axes in the landmarks' frame."""
    ex = np.mean([pts[right] - pts[left] for left, right in L.MIRROR_PAIRS], axis=0)
    ex /= np.linalg.norm(ex)
    eyes = (pts[L.EYE_L_OUTER] + pts[L.EYE_L_INNER] + pts[L.EYE_R_OUTER] + pts[L.EYE_R_INNER]) / 4
    mouth = (pts[L.MOUTH_L] + pts[L.MOUTH_R]) / 2
    ey = mouth - eyes
    ey -= ex * (ey @ ex)
    ey /= np.linalg.norm(ey)
    return np.stack([ex, ey, np.cross(ex, ey)], axis=1)


def build_template(frames: np.ndarray, iterations: int = 3) -> Template:
    """Template from the landmarks of neutral frames (N, 478, 3): align them on the rigid
    points (generalised Procrustes), average, put the mean in face-local coordinates."""
    if len(frames) == 0:
        raise ValueError("a template needs at least one neutral frame with a face")
    ref = frames[0].astype(np.float64)
    for _ in range(iterations):
        aligned = []
        for f in frames:
            s, R, t = umeyama(f[list(L.RIGID)].astype(np.float64), ref[list(L.RIGID)])
            aligned.append(s * f.astype(np.float64) @ R.T + t)
        ref = np.mean(aligned, axis=0)
    c, sn = math.cos(MOUTH_LEAN), math.sin(MOUTH_LEAN)
    lean = np.array([[1, 0, 0], [0, c, -sn], [0, sn, c]])  # Rx(MOUTH_LEAN): eye -> mouth leans forward
    q = (ref - ref.mean(0)) @ _face_axes(ref) @ lean.T
    eye_pts = q[[L.EYE_L_OUTER, L.EYE_L_INNER, L.EYE_R_OUTER, L.EYE_R_INNER]]
    eyes = eye_pts.mean(0)
    mouth = (q[L.MOUTH_L] + q[L.MOUTH_R]) / 2
    q = (q - eyes) / ((mouth[1] - eyes[1]) / (MOUTH_V - EYE_V))  # unit b, origin between the eyes
    # Half-width a from the distance between the eye centres, then the pivot behind the eyes.
    eye_l = q[[L.EYE_L_OUTER, L.EYE_L_INNER]].mean(0)
    eye_r = q[[L.EYE_R_OUTER, L.EYE_R_INNER]].mean(0)
    a = (eye_r[0] - eye_l[0]) / (2 * EYE_GAP_A)
    pivot = np.array([0.0, -EYE_V, -PIVOT_DEPTH_A * a])
    return Template(q - pivot)


def fit_pose(pts: np.ndarray, template: Template) -> tuple[float, np.ndarray, np.ndarray]:
    """One frame's landmarks (478, 3) -> (s, R, t): pixels = s * R @ template + t; t is the
    pivot's position in the image and s the pixels per half-height."""
    return umeyama(template.rigid, pts[list(L.RIGID)].astype(np.float64))


def frontalise(pts: np.ndarray, s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Landmarks (478, 3) in pixels -> face-local coordinates (units of b): the inverse of
    the frame's pose, so expressions can be measured as if the face were frontal."""
    return (pts.astype(np.float64) - t) @ R / s
