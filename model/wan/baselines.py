"""LiveTalk's own KV cache policy, re-expressed: the reference of the recipe tests, the GPU bench's baseline.

LiveTalk's causal DiT keeps one buffer of `sink + window + block` frames per layer. Every
forward pass (each denoising pass and the clean pass) writes the block's keys and values
into it and attends to everything up to them; the first pass of a block that does not fit
first shifts the frames after the sink left by the overflow (a copy, every block, every
layer). `ShiftingKVCache` does exactly that, attending with plain SDPA over the buffer, and
`LiveTalkShifting` is the LiveTalk recipe with it in place of the sink + ring + fused
kernel (model/wan/sink.py): same keys, same outputs, their memory traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from model.cache import WindowCache
from model.config import StreamKnobs
from model.rope import Rope3D
from model.wan.livetalk import LiveTalk


@dataclass(frozen=True)
class ShiftingSnapshot:
    k: Tensor
    v: Tensor
    frames: int
    sink_position: float


class ShiftingKVCache:
    """One stream's LiveTalk cache: per layer a buffer of `capacity` frames whose first
    `sink_frames` stay once written; `frames` committed so far (the next block's start)."""

    def __init__(self, num_layers: int, heads: int, sink_frames: int, capacity: int, tokens_per_frame: int,
                 head_dim: int, dtype, device):
        if capacity <= sink_frames:
            raise ValueError(f"capacity {capacity} must exceed the {sink_frames} sink frames")
        # WindowCache only as preallocated storage (its k, v, move, nbytes); slots are managed here.
        self.buf = WindowCache(num_layers, 1, heads, capacity, tokens_per_frame, head_dim, dtype, device)
        self.sink_frames, self.capacity, self.tokens_per_frame = sink_frames, capacity, tokens_per_frame
        self.frames = 0                       # frames committed (absolute)
        self.filled = [0] * num_layers        # per layer: frames in the buffer (LiveTalk's local_end)
        self.placed = [0] * num_layers        # per layer: absolute end of the last write (global_end)
        self.sink_position = 0.0

    @property
    def sink_full(self) -> bool:
        return self.frames >= self.sink_frames

    def attention(self, write: bool) -> "ShiftingAttention":
        return ShiftingAttention(self)  # LiveTalk writes on every pass; the clean pass's write is the one kept

    def put(self, layer: int, k: Tensor, v: Tensor) -> int:
        """Write a block's k, v (1, H, n * T, D) as LiveTalk does; returns the buffer's end (frames)."""
        T, n = self.tokens_per_frame, k.shape[2] // self.tokens_per_frame
        end = self.frames + n
        if end > self.placed[layer] and self.filled[layer] + n > self.capacity:  # a new block that does not fit
            evict = self.filled[layer] + n - self.capacity
            keep = self.filled[layer] - evict - self.sink_frames
            s = self.sink_frames * T
            for buf in (self.buf.k, self.buf.v):
                buf[layer, :, :, s:s + keep * T] = buf[layer, :, :, s + evict * T:s + (evict + keep) * T].clone()
            self.filled[layer] -= evict
        self.filled[layer] += end - self.placed[layer] if end > self.placed[layer] else 0
        self.placed[layer] = end
        hi = self.filled[layer] * T
        self.buf.k[layer, :, :, hi - n * T:hi] = k
        self.buf.v[layer, :, :, hi - n * T:hi] = v
        return self.filled[layer]

    def commit(self, n_frames: int) -> None:
        self.frames += n_frames

    def move(self, rope: Rope3D, delta: float) -> None:
        self.buf.move(rope, delta)
        self.sink_position += delta

    def move_sink(self, rope: Rope3D, delta: float) -> None:
        raise ValueError("running ahead (ahead_frames) is not part of LiveTalk's own cache policy")

    def snapshot(self, n_frames: int) -> ShiftingSnapshot:
        return ShiftingSnapshot(self.buf.k.clone(), self.buf.v.clone(), self.frames, self.sink_position)

    def restore(self, rope: Rope3D, snap: ShiftingSnapshot) -> None:
        self.buf.k.copy_(snap.k)
        self.buf.v.copy_(snap.v)
        self.frames, self.sink_position = snap.frames, snap.sink_position
        end = min(snap.frames, self.capacity)
        self.filled = [end] * len(self.filled)
        self.placed = [snap.frames] * len(self.placed)

    def nbytes(self) -> int:
        return self.buf.nbytes()


@dataclass
class ShiftingAttention:
    cache: ShiftingKVCache

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        hi = self.cache.put(layer, k, v) * self.cache.tokens_per_frame
        return F.scaled_dot_product_attention(q, self.cache.buf.k[layer, :, :, :hi], self.cache.buf.v[layer, :, :, :hi])


class LiveTalkShifting(LiveTalk):
    """The LiveTalk recipe on LiveTalk's own cache policy (`ShiftingKVCache`, SDPA)."""

    name = "livetalk-shifting"

    def new_cache(self, knobs: StreamKnobs) -> ShiftingKVCache:
        if knobs.knot_frames:
            raise ValueError("knots are not part of LiveTalk's own cache policy")
        d = self.cfg.dit
        return ShiftingKVCache(d.num_layers, d.num_heads, self.family.sink_frames,
                               self.family.sink_frames + knobs.window_frames + knobs.chunk_frames,
                               self.cfg.tokens_per_frame, d.head_dim, self.dtype, self.device)
