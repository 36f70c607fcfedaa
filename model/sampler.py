"""Rectified-flow / flow-matching schedule and few-step Euler sampling (pure functions).

Convention (Wan): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the
velocity v = noise - x0 at timestep t = sigma * num_train_timesteps.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Timestep shift toward high noise (shift > 1), as in SD3/Wan."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def get_sigmas(steps: int, shift: float) -> Tensor:
    """(steps + 1,) noise levels from 1 down to 0, shifted. float64 for exactness."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigma(base, shift)


def to_x0(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Clean estimate from a noisy sample and the velocity."""
    return x - sigma * v


def denoise(velocity: Callable[[Tensor, float], Tensor], x: Tensor, sigmas: Tensor,
            on_last: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Euler integration of the flow from sigmas[0] to sigmas[-1] (= 0).

    velocity(x, sigma) -> v. `on_last(x0)` may edit the clean estimate of the final step
    (the engine fuses knot frames there). Returns the clean sample.
    """
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, s)
        if s_next == 0.0:
            x0 = to_x0(x, v, s)
            return on_last(x0) if on_last is not None else x0
        x = x + (s_next - s) * v
    return x
