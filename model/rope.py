"""3D rotary position embedding (Wan layout) and rotation of cached keys by a delta.

The head dimension is split over time / height / width as in Wan2.1: height and width
get `2 * (D // 6)` dims each, time gets the rest (44/42/42 for D=128). Pairs are adjacent
channels `(x[2i], x[2i+1])`, the temporal pairs come first.

Because RoPE is a rotation, a key cached at temporal position `p` is moved to `p + d` by
rotating it by `d` in the temporal pairs only; running ahead and rebasing use that.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) channel counts of the head dim split, as Wan."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


class Rope3D:
    """Computes cos/sin tables for explicit (t, h, w) positions. Holds no state per stream."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.head_dim = head_dim
        self.dims = axis_dims(head_dim)
        # Inverse frequencies per axis, in float64 so positions in the thousands stay exact.
        self.inv_freq = [
            # Explicit CPU: a model built under `torch.device("meta")` still gets real tables.
            1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)) for d in self.dims
        ]

    def angles(self, t: Tensor, h: Tensor, w: Tensor) -> Tensor:
        """Per-token rotation angles. t, h, w: (L,) float positions -> (L, D/2) float64."""
        parts = [pos.to(torch.float64)[:, None] * f[None, :] for pos, f in zip((t, h, w), self.inv_freq)]
        return torch.cat(parts, dim=1)

    def grid_angles(self, frame_pos: Tensor, height: int, width: int) -> Tensor:
        """Angles of a (frames, height, width) token grid in raster order.

        frame_pos: (F,) temporal positions -> (F * height * width, D/2) float64.
        """
        f = frame_pos.to(torch.float64)
        t = f[:, None, None].expand(-1, height, width).reshape(-1)
        h = torch.arange(height, dtype=torch.float64)[None, :, None].expand(len(f), -1, width).reshape(-1)
        w = torch.arange(width, dtype=torch.float64)[None, None, :].expand(len(f), height, -1).reshape(-1)
        return self.angles(t, h, w)

    def temporal_angles(self, delta: float) -> Tensor:
        """Angles that move a key by `delta` frames in time: (D/2,) float64 (zeros on h/w pairs)."""
        t_pairs = self.dims[0] // 2
        out = torch.zeros(self.head_dim // 2, dtype=torch.float64)
        out[:t_pairs] = delta * self.inv_freq[0]
        return out


def cos_sin(angles: Tensor, dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor]:
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs. x: (..., L, D); cos/sin: (L, D/2) or broadcastable."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., L, D/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)

