"""Training-time chunk step: the engine's chunk, with gradients, on ground-truth clips.

A training sample is a clip treated as the start of a stream. One chunk of it is the
training target; the latent frames before it fill the window cache exactly as the
engine fills it (the cache pass at noise level 0, chunk by chunk), the reference is
encoded into the reference cache, and the chunk is denoised from one noise level with
the same attention contexts, the same condition (`build_cond`), the same driving tokens
(`latent_driving_tokens`) and the same timesteps as at inference. Nothing here is a copy
of the engine's math: context chunks the model generates go through the recipe's own
`chunk_step` (model/knot_forcing.py), the cache pass through its `write_clean`.

Context frames come from one of two sources:
- teacher forcing: the clip's own clean latents;
- rollout (exposure-bias stage): the model's own few-step generations of those chunks,
  under no_grad, as the engine would have produced them. The target stays the ground
  truth of the renderer, which knows every frame; this is what Self Forcing's
  rollouts buy, without a distillation teacher (we have real targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from model.avatar import AvatarModel
from model.cache import ReferenceCache, WindowCache
from model.config import ModelConfig, StreamKnobs
from model.dit import Streaming
from model.driving import log_mel
from model.knot_forcing import (ChunkInputs, build_cond, chunk_step, encode_reference, latent_driving_tokens,
                                positions, reference_position, write_clean)
from model.sampler import get_sigmas, shift_sigma
from model.timeline import Timeline


@dataclass
class ClipBatch:
    """frames (B, 3, 1 + 4(N-1), H, W) in [-1, 1]; reference (B, 3, H, W) in [-1, 1];
    audio (B, S) float32 16 kHz, sample 0 = frame 0; motion (B, frames, motion_dim) as
    given to the model; weight (B, 1, frames, H, W) pixel loss weights (mouth/eyes > 1)."""

    frames: Tensor | None
    reference: Tensor | None
    audio: Tensor
    motion: Tensor
    weight: Tensor | None
    # Precomputed VAE latents (a latent pool): (B, z, N, h, w), (B, z, 1, h, w) and
    # latent-grid loss weights (B, 1, N, h, w); when set, frames/reference are not needed.
    latents: Tensor | None = None
    ref_latent: Tensor | None = None
    latent_weight: Tensor | None = None
    # A model with a motion warp (model/motion_warp.py): the portrait warped onto each frame's
    # motion (B, T, 3, H, W), what the decoder's blend copies from; onto each latent's mean
    # motion (B, N, 3, H, W), and those encoded (B, z, N, h, w): the DiT's condition.
    blend: Tensor | None = None
    hints: Tensor | None = None
    hint_latent: Tensor | None = None


@dataclass
class ChunkPlan:
    """Where the trained chunk sits: latent frames [start, start + chunk + knot)."""

    start: int
    knobs: StreamKnobs
    ref_lead: int  # reference position minus the chunk's exclusive end position (running ahead)

    @classmethod
    def as_engine(cls, start: int, knobs: StreamKnobs) -> "ChunkPlan":
        """The chunk at `start` with the reference where the engine's running ahead puts it."""
        end = start + 1 + knobs.chunk_frames + knobs.knot_frames
        return cls(start, knobs, int(reference_position(knobs, start)) - end if knobs.ahead_frames else 0)


@dataclass
class Context:
    """What a trained chunk sees of the stream before it, given from outside (a replay
    buffer's chain): the committed latents of every chunk before it (B, z, start, h, w),
    written into the window as the engine writes its chunks, and the knot the previous
    chunk predicted (B, z, knot, h, w), or None."""

    latents: Tensor
    knot: Tensor | None


def random_window(knobs: StreamKnobs, windows: tuple[int, int] | None, gen: torch.Generator) -> StreamKnobs:
    """`knobs` with a window length drawn uniformly from [lo, hi] (None: unchanged): a model
    trained on one window length gets worse with longer ones (docs/benchmarks.md)."""
    if windows is None:
        return knobs
    lo, hi = windows
    return knobs.replace(window_frames=lo + int(torch.randint(hi - lo + 1, (1,), generator=gen)))


def plan_chunk(n_latents: int, knobs: StreamKnobs, gen: torch.Generator,
               windows: tuple[int, int] | None = None) -> ChunkPlan:
    span = knobs.chunk_frames + knobs.knot_frames
    if n_latents < span:
        raise ValueError(f"clip has {n_latents} latent frames, a chunk needs {span}")
    # Chunk starts on the engine's grid (multiples of chunk_frames) so context chunks match.
    starts = list(range(0, n_latents - span + 1, knobs.chunk_frames))
    start = starts[int(torch.randint(len(starts), (1,), generator=gen))]
    lead = int(torch.randint(knobs.ahead_frames + 1, (1,), generator=gen)) if knobs.ahead_frames else 0
    return ChunkPlan(start, random_window(knobs, windows, gen), lead)


def chain_noise(seed: int, chunk: int, shape: tuple[int, ...]) -> Tensor:
    """The noise chunk `chunk` of the chain `seed` starts from: a function of (seed, chunk)
    alone, so a chain regenerated from its seed (or from any chunk on) draws the same noise;
    every chunk draws its own, as the engine's generator does."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + chunk) % 2**63)
    return torch.randn(shape, generator=g)


@dataclass
class Chain:
    """A stream the model made itself: `latents` (B, z, n * chunk, h, w), the committed
    latents of its n chunks; `knots[i]` (B, z, knot, h, w) the knot chunk i predicted for
    chunk i + 1 (None with knots off)."""

    latents: Tensor
    knots: list[Tensor | None]

    def context(self, chunk: int, chunk_frames: int) -> Context:
        """The context of chunk `chunk` (>= 1) of this chain."""
        return Context(self.latents[:, :, :chunk * chunk_frames], self.knots[chunk - 1])


class ChunkTrainer:
    """Builds caches for a batch of clips and returns the trained chunk's prediction."""

    def __init__(self, model: AvatarModel):
        self.model = model
        self.cfg: ModelConfig = model.config
        self.timeline = Timeline.of(self.cfg)
        self._hints: Tensor | None = None  # the current batch's condition latents (`latents`)

    def latents(self, batch: ClipBatch) -> tuple[Tensor, Tensor]:
        """VAE latents of the clip frames and of the reference (no gradient: the VAE is frozen
        here). Also sets the condition's latents of this batch (`_hint`)."""
        if batch.latents is not None:
            self._hints = batch.hint_latent
            return batch.latents, batch.ref_latent
        with torch.no_grad():
            vae = self.model.vae
            z = vae.encode(batch.frames)  # (B, z, N, h, w)
            ref = vae.encode(batch.reference[:, :, None])  # (B, z, 1, h, w)
            self._hints = None if batch.hints is None else encode_hints(vae, batch.hints)
        return z, ref

    def _hint(self, ref: Tensor, start: int, n: int) -> Tensor:
        """The condition's latent for latents [start, start + n) (`build_cond`): the batch's
        warped portraits where the model has a motion warp, else the reference latent."""
        return ref if self._hints is None else self._hints[:, :, start:start + n]

    def drive(self, batch: ClipBatch, first_latent: int, n_latents: int) -> Tensor:
        """(B, n_latents, 4M, D) driving tokens of the step that denoises latents [first_latent,
        first_latent + n_latents), from exactly the audio that step reads (`Timeline.span`):
        its last mel frames see the end padding there as they do in the engine. Frames before
        the clip read as silence / not given."""
        dc = self.cfg.driving
        span = self.timeline.span(first_latent, n_latents, n_latents)
        audio = batch.audio[:, span.audio_from:span.audio_to]
        if audio.shape[1] < dc.n_fft:  # as the engine pads a step's short audio
            audio = torch.nn.functional.pad(audio, (0, dc.n_fft - audio.shape[1]))
        mel = log_mel(audio, dc)  # (B, n_mel, n_mels), row 0 = mel frame audio_from / hop
        first_frame = self.timeline.group_start(first_latent)
        n_frames = self.timeline.temporal_stride * n_latents
        B, T, md = batch.motion.shape
        motion = batch.motion.new_zeros(B, n_frames, md)
        lo, hi = max(0, first_frame), min(T, first_frame + n_frames)
        if hi > lo:
            motion[:, lo - first_frame:hi - first_frame] = batch.motion[:, lo:hi]
        return latent_driving_tokens(self.model.driving, self.cfg, mel, span.audio_from // dc.hop_length, motion,
                                     first_latent, n_latents)

    def forward(self, batch: ClipBatch, plan: ChunkPlan, sigma: Tensor, gen: torch.Generator,
                rollout: str | None = None, context: Context | None = None,
                context_steps: int | None = None) -> dict[str, Tensor]:
        """Predict the clean latents of the planned chunk from noise level `sigma` (B,).

        rollout: None = teacher forcing; "all" = every context chunk generated by the model
        (Self Forcing-style); "last" = only the chunk just before the trained one generated
        (its frames in the window and its knot as the condition), the older context clean:
        the knot and the newest window frames are where the model meets its own output
        first, at a fifth of the cost of "all" on a CPU; "truncated" = as "all", with the
        gradient also through the generation of the chunk just before the trained one (its
        frames in the window, its knot), so the loss teaches the model what its own context
        does to the next chunk. context_steps: Euler steps of generated context chunks
        (default the knobs' `denoise_steps`). context: the context given from outside (a
        replay buffer's chain) instead of any of these.

        Returns x0_pred (B, z, F, h, w), x0 target, and the chunk's latent frame range.
        """
        m, cfg, k = self.model.dit, self.cfg, plan.knobs
        z, ref = self.latents(batch)
        B = z.shape[0]
        c, kn = k.chunk_frames, k.knot_frames
        Fr = c + kn
        if plan.start + Fr > z.shape[2]:
            raise ValueError(f"chunk [{plan.start}, {plan.start + Fr}) runs past the clip's {z.shape[2]} latents")
        d = cfg.dit
        T = cfg.tokens_per_frame
        dev, dt = z.device, z.dtype

        # 1. Reference into its cache (with gradient: identity is learned through it).
        rc = ReferenceCache(d.num_layers, B, d.num_heads, T, d.head_dim, dt, dev)
        end = plan.start + 1 + Fr
        rc.position = float(end + plan.ref_lead) if k.ahead_frames else 0.0
        encode_reference(m, ref, rc)

        # 2. Window: the context chunks before the trained one, as the engine writes them.
        wc = WindowCache(d.num_layers, B, d.num_heads, k.window_frames, T, d.head_dim, dt, dev)
        if context is not None:
            knot = self._given_context(batch, ref, rc, wc, plan, context)
        else:
            knot = self._context(batch, z, ref, rc, wc, plan, gen, rollout, context_steps)

        # 3. The trained chunk: noisy target frames, knot condition from the previous chunk.
        target = z[:, :, plan.start:plan.start + Fr]
        if plan.start > 0 and kn:
            if knot is None:
                knot = self._noisy_knot(target[:, :, :kn], gen)
            cond = build_cond(cfg, self._hint(ref, plan.start, Fr), knot, Fr)
        else:
            cond = build_cond(cfg, self._hint(ref, plan.start, Fr), None, Fr)
        noise = torch.randn(target.shape, generator=gen).to(dev, dt)
        s = sigma.view(B, 1, 1, 1, 1).to(dt)
        x_t = (1 - s) * target + s * noise
        chunk = ChunkInputs(positions(plan.start, Fr), cond, self.drive(batch, plan.start, Fr),
                            Streaming(rc, wc, write=False))
        v = chunk.velocity(m, x_t, sigma, cfg.sampler.num_train_timesteps)
        return {"x0_pred": x_t - s * v, "x0": target, "ref": ref, "start": plan.start}

    def _context(self, batch: ClipBatch, z: Tensor, ref: Tensor, rc: ReferenceCache, wc: WindowCache,
                 plan: ChunkPlan, gen: torch.Generator, rollout: str | None,
                 context_steps: int | None) -> Tensor | None:
        """Fill the window with every chunk before the trained one (the clip is a stream from
        its first frame: a chunk's K/V depend on the window it saw, the ring buffer evicting
        what falls out of it). Returns the knot the trained chunk is conditioned on, when a
        generated chunk made one."""
        k = plan.knobs
        c, kn = k.chunk_frames, k.knot_frames
        knot = None
        generate_from = {"all": 0, "truncated": 0, "last": max(0, plan.start - c)}.get(rollout, plan.start)
        steps = context_steps or k.denoise_steps
        for s in range(0, plan.start, c):
            # Truncated: the chunk before the trained one keeps its graph (window K/V and knot).
            with torch.set_grad_enabled(rollout == "truncated" and s == plan.start - c and torch.is_grad_enabled()):
                drive = self.drive(batch, s, c + kn)
                if s >= generate_from:
                    if knot is None and s > 0 and kn:  # after teacher-forced chunks: the engine's knot, imitated
                        knot = self._noisy_knot(z[:, :, s:s + kn], gen)
                    noise = torch.randn(ref.shape[0], self.cfg.vae.z_channels, c + kn, *ref.shape[-2:], generator=gen)
                    clean, knot = self._generate(ref, s, knot, drive, rc, wc, k.replace(denoise_steps=steps), noise)
                else:
                    clean = z[:, :, s:s + c]
                self._write(ref, rc, wc, s, clean, drive[:, :c])
        return knot

    def _given_context(self, batch: ClipBatch, ref: Tensor, rc: ReferenceCache, wc: WindowCache, plan: ChunkPlan,
                       context: Context) -> Tensor | None:
        """Fill the window with given context latents, chunk by chunk as the engine writes them."""
        c, kn = plan.knobs.chunk_frames, plan.knobs.knot_frames
        if context.latents.shape[2] < plan.start:
            raise ValueError(f"context has {context.latents.shape[2]} latents; the chunk at {plan.start} "
                             "needs every latent before it")
        with torch.no_grad():
            for s in range(0, plan.start, c):
                self._write(ref, rc, wc, s, context.latents[:, :, s:s + c], self.drive(batch, s, c + kn)[:, :c])
        return context.knot if kn else None

    def _write(self, ref: Tensor, rc: ReferenceCache, wc: WindowCache, start: int, clean: Tensor,
               drive: Tensor) -> None:
        """The engine's cache-writing pass of one committed chunk, then its commit."""
        c = clean.shape[2]
        write_clean(self.model.dit, Streaming(rc, wc, write=True), clean, positions(start, c),
                    build_cond(self.cfg, self._hint(ref, start, c), None, c), drive)
        wc.commit(c)

    @torch.no_grad()
    def rollout_chain(self, batch: ClipBatch, knobs: StreamKnobs, n_chunks: int, seeds: Sequence[int],
                      noise_of: Callable[[int, int, tuple[int, ...]], Tensor] = chain_noise) -> Chain:
        """The model streams the first `n_chunks` chunks of each clip, as the engine does:
        the recipe's chunk step with the knot of the chunk before (fused per `knot_fusion`),
        the window holding the model's own committed frames, the reference moved by running
        ahead (a rotation of its cached keys). Clip b's chunk i starts from the noise
        `noise_of(seeds[b], i, (z, chunk + knot, h, w))`."""
        cfg, k = self.cfg, knobs
        c, kn = k.chunk_frames, k.knot_frames
        z, ref = self.latents(batch)
        B, (h, w) = ref.shape[0], ref.shape[-2:]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} clips")
        if z.shape[2] < (n_chunks - 1) * c + c + kn:
            raise ValueError(f"clips of {z.shape[2]} latents are too short for {n_chunks} chunks")
        d, T = cfg.dit, cfg.tokens_per_frame
        rc = ReferenceCache(d.num_layers, B, d.num_heads, T, d.head_dim, ref.dtype, ref.device)
        wc = WindowCache(d.num_layers, B, d.num_heads, k.window_frames, T, d.head_dim, ref.dtype, ref.device)
        rc.position = reference_position(k, 0)
        encode_reference(self.model.dit, ref, rc)
        latents, knots, knot = [], [], None
        for i in range(n_chunks):
            s = i * c
            rc.move(self.model.dit.rope, reference_position(k, s) - rc.position)
            drive = self.drive(batch, s, c + kn)
            noise = torch.stack([noise_of(seed, i, (cfg.vae.z_channels, c + kn, h, w)) for seed in seeds])
            clean, knot = self._generate(ref, s, knot, drive, rc, wc, k, noise.to(ref.device, ref.dtype))
            self._write(ref, rc, wc, s, clean, drive[:, :c])
            latents.append(clean)
            knots.append(knot)
        return Chain(torch.cat(latents, dim=2), knots)

    @staticmethod
    def _noisy_knot(truth: Tensor, gen: torch.Generator) -> Tensor:
        """Teacher forcing's knot: the previous chunk's knot prediction is imperfect at
        inference; imitate it with a lightly noised ground truth."""
        return truth + 0.1 * torch.randn(truth.shape, generator=gen).to(truth.device, truth.dtype)

    def _generate(self, ref, start, knot, drive, rc, wc, k: StreamKnobs, noise: Tensor) -> tuple[Tensor, Tensor | None]:
        """The engine's few-step generation of one context chunk from `noise` (B, z, c + knot,
        h, w): the recipe's chunk step."""
        cfg = self.cfg
        B = ref.shape[0]
        c, kn = k.chunk_frames, k.knot_frames
        Fr = c + kn
        chunk = ChunkInputs(positions(start, Fr), build_cond(cfg, self._hint(ref, start, Fr), knot, Fr), drive,
                            Streaming(rc, wc, write=False))
        noise = noise.to(ref.device, ref.dtype)
        knots = [None] * B if knot is None else list(knot.split(1))
        x0 = chunk_step(self.model.dit, chunk, noise, get_sigmas(k.denoise_steps, k.shift), knots, k.knot_fusion,
                        cfg.sampler.num_train_timesteps)
        return x0[:, :, :c], (x0[:, :, c:] if kn else None)


def encode_hints(vae, hints: Tensor) -> Tensor:
    """(B, N, 3, H, W) warped portraits -> (B, z, N, h, w), each encoded as a lone frame (as
    the engine's `warped_latents`)."""
    B, N = hints.shape[:2]
    z = vae.encode(hints.flatten(0, 1)[:, :, None])  # (B*N, z, 1, h, w)
    return z[:, :, 0].unflatten(0, (B, N)).transpose(1, 2)


def sample_sigma(batch: int, shift: float, gen: torch.Generator) -> Tensor:
    """Training noise levels: uniform then shifted toward high noise (the task is nearly
    deterministic given the conditioning; what matters is the high-noise regime)."""
    u = torch.rand(batch, generator=gen, dtype=torch.float64)
    return shift_sigma(u, shift).float().clamp(1e-3, 1.0)
