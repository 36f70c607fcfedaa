"""SoulX-FlashHead's chunk loop as a recipe (model/recipe.py): bidirectional chunks, motion latents.

FlashHead (Soul-AILab/SoulX-FlashHead, Pro) makes video in chunks of 9 latent frames, each
chunk one bidirectional clip with no KV cache between chunks:

1. the chunk's first `motion_latents` (2) latents are given: the last 5 frames shown so
   far, re-encoded by the VAE after colour correction (model/wan/motion.py); before the
   first chunk, the portrait's own latent (1 latent);
2. the chunk is denoised in 4 passes with FlashHead's sampler (model/wan/sampling.py:
   x0 from the velocity, fresh noise to the next level, timesteps and sigmas rounded to
   bfloat16), the given latents put back before every pass and into the result; every
   frame sees the same timestep, and the condition is the portrait held still for the
   whole chunk, encoded (`MotionChunkVAE.encode_still`, once per stream);
3. the chunk is decoded whole, colour-corrected toward the portrait, and the frames after
   the motion frames are shown: 28 new frames per chunk (the engine's decode step with
   FlashHead's `ChunkDecoder`);
4. `write` re-encodes the last 5 shown frames into the next chunk's motion latents.

Audio, as FlashHead's streaming mode: wav2vec2 over the last `audio_context_s` (8 s) of
audio ending at the chunk's last frame (zeros before the stream's start), interpolated to
one vector per video frame (hidden states 1..12); the chunk's 33 frames are the buffer's
last ones, each latent's window of frames goes through its audio projection
(`flashhead_audio_windows`) into audio tokens its cross-attention reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from model.config import StreamKnobs
from model.dit import FullSequence
from model.timeline import StepInput, StepSpan
from model.wan.audio import flashhead_audio_windows
from model.wan.photoreal import PhotorealModel, PhotorealRecipe
from model.wan.sampling import flashhead_sigmas


class FlashHeadState:
    """What a FlashHead stream carries from chunk to chunk."""

    def __init__(self, still: Tensor, motion: Tensor):
        self.still = still        # (1, z, n, h, w) the portrait held still, encoded: the condition
        self.motion = motion      # (1, z, m, h, w) the next chunk's given first latents
        self.next_frame = 0       # first video frame the next chunk shows


@dataclass(frozen=True)
class FlashHeadSnapshot:
    next_frame: int
    motion: Tensor  # replaced, never written in place: a reference is a snapshot


@dataclass
class FlashHeadPlan:
    tokens: Tensor         # (1, n, audio_tokens, dim) the chunk's audio tokens
    noise: Tensor          # (1, z, n, h, w)
    generator: torch.Generator  # fresh noise between passes


class FlashHead(PhotorealRecipe):
    """FlashHead's recipe for one loaded `PhotorealModel` (see the module docstring)."""

    name = "flashhead"

    def __init__(self, model: PhotorealModel, device: torch.device, dtype: torch.dtype):
        super().__init__(model, device, dtype)
        self.buffer_frames = round(self.family.audio_context_s * self.cfg.fps)

    def latents(self, knobs: StreamKnobs) -> int:
        """Latent frames of one chunk: the motion latents and the new ones."""
        return self.family.motion_latents + knobs.chunk_frames

    def chunk_frames(self, knobs: StreamKnobs) -> int:
        """Video frames of one chunk's clip (1 + 4(n - 1): 33 at n = 9)."""
        return self.timeline.frames_for_latents(self.latents(knobs), first=True)

    # ----- a stream ----------------------------------------------------------------------

    def start(self, reference_latent: Tensor, knobs: StreamKnobs, reference_video: Tensor | None = None) -> FlashHeadState:
        """The still-portrait condition and the first chunk's given latent (the portrait's)."""
        if reference_video is None:
            raise ValueError("FlashHead's condition is the portrait held still: pass reference_video")
        still = self.model.vae.encode_still(reference_video, self.latents(knobs))
        if self.chunk_frames(knobs) + self.family.audio_lookahead_frames > self.buffer_frames:
            raise ValueError(f"a chunk of {self.chunk_frames(knobs)} frames does not fit FlashHead's "
                             f"{self.buffer_frames}-frame audio buffer")
        return FlashHeadState(still, still[:, :, :1])

    def span(self, state: FlashHeadState, knobs: StreamKnobs) -> StepSpan:
        frame, frames = state.next_frame, self.timeline.temporal_stride * knobs.chunk_frames
        driving = frames + self.family.audio_lookahead_frames
        tl = self.timeline
        return StepSpan(frame, frames, driving, tl.context_start(frame), tl.sample_of(frame + driving))

    @staticmethod
    def batch_key(knobs: StreamKnobs) -> tuple:
        return "flashhead", knobs.chunk_frames, knobs.shift

    # ----- a step ------------------------------------------------------------------------

    def plan(self, state: FlashHeadState, knobs: StreamKnobs, inp: StepInput, generator: torch.Generator) -> FlashHeadPlan:
        n = self.latents(knobs)
        z, (h, w) = self.cfg.vae.z_channels, self.cfg.latent_hw
        noise = torch.randn(1, z, n, h, w, generator=generator).to(self.device, self.dtype)
        return FlashHeadPlan(self.audio_tokens(inp, n), noise, generator)

    def audio_tokens(self, inp: StepInput, n_latents: int) -> Tensor:
        """(1, n_latents, tokens, dim): the chunk's audio tokens from FlashHead's audio buffer
        (the `buffer_frames` frames of audio ending `audio_lookahead_frames` after the chunk)."""
        spf = self.family.audio_layout.samples_per_frame
        end = inp.span.frame + inp.span.driving_frames
        lo = (end - self.buffer_frames) * spf  # negative before the stream's start: silence
        buffer = torch.zeros(self.buffer_frames * spf)
        if inp.audio is not None:
            have = torch.tensor(inp.audio[max(0, lo - inp.span.audio_from):])
            at = max(0, inp.span.audio_from - lo)
            have = have[:len(buffer) - at]
            buffer[at:at + len(have)] = have
        feats = self.model.audio.encode(buffer, n_frames=self.buffer_frames)  # (1, frames, L, H)
        n_frames = self.timeline.frames_for_latents(n_latents, first=True)
        first = self.buffer_frames - self.family.audio_lookahead_frames - n_frames
        first_w, later_w = flashhead_audio_windows(feats, first, n_latents)
        dit = self.model.dit
        p = next(dit.audio_proj.parameters())
        return dit.audio_proj(first_w.to(p.device, p.dtype), later_w.to(p.device, p.dtype))

    def denoise(self, states: Sequence[FlashHeadState], plans: Sequence[FlashHeadPlan], knobs: StreamKnobs,
                steps: int, before_pass: Callable[[], None]) -> Tensor:
        """Every stream's chunk in one batched loop of FlashHead's sampler: (B, z, n, h, w)."""
        B, n = len(plans), self.latents(knobs)
        still = torch.cat([s.still for s in states])
        tokens = torch.cat([p.tokens for p in plans])
        pos = torch.arange(n, dtype=torch.float64)
        ctx = FullSequence(0, n * self.cfg.tokens_per_frame, None)  # one bidirectional clip
        sigmas, timesteps = flashhead_sigmas(steps, knobs.shift)
        x = torch.cat([p.noise for p in plans])
        for i in range(steps):
            before_pass()
            _pin(x, states)
            v = self.model.dit(x, timesteps[i].expand(B, n).to(self.device), pos, ctx, cond=still, audio=tokens)
            sigma = float(sigmas[i])
            x = x - sigma * v  # x0
            if i + 1 < steps:
                s1 = float(sigmas[i + 1])
                noise = torch.cat([torch.randn(x[:1].shape, generator=p.generator) for p in plans])
                x = (1 - s1) * x + s1 * noise.to(self.device, self.dtype)
        _pin(x, states)
        return x

    @staticmethod
    def finish(state: FlashHeadState, knobs: StreamKnobs, x0: Tensor) -> Tensor:
        """The whole chunk is decoded (its decoder shows the frames after the motion frames)."""
        return x0

    @staticmethod
    def blend_frames(state: FlashHeadState, plan: FlashHeadPlan, first_frame: int, n: int) -> None:
        return None  # the Wan VAE has no reference blend

    def write(self, states: Sequence[FlashHeadState], plans: Sequence[FlashHeadPlan], knobs: StreamKnobs,
              committed: Tensor, decoded: Sequence[Tensor]) -> None:
        """The last motion frames shown, re-encoded: the next chunk's given latents."""
        m = self.model.vae.motion_frames
        motion = self.model.vae.encode(torch.cat([d[:, :, -m:] for d in decoded]).to(self.dtype))
        for i, s in enumerate(states):
            s.motion = motion[i:i + 1]
            s.next_frame += decoded[i].shape[2]

    @staticmethod
    def forget_from(state: FlashHeadState, frame: int) -> None:
        """Nothing to drop: a chunk predicts no frames past its own, and the motion latents of a
        restored snapshot come from frames shown before it."""

    @staticmethod
    def cache_nbytes(state: FlashHeadState) -> int:
        return sum(t.numel() * t.element_size() for t in (state.still, state.motion))

    # ----- rewinding ---------------------------------------------------------------------

    @staticmethod
    def snapshot(state: FlashHeadState, knobs: StreamKnobs) -> FlashHeadSnapshot:
        return FlashHeadSnapshot(state.next_frame, state.motion)

    @staticmethod
    def restore(state: FlashHeadState, snap: FlashHeadSnapshot) -> None:
        state.next_frame, state.motion = snap.next_frame, snap.motion


def _pin(x: Tensor, states: Sequence[FlashHeadState]) -> None:
    """Each stream's motion latents as the first latents of its row of x (B, z, n, h, w)."""
    for row, s in enumerate(states):
        x[row:row + 1, :, :s.motion.shape[2]] = s.motion
