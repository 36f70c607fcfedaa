"""The preparation pipeline: a clip of one person -> everything the fitting step reads.

Two passes over the video (nothing but landmarks is kept between them, so memory grows
with the aligned frames only):
  1. landmarks of every frame (mediapipe face mesh, tracking mode) and the sharpness of
     the face region;
  2. after the calibration (template + neutral face, from the first `fit_frames` frames),
     the motion track, the smoothed crop track (and the head's place in it: the head
     fields) and the portrait choice: every frame
     cropped to the model's size, the portrait also at PORTRAIT_SIZE (its colour moved
     to the fitting frames' mean: `portrait.clip_colour`).
The clip's speech is demuxed and resampled to the model's rate.

`save` / `load` keep a `Prepared` in one safetensors file (arrays as tensors, the rest
as JSON metadata), the file the fitting step and `knotstream eval --personal` read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.personal import align, portrait, video
from model.personal import landmarks as L
from model.personal import motion as M

PORTRAIT_SIZE = 256      # as the bundled avatars (server/avatars.py)
TRACK_MAX_SIDE = 720     # frames are tracked at most this large on their short side
# The file format and the preparation that wrote it: /2 has the exact crop geometry and the
# portrait in the clip's colour, /3 the head fields (both 2026-12-02); a file of an older
# version is prepared again.
FORMAT = "knotstream-personal-prepared/3"


@dataclass
class Prepared:
    """One person's clip, aligned and measured. T frames at `fps`."""

    frames: np.ndarray        # (T, size, size, 3) uint8 aligned crops
    landmarks: np.ndarray     # (T, 478, 3) float32 in crop pixels (NaN where no face)
    found: np.ndarray         # (T,) bool: a face was tracked
    motion: np.ndarray        # (T, len(MOTION_FIELDS)) float32 in the model's units
    boxes: np.ndarray         # (T, 3) float32 crop (x0, y0, side) in source pixels
    portrait: np.ndarray      # (PORTRAIT_SIZE, PORTRAIT_SIZE, 3) uint8
    portrait_index: int
    calibration: M.Calibration
    fps: int
    sample_rate: int
    audio: np.ndarray | None  # (n,) float32 at sample_rate, or None (silent clip)
    fit_frames: int           # frames the calibration and the portrait came from
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.frames.shape[1])


def _track(path, fps: int, progress: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1: (T, 478, 3) source-pixel landmarks, (T,) found, (T,) face sharpness."""
    import cv2

    lms, found, sharp = [], [], []
    with L.FaceTracker(video=True) as tracker:
        for frame in video.iter_frames(path, fps):
            k = min(1.0, TRACK_MAX_SIDE / min(frame.shape[:2]))
            small = cv2.resize(frame, None, fx=k, fy=k, interpolation=cv2.INTER_AREA) if k < 1 else frame
            pts = tracker(small)
            pts = None if pts is None else pts / np.float32(k)
            found.append(pts is not None)
            lms.append(np.full((L.N_LANDMARKS, 3), np.nan, np.float32) if pts is None else pts)
            sharp.append(portrait.sharpness(frame, pts))
            progress(1)
    if not lms:
        raise ValueError(f"{path} has no frames")
    return np.stack(lms), np.array(found), np.array(sharp)


def prepare(path: str | Path, size: int = 128, fps: int = 25, sample_rate: int = 16000,
            fit_fraction: float = 1.0, progress: Callable[[int], None] | None = None) -> Prepared:
    """Run both passes on the clip at `path`. fit_fraction: the leading share of the clip
    the calibration and the portrait come from (the rest is measured with it: held-out
    frames in `knotstream eval --personal`). progress(n) is called per frame and pass."""
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"fit_fraction must be in (0, 1], got {fit_fraction}")
    progress = progress or (lambda n: None)
    lms, found, sharp = _track(path, fps, progress)
    n_fit = max(1, int(round(fit_fraction * len(lms))))
    if not found[:n_fit].any():
        raise ValueError(f"no face was found in {path} (in the {n_fit} frames used for calibration)")
    calibration = M.calibrate(lms[:n_fit], found[:n_fit])
    motion, poses = M.measure(lms, found, calibration)
    boxes = align.crop_track(poses.s, poses.t, fps)
    motion = M.with_head(motion, align.head_in_crop(poses.s, poses.t, boxes), found)
    index, cost = portrait.choose(motion[:n_fit], sharp[:n_fit], found[:n_fit])

    frames, crop_lms, portrait_image = [], [], None
    for i, frame in enumerate(video.iter_frames(path, fps)):
        if i >= len(boxes):
            break  # the file decoded to more frames than pass 1 saw: keep pass 1's count
        frames.append(align.crop(frame, boxes[i], size))
        crop_lms.append(align.to_crop(lms[i], boxes[i], size))
        if i == index:
            portrait_image = align.crop(frame, boxes[i], PORTRAIT_SIZE)
        progress(1)
    if len(frames) != len(boxes) or portrait_image is None:
        raise ValueError(f"{path} decoded to {len(frames)} frames on the second pass, {len(boxes)} on the first")
    frames = np.stack(frames)
    portrait_image, colour_shift = portrait.clip_colour(portrait_image, frames[index], frames[:n_fit])
    audio = video.load_speech(path, sample_rate)
    meta = {"source": Path(path).name, "portrait_cost": cost, "tracked": float(found.mean()),
            "portrait_colour_shift": [round(float(c), 2) for c in colour_shift], "source_info": video.probe(path)}
    return Prepared(frames, np.stack(crop_lms).astype(np.float32), found, motion,
                    boxes.astype(np.float32), portrait_image, index, calibration, fps, sample_rate,
                    audio, n_fit, meta)


def save(prepared: Prepared, path: str | Path) -> None:
    """Write `prepared` to one safetensors file (atomically: a temporary file renamed)."""
    from safetensors.numpy import save_file

    p = prepared
    tensors = {"frames": p.frames, "landmarks": p.landmarks, "found": p.found.astype(np.uint8),
               "motion": p.motion, "boxes": p.boxes, "portrait": p.portrait,
               **{f"calibration.{k}": v for k, v in p.calibration.to_arrays().items()}}
    if p.audio is not None:
        tensors["audio"] = p.audio.astype(np.float32)
    meta = {"format": FORMAT, "fps": str(p.fps), "sample_rate": str(p.sample_rate),
            "portrait_index": str(p.portrait_index), "fit_frames": str(p.fit_frames), "meta": json.dumps(p.meta)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_current(path: str | Path, video: str | Path) -> Prepared | None:
    """The prepared file at `path` when it can stand in for preparing `video` again: it
    exists, is newer than the video and was written by this version of the preparation
    (FORMAT). None otherwise (a file of an older version is not an error: it is redone)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file() or path.stat().st_mtime < Path(video).stat().st_mtime:
        return None
    with safe_open(str(path), framework="numpy") as f:
        current = (f.metadata() or {}).get("format") == FORMAT
    return load(path) if current else None


def load(path: str | Path) -> Prepared:
    """Read a file written by `save`; ValueError when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared clip not found: {path}")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a prepared personal clip (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        t = {k: f.get_tensor(k) for k in f.keys()}
    calibration = M.Calibration.from_arrays({"template": t["calibration.template"],
                                             "neutral": t["calibration.neutral"]})
    return Prepared(t["frames"], t["landmarks"], t["found"].astype(bool), t["motion"], t["boxes"],
                    t["portrait"], int(meta["portrait_index"]), calibration, int(meta["fps"]),
                    int(meta["sample_rate"]), t.get("audio"), int(meta["fit_frames"]), json.loads(meta["meta"]))
