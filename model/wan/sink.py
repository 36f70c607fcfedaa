"""LiveTalk's KV cache as two preallocated buffers: pinned sink frames and a rolling window.

LiveTalk keeps, per layer, one buffer of `sink + window + block` frames: the stream's
first `sink` frames stay, and when a new block does not fit, the frames after the sink are
shifted left (a copy of the whole rolling part, every block, every layer). Here the sink is
a buffer written once (by the stream's first blocks) and the rolling part a ring
(`WindowCache`): a new block overwrites the oldest slots in place, and the fused window
kernel reads [sink | ring | block] without gathering them. Same keys, same attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import kernels
from model.cache import WindowCache, WindowSnapshot
from model.rope import Rope3D


@dataclass(frozen=True)
class SinkWindowSnapshot:
    sink: WindowSnapshot
    window: WindowSnapshot
    sink_position: float
    window_shift: float


class SinkWindow:
    """The first `sink_frames` frames of a stream (pinned) and the last `window_frames` after
    them (a ring), at every layer, for one stream. Keys are stored RoPE-rotated."""

    def __init__(self, num_layers: int, heads: int, sink_frames: int, window_frames: int, tokens_per_frame: int,
                 head_dim: int, dtype, device):
        self.sink = WindowCache(num_layers, 1, heads, sink_frames, tokens_per_frame, head_dim, dtype, device)
        self.window = WindowCache(num_layers, 1, heads, window_frames, tokens_per_frame, head_dim, dtype, device)
        self.tokens_per_frame = tokens_per_frame
        self.sink_position = 0.0   # temporal position of sink frame 0 (rebasing, running ahead)
        self.window_shift = 0.0    # total temporal shift applied to the window's keys (rebasing)

    @property
    def sink_full(self) -> bool:
        return self.sink.length == self.sink.capacity

    def sink_share(self, n_frames: int) -> int:
        """How many of the next `n_frames` committed frames go into the sink (the rest: the ring)."""
        return min(n_frames, self.sink.capacity - self.sink.length)

    def attention(self, write: bool) -> "SinkAttention":
        """The attention context of a block over this cache; `write`: stage the block's keys
        and values (the clean pass), made visible by `commit`."""
        return SinkAttention(self, write)

    def commit(self, n_frames: int) -> None:
        f = self.sink_share(n_frames)
        self.sink.commit(f)
        self.window.commit(n_frames - f)

    def move(self, rope: Rope3D, delta: float) -> None:
        """Shift every cached frame's temporal position by `delta` (rebasing)."""
        self.move_sink(rope, delta)
        self.window.move(rope, delta)
        self.window_shift += delta

    def move_sink(self, rope: Rope3D, delta: float) -> None:
        """Shift the sink frames' temporal positions by `delta` (running ahead)."""
        self.sink.move(rope, delta)
        self.sink_position += delta

    def snapshot(self, n_frames: int) -> SinkWindowSnapshot:
        """Positions, and the slots the next commit of `n_frames` overwrites (restore newest first)."""
        f = self.sink_share(n_frames)
        return SinkWindowSnapshot(self.sink.snapshot(f), self.window.snapshot(n_frames - f), self.sink_position,
                                  self.window_shift)

    def restore(self, rope: Rope3D, snap: SinkWindowSnapshot) -> None:
        # The saved slots hold keys at the positions of their step: undo later moves first.
        self.sink.move(rope, snap.sink_position - self.sink_position)
        self.window.move(rope, snap.window_shift - self.window_shift)
        self.sink.restore(snap.sink)
        self.window.restore(snap.window)
        self.sink_position, self.window_shift = snap.sink_position, snap.window_shift

    def nbytes(self) -> int:
        return self.sink.nbytes() + self.window.nbytes()


@dataclass
class SinkAttention:
    """A block's queries over [filled sink | window ring | the block itself]."""

    cache: SinkWindow
    write: bool = False

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cache
        sink_k, sink_v, _, n = c.sink.view(layer)  # the sink never wraps: its valid tokens start at 0
        ring_k, ring_v, start, length = c.window.view(layer)
        out = kernels.window_attention(q, sink_k[:, :, :n], sink_v[:, :, :n], ring_k, ring_v, start, length, k, v)
        if self.write:
            T = c.tokens_per_frame
            f = c.sink_share(k.shape[2] // T) * T
            if f:
                c.sink.write(layer, k[:, :, :f], v[:, :, :f])
            if f < k.shape[2]:
                c.window.write(layer, k[:, :, f:], v[:, :, f:])
        return out
