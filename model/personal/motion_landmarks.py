"""A person's face-mesh landmarks predicted from the model's motion fields.

The motion fields (yaw, pitch, roll, mouth_open, ...: model/personal/motion.py) are what a
session drives an avatar with; the landmarks are what a classical warp needs. Over one
person's clip the map between them is smooth and nearly fixed (the crop follows the head,
so the landmarks move only with pose and expression), so ridge regression on the fields and
their squares, fitted on the clip's own frames, predicts each landmark to well under a pixel
at 128 px (docs/benchmarks.md). The personal eval uses it for the baseline that gets
exactly the avatar's inputs: the portrait warped onto the landmarks the motion predicts.
"""

from __future__ import annotations

import numpy as np

# Only keeps a rank-poor clip solvable: the head fields vary by a few thousandths (their
# squares by 1e-5), so a larger ridge shrinks what they carry; at 1e-2 it halved the gain of
# the head fields on held-out landmarks (docs/benchmarks.md).
RIDGE = 1e-4


def _features(motion: np.ndarray) -> np.ndarray:
    """The regression's inputs, the same as the engine's warp computes (motion_warp.features)."""
    import torch

    from model.motion_warp import features

    return features(torch.from_numpy(np.asarray(motion, np.float64))).numpy()


class MotionLandmarks:
    """fit(motion (T, F), landmarks (T, N, 2+)) on one person's frames; then
    predict(motion (T', F)) -> (T', N, 2) crop-pixel landmarks."""

    def __init__(self, weights: np.ndarray, n_points: int):
        self.weights, self.n_points = weights, n_points

    @classmethod
    def fit(cls, motion: np.ndarray, landmarks: np.ndarray) -> "MotionLandmarks":
        motion, points = np.asarray(motion), np.asarray(landmarks)[..., :2]
        if len(motion) != len(points):
            raise ValueError(f"{len(motion)} motion rows for {len(points)} landmark frames")
        flat = points.reshape(len(points), -1)
        rows = np.isfinite(motion).all(1) & np.isfinite(flat).all(1)  # frames without a face drop out
        x = _features(motion[rows])
        if rows.sum() < x.shape[1]:
            raise ValueError(f"{int(rows.sum())} frames with a face; the map needs at least {x.shape[1]}")
        weights = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ flat[rows])
        return cls(weights, points.shape[1])

    def predict(self, motion: np.ndarray) -> np.ndarray:
        return (_features(motion) @ self.weights).reshape(len(motion), self.n_points, 2)
