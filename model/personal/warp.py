"""The classical baseline: the portrait warped piecewise-affinely onto other landmarks.

The target landmarks (2D, crop pixels) are triangulated (scipy's Delaunay); every output
pixel takes its triangle (the triangles' indices rasterised with cv2.fillConvexPoly:
scipy's find_simplex walks the mesh point by point and is orders of magnitude slower
here) and its barycentric coordinates there, which place it in the same triangle of the
portrait's landmarks: the piecewise-affine map of scikit-image's PiecewiseAffineTransform,
vectorised over pixels. cv2.remap samples the portrait there. Points on the image border are pinned on both
sides, so the background stays where it is and every pixel lies in a triangle. A warp
moves pixels and cannot make new ones: an opening mouth stretches the lips.
"""

from __future__ import annotations

import numpy as np

BORDER_POINTS_PER_SIDE = 4


def _border(size: int) -> np.ndarray:
    """(4 * BORDER_POINTS_PER_SIDE, 2) points spaced along the image border (x, y)."""
    e = size - 1
    s = np.linspace(0, e, BORDER_POINTS_PER_SIDE + 1)[:-1]
    return np.concatenate([np.c_[s, np.zeros_like(s)], np.c_[np.full_like(s, e), s],
                           np.c_[e - s, np.full_like(s, e)], np.c_[np.zeros_like(s), e - s]])


def _barycentric(p: np.ndarray, tri: np.ndarray) -> np.ndarray:
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


def warp_portrait(portrait: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 portrait with landmarks src (N, 2+) -> the portrait warped so they
    land on dst (N, 2+). Landmarks outside the image are clamped to it; non-finite
    landmarks (no face) return the portrait unchanged."""
    import cv2
    from scipy.spatial import Delaunay

    size = portrait.shape[0]
    src2 = np.clip(np.asarray(src, np.float64)[:, :2], 0, size - 1)
    dst2 = np.clip(np.asarray(dst, np.float64)[:, :2], 0, size - 1)
    if not (np.isfinite(src2).all() and np.isfinite(dst2).all()):
        return portrait.copy()
    border = _border(size)
    src2, dst2 = np.r_[src2, border], np.r_[dst2, border]
    tri = Delaunay(dst2)
    labels = np.full((size, size), -1, np.int32)
    for i, corners in enumerate(np.round(dst2[tri.simplices]).astype(np.int32)):
        cv2.fillConvexPoly(labels, corners, int(i))
    ys, xs = np.mgrid[0:size, 0:size]
    pix = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)            # (P, 2) output pixels
    simplex = labels.ravel()
    inside = simplex >= 0
    corners = tri.simplices[simplex[inside]]                            # (P', 3) point indices
    bary = _barycentric(pix[inside], dst2[corners])                     # (P', 3)
    corners = src2[corners]                                             # (P', 3, 2) portrait triangle
    maps = pix.copy()
    maps[inside] = np.einsum("pk,pkd->pd", bary, corners)
    map_x = maps[:, 0].reshape(size, size).astype(np.float32)
    map_y = maps[:, 1].reshape(size, size).astype(np.float32)
    return cv2.remap(portrait, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
