"""The trained parts of an avatar model, held together: DiT, VAE and driving encoder (and a
personal avatar's portrait warp)."""

from __future__ import annotations

import torch
from torch import nn

from model.config import MOTION_FIELDS, ModelConfig
from model.dit import DiT
from model.driving import DrivingEncoder
from model.motion_warp import MotionWarp
from model.vae import CausalVAE


class AvatarModel(nn.Module):
    """`dit`, `vae` and `driving` of one `ModelConfig`; saved and loaded as one safetensors file."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dit = DiT(config.dit)
        self.vae = CausalVAE(config.vae)
        self.driving = DrivingEncoder(config.driving, config.dit.drive_dim)
        # A personal avatar's portrait warp (ModelConfig.motion_warp), else None.
        self.warp = (MotionWarp(config.motion_warp, len(MOTION_FIELDS), config.height, config.warp_absolute,
                                config.warp_mouth, config.warp_open, config.warp_torso)
                     if config.motion_warp else None)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> "AvatarModel":
        """Seeded random weights (the untrained fallback; benchmarks and shape tests use it)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)
