"""Replay buffer of self-generated chains: train what inference does, at a CPU's price.

At inference every chunk's context is the model's own: the window holds the frames it
committed, the knot condition is its previous chunk's prediction, fused per
`knot_fusion`. Generating that context at every training step (`--rollout-context all`)
costs a whole rollout per step. The buffer amortises it: every `refresh_every` optimiser
steps it regenerates its chains with the current weights (`ChunkTrainer.rollout_chain`:
the engine's chunk step, no gradient), and training steps draw (context, knot, target)
from them:

- a chain is `n_chunks` chunks of one pool clip, its noise keyed by the chain's seed
  (`chain_noise`), so it can be regenerated exactly;
- chains come in groups of one training batch, generated together with one window length
  drawn from `windows` (the window a chain was made with is the one it is trained with:
  a longer window then holds more of the model's own frames, as at inference);
- a sample is group x chunk: the group's clips, the committed latents of the chunks before
  the trained one (written into the window by the current weights, as the engine writes
  them), the previous chunk's knot, the reference where the engine's running ahead puts
  it, and the ground truth of the chunk as the target;
- a fraction `teacher_forced` of the samples takes the ground-truth context instead (and a
  lightly noised ground-truth knot): it keeps the model anchored while its own context is
  still poor.

The chains lag the weights by at most `refresh_every` steps; the window's keys and values
are always computed by the current weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import StreamKnobs
from model.train.chunks import Chain, ChunkPlan, ChunkTrainer, ClipBatch, Context, random_window
from model.train.data import LatentPool


@dataclass
class ChainGroup:
    """Chains generated together: pool clips `clips` (G,), their seeds, one window length."""

    clips: torch.Tensor
    seeds: list[int]
    knobs: StreamKnobs
    chain: Chain


@dataclass
class Sample:
    batch: ClipBatch
    plan: ChunkPlan
    context: Context | None  # None: teacher forced (ground-truth context)


class ReplayBuffer:
    def __init__(self, trainer: ChunkTrainer, pool: LatentPool, knobs: StreamKnobs, n_chunks: int, group: int,
                 groups: int, windows: tuple[int, int], teacher_forced: float):
        c, kn = knobs.chunk_frames, knobs.knot_frames
        clip_latents = pool.t["latents"].shape[2]
        if n_chunks < 1 or n_chunks * c + c + kn > clip_latents:
            raise ValueError(f"{n_chunks} context chunks and the trained one need {n_chunks * c + c + kn} latents, "
                             f"the pool's clips have {clip_latents}")
        if not 1 <= windows[0] <= windows[1] or not 0 <= teacher_forced <= 1:
            raise ValueError(f"bad windows {windows} or teacher-forced fraction {teacher_forced}")
        self.trainer, self.pool, self.knobs = trainer, pool, knobs
        self.n_chunks, self.group, self.n_groups = n_chunks, group, groups
        self.windows, self.teacher_forced = windows, teacher_forced
        self.groups: list[ChainGroup] = []

    def generate(self, clips: torch.Tensor, seeds: list[int], window: int) -> ChainGroup:
        """One group of chains from pool clips `clips` with the current weights."""
        knobs = self.knobs.replace(window_frames=window)
        was_training = self.trainer.model.training
        self.trainer.model.eval()
        try:
            chain = self.trainer.rollout_chain(self.pool.take(clips), knobs, self.n_chunks, seeds)
        finally:
            self.trainer.model.train(was_training)
        return ChainGroup(clips, seeds, knobs, chain)

    def refresh(self, gen: torch.Generator) -> None:
        """Every group regenerated from fresh clips, seeds and window lengths."""
        groups = []
        for _ in range(self.n_groups):
            clips = torch.randint(len(self.pool), (self.group,), generator=gen)
            seeds = [int(s) for s in torch.randint(2**62, (self.group,), generator=gen)]
            groups.append(self.generate(clips, seeds, random_window(self.knobs, self.windows, gen).window_frames))
        self.groups = groups

    def sample(self, gen: torch.Generator) -> Sample:
        """A training batch: one group at one chunk, its own context or (teacher forced) the truth."""
        if not self.groups:
            raise RuntimeError("refresh() the buffer before sampling")
        g = self.groups[int(torch.randint(len(self.groups), (1,), generator=gen))]
        c = g.knobs.chunk_frames
        teacher = float(torch.rand(1, generator=gen)) < self.teacher_forced
        # The chain's chunks are contexts for chunks 1..n; teacher forcing also trains chunk 0.
        chunk = int(torch.randint(0 if teacher else 1, self.n_chunks + 1, (1,), generator=gen))
        plan = ChunkPlan.as_engine(chunk * c, g.knobs)
        return Sample(self.pool.take(g.clips), plan, None if teacher else g.chain.context(chunk, c))
