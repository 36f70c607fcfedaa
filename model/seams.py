"""Seam blend: spread the step into each latent frame over that latent's video frames.

The causal VAE compresses 4 video frames into one latent frame. A small decoder draws
those 4 frames nearly alike and puts the change between two latent frames into one
frame step, so motion advances in jumps at 25/4 Hz (the bundled model's frame-difference
energy is much higher across a latent border than inside a latent frame, while the ground
truth moves evenly: docs/benchmarks.md). `spread_latent_steps` takes a fraction `amount` of each jump J out
of the border step and hands it out over the latent's frames: frame i (0..3) of the
latent moves by -amount * (1 - (i + 1) / 4) * J, so its last frame is left exactly as
decoded. Hence the filter needs only the previous latent's last frame, adds no latency
and no error can build up from one latent to the next.

It is a post-filter on the decoder's output, not a learned fix: a decoder that draws the
motion inside the latent would make it unnecessary (see docs/benchmarks.md).
"""

from __future__ import annotations

from torch import Tensor


def latent_starts(first_frame: int, n_frames: int, temporal_stride: int = 4) -> list[int]:
    """Local indices, in a run of `n_frames` video frames beginning at absolute frame
    `first_frame`, where a latent frame's video frames begin (absolute 1, 5, 9, ...:
    frame 0 stands alone)."""
    if first_frame < 0 or n_frames < 0:
        raise ValueError(f"first_frame and n_frames must be >= 0, got {first_frame}, {n_frames}")
    first_start = 1 if first_frame <= 1 else first_frame + (-(first_frame - 1)) % temporal_stride
    return list(range(first_start - first_frame, n_frames, temporal_stride))


def spread_latent_steps(frames: Tensor, first_frame: int, previous: Tensor | None, amount: float,
                        temporal_stride: int = 4) -> Tensor:
    """frames (B, C, n, H, W): decoded video frames from absolute frame `first_frame` on;
    previous (B, C, H, W): the frame just before them (None at the start of the clip).
    Returns a new tensor with every latent-border jump spread as the module docstring says.

    Chunks hold whole latent frames, so applying it chunk by chunk (passing each chunk's
    last frame on as `previous`) gives the same frames as applying it to the whole clip."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    if frames.dim() != 5:
        raise ValueError(f"frames must be (B, C, n, H, W), got {tuple(frames.shape)}")
    out = frames.clone()
    if amount == 0.0:
        return out
    for j in latent_starts(first_frame, frames.shape[2], temporal_stride):
        before = frames[:, :, j - 1] if j > 0 else previous
        if before is None:
            if first_frame + j > 1:
                raise ValueError(f"frame {first_frame + j} starts a latent frame: pass the frame before it")
            continue
        jump = frames[:, :, j] - before
        for i in range(min(temporal_stride, frames.shape[2] - j)):
            out[:, :, j + i] -= amount * (1.0 - (i + 1) / temporal_stride) * jump
    return out
