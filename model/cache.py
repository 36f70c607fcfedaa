"""Per-stream key/value caches: the reference anchor and the sliding window ring buffer.

Both preallocate their storage once per stream; nothing grows or is concatenated per
chunk, so memory and the shapes each chunk touches are constant however long the
stream runs. Keys are stored RoPE-rotated at their absolute temporal positions; moving
positions (running ahead, rebasing) rotates them in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.rope import Rope3D, cos_sin


class ReferenceCache:
    """Keys/values of the reference frame's tokens at every layer, kept for the whole stream.

    k, v: (num_layers, B, H, R, D). `position` is the reference's temporal RoPE coordinate.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, heads, tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.position = 0.0
        self.filled = [False] * num_layers

    def set(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v: (B, H, R, D) already rotated to `self.position`."""
        self.k[layer].copy_(k)
        self.v[layer].copy_(v)
        self.filled[layer] = True

    def view(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.k[layer], self.v[layer]

    def move(self, rope: Rope3D, delta: float) -> None:
        """Shift the reference's temporal coordinate by `delta`: rotate the cached keys."""
        if delta == 0:
            return
        _rotate_keys(self.k, rope, delta)
        self.position += delta

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def snapshot(self) -> "ReferenceSnapshot":
        """The keys and position as they are now (the values never change after encoding)."""
        return ReferenceSnapshot(self.k.clone(), self.position)

    def restore(self, snap: "ReferenceSnapshot") -> None:
        self.k.copy_(snap.k)
        self.position = snap.position


@dataclass(frozen=True)
class ReferenceSnapshot:
    k: Tensor
    position: float


class WindowCache:
    """Ring buffer of the last `capacity` latent frames' keys/values at every layer.

    k, v: (num_layers, B, H, capacity * tokens_per_frame, D). Frames are written in
    order into slots `head, head+1, ...` (mod capacity); the valid frames are the
    `length` slots ending just before `head`. Attention does not depend on key order,
    so the kernel only needs the valid physical range (start, length) in tokens.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, capacity: int, tokens_per_frame: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.capacity = capacity
        self.tokens_per_frame = tokens_per_frame
        shape = (num_layers, batch, heads, capacity * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.head = 0     # next slot to write
        self.length = 0   # valid frames

    def reset(self) -> None:
        self.head = 0
        self.length = 0

    def ring_range(self) -> tuple[int, int]:
        """(start, length) of the valid tokens in the physical buffer (start wraps mod capacity)."""
        if self.capacity == 0:
            return 0, 0
        start_slot = (self.head - self.length) % self.capacity
        return start_slot * self.tokens_per_frame, self.length * self.tokens_per_frame

    def view(self, layer: int) -> tuple[Tensor, Tensor, int, int]:
        start, length = self.ring_range()
        return self.k[layer], self.v[layer], start, length

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Stage one layer's keys/values of n new frames: (B, H, n * T, D).

        Only the last `capacity` frames are kept. The frames become visible after
        `commit(n)`, once every layer has been written, so all layers of one pass see
        the same window.
        """
        if self.capacity == 0:
            return
        T = self.tokens_per_frame
        n = k.shape[2] // T
        keep = min(n, self.capacity)
        k = k[:, :, (n - keep) * T:]
        v = v[:, :, (n - keep) * T:]
        first = (self.head + n - keep) % self.capacity
        # At most two contiguous pieces: [first, capacity) and [0, rest).
        n1 = min(keep, self.capacity - first)
        self.k[layer, :, :, first * T:(first + n1) * T].copy_(k[:, :, :n1 * T])
        self.v[layer, :, :, first * T:(first + n1) * T].copy_(v[:, :, :n1 * T])
        if keep > n1:
            self.k[layer, :, :, :(keep - n1) * T].copy_(k[:, :, n1 * T:])
            self.v[layer, :, :, :(keep - n1) * T].copy_(v[:, :, n1 * T:])

    def snapshot(self, n_frames: int) -> "WindowSnapshot":
        """The ring position and what the next `n_frames` committed frames will overwrite.

        Only those slots are copied, not the whole window, so a snapshot restores the
        cache as it was only when the snapshots taken after it have been restored first
        (newest first): a stream rewinds by whole steps, one snapshot per step."""
        keep = min(n_frames, self.capacity)
        T = self.tokens_per_frame
        pieces = []
        for i in range(keep):
            slot = (self.head + i) % self.capacity
            pieces.append((slot, self.k[:, :, :, slot * T:(slot + 1) * T].clone(),
                           self.v[:, :, :, slot * T:(slot + 1) * T].clone()))
        return WindowSnapshot(self.head, self.length, tuple(pieces))

    def restore(self, snap: "WindowSnapshot") -> None:
        """Put back the slots and ring position of `snap` (see `snapshot` for the order)."""
        T = self.tokens_per_frame
        for slot, k, v in snap.pieces:
            self.k[:, :, :, slot * T:(slot + 1) * T].copy_(k)
            self.v[:, :, :, slot * T:(slot + 1) * T].copy_(v)
        self.head, self.length = snap.head, snap.length

    def commit(self, n_frames: int) -> None:
        if self.capacity == 0:
            return
        self.head = (self.head + n_frames) % self.capacity
        self.length = min(self.capacity, self.length + n_frames)

    def move(self, rope: Rope3D, delta: float) -> None:
        """Shift every cached frame's temporal coordinate by `delta` (rebasing)."""
        if delta == 0 or self.capacity == 0:
            return
        _rotate_keys(self.k, rope, delta)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class ContextKV:
    """Cross-attention keys/values of a fixed context (a session's prompt embedding) at
    every layer: computed once (`DiT.text_kv`), read by every chunk's every step.

    k, v: (num_layers, B, H, M, D).
    """

    def __init__(self, k: Tensor, v: Tensor):
        if k.shape != v.shape or k.dim() != 5:
            raise ValueError(f"k and v must both be (layers, B, H, M, D), got {tuple(k.shape)} and {tuple(v.shape)}")
        self.k, self.v = k, v

    def view(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass(frozen=True)
class WindowSnapshot:
    """Ring position and the contents of the slots the next commit overwrites: (slot, k, v)."""

    head: int
    length: int
    pieces: tuple[tuple[int, Tensor, Tensor], ...]


def _rotate_keys(k: Tensor, rope: Rope3D, delta: float) -> None:
    """Rotate keys (..., L, D) in place by a temporal delta; h/w pairs are untouched."""
    # Only the temporal pairs (the first t_pairs pairs) change; rotate them in at least float32.
    work = torch.promote_types(k.dtype, torch.float32)
    cos, sin = cos_sin(rope.temporal_angles(delta), work, k.device)
    t_pairs = rope.dims[0] // 2
    kt = k[..., : 2 * t_pairs].to(work).unflatten(-1, (-1, 2))  # (..., L, t_pairs, 2)
    x1, x2 = kt.unbind(-1)
    c, s = cos[:t_pairs], sin[:t_pairs]
    rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    k[..., : 2 * t_pairs].copy_(rotated.to(k.dtype))
