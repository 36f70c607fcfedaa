"""How sure a per-clip gap between two systems is: a paired block bootstrap.

The personal eval scores each system on one clip's held-out frames, a few hundred frames of
one person; "the avatar is 0.1 dB above the warp" on them may be the frames, not the avatar.
Both systems are scored on the same frames, so the difference is taken frame by frame
(paired), and neighbouring frames are alike, so the frames are resampled in blocks of
BLOCK_FRAMES consecutive frames (one chunk of the stream: 2 latents of 4 frames) rather
than one by one, which would make the interval too narrow. The interval is the percentile
one of the mean difference over RESAMPLES resamples of the blocks. It covers the spread of
the frames only: a second fit of the same clip moves the avatar by more than that on the
calm clips (0.5 dB once, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_FRAMES = 8
RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Gap:
    """Mean of a - b over the frames where both are scored, and its bootstrap interval."""

    mean: float
    low: float
    high: float
    blocks: int

    @property
    def sure(self) -> bool:
        """The interval leaves out 0: the sign of the gap is not the frames' chance."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3g} [{self.low:+.3g}, {self.high:+.3g}]"


def paired_gap(a: np.ndarray, b: np.ndarray, block: int = BLOCK_FRAMES, resamples: int = RESAMPLES,
               level: float = LEVEL, seed: int = 0) -> Gap:
    """a, b: (T,) per-frame scores of two systems on the same frames (NaN: not scored there,
    e.g. no face found). Raises ValueError when no frame has both."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"per-frame scores must be two (T,) arrays of one length, got {a.shape} and {b.shape}")
    if block < 1 or resamples < 1 or not 0 < level < 1:
        raise ValueError("block and resamples must be >= 1 and level in (0, 1)")
    d = a - b
    ok = np.isfinite(d)
    if not ok.any():
        raise ValueError("no frame is scored in both systems")
    n_blocks = -(-len(d) // block)
    pad = n_blocks * block - len(d)
    sums = np.pad(np.where(ok, d, 0.0), (0, pad)).reshape(n_blocks, block).sum(1)
    counts = np.pad(ok.astype(np.float64), (0, pad)).reshape(n_blocks, block).sum(1)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    pick = np.random.default_rng(seed).integers(0, len(sums), (resamples, len(sums)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Gap(float(d[ok].mean()), float(low), float(high), int(len(sums)))
