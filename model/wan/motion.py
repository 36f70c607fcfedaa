"""FlashHead's use of the Wan2.1 VAE: chunks decoded whole, colour-corrected, motion frames dropped.

A FlashHead chunk is one clip of `1 + 4(n - 1)` video frames (n latents, 33 frames at n = 9)
whose first `motion_latents` latents are given: the last `1 + 4(motion_latents - 1)`
frames of the previous chunk (5 at 2 latents), encoded again. Its pipeline decodes every
chunk as a clip of its own (a fresh causal cache), corrects its colours toward the
portrait (model/wan/colour.py) and shows the frames after the motion frames: 28 new
frames per chunk. `MotionChunkVAE.stream_decoder` is that decoder, so the engine's
generic decode step (model/engine.py) shows exactly those frames, and the recipe's
write step re-encodes the last motion frames of what was shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from model.wan.colour import match_colours
from model.wan.vae import WanVAE


def motion_frame_count(motion_latents: int, temporal_stride: int = 4) -> int:
    """Video frames of `motion_latents` latents encoded as a clip of their own (1 + s(m - 1))."""
    return 1 + temporal_stride * (motion_latents - 1)


class MotionChunkVAE(nn.Module):
    """The Wan VAE as FlashHead uses it (see the module docstring)."""

    def __init__(self, vae: WanVAE, motion_latents: int, colour_strength: float):
        super().__init__()
        if motion_latents < 1:
            raise ValueError(f"motion_latents must be >= 1, got {motion_latents}")
        self.wan = vae
        self.motion_latents = motion_latents
        self.colour_strength = colour_strength

    @property
    def motion_frames(self) -> int:
        return motion_frame_count(self.motion_latents, self.wan.cfg.temporal_stride)

    def encode(self, video: Tensor) -> Tensor:
        """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> normalised latents (B, z, 1 + k, h, w)."""
        return self.wan.encode(video)

    def encode_still(self, image: Tensor, n_latents: int) -> Tensor:
        """The portrait (B, 3, 1, H, W) held still for a whole chunk, encoded: (B, z, n_latents, h, w).
        FlashHead's reference condition (latent 0 is the portrait's own latent; the causal
        encoder gives the later latents of a still clip their own values)."""
        frames = 1 + self.wan.cfg.temporal_stride * (n_latents - 1)
        return self.wan.encode(image.expand(-1, -1, frames, -1, -1))

    def stream_decoder(self, reference: Tensor | None = None) -> "ChunkDecoder":
        if reference is None:
            raise ValueError("FlashHead's decoder corrects colours toward the portrait: pass reference=")
        return ChunkDecoder(self.wan, reference, self.motion_frames, self.colour_strength)


@dataclass(frozen=True)
class ChunkDecoderSnapshot:
    latents_in: int
    frames_out: int


class ChunkDecoder:
    """Decodes one FlashHead chunk per call (no state carried between chunks but counters).

    reference: the portrait (1, 3, 1, H, W) in [-1, 1], the colour target."""

    def __init__(self, vae: WanVAE, reference: Tensor, motion_frames: int, colour_strength: float):
        self.vae = vae
        self.reference = reference
        self.motion_frames = motion_frames
        self.colour_strength = colour_strength
        self.latents_in = 0
        self.frames_out = 0

    def decode(self, chunk: Tensor) -> Tensor:
        """chunk (1, z, n, h, w) normalised latents, motion latents first -> the frames after
        the motion frames, colour-corrected: (1, 3, 1 + 4(n - 1) - motion_frames, H, W)."""
        video = match_colours(self.vae.decode(chunk), self.reference, self.colour_strength)
        out = video[:, :, self.motion_frames:]
        self.latents_in += chunk.shape[2]
        self.frames_out += out.shape[2]
        return out

    def snapshot(self) -> ChunkDecoderSnapshot:
        return ChunkDecoderSnapshot(self.latents_in, self.frames_out)

    def restore(self, snap: ChunkDecoderSnapshot) -> None:
        self.latents_in, self.frames_out = snap.latents_in, snap.frames_out

    def reset(self) -> None:
        self.latents_in = self.frames_out = 0

    def cache_nbytes(self) -> int:
        return 0
