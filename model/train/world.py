"""Procedural avatar world: a cartoon head whose pixels are exact ground truth.

An `Identity` (sampled per avatar from a seed) fixes the look: face shape and size,
skin, hair style and colour, eye colour, brows, lips, background. A motion vector per
frame (`MOTION_FIELDS`: yaw, pitch, roll, blink, gaze, mouth_open, mouth_wide, smile,
brow) drives it. Facial features sit on an ellipsoid that is rotated by the pose and
projected, so yaw/pitch/roll visibly move them. Rendering is deterministic (same
identity + motion -> bit-identical frame) and anti-aliased by drawing at 2x with
cv2.LINE_AA and downsampling with area averaging.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from model.config import MOTION_FIELDS

SS = 2  # supersampling factor
CAVITY = (70, 18, 32)  # mouth interior (RGB); dark, used by measure_mouth_open
HAIR_STYLES = ("short", "bob", "long", "bald", "spiky")
_F = {name: i for i, name in enumerate(MOTION_FIELDS)}


@dataclass(frozen=True)
class Identity:
    face_w: float      # half-width of the face, fraction of the image
    face_h: float      # half-height
    skin: tuple        # RGB 0..255
    hair_style: int
    hair: tuple
    iris: tuple
    brow: tuple
    brow_thick: float
    lips: tuple
    bg_top: tuple
    bg_bottom: tuple
    eye_gap: float     # half distance between the eyes, fraction of face_w
    eye_size: float
    mouth_w: float     # half-width of the mouth at rest, fraction of face_w
    center_y: float

    def to_dict(self) -> dict:
        return asdict(self)


def _rgb(rng, lo, hi):
    return tuple(int(x) for x in rng.integers(lo, hi, 3))


def sample_identity(rng: np.random.Generator) -> Identity:
    skin_tones = [(255, 224, 196), (241, 194, 157), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 205, 178)]
    tone = np.array(skin_tones[rng.integers(len(skin_tones))]) + rng.integers(-12, 13, 3)
    return Identity(
        face_w=float(rng.uniform(0.24, 0.31)), face_h=float(rng.uniform(0.30, 0.37)),
        skin=tuple(int(x) for x in np.clip(tone, 0, 255)),
        hair_style=int(rng.integers(len(HAIR_STYLES))), hair=_rgb(rng, 10, 200),
        iris=_rgb(rng, 20, 160), brow=_rgb(rng, 10, 110), brow_thick=float(rng.uniform(0.6, 1.4)),
        lips=(int(rng.integers(150, 230)), int(rng.integers(40, 110)), int(rng.integers(60, 120))),
        bg_top=_rgb(rng, 40, 255), bg_bottom=_rgb(rng, 0, 220),
        eye_gap=float(rng.uniform(0.36, 0.46)), eye_size=float(rng.uniform(0.8, 1.2)),
        mouth_w=float(rng.uniform(0.30, 0.42)), center_y=float(rng.uniform(0.48, 0.54)),
    )


def identity_from_seed(seed: int) -> Identity:
    return sample_identity(np.random.default_rng(seed))


def neutral_motion() -> np.ndarray:
    m = np.zeros(len(MOTION_FIELDS), np.float32)
    m[_F["brow"]] = 0.5
    return m


# ------------------------------------------------------------------------------------------
# Geometry: features on an ellipsoid, rotated by the pose, projected orthographically.
# ------------------------------------------------------------------------------------------

class _Pose:
    def __init__(self, ident: Identity, motion: np.ndarray, size: int):
        self.s = size * SS
        yaw, pitch, roll = (float(motion[_F[k]]) for k in ("yaw", "pitch", "roll"))
        cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                                  math.cos(roll), math.sin(roll))
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
        rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
        self.rot = rz @ rx @ ry
        self.a, self.b = ident.face_w * self.s, ident.face_h * self.s
        self.depth = 0.9 * self.a
        self.cx, self.cy = 0.5 * self.s, ident.center_y * self.s
        self.roll = roll

    def point(self, u: float, v: float, lift: float = 0.0) -> tuple[np.ndarray, float]:
        """Face coordinates (u right, v down, in face half-widths/heights) -> pixel xy and depth z."""
        x, y = u * self.a, v * self.b
        r2 = min(1.0, (u * u + v * v))
        z = self.depth * math.sqrt(max(0.0, 1.0 - 0.85 * r2)) + lift
        p = self.rot @ np.array([x, y, z])
        return np.array([self.cx + p[0], self.cy + p[1]]), float(p[2])

    def scale_x(self, u: float, v: float) -> float:
        """Foreshortening of horizontal sizes at (u, v) (features turn away with yaw)."""
        p0, _ = self.point(u - 0.05, v)
        p1, _ = self.point(u + 0.05, v)
        return float(np.linalg.norm(p1 - p0) / (0.1 * self.a))


def _pt(p) -> tuple[int, int]:
    return int(round(p[0] * 16)), int(round(p[1] * 16))  # 4 fractional bits for cv2 shift=4


def _ellipse(img, center, axes, angle, color, thickness=-1):
    cv2.ellipse(img, _pt(center), (max(1, int(axes[0] * 16)), max(1, int(axes[1] * 16))), angle, 0, 360, color,
                thickness, cv2.LINE_AA, 4)


def _poly(img, pts, color):
    cv2.fillPoly(img, [np.round(np.array(pts) * 16).astype(np.int32)], color, cv2.LINE_AA, 4)


# ------------------------------------------------------------------------------------------
# Feature layout (shared by the renderer and the region boxes)
# ------------------------------------------------------------------------------------------

def _mouth_shape(ident: Identity, motion: np.ndarray, pose: _Pose):
    """Mouth centre, half width/height (pixels) and corner lift."""
    open_, wide, smile = (float(motion[_F[k]]) for k in ("mouth_open", "mouth_wide", "smile"))
    centre, _ = pose.point(0.0, 0.55)
    half_w = ident.mouth_w * pose.a * (1.0 + 0.35 * wide + 0.2 * smile - 0.15 * open_) * pose.scale_x(0, 0.55)
    half_h = pose.b * (0.025 + 0.16 * open_)
    lift = smile * 0.07 * pose.b
    return centre, half_w, half_h, lift


def _eye_centres(ident: Identity, pose: _Pose):
    return [pose.point(sx * ident.eye_gap, -0.12) for sx in (-1, 1)]


def mouth_box(ident: Identity, motion: np.ndarray, size: int = 128, margin: float = 0.3) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box around the mouth at the largest opening this pose allows."""
    pose = _Pose(ident, motion, size)
    m = motion.copy()
    m[_F["mouth_open"]], m[_F["mouth_wide"]] = 1.0, 1.0
    c, hw, hh, lift = _mouth_shape(ident, m, pose)
    hw, hh = hw * (1 + margin), (hh + lift) * (1 + margin)
    return _box(c, hw, hh, size)


def eye_boxes(ident: Identity, motion: np.ndarray, size: int = 128) -> list[tuple[int, int, int, int]]:
    pose = _Pose(ident, motion, size)
    r = 0.11 * pose.a * ident.eye_size
    return [_box(c, 1.6 * r, 1.8 * r, size) for c, _ in _eye_centres(ident, pose)]


def _box(c, hw, hh, size):
    x0, y0 = (c[0] - hw) / SS, (c[1] - hh) / SS
    x1, y1 = (c[0] + hw) / SS, (c[1] + hh) / SS
    clip = lambda v: int(min(max(v, 0), size))  # noqa: E731
    return clip(math.floor(x0)), clip(math.floor(y0)), clip(math.ceil(x1)), clip(math.ceil(y1))


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

def _background(ident: Identity, s: int) -> np.ndarray:
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    bg = (1 - t) * np.array(ident.bg_top, np.float32) + t * np.array(ident.bg_bottom, np.float32)
    return np.ascontiguousarray(np.broadcast_to(bg, (s, s, 3)).astype(np.uint8))


def _hair(img, ident: Identity, pose: _Pose, front: bool):
    style = HAIR_STYLES[ident.hair_style]
    angle = math.degrees(pose.roll)
    top, _ = pose.point(0.0, -0.75, lift=0.05 * pose.a)
    if not front:
        if style in ("bob", "long"):
            drop = 1.25 if style == "long" else 0.85
            c, _ = pose.point(0.0, 0.05)
            _ellipse(img, c + np.array([0, drop * 0.35 * pose.b]), (pose.a * 1.22, pose.b * drop), angle, ident.hair)
        return
    if style == "bald":
        return
    if style == "spiky":
        base = [pose.point(u, -0.72)[0] for u in np.linspace(-0.9, 0.9, 7)]
        for i in range(6):
            tip, _ = pose.point((i - 2.5) * 0.3, -1.25)
            _poly(img, [base[i], tip, base[i + 1]], ident.hair)
    # A cap of hair over the top of the head, its lower edge a fringe.
    pts = [pose.point(u, -math.sqrt(max(0.0, 1 - u * u)) * 1.02, lift=0.02 * pose.a)[0]
           for u in np.linspace(-1.0, 1.0, 15)]
    fringe = 0.55 if style == "short" else 0.45
    pts += [pose.point(u, -fringe + 0.12 * abs(u))[0] for u in np.linspace(0.95, -0.95, 9)]
    _poly(img, pts, ident.hair)


def _eyes(img: np.ndarray, ident: Identity, pose: "_Pose", motion: np.ndarray, angle: float, shade: tuple) -> None:
    """Eyes: white, iris following gaze, eyelid closing with blink."""
    blink, gx, gy = (float(motion[_F[k]]) for k in ("blink", "gaze_x", "gaze_y"))
    r = 0.11 * pose.a * ident.eye_size
    for (c, z), su in zip(_eye_centres(ident, pose), (-1, 1)):
        if z <= 0:
            continue
        sx = pose.scale_x(su * ident.eye_gap, -0.12)
        _ellipse(img, c, (1.3 * r * sx, r), angle, (250, 250, 250))
        iris_c = c + np.array([0.45 * r * gx * sx, 0.35 * r * gy])
        _ellipse(img, iris_c, (0.62 * r * sx, 0.62 * r), angle, ident.iris)
        _ellipse(img, iris_c, (0.3 * r * sx, 0.3 * r), angle, (15, 15, 20))
        if blink > 0.02:  # upper lid: skin covering the top `blink` fraction of the eye
            lid_h = 2.1 * r * blink
            top = c[1] - 1.05 * r
            x0, x1 = c[0] - 1.45 * r * sx, c[0] + 1.45 * r * sx
            _poly(img, [(x0, top), (x1, top), (x1, top + lid_h), (x0, top + lid_h)], shade)
            cv2.line(img, _pt((x0 + 0.2 * r, top + lid_h)), _pt((x1 - 0.2 * r, top + lid_h)), (40, 30, 30),
                     max(1, int(0.25 * r)), cv2.LINE_AA, 4)


def _brows_and_nose(img: np.ndarray, ident: Identity, pose: "_Pose", motion: np.ndarray, shade: tuple) -> None:
    """Brows raised with `brow` (0.5 neutral), and the nose."""
    lift = (float(motion[_F["brow"]]) - 0.5) * 0.2
    for su in (-1, 1):
        a, za = pose.point(su * (ident.eye_gap - 0.16), -0.33 - lift)
        b, zb = pose.point(su * (ident.eye_gap + 0.16), -0.30 - lift)
        if za > 0 and zb > 0:
            cv2.line(img, _pt(a), _pt(b), ident.brow, max(1, int(0.06 * pose.a * ident.brow_thick)), cv2.LINE_AA, 4)

    # Nose.
    n0, _ = pose.point(0.0, 0.05, lift=0.03 * pose.a)
    n1, _ = pose.point(0.04, 0.3, lift=0.08 * pose.a)
    cv2.line(img, _pt(n0), _pt(n1), shade, max(1, int(0.05 * pose.a)), cv2.LINE_AA, 4)


def _mouth(img: np.ndarray, ident: Identity, pose: "_Pose", motion: np.ndarray) -> None:
    """Lips around a dark cavity whose height follows mouth_open; corners lift with smile."""
    c, hw, hh, clift = _mouth_shape(ident, motion, pose)
    ca, sa = math.cos(pose.roll), math.sin(pose.roll)

    def rot(dx, dy):
        return (c[0] + dx * ca - dy * sa, c[1] + dx * sa + dy * ca)

    n = 16
    upper = [rot(hw * math.cos(t), -hh * math.sin(t) - clift * math.cos(t) ** 2) for t in np.linspace(0, math.pi, n)]
    lower = [rot(hw * math.cos(t), -hh * math.sin(t) - clift * math.cos(t) ** 2) for t in np.linspace(math.pi, 2 * math.pi, n)]
    lip = 0.03 * pose.b + 0.25 * hh
    outer_u = [rot(1.08 * hw * math.cos(t), -(hh + lip) * math.sin(t) - clift * math.cos(t) ** 2)
               for t in np.linspace(0, math.pi, n)]
    outer_l = [rot(1.08 * hw * math.cos(t), -(hh + lip) * math.sin(t) - clift * math.cos(t) ** 2)
               for t in np.linspace(math.pi, 2 * math.pi, n)]
    _poly(img, outer_u + outer_l, ident.lips)
    _poly(img, upper + lower, CAVITY)


def render_frame(ident: Identity, motion: np.ndarray, size: int = 128) -> np.ndarray:
    """(len(MOTION_FIELDS),) motion -> (size, size, 3) uint8 RGB."""
    motion = np.asarray(motion, np.float32)
    if motion.shape != (len(MOTION_FIELDS),):
        raise ValueError(f"motion must be ({len(MOTION_FIELDS)},) in MOTION_FIELDS order, got {motion.shape}")
    pose = _Pose(ident, motion, size)
    s = pose.s
    img = _background(ident, s)
    angle = math.degrees(pose.roll)
    _hair(img, ident, pose, front=False)

    # Face: an ellipse, shifted with yaw/pitch as the head turns.
    centre, _ = pose.point(0.0, 0.0, lift=-pose.depth)
    _ellipse(img, centre, (pose.a * (0.9 + 0.1 * abs(pose.rot[2, 2])), pose.b), angle, ident.skin)
    shade = tuple(int(c * 0.82) for c in ident.skin)

    # Ears at the sides, hidden when turned away.
    for su in (-1, 1):
        p, z = pose.point(su * 1.02, 0.0, lift=-pose.depth * 0.9)
        if z > -0.2 * pose.a:
            _ellipse(img, p, (0.13 * pose.a, 0.2 * pose.b), angle, shade)

    _hair(img, ident, pose, front=True)

    _eyes(img, ident, pose, motion, angle, shade)
    _brows_and_nose(img, ident, pose, motion, shade)
    _mouth(img, ident, pose, motion)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def render_clip(ident: Identity, motion: np.ndarray, size: int = 128) -> np.ndarray:
    """(T, len(MOTION_FIELDS)) -> (T, size, size, 3) uint8."""
    motion = np.asarray(motion, np.float32)
    if motion.ndim != 2:
        raise ValueError(f"motion must be (T, {len(MOTION_FIELDS)}), got {motion.shape}")
    return np.stack([render_frame(ident, m, size) for m in motion])


def region_weights(ident: Identity, motion: np.ndarray, size: int = 128, mouth: float = 4.0,
                   eyes: float = 2.0) -> np.ndarray:
    """(T, size, size) float32 loss weights: 1 everywhere, more on the mouth and eyes."""
    w = np.ones((len(motion), size, size), np.float32)
    for t, m in enumerate(motion):
        for x0, y0, x1, y1 in eye_boxes(ident, m, size):
            w[t, y0:y1, x0:x1] = np.maximum(w[t, y0:y1, x0:x1], eyes)
        x0, y0, x1, y1 = mouth_box(ident, m, size)
        w[t, y0:y1, x0:x1] = mouth
    return w


def measure_mouth_open(frames: np.ndarray, boxes) -> np.ndarray:
    """Mouth opening estimated from pixels: the fraction of the mouth box that looks like the
    dark mouth cavity. frames (T, H, W, 3) uint8; boxes one (x0, y0, x1, y1) or one per frame.
    Returns (T,) float32 (0 closed, larger = more open)."""
    frames = np.asarray(frames)
    if len(np.shape(boxes)) == 1:
        boxes = [boxes] * len(frames)
    cav = np.array(CAVITY, np.float32)
    out = np.zeros(len(frames), np.float32)
    for t, (f, (x0, y0, x1, y1)) in enumerate(zip(frames, boxes)):
        crop = f[y0:y1, x0:x1].astype(np.float32)
        if crop.size == 0:
            continue
        dist = np.linalg.norm(crop - cav, axis=-1)
        out[t] = float(np.clip(1.0 - dist / 90.0, 0, 1).mean())
    return out
