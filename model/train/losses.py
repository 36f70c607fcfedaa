"""Training losses: VAE reconstruction, and the DiT's clean-frame loss with region weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.timeline import frames_of_latent


def latent_weight(weight: Tensor, start: int, n_latents: int, spatial: int = 8, temporal_stride: int = 4) -> Tensor:
    """Pixel loss weights (B, 1, frames, H, W) -> latent-grid weights (B, 1, n, H/8, W/8).

    Each latent cell takes the largest weight of the pixels and video frames it covers
    (`model.timeline.frames_of_latent`), so the mouth region keeps its weight after the
    8x8x4 reduction.
    """
    B, _, T, H, W = weight.shape
    out = []
    for f in range(start, start + n_latents):
        frames = frames_of_latent(f, temporal_stride)
        w = weight[:, :, frames.start:min(T, frames.stop)].amax(dim=2)  # (B, 1, H, W)
        out.append(F.max_pool2d(w, spatial))
    return torch.stack(out, dim=2)


def x0_loss(x0_pred: Tensor, x0: Tensor, weight: Tensor) -> Tensor:
    """Unweighted-in-time clean-frame MSE (no velocity weighting, which would favour low
    noise), spatially weighted toward mouth and eyes. weight broadcasts over channels."""
    return ((x0_pred - x0) ** 2 * weight).sum() / (weight.sum() * x0.shape[1]).clamp_min(1e-8)


def vae_loss(recon: Tensor, frames: Tensor, weight: Tensor, mean: Tensor, logvar: Tensor,
             kl_weight: float = 1e-6) -> dict[str, Tensor]:
    """L1 + L2 reconstruction weighted by region, plus a small KL to keep the latent tame."""
    err = recon - frames
    rec = ((err.abs() + err ** 2) * weight).sum() / (weight.sum() * frames.shape[1])
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return {"loss": rec + kl_weight * kl, "rec": rec.detach(), "kl": kl.detach()}


def temporal_loss(recon: Tensor, frames: Tensor, weight: Tensor) -> Tensor:
    """L1 between decoded and true frame-to-frame differences (B, 3, T, H, W), weighted by
    region as the reconstruction loss: penalises flicker that the per-frame loss tolerates."""
    w = weight[:, :, 1:]
    err = (recon[:, :, 1:] - recon[:, :, :-1]) - (frames[:, :, 1:] - frames[:, :, :-1])
    return (err.abs() * w).sum() / (w.sum() * frames.shape[1])
