"""A personal avatar's portrait warped onto each frame's motion: the model's per-frame copy source.

A classical warp of the portrait onto the landmarks a frame's motion predicts is a strong
picture of the person (right pose, roughly right mouth; docs/benchmarks.md) that the small
latent of the generated frame is not. A model with `ModelConfig.motion_warp` carries, as
buffers of this module, what it needs to make that warp from nothing but the driving:

- `landmark_map` (K, 2N): ridge regression of the person's N face-mesh landmarks (crop
  pixels) on the motion fields and their squares (`features`), fitted on the person's clip
  (model/personal/motion_landmarks.py);
- `points` (N, 2): the landmarks of the portrait;
- `rest` (F,): the portrait's own motion, what a field the session does not give takes
  (the warp then leaves that part of the face as in the portrait).

Two consumers: the DiT's condition channels take, per latent frame, the VAE latent of the
portrait warped onto the latent's mean motion (`latent_fields`) instead of the still
portrait's latent; the reference decoder's blend copies, per video frame, from the portrait
warped onto that frame's motion (`warp`).

The warp is piecewise-affine over the portrait's triangulated landmarks (model/personal/
warp.py) to first order: every pixel moves by the barycentric mix of its triangle's landmark
displacements. The displacement is linear in `features`, so the dense sampling grid of a
frame is one small matrix product with a table built once per model (`_table`): about
0.1 ms a frame at 128 px, against ~28 ms for the exact per-frame triangulation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BORDER_POINTS_PER_SIDE = 4  # pinned on the image border: the background stays where it is


def features(fields: Tensor) -> Tensor:
    """(..., F) motion fields -> (..., 1 + 2F): 1, the fields, their squares (the regression's
    inputs; MotionLandmarks uses the same)."""
    return torch.cat([torch.ones_like(fields[..., :1]), fields, fields * fields], dim=-1)


def border_points(size: int) -> np.ndarray:
    """(4 * BORDER_POINTS_PER_SIDE, 2) points spaced along the image border (x, y)."""
    e = size - 1
    s = np.linspace(0, e, BORDER_POINTS_PER_SIDE + 1)[:-1]
    return np.concatenate([np.c_[s, np.zeros_like(s)], np.c_[np.full_like(s, e), s],
                           np.c_[e - s, np.full_like(s, e)], np.c_[np.zeros_like(s), e - s]])


def barycentric(p: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (P, 3) of points p (P, 2) in triangles tri (P, 3, 2), in closed
    form (scipy's Delaunay.transform inverts every simplex through LAPACK, slow here)."""
    a = tri[:, 0]
    v0, v1, v2 = tri[:, 1] - a, tri[:, 2] - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    denom = d00 * d11 - d01 * d01
    denom = np.where(np.abs(denom) < 1e-12, 1e-12, denom)  # a sliver triangle: its pixels go to a corner
    v = (d11 * d20 - d01 * d21) / denom
    w = (d00 * d21 - d01 * d20) / denom
    return np.c_[1.0 - v - w, v, w]


def _pixel_weights(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's triangle (over `points` plus the border points) as 3 point indices and
    barycentric weights: (P, 3) int, (P, 3) float. Border points index past the landmarks."""
    import cv2
    from scipy.spatial import Delaunay

    pts = np.r_[np.clip(points, 0, size - 1), border_points(size)]
    tri = Delaunay(pts)
    labels = np.full((size, size), -1, np.int32)
    for i, corners in enumerate(np.round(pts[tri.simplices]).astype(np.int32)):
        cv2.fillConvexPoly(labels, corners, int(i))
    ys, xs = np.mgrid[0:size, 0:size]
    pix = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)
    simplex = labels.ravel()
    idx = np.zeros((len(pix), 3), np.int64)
    bary = np.zeros((len(pix), 3))
    inside = simplex >= 0
    idx[inside] = tri.simplices[simplex[inside]]
    bary[inside] = barycentric(pix[inside], pts[idx[inside]])
    idx[~inside] = len(points)  # outside every triangle (rounding at the border): a border point, no motion
    bary[~inside, 0] = 1.0
    return idx, bary


class MotionWarp(nn.Module):
    """The warp of one person (see the module docstring); its buffers are part of the model file."""

    def __init__(self, n_points: int, n_fields: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("landmark_map", torch.zeros(1 + 2 * n_fields, 2 * n_points))
        self.register_buffer("points", torch.zeros(n_points, 2))
        self.register_buffer("rest", torch.zeros(n_fields))
        self._cache: tuple | None = None  # (key, table) built from the buffers on first use

    @torch.no_grad()
    def set_fit(self, landmark_map: np.ndarray, points: np.ndarray, rest: np.ndarray) -> None:
        """The person's regression weights (K, 2N), portrait landmarks (N, 2+) and rest motion (F,)."""
        self.landmark_map.copy_(torch.as_tensor(np.asarray(landmark_map), dtype=self.landmark_map.dtype))
        self.points.copy_(torch.as_tensor(np.asarray(points)[:, :2], dtype=self.points.dtype))
        self.rest.copy_(torch.as_tensor(np.asarray(rest), dtype=self.rest.dtype))
        self._cache = None

    def fields(self, driving: Tensor) -> Tensor:
        """(..., 2F) driving rows (values, given flags) -> (..., F): given values, else the rest."""
        n = self.rest.shape[0]
        given = driving[..., n:2 * n] > 0.5
        return torch.where(given, driving[..., :n], self.rest.to(driving.dtype))

    def latent_fields(self, driving: Tensor, stride: int) -> Tensor:
        """(T = stride * L, 2F) driving rows of L latents' groups of frames -> (L, F): each
        latent's mean motion (a row before the stream start, all zeros, counts as the rest)."""
        f = self.fields(driving)
        return f.reshape(-1, stride, f.shape[-1]).mean(1)

    def landmarks(self, fields: Tensor) -> Tensor:
        """(T, F) motion -> (T, N, 2) predicted crop-pixel landmarks."""
        m = self.landmark_map.float()
        return (features(fields.float()) @ m).reshape(len(fields), -1, 2)

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(K, S*S, 2) grid change per feature and the (S*S, 2) grid of the rest pose, in
        grid_sample's [-1, 1] units; built once per set of buffers."""
        key = (device, self.landmark_map.data_ptr(), self.points.data_ptr(), self.rest.data_ptr())
        if self._cache is None or self._cache[0] != key:
            S = self.size
            idx, bary = _pixel_weights(self.points.float().cpu().numpy(), S)
            n = self.points.shape[0]
            lm = self.landmark_map.float().cpu().reshape(-1, n, 2)
            lm = torch.cat([lm, torch.zeros(lm.shape[0], idx.max() + 1 - n, 2)], dim=1)  # border points: no motion
            w = torch.from_numpy(bary).float()
            per_feature = (lm[:, torch.from_numpy(idx)] * w[None, :, :, None]).sum(2)  # (K, P, 2) displacement
            rest = features(self.rest.float().cpu()[None])[0] @ lm.reshape(lm.shape[0], -1)
            rest_disp = (rest.reshape(-1, 2)[torch.from_numpy(idx)] * w[..., None]).sum(1)  # (P, 2)
            ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32),
                                    indexing="ij")
            base = torch.stack([xs.ravel(), ys.ravel()], 1)
            # A pixel samples the portrait where its content came from: x - (disp(m) - disp(rest)).
            scale = 2.0 / (S - 1)
            table = (-per_feature * scale).to(device)
            offset = ((base + rest_disp) * scale - 1).to(device)
            self._cache = (key, (table, offset))
        return self._cache[1]

    def grid(self, fields: Tensor) -> Tensor:
        """(T, F) motion -> (T, S, S, 2) grid_sample coordinates into the portrait."""
        table, offset = self._table(fields.device)
        g = offset + torch.einsum("tk,kpd->tpd", features(fields.float()), table)
        return g.reshape(len(fields), self.size, self.size, 2)

    def warp(self, image: Tensor, fields: Tensor) -> Tensor:
        """image (1 or T, 3, S, S) -> (T, 3, S, S): the portrait warped onto each row's motion."""
        g = self.grid(fields).to(image.dtype)
        image = image.expand(len(fields), -1, -1, -1) if image.shape[0] == 1 else image
        return F.grid_sample(image, g, mode="bilinear", padding_mode="border", align_corners=True)
