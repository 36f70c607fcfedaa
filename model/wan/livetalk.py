"""LiveTalk's chunk loop as a recipe (model/recipe.py): sink frames, a rolling window, x0 sampling.

LiveTalk (GAIR-NLP/LiveTalk) generates blocks of 3 latent frames, block-causally:

1. the stream's first latent frame is the portrait: in the first block, frame 0 of the
   noisy input is replaced by the reference latent before every pass (and in the result),
   and its condition mask is 0 there (given), 1 everywhere else;
2. each block is denoised in 4 passes with LiveTalk's sampler (model/wan/sampling.py:
   x0 from the velocity, then fresh noise to the next level; the model's timestep rounded
   to bfloat16), all frames of a block at the same level;
3. every pass attends to the KV cache plus the block itself; the cache holds the first
   `sink_frames` (9) frames of the stream, pinned (the first blocks fill them), and the
   last `window_frames` (3) frames after them (LiveTalk: a 15-frame buffer whose oldest
   non-sink frames are shifted out). Here the sink is one fixed buffer and the window a
   ring (model/cache.py `WindowCache`), read by the fused window kernel without copies;
4. after the decode, the block runs once more at timestep 0 (its clean latents, same
   condition and audio) to write its keys/values into the cache (`write`).

Audio: wav2vec2 features (last hidden state + all hidden states) of the block's video
frames from a bounded window (`StreamingWav2Vec`), grouped 4 frames per latent frame and
added to the tokens before blocks 2..L/2 (model/wan/dit.py). Text: the prompt
embedding's cross-attention keys/values, computed once per engine.

Knobs on top of LiveTalk's own loop, off by default: `knot_frames` (a block also predicts
the next block's first frames; the next block takes them as given frames, as it takes the
portrait, and fuses them at its last step), `ahead_frames` (once the sink is full, its
positions are kept ahead of the block, a rotation of its cached keys), `rebase_every`
(positions shifted back once past it; attention is unchanged; LiveTalk's own RoPE table
ends at 1024 latent frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from model.cache import ContextKV
from model.config import StreamKnobs
from model.dit import BatchedStreaming
from model.knot_forcing import KnotForcing
from model.timeline import StepInput, StepSpan
from model.wan.audio import livetalk_audio_groups
from model.wan.dit import livetalk_condition
from model.wan.photoreal import PhotorealModel, PhotorealRecipe
from model.wan.sampling import livetalk_sigmas, renoise, x0_from_velocity
from model.wan.sink import SinkWindow, SinkWindowSnapshot


class LiveTalkState:
    """What a LiveTalk stream carries from block to block."""

    def __init__(self, cache: SinkWindow, reference_latent: Tensor):
        self.cache = cache
        self.reference_latent = reference_latent  # (1, z, 1, h, w): the stream's frame 0
        self.next_latent = 0                      # latent index of the next block's first frame
        self.offset = 0                           # positions are (latent index - offset)
        self.knot: Tensor | None = None           # (1, z, kn, h, w) predicted by the previous block


@dataclass(frozen=True)
class LiveTalkSnapshot:
    next_latent: int
    offset: int
    knot: Tensor | None
    cache: SinkWindowSnapshot


@dataclass
class LiveTalkPlan:
    pos: Tensor            # (Fr,) float64 temporal positions
    audio: Tensor          # (1, Fr, 4 * layers * hidden) wav2vec2 feature groups
    cond: Tensor           # (1, 17, Fr, h, w) reference latent + mask
    reference: Tensor | None  # (1, z, 1, h, w) in the stream's first block: pinned as frame 0
    knot: Tensor | None    # (1, z, kn, h, w) pinned as the first frames, fused at the last step
    noise: Tensor          # (1, z, Fr, h, w)
    generator: torch.Generator  # fresh noise between passes


class LiveTalk(PhotorealRecipe):
    """LiveTalk's recipe for one loaded `PhotorealModel` (see the module docstring)."""

    name = "livetalk"

    def __init__(self, model: PhotorealModel, device: torch.device, dtype: torch.dtype):
        super().__init__(model, device, dtype)
        self.rope = model.dit.rope
        self.audio = self.family.audio_stream(model.audio)
        self._text: ContextKV | None = None

    # ----- a stream ----------------------------------------------------------------------

    def start(self, reference_latent: Tensor, knobs: StreamKnobs, reference_video: Tensor | None = None) -> LiveTalkState:
        """A new stream: empty caches; the portrait enters as frame 0 of the first block."""
        return LiveTalkState(self.new_cache(knobs), reference_latent)

    def new_cache(self, knobs: StreamKnobs) -> SinkWindow:
        """A stream's KV cache (model/wan/baselines.py has LiveTalk's own policy, for the bench)."""
        d = self.cfg.dit
        return SinkWindow(d.num_layers, d.num_heads, self.family.sink_frames, knobs.window_frames,
                          self.cfg.tokens_per_frame, d.head_dim, self.dtype, self.device)

    def span(self, state: LiveTalkState, knobs: StreamKnobs) -> StepSpan:
        return self.timeline.span(state.next_latent, knobs.chunk_frames, knobs.chunk_frames + knobs.knot_frames)

    @staticmethod
    def batch_key(knobs: StreamKnobs) -> tuple:
        return "livetalk", knobs.chunk_frames, knobs.knot_frames, knobs.shift, knobs.knot_fusion

    # ----- a step ------------------------------------------------------------------------

    def plan(self, state: LiveTalkState, knobs: StreamKnobs, inp: StepInput, generator: torch.Generator) -> LiveTalkPlan:
        """Per stream: running ahead, positions, audio groups, condition, pinned frames, noise."""
        Fr = knobs.chunk_frames + knobs.knot_frames
        if knobs.ahead_frames and state.cache.sink_full:
            end = state.next_latent + Fr - state.offset
            while end > state.cache.sink_position:
                state.cache.move_sink(self.rope, float(knobs.ahead_frames))
        pos = torch.arange(Fr, dtype=torch.float64) + (state.next_latent - state.offset)
        z, (h, w) = self.cfg.vae.z_channels, self.cfg.latent_hw
        noise = torch.randn(1, z, Fr, h, w, generator=generator).to(self.device, self.dtype)
        return LiveTalkPlan(pos, self.audio_groups(inp, state.next_latent, Fr),
                            livetalk_condition(state.reference_latent, Fr, state.next_latent),
                            state.reference_latent if state.next_latent == 0 else None, state.knot, noise, generator)

    def audio_groups(self, inp: StepInput, first_latent: int, n_latents: int) -> Tensor:
        """(1, n_latents, 4 * layers * hidden): wav2vec2 features of the latents' video frames
        from the step's audio (`StreamingWav2Vec` window; audio not known yet is silence)."""
        tl, spf = self.timeline, self.family.audio_layout.samples_per_frame
        first = tl.latent_first_frame(first_latent)
        n = tl.frames_for_latents(n_latents, first=first_latent == 0)
        lo, hi = self.audio.span(first, n)
        need = self.family.audio_layout.samples_for(hi - lo)
        audio = torch.zeros(need)
        if inp.audio is not None:
            part = torch.tensor(inp.audio[lo * spf - inp.span.audio_from:][:need])
            audio[:len(part)] = part
        feats = self.audio.features(audio, lo, first, n)  # (1, n, L, H)
        return livetalk_audio_groups(feats, first_chunk=first_latent == 0).to(self.device, self.dtype)

    def text(self, batch: int) -> ContextKV | None:
        """The prompt's cross-attention keys/values (computed once), for `batch` rows."""
        if self.model.prompt is None:
            return None
        if self._text is None:
            self._text = self.model.dit.text_kv(self.model.prompt.to(self.device, self.dtype))
        k, v = self._text.k, self._text.v
        return ContextKV(k.expand(-1, batch, -1, -1, -1), v.expand(-1, batch, -1, -1, -1))

    def denoise(self, states: Sequence[LiveTalkState], plans: Sequence[LiveTalkPlan], knobs: StreamKnobs, steps: int,
                before_pass: Callable[[], None]) -> Tensor:
        """Every stream's block in one batched loop of LiveTalk's sampler: (B, z, Fr, h, w)."""
        dit, B = self.model.dit, len(plans)
        pos = torch.stack([p.pos for p in plans])
        cond = torch.cat([p.cond for p in plans])
        adds = dit.audio_adds(torch.cat([p.audio for p in plans]))
        text = self.text(B)
        ctx = BatchedStreaming([s.cache.attention(write=False) for s in states])
        sigmas, timesteps = livetalk_sigmas(steps, knobs.shift)
        x = torch.cat([p.noise for p in plans])
        for i in range(steps):
            before_pass()
            _pin(x, plans, knots=True)
            t = timesteps[i].expand(B, x.shape[2]).to(self.device)
            v = dit(x, t, pos, ctx, cond=cond, audio=adds, text=text)
            x0 = x0_from_velocity(x, v, float(sigmas[i]))
            if i + 1 < steps:
                noise = torch.cat([torch.randn(x0[:1].shape, generator=p.generator) for p in plans])
                x = renoise(x0, noise.to(self.device, self.dtype), float(sigmas[i + 1]))
        _pin(x0, plans, knots=False)
        for row, p in enumerate(plans):
            if p.knot is not None:
                kn = p.knot.shape[2]
                x0[row:row + 1, :, :kn] = knobs.knot_fusion * p.knot + (1 - knobs.knot_fusion) * x0[row:row + 1, :, :kn]
        return x0

    # Knots as in Knot Forcing: the block's own latents are committed, its knot kept (when on)
    # and dropped when the driving changes before the frames it predicts.
    finish = staticmethod(KnotForcing.finish)
    forget_from = KnotForcing.forget_from

    @staticmethod
    def blend_frames(state: LiveTalkState, plan: LiveTalkPlan, first_frame: int, n: int) -> None:
        return None  # the Wan VAE has no reference blend

    def write(self, states: Sequence[LiveTalkState], plans: Sequence[LiveTalkPlan], knobs: StreamKnobs,
              committed: Tensor, decoded: Sequence[Tensor]) -> None:
        """The clean pass (timestep 0) writes every block into its stream's cache; then each
        stream moves on, rebasing its positions when due."""
        c, B = knobs.chunk_frames, len(states)
        dit = self.model.dit
        ctx = BatchedStreaming([s.cache.attention(write=True) for s in states])
        t = torch.zeros(B, c, device=self.device)
        dit(committed, t, torch.stack([p.pos for p in plans])[:, :c], ctx,
            cond=torch.cat([p.cond for p in plans])[:, :, :c],
            audio=dit.audio_adds(torch.cat([p.audio for p in plans])[:, :c]), text=self.text(B))
        for s in states:
            s.cache.commit(c)
            s.next_latent += c
            if s.next_latent - s.offset > knobs.rebase_every:
                delta = s.next_latent - s.offset
                s.cache.move(self.rope, -float(delta))
                s.offset += delta

    @staticmethod
    def cache_nbytes(state: LiveTalkState) -> int:
        return state.cache.nbytes()

    # ----- rewinding ---------------------------------------------------------------------

    @staticmethod
    def snapshot(state: LiveTalkState, knobs: StreamKnobs) -> LiveTalkSnapshot:
        return LiveTalkSnapshot(state.next_latent, state.offset, state.knot, state.cache.snapshot(knobs.chunk_frames))

    def restore(self, state: LiveTalkState, snap: LiveTalkSnapshot) -> None:
        """Back to `snap` (snapshots of later steps restored first, newest first)."""
        state.cache.restore(self.rope, snap.cache)
        state.next_latent, state.offset, state.knot = snap.next_latent, snap.offset, snap.knot


def _pin(x: Tensor, plans: Sequence[LiveTalkPlan], knots: bool) -> None:
    """Put each stream's given frames into its rows of x (B, z, Fr, h, w): the portrait as the
    stream's frame 0, and with `knots` the previous block's knot prediction as the first frames."""
    for row, p in enumerate(plans):
        if knots and p.knot is not None:
            x[row:row + 1, :, :p.knot.shape[2]] = p.knot
        if p.reference is not None:
            x[row:row + 1, :, :1] = p.reference
