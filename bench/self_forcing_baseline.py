"""A Self-Forcing-style streaming baseline built from our DiT modules, for bench/gpu.py.

What it keeps from the usual autoregressive few-step recipe: chunk-wise few-step
denoising, a KV cache of the clean frames written by one extra pass at noise level 0,
the reference frame as the first cached frame, the same streaming VAE decode. What it
lacks, on purpose, is what knotstream adds: the cache only grows (dense block-causal
attention over every earlier frame: no sliding window, no ring buffer, no eviction), no
knots, no running-ahead reference, no fused kernel (one dense SDPA call per layer), no
graphs. Per-chunk cost therefore grows with the stream; ours stays flat.

The cache is preallocated once for `max_frames` latent frames and attention reads a
contiguous prefix of it (the chunk's keys are written in place first), so the baseline
does no concatenation copies: it is a fair, not a strawman, dense implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.avatar import AvatarModel
from model.config import StreamKnobs
from model.sampler import denoise, get_sigmas


class GrowingCache:
    """Keys/values of every cached frame, in order: (num_layers, B, H, max_frames * T, D) each."""

    def __init__(self, num_layers: int, heads: int, head_dim: int, tokens_per_frame: int, max_frames: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, 1, heads, max_frames * tokens_per_frame, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.tokens_per_frame = tokens_per_frame
        self.length = 0  # committed tokens

    @property
    def frames(self) -> int:
        return self.length // self.tokens_per_frame

    def commit(self, tokens: int) -> None:
        if self.length + tokens > self.k.shape[3]:
            raise RuntimeError(f"baseline cache full ({self.k.shape[3] // self.tokens_per_frame} frames)")
        self.length += tokens


@dataclass
class DenseBlockCausal:
    """Attention context: the chunk's queries over [all committed frames | the chunk itself].

    The chunk's keys/values are written right after the committed ones, so one SDPA call
    over a contiguous prefix sees everything; `write=True` (the clean pass) keeps them.
    """

    cache: GrowingCache

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, end = self.cache.length, self.cache.length + k.shape[2]
        if end > self.cache.k.shape[3]:
            raise RuntimeError("baseline cache full")
        self.cache.k[layer, :, :, n:end].copy_(k)
        self.cache.v[layer, :, :, n:end].copy_(v)
        return F.scaled_dot_product_attention(q, self.cache.k[layer, :, :, :end], self.cache.v[layer, :, :, :end])


class BaselineStream:
    """One stream of the baseline: `step()` returns (4c or 4c - 3, H, W, 3) uint8 like `Stream.step`."""

    def __init__(self, model: AvatarModel, reference: np.ndarray, knobs: StreamKnobs, max_chunks: int, seed: int,
                 device: torch.device, dtype: torch.dtype):
        cfg = model.config
        d = cfg.dit
        self.model, self.cfg, self.knobs = model, cfg, knobs
        self.device, self.dtype = device, dtype
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        T = cfg.tokens_per_frame
        self.cache = GrowingCache(d.num_layers, d.num_heads, d.head_dim, T, 1 + max_chunks * knobs.chunk_frames,
                                  dtype, device)
        self.next_pos = 1  # the reference sits at temporal position 0, frames follow it
        # Driving tokens of the same shape the engine feeds (their encoder cost is not the point).
        self.drive = torch.zeros(1, knobs.chunk_frames, 4 * cfg.driving.tokens_per_frame, d.drive_dim,
                                 device=device, dtype=dtype)
        with torch.inference_mode():
            image = torch.from_numpy(reference).to(device, dtype).permute(2, 0, 1)[None, :, None] / 127.5 - 1
            latent = model.vae.encode(image)  # (1, z, 1, h, w)
            self.decoder = model.vae.stream_decoder(reference=image)
            model.dit(latent, torch.zeros(1, 1, device=device, dtype=dtype), torch.zeros(1, dtype=torch.float64),
                      DenseBlockCausal(self.cache))
            self.cache.commit(T)

    @torch.inference_mode()
    def step(self) -> np.ndarray:
        c, m = self.knobs.chunk_frames, self.model
        z, (h, w) = self.cfg.vae.z_channels, self.cfg.latent_hw
        pos = torch.arange(c, dtype=torch.float64) + self.next_pos
        ctx = DenseBlockCausal(self.cache)

        def velocity(x: Tensor, sigma: float) -> Tensor:
            t = torch.full((1, c), sigma * self.cfg.sampler.num_train_timesteps, device=self.device, dtype=self.dtype)
            return m.dit(x, t, pos, ctx, drive=self.drive)

        noise = torch.randn(1, z, c, h, w, generator=self.generator).to(self.device, self.dtype)
        x0 = denoise(velocity, noise, get_sigmas(self.knobs.denoise_steps, self.knobs.shift))
        m.dit(x0, torch.zeros(1, c, device=self.device, dtype=self.dtype), pos, ctx, drive=self.drive)
        self.cache.commit(c * self.cfg.tokens_per_frame)
        self.next_pos += c
        frames = self.decoder.decode(x0)  # (1, 3, n, H, W) in [-1, 1]
        out = ((frames[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return out.permute(1, 2, 3, 0).cpu().numpy()
