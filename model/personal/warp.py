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

from model.motion_warp import barycentric, border_points


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
    border = border_points(size)
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
    bary = barycentric(pix[inside], dst2[corners])                     # (P', 3)
    corners = src2[corners]                                             # (P', 3, 2) portrait triangle
    maps = pix.copy()
    maps[inside] = np.einsum("pk,pkd->pd", bary, corners)
    map_x = maps[:, 0].reshape(size, size).astype(np.float32)
    map_y = maps[:, 1].reshape(size, size).astype(np.float32)
    return cv2.remap(portrait, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
