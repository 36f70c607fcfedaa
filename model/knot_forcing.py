"""The Knot Forcing chunk step: the first model-family recipe (model/recipe.py).

One step of a stream:

1. running ahead: if the chunk would pass the reference's temporal coordinate, move the
   reference forward by `ahead_frames` (a rotation of the cached reference keys);
2. denoise `chunk_frames + knot_frames` latent frames with few-step Euler (`chunk_step`);
   queries see the reference cache, the window ring buffer and the chunk itself; the first
   `knot_frames` are conditioned (image-to-video mask + latent) on the previous chunk's knot
   prediction, and fused with it at the last step;
3. after the decode (model/engine.py), write the committed `chunk_frames` clean frames into
   the window cache by one extra pass at noise level 0 (as Self Forcing), condition
   without knot (`write_clean`); knot frames are never cached, they become the next
   chunk's condition;
4. rebase positions when they exceed `rebase_every` (rotate every cached key by the same
   negative offset: attention is unchanged, numbers stay small).

The module-level functions are the step's math; the trainer (model/train/chunks.py) calls
the same ones, so a trained chunk is the engine's chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model import driving as drv
from model.avatar import AvatarModel
from model.cache import ReferenceCache, ReferenceSnapshot, WindowCache, WindowSnapshot
from model.config import ModelConfig, StreamKnobs
from model.dit import DiT, EncodeReference, Streaming, BatchedStreaming
from model.sampler import denoise, get_sigmas
from model.timeline import StepInput, StepSpan, Timeline

# ----- the chunk step's math (engine and trainer) -----------------------------------------


def build_cond(cfg: ModelConfig, reference_latent: Tensor, knot: Tensor | None, n_frames: int) -> Tensor:
    """Image-to-video condition of a chunk: (B, mask + z, n_frames, h, w).

    The first knot frames carry the previous chunk's knot prediction with mask 1; the
    other frames carry the reference latent with mask 0 when `cfg.reference_hint` is on
    (zeros otherwise): (B, z, 1, h, w) the same for every frame, or (B, z, n_frames, h, w)
    one per frame (a motion warp's `warped_latents`).
    """
    B, z, _, h, w = reference_latent.shape
    n_mask = cfg.dit.in_channels - 2 * z
    cond = reference_latent.new_zeros(B, n_mask + z, n_frames, h, w)
    if cfg.reference_hint:
        cond[:, n_mask:] = reference_latent
    if knot is not None:
        kn = knot.shape[2]
        cond[:, :n_mask, :kn] = 1.0
        cond[:, n_mask:, :kn] = knot
    return cond


def warped_latents(vae, warp, portrait: Tensor, fields: Tensor) -> Tensor:
    """The condition latents of a model with a motion warp: the portrait (1, 3, H, W) warped
    onto each latent's motion fields (L, F), each encoded as a lone frame as the portrait's
    own latent is -> (1, z, L, h, w)."""
    images = warp.warp(portrait, fields.to(portrait.device))  # (L, 3, H, W)
    return vae.encode(images[:, :, None]).permute(2, 1, 0, 3, 4)


def latent_driving_tokens(encoder, cfg: ModelConfig, mel: Tensor, mel_offset: int, motion: Tensor,
                          first_latent: int, n_latents: int) -> Tensor:
    """Driving tokens of latent frames [first_latent, first_latent + n_latents).

    mel: (B, n_mel, n_mels) log-mel whose row 0 is mel frame `mel_offset` of the stream;
    motion: (B, s * n_latents, motion_dim) for the video frames of those latents' token
    groups (s = the VAE's temporal stride; `Timeline.group_start`).
    Returns (B, n_latents, s * tokens_per_frame, drive_dim): each latent frame gets the
    tokens of its own s video frames (and, inside each audio window, the lookahead).
    """
    tl = Timeline.of(cfg)
    first_frame, n_frames = tl.group_start(first_latent), tl.temporal_stride * n_latents
    win = torch.stack([drv.audio_windows(m, cfg.fps, first_frame, n_frames, cfg.driving, mel_offset=mel_offset)
                       for m in mel])  # (B, n_frames, win, n_mels)
    tokens = encoder(win, motion)  # (B, n_frames, M, D)
    B, _, M, D = tokens.shape
    return tokens.reshape(B, n_latents, tl.temporal_stride * M, D)


def positions(first_latent: int, n: int, offset: int = 0) -> Tensor:
    """(n,) float64 temporal RoPE positions of latents [first_latent, first_latent + n):
    latent l sits at l + 1 - offset (the reference, with running ahead off, at 0)."""
    return torch.arange(n, dtype=torch.float64) + (first_latent + 1 - offset)


def reference_position(knobs: StreamKnobs, first_latent: int) -> float:
    """Where running ahead has put the reference's temporal position when a stream (from
    latent 0, before any rebase) denoises the chunk starting at latent `first_latent`: it
    starts `ahead_frames` past the first chunk's end and moves by `ahead_frames` whenever a
    chunk would pass it (`KnotForcing.start` / `plan`). 0 with running ahead off."""
    ahead = knobs.ahead_frames
    if not ahead:
        return 0.0
    span = knobs.chunk_frames + knobs.knot_frames
    position = 1 + span + ahead
    for first in range(0, first_latent + 1, knobs.chunk_frames):
        while first + 1 + span > position:
            position += ahead
    return float(position)


def timesteps(sigma: float | Tensor, batch: int, frames: int, num_train_timesteps: int,
              device: torch.device) -> Tensor:
    """(batch, frames) model timesteps of noise level `sigma` (a float, or (batch,) one per
    row). Always float32, whatever the model's dtype: in bf16, values in [512, 1000) would
    snap to multiples of 4."""
    if isinstance(sigma, Tensor):
        return (sigma.float() * num_train_timesteps).view(batch, 1).expand(batch, frames).to(device)
    return torch.full((batch, frames), sigma * num_train_timesteps, device=device, dtype=torch.float32)


@dataclass
class ChunkInputs:
    """The model inputs of one chunk, batched over streams or clips."""

    pos: Tensor      # (F,) or (B, F) float64 temporal positions
    cond: Tensor     # (B, mask + z, F, h, w) image-to-video condition
    drive: Tensor    # (B, F, M, drive_dim) driving tokens
    ctx: Streaming | BatchedStreaming  # what the chunk's queries see besides themselves

    def velocity(self, dit: DiT, x: Tensor, sigma: float | Tensor, num_train_timesteps: int) -> Tensor:
        t = timesteps(sigma, x.shape[0], x.shape[2], num_train_timesteps, x.device)
        return dit(x, t, self.pos, self.ctx, cond=self.cond, drive=self.drive)


def chunk_step(dit: DiT, chunk: ChunkInputs, noise: Tensor, sigmas: Tensor, knots: Sequence[Tensor | None],
               fusion: float, num_train_timesteps: int, before_pass: Callable[[], None] | None = None) -> Tensor:
    """Few-step Euler from `noise` (B, z, F, h, w) down the `sigmas` schedule to the clean
    chunk. knots[i]: row i's previous knot prediction (B=1, z, kn, h, w), fused into its
    first kn frames at the last step with weight `fusion`; None: no knot. `before_pass` runs
    before every DiT pass (the engine's abort point). Returns the clean latents (B, z, F, h, w)."""

    def velocity(x: Tensor, sigma: float) -> Tensor:
        if before_pass is not None:
            before_pass()
        return chunk.velocity(dit, x, sigma, num_train_timesteps)

    def fuse_knots(x0: Tensor) -> Tensor:
        for i, knot in enumerate(knots):
            if knot is not None:
                kn = knot.shape[2]
                x0[i:i + 1, :, :kn] = fusion * knot + (1 - fusion) * x0[i:i + 1, :, :kn]
        return x0

    return denoise(velocity, noise, sigmas, on_last=fuse_knots)


def write_clean(dit: DiT, ctx: Streaming | BatchedStreaming, clean: Tensor, pos: Tensor, cond: Tensor,
                drive: Tensor) -> None:
    """The cache-writing pass: clean latents (B, z, c, h, w) at noise level 0 through a
    writing context (`Streaming(write=True)`); the caller commits the window afterwards."""
    dit(clean, timesteps(0.0, clean.shape[0], clean.shape[2], 1, clean.device), pos, ctx, cond=cond, drive=drive)


def encode_reference(dit: DiT, reference_latent: Tensor, cache: ReferenceCache) -> None:
    """The reference latent (B, z, 1, h, w) at noise level 0, at `cache.position`, into `cache`."""
    pos = torch.tensor([cache.position], dtype=torch.float64)
    dit(reference_latent, torch.zeros(reference_latent.shape[0], 1, device=reference_latent.device), pos,
        EncodeReference(cache))


# ----- one stream's state and the recipe object -------------------------------------------


class KnotState:
    """What a Knot Forcing stream carries from chunk to chunk."""

    def __init__(self, reference: ReferenceCache, window: WindowCache, reference_latent: Tensor):
        self.reference = reference
        self.window = window
        self.reference_latent = reference_latent  # (1, z, 1, h, w)
        self.next_latent = 0               # latent index of the next chunk's first frame
        self.offset = 0                    # positions are (latent index + 1 - offset)
        self.knot: Tensor | None = None    # previous chunk's knot prediction (1, z, kn, h, w)
        self.portrait: Tensor | None = None  # (1, 3, H, W) in [-1, 1]: what a motion warp warps



@dataclass(frozen=True)
class KnotSnapshot:
    next_latent: int
    offset: int
    knot: Tensor | None
    reference: ReferenceSnapshot
    window: WindowSnapshot


@dataclass
class KnotPlan:
    """One stream's part of a batched chunk (what `plan` prepares before the denoising)."""

    pos: Tensor            # (Fr,) temporal positions
    drive: Tensor          # (1, Fr, M, drive_dim)
    cond: Tensor           # (1, mask + z, Fr, h, w)
    knot: Tensor | None    # previous knot prediction, fused at the last step
    noise: Tensor          # (1, z, Fr, h, w)
    hint: Tensor           # the condition's latent: (1, z, 1, h, w) portrait, or (1, z, Fr, h, w) warped
    motion_first: int      # video frame of `motion`'s first row
    motion: Tensor | None  # (s * Fr, F) each frame's motion fields, for the warp (None: no warp)


class KnotForcing:
    """The Knot Forcing recipe for one loaded model (see the module docstring)."""

    name = "knot-forcing"

    def __init__(self, model: AvatarModel, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.cfg: ModelConfig = model.config
        self.timeline = Timeline.of(self.cfg)
        self.device, self.dtype = device, dtype
        self.rope = model.dit.rope

    def start(self, reference_latent: Tensor, knobs: StreamKnobs, reference_video: Tensor | None = None) -> KnotState:
        """A new stream's state: the reference encoded into its cache, an empty window (the
        portrait's pixels are not needed)."""
        d, T = self.cfg.dit, self.cfg.tokens_per_frame
        dev, dt = self.device, self.dtype
        state = KnotState(ReferenceCache(d.num_layers, 1, d.num_heads, T, d.head_dim, dt, dev),
                          WindowCache(d.num_layers, 1, d.num_heads, knobs.window_frames, T, d.head_dim, dt, dev),
                          reference_latent)
        # Running ahead off: the reference sits at position 0 and frames start at 1.
        state.reference.position = reference_position(knobs, 0)
        encode_reference(self.model.dit, reference_latent, state.reference)
        if self.model.warp is not None:
            if reference_video is None:
                raise ValueError("a model with a motion warp needs the portrait (reference_video)")
            state.portrait = reference_video[:, :, 0]
        return state

    def span(self, state: KnotState, knobs: StreamKnobs) -> StepSpan:
        return self.timeline.span(state.next_latent, knobs.chunk_frames, knobs.chunk_frames + knobs.knot_frames)

    @staticmethod
    def batch_key(knobs: StreamKnobs) -> tuple:
        """Streams with equal keys (and denoising steps) can share one batched forward."""
        return knobs.chunk_frames, knobs.knot_frames, knobs.shift, knobs.knot_fusion

    def _span_end(self, state: KnotState, knobs: StreamKnobs) -> int:
        """Exclusive end position of the next chunk (with knots)."""
        return state.next_latent + 1 - state.offset + knobs.chunk_frames + knobs.knot_frames

    # ----- a step ----------------------------------------------------------------------

    def plan(self, state: KnotState, knobs: StreamKnobs, inp: StepInput, generator: torch.Generator) -> KnotPlan:
        """Per stream, before the denoising: running ahead, positions, driving, condition, noise."""
        if knobs.ahead_frames:
            end = self._span_end(state, knobs)
            while end > state.reference.position:
                state.reference.move(self.rope, float(knobs.ahead_frames))
        Fr = knobs.chunk_frames + knobs.knot_frames
        pos = positions(state.next_latent, Fr, state.offset)
        motion = self.driving_motion(inp, state.next_latent, Fr)
        drive = self.driving_tokens(inp, motion, state.next_latent, Fr)
        z, (h, w) = self.cfg.vae.z_channels, self.cfg.latent_hw
        noise = torch.randn(1, z, Fr, h, w, generator=generator).to(self.device, self.dtype)
        hint, fields = state.reference_latent, None
        if self.model.warp is not None:  # the condition: the portrait warped onto each latent's motion
            warp = self.model.warp
            rows = torch.from_numpy(motion).to(self.device)
            fields = warp.fields(rows)
            hint = warped_latents(self.model.vae, warp, state.portrait,
                                  warp.latent_fields(rows, self.timeline.temporal_stride))
        return KnotPlan(pos, drive, build_cond(self.cfg, hint, state.knot, Fr), state.knot, noise, hint,
                        self.timeline.group_start(state.next_latent), fields)

    def blend_frames(self, state: KnotState, plan: KnotPlan, first_frame: int, n: int) -> Tensor | None:
        """What the decoder's blend copies from for video frames [first_frame, first_frame + n)
        of this plan's chunk: the portrait warped onto each frame's motion, (1, n, 3, H, W),
        plus the calibrated offsets of the blend's logit as a 4th channel when the avatar has
        some (`ModelConfig.warp_blend`); None without a motion warp (the blend copies the
        still portrait)."""
        if plan.motion is None:
            return None
        warp, cfg = self.model.warp, self.cfg
        rows = plan.motion[first_frame - plan.motion_first:][:n]
        images = warp.warp(state.portrait, rows, sharp_mouth=True)  # the line of closed lips kept
        face, mouth = cfg.warp_blend
        if face == 0 and mouth == 0:
            return images[None]
        offset = torch.full_like(images[:, :1], face)
        if cfg.warp_mouth:
            offset = offset + (mouth - face) * warp.mouth_mask(rows, cfg.warp_mouth).to(images.dtype)
        return torch.cat([images, offset], 1)[None]

    def driving_motion(self, inp: StepInput, first_latent: int, n_latents: int) -> np.ndarray:
        """(s * n_latents, motion_dim) motion rows of the latents' groups of frames (from
        `Timeline.group_start(first_latent)`; rows before the stream or the span: not given),
        a personal avatar's mouth filled in from the speech."""
        dc, tl = self.cfg.driving, self.timeline
        first = tl.group_start(first_latent)
        motion = np.zeros((tl.temporal_stride * n_latents, dc.motion_dim), np.float32)
        if inp.motion is not None:  # rows from the span's first frame; the first group starts before it
            rows = inp.motion[: len(motion) - (inp.span.frame - first)]
            motion[inp.span.frame - first:inp.span.frame - first + len(rows)] = rows
        if self.cfg.speech_mouth is not None:  # a personal avatar: speech -> mouth fields
            from model.personal.speech_mouth import fill
            motion = fill(motion, inp.audio, inp.span.audio_from, first, tl, self.cfg.speech_mouth)
        return motion

    def driving_tokens(self, inp: StepInput, motion: np.ndarray, first_latent: int, n_latents: int) -> Tensor:
        """(1, n_latents, M, D) tokens of one step's driving (log-mel of its audio, its
        `driving_motion`)."""
        dc = self.cfg.driving
        audio = np.zeros(0, np.float32) if inp.audio is None else inp.audio
        if len(audio) < dc.n_fft:
            audio = np.pad(audio, (0, dc.n_fft - len(audio)))
        mel = drv.log_mel(torch.from_numpy(np.ascontiguousarray(audio)), dc)[None]
        dev, dt = self.device, self.dtype
        return latent_driving_tokens(self.model.driving, self.cfg, mel.to(dev, dt), inp.span.audio_from // dc.hop_length,
                                     torch.from_numpy(motion)[None].to(dev, dt), first_latent, n_latents)

    def denoise(self, states: Sequence[KnotState], plans: Sequence[KnotPlan], knobs: StreamKnobs, steps: int,
                before_pass: Callable[[], None]) -> Tensor:
        """Every stream's chunk + knot latents in one batched few-step Euler: (B, z, Fr, h, w)."""
        chunk = ChunkInputs(torch.stack([p.pos for p in plans]), torch.cat([p.cond for p in plans]),
                            torch.cat([p.drive for p in plans]),
                            BatchedStreaming([Streaming(s.reference, s.window, write=False) for s in states]))
        return chunk_step(self.model.dit, chunk, torch.cat([p.noise for p in plans]), get_sigmas(steps, knobs.shift),
                          [p.knot for p in plans], knobs.knot_fusion, self.cfg.sampler.num_train_timesteps,
                          before_pass)

    @staticmethod
    def finish(state: KnotState, knobs: StreamKnobs, x0: Tensor) -> Tensor:
        """Keep one stream's knot prediction; returns its committed latents (1, z, c, h, w)."""
        c = knobs.chunk_frames
        state.knot = x0[:, :, c:].clone() if knobs.knot_frames else None
        return x0[:, :, :c]

    def write(self, states: Sequence[KnotState], plans: Sequence[KnotPlan], knobs: StreamKnobs,
              committed: Tensor, decoded: Sequence[Tensor]) -> None:
        """The cache-writing pass over every stream's committed latents (B, z, c, h, w), then
        each stream moves on to its next chunk (rebasing when due). The decoded frames are
        not needed here."""
        c = knobs.chunk_frames
        write_clean(self.model.dit, BatchedStreaming([Streaming(s.reference, s.window, write=True) for s in states]),
                    committed, torch.stack([p.pos for p in plans])[:, :c],
                    torch.cat([build_cond(self.cfg, p.hint[:, :, :c], None, c) for p in plans]),
                    torch.cat([p.drive for p in plans])[:, :c])
        for s in states:
            s.window.commit(c)
            s.next_latent += c
            if s.next_latent + 1 - s.offset > knobs.rebase_every:
                self.rebase(s)

    def rebase(self, state: KnotState) -> None:
        """Shift every position so the next chunk starts at 1; outputs are unchanged."""
        delta = state.next_latent - state.offset
        state.reference.move(self.rope, -float(delta))
        state.window.move(self.rope, -float(delta))
        state.offset += delta

    def forget_from(self, state: KnotState, frame: int) -> None:
        """The driving changes from video frame `frame` on: drop a knot predicted for frames
        from `frame` on with the old driving (the chunk is then made as with knots off,
        instead of being conditioned on, and fused with, the old prediction)."""
        if state.knot is not None:
            knot_end = self.timeline.latent_first_frame(state.next_latent + state.knot.shape[2])
            if frame < knot_end:
                state.knot = None

    @staticmethod
    def cache_nbytes(state: KnotState) -> int:
        return state.reference.nbytes() + state.window.nbytes()

    # ----- rewinding -------------------------------------------------------------------

    @staticmethod
    def snapshot(state: KnotState, knobs: StreamKnobs) -> KnotSnapshot:
        """State before a step (the window part holds what that step's commit overwrites)."""
        return KnotSnapshot(state.next_latent, state.offset, state.knot, state.reference.snapshot(),
                            state.window.snapshot(knobs.chunk_frames))

    def restore(self, state: KnotState, snap: KnotSnapshot) -> None:
        """Back to `snap` (snapshots of later steps restored first, newest first)."""
        # The window's slots were saved under the positions of their step: undo later rebases first.
        state.window.move(self.rope, float(state.offset - snap.offset))
        state.offset = snap.offset
        state.window.restore(snap.window)
        state.reference.restore(snap.reference)
        state.next_latent, state.knot = snap.next_latent, snap.knot
