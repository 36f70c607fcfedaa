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
  (the warp then leaves that part of the face about as in the portrait).

Where the landmarks go (`absolute`): onto the landmarks the motion predicts, or (the
avatars fitted before 2026-12-02) onto the portrait's own landmarks moved by the
prediction's change from the portrait's motion. The relative form keeps whatever the
portrait frame has that the motion does not carry, above all where the head sat in the crop
at that instant (the crop follows a smoothed track: a few tenths of a pixel); every frame
then repeats it. The absolute form puts the face where frames with that motion have it on
average: it scores higher on held-out frames (docs/benchmarks.md).

Two consumers: the DiT's condition channels take, per latent frame, the VAE latent of the
portrait warped onto the latent's mean motion (`latent_fields`) instead of the still
portrait's latent; the reference decoder's blend copies, per video frame, from the portrait
warped onto that frame's motion (`warp`).

The warp is piecewise-affine over the portrait's triangulated landmarks (the triangles of
model/personal/warp.py's classical baseline, fixed once per model). Rasterising each frame's
triangles costs ~28 ms a frame; here every output pixel finds its triangle by a vectorised
walk instead (`_locate`): it starts in the triangle of the first-order guess (the pixel moved
back by the portrait's displacement field there, one small matrix product with a table
built once per model: the displacement is linear in `features`) and steps across the edge
its barycentric coordinates say it lies beyond until it is inside, a few steps at most. The
first-order guess alone is close in most of the face but not inside an opening mouth: a
closed-lip portrait's thin inner-lip triangles stretch there, and the first-order warp fills
the opening with lip instead of the stretched lip line, which doubles the mouth-opening error
of the warp (docs/benchmarks.md). A pixel whose walk does not end (a triangle folded over by
an extreme motion) keeps its first-order guess.

The open mouth (`set_open`, the avatars fitted from 2026-12-03 on): a closed-lip portrait has
no picture of the inside of a mouth, so its warp fills an opening with stretched lip, a
striped patch. The model may carry a second portrait, a frame of the clip with the mouth
open, and its landmarks. In the mouth box (`mouth_mask`), the warp then crossfades to that
frame warped onto the same predicted landmarks (the same triangles, located once: only the
source corners differ), by how far the predicted inner-lip gap has gone from the portrait's
towards the open frame's (`open_weight`). A closed mouth is the portrait's warp exactly.

The body (`set_torso`, the avatars fitted from 2026-12-03 on): the crop follows the head, so
the shoulders and neck move in it as the person leans and the head turns, and the mesh,
pinned to the image border, leaves them where the portrait has them: the decoder's blend
then draws them as a blurred average of both places. The model may carry a regression of
where the body sits, measured in the clip (model/personal/torso.py: the displacement from
the portrait of `torso_columns` points on a line below the chin), on the same motion
features; below the portrait's chin line (`torso_line`, fading in over TORSO_RAMP px) every
pixel samples the face warp where the predicted displacement, interpolated along x, says
its content was. Above the line the warp is unchanged.

The sharp mouth (`warp(..., sharp_mouth=True)`, what the decoder's blend copies): bilinear
sampling at a sub-pixel offset spreads the dark line where closed lips meet over two
half-dark rows, which the landmark model (and a viewer) reads as lips slightly parted.
Inside the mouth box the warp then samples bicubic, which keeps the line, as far as the
motion closes the lips: fully when the predicted inner lips (`open_pair`) meet, not at all
from SHARP_GAP apart (on an opening mouth the bicubic one read worse, docs/benchmarks.md).
A warp without the inner-lip pair (no open-mouth portrait) stays bilinear. The DiT's
condition and training keep the bilinear warp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BORDER_POINTS_PER_SIDE = 4  # pinned on the image border: the background stays where it is
MOUTH_MARGIN = 0.3  # the mouth box of `mouth_mask` grows by this much of its size on each side
MOUTH_FEATHER = 3.0  # px over which it fades out
TORSO_RAMP = 6.0  # px below the torso line over which the body's displacement fades in
SHARP_GAP = 1.0  # px: predicted inner lips closer than this are a line that bilinear sampling blurs


def torso_columns(n: int, size: int) -> np.ndarray:
    """(n,) x positions (crop pixels) of the body points `set_torso` displaces, spread over the
    middle 80 % of the frame's width."""
    return np.linspace(0.1, 0.9, n) * (size - 1)


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


def _mesh(points: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The portrait's triangulation: its vertices `points` clamped to the image plus the border
    points (M, 2), the triangles (K, 3) and their neighbours (K, 3: the one across from each
    corner, -1 on the hull), and each pixel's triangle (P,) and barycentric weights (P, 3).
    A pixel outside every triangle (rounding at the border) gets triangle -1."""
    import cv2
    from scipy.spatial import Delaunay

    pts = np.r_[np.clip(points, 0, size - 1), border_points(size)]
    tri = Delaunay(pts)
    labels = np.full((size, size), -1, np.int32)
    for i, corners in enumerate(np.round(pts[tri.simplices]).astype(np.int32)):
        cv2.fillConvexPoly(labels, corners, int(i))
    ys, xs = np.mgrid[0:size, 0:size]
    pix = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)
    label = labels.ravel()
    bary = np.zeros((len(pix), 3))
    inside = label >= 0
    bary[inside] = barycentric(pix[inside], pts[tri.simplices[label[inside]]])
    return {"vertices": pts, "triangles": tri.simplices, "neighbours": tri.neighbors, "label": label, "bary": bary}


WALK_STEPS = 8        # a walk from the first-order guess ends in 1-3 steps in a real face's motion
INSIDE = -1e-4        # barycentric slack: a pixel on an edge is inside either triangle


def _to_barycentric(corners: Tensor) -> Tensor:
    """Triangles (..., 3, 2) -> (..., 9): the barycentric weights of a point (x, y) are
    x * w[0:3] + y * w[3:6] + w[6:9] (closed form; this layout makes a gathered row three
    contiguous slices). A degenerate (zero-area) triangle puts every point outside it."""
    (ax, ay), (bx, by), (cx, cy) = [corners[..., i, :].unbind(-1) for i in range(3)]
    det = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
    ok = det.abs() > 1e-6
    inv = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    l1x, l1y = (by - cy) * inv, (cx - bx) * inv
    l2x, l2y = (cy - ay) * inv, (ax - cx) * inv
    l1c, l2c = -(l1x * cx + l1y * cy), -(l2x * cx + l2y * cy)
    l3c = torch.where(ok, 1.0 - l1c - l2c, torch.full_like(det, -1.0))
    return torch.stack([l1x, l2x, -l1x - l2x, l1y, l2y, -l1y - l2y, l1c, l2c, l3c], -1)


def _apply(rows: Tensor, index: Tensor, xy: Tensor) -> Tensor:
    """rows (R, 3n) laid out as `_to_barycentric`'s, index (A,), xy (A, 2) -> (A, n):
    x * row[x part] + y * row[y part] + row[constant part] of each point's row."""
    g = rows.index_select(0, index)
    n = g.shape[1] // 3
    return torch.addcmul(torch.addcmul(g[:, 2 * n:], g[:, :n], xy[:, :1]), g[:, n:2 * n], xy[:, 1:])


def _locate(to_bary: Tensor, neighbours: Tensor, px: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    """Each pixel's triangle in each frame's moved mesh, by walking from `start`.
    to_bary (T * K, 9) the moved triangles' `_to_barycentric`, frame-major; neighbours
    (K, 3); px (T*P, 2) every frame's pixels, frame-major; start (T, P) -> found (T*P,)
    bool, flat triangle index frame * K + triangle (T*P,)."""
    T, K = start.shape[0], neighbours.shape[0]
    base = (torch.arange(T, device=px.device) * K)[:, None]
    tri = (start.clamp(min=0) + base).reshape(-1)
    low, corner = _apply(to_bary, tri, px).min(1)
    found = low >= INSIDE
    active = (~found).nonzero().squeeze(1)
    corner = corner[active]
    for _ in range(WALK_STEPS):
        # Step across the edge opposite the most negative corner; the hull has no
        # neighbour there, and such a pixel keeps its first-order guess.
        t = tri[active]
        nxt = neighbours[t % K, corner]
        keep = nxt >= 0
        active, t = active[keep], nxt[keep] + (t[keep] // K) * K
        if active.numel() == 0:
            break
        tri[active] = t
        low, corner = _apply(to_bary, t, px[active]).min(1)
        inside = low >= INSIDE
        found[active[inside]] = True
        active, corner = active[~inside], corner[~inside]
    return found, tri


class MotionWarp(nn.Module):
    """The warp of one person (see the module docstring); its buffers are part of the model file."""

    def __init__(self, n_points: int, n_fields: int, size: int, absolute: bool = False,
                 mouth: Sequence[int] = (), open_pair: Sequence[int] = (), torso: int = 0):
        super().__init__()
        self.size, self.absolute = size, absolute
        self.mouth = tuple(mouth)          # the landmarks ringing the mouth (`mouth_mask`)
        self.open_pair = tuple(open_pair)  # (upper, lower) inner lip: their gap is the opening; (): no open portrait
        if self.open_pair and (len(self.open_pair) != 2 or not self.mouth):
            raise ValueError("an open-mouth portrait needs the mouth's landmarks and one (upper, lower) inner-lip pair")
        self.register_buffer("landmark_map", torch.zeros(1 + 2 * n_fields, 2 * n_points))
        self.register_buffer("points", torch.zeros(n_points, 2))
        self.register_buffer("rest", torch.zeros(n_fields))
        if self.open_pair:
            self.register_buffer("open_image", torch.zeros(3, size, size))  # [-1, 1]
            self.register_buffer("open_points", torch.zeros(n_points, 2))
        self.torso = torso                 # body points below the chin (`set_torso`); 0: the body stays put
        if torso:
            self.register_buffer("torso_map", torch.zeros(1 + 2 * n_fields, 2 * torso))
            self.register_buffer("torso_line", torch.zeros(1))
        self._cache: tuple | None = None  # (key, tables) built from the buffers on first use

    @torch.no_grad()
    def set_fit(self, landmark_map: np.ndarray, points: np.ndarray, rest: np.ndarray) -> None:
        """The person's regression weights (K, 2N), portrait landmarks (N, 2+) and rest motion (F,)."""
        self.landmark_map.copy_(torch.as_tensor(np.asarray(landmark_map), dtype=self.landmark_map.dtype))
        self.points.copy_(torch.as_tensor(np.asarray(points)[:, :2], dtype=self.points.dtype))
        self.rest.copy_(torch.as_tensor(np.asarray(rest), dtype=self.rest.dtype))
        self._cache = None

    @torch.no_grad()
    def set_open(self, image: np.ndarray, points: np.ndarray) -> None:
        """The open-mouth portrait (S, S, 3) uint8 and its landmarks (N, 2+), crop pixels."""
        if not self.open_pair:
            raise ValueError("this warp was built without an open-mouth portrait (open_pair)")
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"the open-mouth portrait must be ({self.size}, {self.size}, 3) uint8, got "
                             f"{image.shape} {image.dtype}")
        picture = torch.from_numpy(np.ascontiguousarray(image)).float().div(127.5).sub(1).permute(2, 0, 1)
        self.open_image.copy_(picture)
        self.open_points.copy_(torch.as_tensor(np.asarray(points)[:, :2], dtype=self.open_points.dtype))
        self._cache = None

    @torch.no_grad()
    def set_torso(self, torso_map: np.ndarray, line: float) -> None:
        """The regression (K, 2 * torso) of the body points' displacement from the portrait
        (crop pixels, at `torso_columns`) on the motion features, and the portrait's chin line
        (y) below which the body moves."""
        if not self.torso:
            raise ValueError("this warp was built without body points (torso)")
        self.torso_map.copy_(torch.as_tensor(np.asarray(torso_map), dtype=self.torso_map.dtype))
        self.torso_line.fill_(float(line))

    def torso_displacement(self, fields: Tensor) -> Tensor:
        """(T, F) motion -> (T, S, S, 2): how far, in crop pixels, each output pixel's content
        moved from the portrait with the body (0 above the torso line)."""
        S = self.size
        d = (features(fields.float()) @ self.torso_map.float()).reshape(len(fields), self.torso, 2)  # (T, n, 2)
        # Linear interpolation along x between the body points, constant beyond the outer ones.
        cols = torch.as_tensor(torso_columns(self.torso, S), dtype=torch.float32, device=fields.device)
        x = torch.arange(S, dtype=torch.float32, device=fields.device)
        if self.torso > 1:
            hat = (1 - (x[:, None] - cols[None]).abs() / (cols[1] - cols[0])).clamp(min=0)   # (S, n)
            hat[x < cols[0], 0], hat[x > cols[-1], -1] = 1.0, 1.0
        else:
            hat = torch.ones(S, 1, device=fields.device)
        along = torch.einsum("xn,tnd->txd", hat, d)                                           # (T, S, 2)
        ramp = ((x - self.torso_line.float()) / TORSO_RAMP).clamp(0, 1)                        # (S,) rows
        return ramp[None, :, None, None] * along[:, None]

    def lip_gap(self, points: Tensor) -> Tensor:
        """(..., N, 2) landmarks -> (...,) px between the inner lips (`open_pair`)."""
        up, down = self.open_pair
        return (points[..., up, :] - points[..., down, :]).norm(dim=-1)

    def open_weight(self, fields: Tensor) -> Tensor:
        """(T, F) motion -> (T,) in [0, 1]: how far the predicted inner-lip gap has gone from
        the portrait's (0) to the open-mouth portrait's (1)."""
        closed, opened = self.lip_gap(self.points.float()), self.lip_gap(self.open_points.float())
        span = (opened - closed).clamp(min=1e-3)  # the fit sets it only when the frame opens wider
        return ((self.lip_gap(self.landmarks(fields)) - closed) / span).clamp(0, 1)

    def closed_weight(self, fields: Tensor) -> Tensor:
        """(T, F) motion -> (T,) in [0, 1]: 1 where the predicted inner lips meet, falling to
        0 at SHARP_GAP px apart (the sharp mouth's weight; needs `open_pair`)."""
        return (1 - self.lip_gap(self.landmarks(fields)) / SHARP_GAP).clamp(0, 1)

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

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        """What `grid` needs, built once per set of buffers: the portrait's mesh (`_mesh`), the
        landmarks' motion weights padded with the border points' zeros (K, M, 2), and the
        first-order displacement per feature (K, P, 2) and at rest (P, 2), crop pixels."""
        key = (device, self.landmark_map.data_ptr(), self.points.data_ptr(), self.rest.data_ptr(), self.absolute,
               self.open_points.data_ptr() if self.open_pair else None)
        if self._cache is None or self._cache[0] != key:
            S, n = self.size, self.points.shape[0]
            mesh = _mesh(self.points.float().cpu().numpy(), S)
            m = len(mesh["vertices"])
            lm = self.landmark_map.float().cpu().reshape(-1, n, 2)
            lm = torch.cat([lm, torch.zeros(lm.shape[0], m - n, 2)], dim=1)  # border points: no motion
            label = torch.from_numpy(mesh["label"]).long()
            corners = torch.from_numpy(mesh["triangles"]).long()[label.clamp(min=0)]           # (P, 3)
            w = torch.from_numpy(mesh["bary"]).float()
            per_feature = (lm[:, corners] * w[None, :, :, None]).sum(2)                         # (K, P, 2)
            # Where the mesh's vertices sit at no displacement: `_moved` is vertices + pred(m) -
            # rest, i.e. pred(m) (absolute) or the portrait's landmarks + pred(m) - pred(rest).
            if self.absolute:
                rest = torch.cat([torch.from_numpy(mesh["vertices"][:n]).float(), torch.zeros(m - n, 2)])
            else:
                rest = torch.einsum("k,kmd->md", features(self.rest.float().cpu()[None])[0], lm)  # (M, 2)
            ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32),
                                    indexing="ij")
            tables = {"pixels": torch.stack([xs.ravel(), ys.ravel()], 1), "label": label,
                      "vertices": torch.from_numpy(mesh["vertices"]).float(), "weights": lm, "rest": rest,
                      "triangles": torch.from_numpy(mesh["triangles"]).long(),
                      "corners": torch.from_numpy(mesh["vertices"][mesh["triangles"]]).float(),  # (K, 3, 2) portrait
                      "neighbours": torch.from_numpy(mesh["neighbours"]).long(),
                      "per_feature": per_feature, "rest_disp": (rest[corners] * w[..., None]).sum(1)}
            if self.open_pair:  # the open-mouth portrait's corners of the same triangles
                opened = np.r_[np.clip(self.open_points.float().cpu().numpy(), 0, S - 1), border_points(S)]
                tables["open_corners"] = torch.from_numpy(opened[mesh["triangles"]]).float()
            self._cache = (key, {k: v.to(device) for k, v in tables.items()})
        return self._cache[1]

    def grid(self, fields: Tensor) -> Tensor:
        """(T, F) motion -> (T, S, S, 2) grid_sample coordinates into the portrait (see the
        module docstring: the first-order guess, then the exact triangle by a walk)."""
        with torch.autocast(fields.device.type, enabled=False):
            return self._grids(fields.float())[0]

    def _grids(self, fields: Tensor) -> list[Tensor]:
        """The portrait's grid, then the open-mouth portrait's when the warp has one."""
        t = self._tables(fields.device)
        return self._grid(fields, ("corners", "open_corners") if "open_corners" in t else ("corners",))

    def _grid(self, fields: Tensor, sources: tuple[str, ...]) -> list[Tensor]:
        # float32 throughout, also under the engine's bf16 autocast: the barycentric
        # constants are differences of products of pixel coordinates, which bf16 cancels.
        t, S = self._tables(fields.device), self.size
        f = features(fields)                                                               # (T, K)
        # A pixel samples the portrait where its content came from; to first order
        # x - (disp(m) - disp(rest)) with the displacement field of the portrait's mesh.
        guess = t["pixels"] - (torch.einsum("tk,kpd->tpd", f, t["per_feature"]) - t["rest_disp"])
        moved = self._moved(t, f)
        to_bary = _to_barycentric(moved[:, t["triangles"]]).reshape(-1, 9)                 # (T * K, 9)
        xy = guess.round().long().clamp(0, S - 1)
        start = t["label"][xy[..., 1] * S + xy[..., 0]]
        px = t["pixels"].repeat(len(fields), 1)                                            # (T * P, 2)
        found, tri = _locate(to_bary, t["neighbours"], px, start)
        # The triangle's affine map onto the portrait, in the same layout: corners @ weights.
        w = to_bary.view(len(fields), -1, 3, 3)                                           # (T, K, part, corner)
        grids = []
        for corners in sources:
            affine = torch.einsum("kcd,tkpc->tkpd", t[corners], w).reshape(-1, 6)          # (T * K, 6)
            exact = _apply(affine, tri, px)
            if corners == "open_corners":
                # Where the lips cross, the moved mesh folds and leaves pixels no triangle
                # holds. The first-order guess is a place in the closed portrait (its lip
                # line: dark dots in the teeth); the open portrait continues the affine map
                # of the triangle the walk ended in, next to the fold.
                source = exact
            else:
                source = torch.where(found[:, None], exact, guess.reshape(-1, 2))
            grids.append((source * (2.0 / (S - 1)) - 1).reshape(len(fields), S, S, 2))
        if self.torso:
            # The body's content at p came from p - displacement: sample the face warp's
            # grid there (bilinear; exactly the grid above the torso line).
            at = (t["pixels"].reshape(1, S, S, 2) - self.torso_displacement(fields)) * (2.0 / (S - 1)) - 1
            grids = [F.grid_sample(g.permute(0, 3, 1, 2), at, mode="bilinear", padding_mode="border",
                                   align_corners=True).permute(0, 2, 3, 1) for g in grids]
        return grids

    def _moved(self, t: dict[str, Tensor], f: Tensor) -> Tensor:
        """The mesh's vertices (T, M, 2) for motion features f (T, K): the portrait's
        landmarks moved by the regression's change from the rest motion (border points stay)."""
        moved = t["vertices"] + torch.einsum("tk,kmd->tmd", f, t["weights"]) - t["rest"]
        return moved.clamp(0, self.size - 1)

    def mouth_mask(self, fields: Tensor, mouth: Sequence[int]) -> Tensor:
        """(T, F) motion -> (T, 1, S, S) in [0, 1]: 1 in the box around the landmarks `mouth`
        where each row's motion puts them, grown by MOUTH_MARGIN of its size on every side,
        falling to 0 over MOUTH_FEATHER px outside it."""
        with torch.autocast(fields.device.type, enabled=False):
            t = self._tables(fields.device)
            lips = self._moved(t, features(fields.float()))[:, list(mouth)]              # (T, n, 2)
            lo, hi = lips.amin(1), lips.amax(1)
            grow = MOUTH_MARGIN * (hi - lo)
            lo, hi = (lo - grow)[:, None], (hi + grow)[:, None]                           # (T, 1, 2)
            outside = torch.maximum(lo - t["pixels"], t["pixels"] - hi).clamp(min=0).amax(-1)  # (T, P)
            mask = (1 - outside / MOUTH_FEATHER).clamp(0, 1)
        return mask.reshape(len(fields), 1, self.size, self.size)

    def warp(self, image: Tensor, fields: Tensor, sharp_mouth: bool = False) -> Tensor:
        """image (1 or T, 3, S, S) in [-1, 1] -> (T, 3, S, S): the portrait warped onto each
        row's motion (sampled in float32: a bf16 grid is a quarter pixel coarse at 128 px).
        sharp_mouth: the mouth box sampled bicubic as far as the lips are closed (the module
        docstring; bilinear throughout for a warp without the inner-lip pair)."""
        with torch.autocast(image.device.type, enabled=False):
            fields = fields.float()
            grids = self._grids(fields)
            source = image.float().expand(len(fields), -1, -1, -1) if image.shape[0] == 1 else image.float()
            mouth = self.mouth_mask(fields, self.mouth) if len(grids) > 1 else None
            sharp = mouth * self.closed_weight(fields)[:, None, None, None] if sharp_mouth and mouth is not None else None
            out = _sample(source, grids[0], sharp)
            if len(grids) > 1:  # the mouth from the open-mouth portrait as far as the motion opens it
                opened = self.open_image.to(out.device, out.dtype).expand(len(fields), -1, -1, -1)
                mix = mouth * self.open_weight(fields)[:, None, None, None]
                out = torch.lerp(out, _sample(opened, grids[1], sharp), mix)
        return out.to(image.dtype)


def _sample(image: Tensor, grid: Tensor, sharp: Tensor | None) -> Tensor:
    """image (T, C, S, S) in [-1, 1] sampled at grid (T, S, S, 2): bilinear, crossfading to
    bicubic by `sharp` (T, 1, S, S) in [0, 1] (None: bilinear only). Bilinear sampling at
    sub-pixel offsets blurs the line where closed lips meet, and the landmark model reads a
    blurred line as lips slightly parted; bicubic keeps it (docs/benchmarks.md). Bicubic over
    the whole frame cost the warp 0.1 dB, so only where `sharp` asks for it."""
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    if sharp is None:
        return out
    rows, cols = (sharp.amax(dim=(0, 1)) > 0).nonzero(as_tuple=True)  # one window holding every row's box
    if len(rows) == 0:
        return out
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    cubic = F.grid_sample(image, grid[:, y0:y1, x0:x1], mode="bicubic", padding_mode="border", align_corners=True)
    # bicubic overshoots at edges; clamped to the image's range as the decoder's frames are
    out[..., y0:y1, x0:x1] = torch.lerp(out[..., y0:y1, x0:x1], cubic.clamp(-1, 1), sharp[..., y0:y1, x0:x1])
    return out
