"""Model families are recipes: what a family's chunk step is, behind one small interface.

A recipe decides, for its family: the chunk geometry (`span`: which latents a step
denoises and which video frames it returns), what a stream caches and carries between
steps (its state: one reference frame's K/V and a sliding window for Knot Forcing; N sink
frames plus a rolling window for LiveTalk; motion latents for FlashHead), the condition
layout and driving tokens (`plan`), the sampler (`denoise`: Euler here; x0 plus fresh noise
for LiveTalk), and what happens once the frames are decoded (`write`: the clean re-pass
into the window here and in LiveTalk; re-encoding the last decoded frames into motion
latents for FlashHead). `forget_from` drops what was predicted with driving that changed
(barge-in); `snapshot`/`restore` let a stream step back over whole steps.

`model/engine.py`'s `Stream` is generic over the recipe: it owns the VAE decoder, the
noise generator, the seam blend, history and aborts, and calls these methods in this
order for every batch of streams with the same `batch_key`:

    plan (per stream) -> denoise (batched) -> finish (per stream) -> decode (blend_frames) -> write (batched)

The model file's config names the recipe (`ModelConfig.recipe`); `RECIPES` maps the name to
its class. A new family is a new entry here and a new module, never a branch in `Stream`.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, TypeVar

import torch
from torch import Tensor

from model.avatar import AvatarModel
from model.config import StreamKnobs
from model.knot_forcing import KnotForcing
from model.timeline import StepInput, StepSpan
from model.wan.flashhead import FlashHead
from model.wan.livetalk import LiveTalk

State = TypeVar("State")
Plan = TypeVar("Plan")
Snapshot = TypeVar("Snapshot")


class Recipe(Protocol[State, Plan, Snapshot]):
    name: str

    def start(self, reference_latent: Tensor, knobs: StreamKnobs, reference_video: Tensor | None = None) -> State:
        """A new stream's state from the portrait's latent (1, z, 1, h, w) (and the portrait
        itself, (1, 3, 1, H, W) in [-1, 1], for a family that encodes it otherwise)."""

    def span(self, state: State, knobs: StreamKnobs) -> StepSpan:
        """The next step's frames and driving on the stream's timeline."""

    def batch_key(self, knobs: StreamKnobs) -> tuple:
        """Streams with equal keys (and denoising steps) can be denoised in one batch."""

    def plan(self, state: State, knobs: StreamKnobs, inp: StepInput, generator: torch.Generator) -> Plan:
        """One stream's chunk inputs (positions, condition, driving tokens, noise)."""

    def denoise(self, states: Sequence[State], plans: Sequence[Plan], knobs: StreamKnobs, steps: int,
                before_pass: Callable[[], None]) -> Tensor:
        """The batched sampler: every stream's clean chunk latents; `before_pass()` before each model pass."""

    def finish(self, state: State, knobs: StreamKnobs, x0: Tensor) -> Tensor:
        """One stream's clean latents -> the latents it commits (decoded and cached)."""

    def blend_frames(self, state: State, plan: Plan, first_frame: int, n: int) -> Tensor | None:
        """Per-frame images (1, n, 3, H, W) the reference decoder's blend copies from for video
        frames [first_frame, first_frame + n) of the planned chunk; None: the still portrait."""

    def write(self, states: Sequence[State], plans: Sequence[Plan], knobs: StreamKnobs, committed: Tensor,
              decoded: Sequence[Tensor]) -> None:
        """After the decode: update every stream's caches for its next step and advance it.
        decoded[i]: stream i's frames (1, 3, n, H, W) in [-1, 1] (what a family that
        re-encodes its last frames, as FlashHead's motion latents, reads)."""

    def forget_from(self, state: State, frame: int) -> None:
        """The driving changed from video frame `frame` on: drop predictions made with the old one."""

    def snapshot(self, state: State, knobs: StreamKnobs) -> Snapshot:
        """The state before a step; `restore` takes the newest snapshot not yet restored."""

    def restore(self, state: State, snap: Snapshot) -> None: ...

    def cache_nbytes(self, state: State) -> int: ...


RECIPES: dict[str, type] = {KnotForcing.name: KnotForcing, LiveTalk.name: LiveTalk, FlashHead.name: FlashHead}


def recipe_for(model: AvatarModel, device: torch.device, dtype: torch.dtype) -> Recipe:
    name = model.config.recipe
    if name not in RECIPES:
        raise ValueError(f"model {model.config.name!r} names recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name](model, device, dtype)
