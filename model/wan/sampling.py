"""The photoreal families' few-step samplers: noise levels, and the x0 + fresh-noise step.

Both released models were distilled to 4 steps and sample the same way (not Euler):

    x0 = x_t - sigma * v                           (the model predicts v = noise - x0)
    x_next = (1 - sigma_next) * x0 + sigma_next * fresh_noise

Their noise levels differ only in how a step count other than 4 is spread, and in where
bfloat16 rounding happens in their (bfloat16) pipelines, which the recipes reproduce on any
device and dtype because the models were distilled that way:

- LiveTalk: sigmas from FlowMatchScheduler(shift, extra_one_step): linspace(1, 0, n + 1)
  without its last entry, shifted. The model's timestep input is rounded to bfloat16
  (937.5 -> 936, 833.3 -> 832, 625 -> 624); the x0 and renoise steps use the float32
  sigma itself.
- FlashHead: timesteps [1000, 500] (2 steps), [1000, 750, 500, 250] (4), otherwise
  linspace(1000, 1, n); shifted. Both the model's timestep input and the sigmas of its
  update are rounded to bfloat16 (its pipeline casts both to the model dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def shifted(sigma: Tensor, shift: float) -> Tensor:
    """Timestep shift toward high noise, as Wan and both families: s * u / (1 + (s - 1) * u)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def to_bf16(values: Tensor) -> Tensor:
    """float32 values rounded to the nearest bfloat16 (what a bfloat16 pipeline feeds its model)."""
    return values.to(torch.bfloat16).to(torch.float32)


def livetalk_sigmas(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    """(sigmas, model timesteps), each (steps,) float32: LiveTalk's noise levels and what its
    model is given (the bfloat16-rounded timestep)."""
    _check(steps)
    sigmas = shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1], shift)
    return sigmas, to_bf16(sigmas * NUM_TRAIN_TIMESTEPS)


def flashhead_sigmas(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    """(sigmas, model timesteps), each (steps,) float32, both bfloat16-rounded as in FlashHead."""
    _check(steps)
    fixed = {2: [1000.0, 500.0], 4: [1000.0, 750.0, 500.0, 250.0]}
    if steps in fixed:
        t = torch.tensor(fixed[steps], dtype=torch.float32)
    else:
        t = torch.linspace(NUM_TRAIN_TIMESTEPS, 1.0, steps, dtype=torch.float32)
    t = shifted(t / NUM_TRAIN_TIMESTEPS, shift) * NUM_TRAIN_TIMESTEPS
    return to_bf16(t / NUM_TRAIN_TIMESTEPS), to_bf16(t)


def _check(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def x0_from_velocity(x: Tensor, v: Tensor, sigma: float) -> Tensor:
    """Clean estimate, computed in float64 as LiveTalk's pipeline does, in x's dtype."""
    return (x.double() - sigma * v.double()).to(x.dtype)


def renoise(x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """x0 taken back to noise level `sigma` with fresh `noise` (float32 math, x0's dtype)."""
    return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)
