"""Geometry of the photoreal families, one preset table, and the model bundle a recipe uses.

`livetalk-1.3b` / `flashhead-1.3b` are the released geometries (weights: the user's
downloaded files, `model.wan.checkpoints.load_family`). `livetalk-random` /
`flashhead-random` keep every layout (channels, layer roles, audio windows) but scale
widths and depth down, with random weights: they run on a CPU in tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.config import DiTConfig
from model.wan.audio import AudioLayout, StreamingWav2Vec, Wav2VecDriving, require_transformers
from model.wan.dit import FlashHeadDiT, LiveTalkDiT
from model.wan.vae import WanVAE, WanVAEConfig

# wav2vec2-base-960h: 12 transformer layers of width 768 (its own config.json says so).
WAV2VEC2_BASE = dict(hidden_size=768, num_hidden_layers=12)
# A wav2vec2 with base's CNN (50 Hz from 16 kHz) and a tiny transformer, for random presets.
WAV2VEC2_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                     num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


@dataclass
class FamilyConfig:
    """One family's geometry (DiT, VAE, wav2vec2, audio projections) and its video size/rate."""

    name: str
    family: str  # "livetalk" | "flashhead"
    dit: DiTConfig
    vae: WanVAEConfig = field(default_factory=WanVAEConfig)
    # Wav2Vec2Config fields of the driving encoder (a real folder's config.json overrides).
    wav2vec: dict = field(default_factory=lambda: dict(WAV2VEC2_BASE))
    height: int = 512
    width: int = 512
    fps: int = 16
    sample_rate: int = 16000
    text_len: int = 512          # LiveTalk: prompt tokens, zero-padded (Wan's text_len)
    audio_pack_hidden: int = 32  # LiveTalk: AudioPack width
    audio_tokens: int = 32       # FlashHead: audio tokens per latent frame
    audio_intermediate: int = 512  # FlashHead: audio_proj width
    # Streaming wav2vec2 window (docs/models.md): audio before a chunk, and video frames of
    # audio after it. 8 s and 0 are FlashHead's own streaming buffer; not yet measured with
    # the trained wav2vec2 (bench/wav2vec_context.py --weights DIR does).
    audio_context_s: float = 8.0
    audio_lookahead_frames: int = 0
    # The chunk loop (model/wan/livetalk.py, model/wan/flashhead.py): new latent frames per
    # chunk; LiveTalk's pinned sink frames and rolling window of earlier frames (its KV
    # cache of 15 = 9 sink + 3 window + the 3 of the chunk); FlashHead's motion latents and
    # the strength of its colour correction.
    chunk_frames: int = 3
    window_frames: int = 3
    sink_frames: int = 9
    motion_latents: int = 2
    colour_strength: float = 1.0
    # FlashHead runs wav2vec2 in float32 whatever the DiT's dtype; LiveTalk in the DiT's.
    wav2vec_float32: bool = False

    def __post_init__(self) -> None:
        AudioLayout(self.family, self.fps, self.sample_rate)  # validates the family and the rates
        s = self.vae.spatial_stride * self.dit.patch_size[1]
        if self.height % s or self.width % s:
            raise ValueError(f"{self.name}: {self.height}x{self.width} is not a multiple of {s}")

    @property
    def audio_layout(self) -> AudioLayout:
        return AudioLayout(self.family, self.fps, self.sample_rate)

    @property
    def audio_layers(self) -> int:
        """Feature vectors per video frame: LiveTalk last_hidden_state + all hidden states, FlashHead 1..n."""
        n = self.wav2vec["num_hidden_layers"]
        return n + 2 if self.family == "livetalk" else n

    @property
    def audio_hidden(self) -> int:
        return self.wav2vec["hidden_size"]

    def audio_stream(self, encoder: Wav2VecDriving) -> StreamingWav2Vec:
        return encoder.stream(round(self.audio_context_s * self.fps), self.audio_lookahead_frames)

    def wav2vec_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The audio encoder's dtype for a model in `dtype` (FlashHead keeps float32)."""
        return torch.float32 if self.wav2vec_float32 else dtype

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae.spatial_stride, self.width // self.vae.spatial_stride

    def replace(self, **changes) -> "FamilyConfig":
        return dataclasses.replace(self, **changes)


def build_dit(cfg: FamilyConfig) -> LiveTalkDiT | FlashHeadDiT:
    """The family's DiT, initialised as its __init__ does (build under torch.device('meta')
    to skip that before loading weights)."""
    if cfg.family == "livetalk":
        return LiveTalkDiT(cfg.dit, audio_in=4 * cfg.audio_layers * cfg.audio_hidden,
                           audio_hidden=cfg.audio_pack_hidden)
    return FlashHeadDiT(cfg.dit, cfg.audio_layers, cfg.audio_hidden, cfg.audio_tokens, cfg.audio_intermediate)


def _wan13b(**changes) -> DiTConfig:
    return DiTConfig(**{**dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, latent_channels=16), **changes})


def _livetalk() -> FamilyConfig:
    return FamilyConfig("livetalk-1.3b", "livetalk", _wan13b(text_dim=4096, drive_dim=0, cond_mask_channels=1), fps=16)


def _flashhead() -> FamilyConfig:
    # No text cross-attention, so no norm3 (its name belongs to FlashHead's audio attention).
    dit = _wan13b(text_dim=0, drive_dim=1536, cond_mask_channels=0, cross_attn_norm=False)
    return FamilyConfig("flashhead-1.3b", "flashhead", dit, fps=25, chunk_frames=7, window_frames=0,
                        wav2vec_float32=True)


_TINY_VAE = WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


def _livetalk_random() -> FamilyConfig:
    # Real layout: 33 channels, text cross-attention, audio added before blocks 2..L/2.
    dit = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=6, freq_dim=32, text_dim=32, drive_dim=0,
                    cond_mask_channels=1, latent_channels=16)
    return FamilyConfig("livetalk-random", "livetalk", dit, vae=_TINY_VAE, wav2vec=dict(WAV2VEC2_TINY),
                        height=64, width=64, fps=16, text_len=16, audio_pack_hidden=8)


def _flashhead_random() -> FamilyConfig:
    dit = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=4, freq_dim=32, text_dim=0, drive_dim=64,
                    cond_mask_channels=0, latent_channels=16, cross_attn_norm=False)
    return FamilyConfig("flashhead-random", "flashhead", dit, vae=_TINY_VAE, wav2vec=dict(WAV2VEC2_TINY),
                        height=64, width=64, fps=25, audio_tokens=4, audio_intermediate=32, chunk_frames=7,
                        window_frames=0, wav2vec_float32=True)


PRESETS = {"livetalk-1.3b": _livetalk, "flashhead-1.3b": _flashhead,
           "livetalk-random": _livetalk_random, "flashhead-random": _flashhead_random}


def family_config(name: str) -> FamilyConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown photoreal preset {name!r}; choose from {sorted(PRESETS)}") from None


@dataclass
class FamilyModel:
    """Everything a family's recipe calls: the DiT, the VAE, the driving encoder, and
    (LiveTalk) the prompt embedding (1, text_len, text_dim)."""

    config: FamilyConfig
    dit: LiveTalkDiT | FlashHeadDiT
    vae: WanVAE
    audio: Wav2VecDriving
    prompt: Tensor | None = None


def random_family(name: str, seed: int = 0, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> FamilyModel:
    """A preset with random weights (seeded): the real layout, for tests and speed runs."""
    cfg = family_config(name)
    transformers = require_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit, vae = build_dit(cfg), WanVAE(cfg.vae)
        for block in dit.blocks:  # the DiT zero-inits drive_attn's output for converted Wan files
            if block.drive_attn is not None:
                block.drive_attn.o.reset_parameters()
        wav2vec = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**cfg.wav2vec))
        prompt = None
        if cfg.family == "livetalk":
            prompt = torch.zeros(1, cfg.text_len, cfg.dit.text_dim)
            prompt[:, :cfg.text_len // 4] = torch.randn(1, cfg.text_len // 4, cfg.dit.text_dim)
    to = dict(device=device, dtype=dtype)
    return FamilyModel(cfg, dit.to(**to).eval(), vae.to(**to).eval(),
                       Wav2VecDriving(wav2vec.to(device=device, dtype=cfg.wav2vec_dtype(dtype)), cfg.audio_layout),
                       None if prompt is None else prompt.to(**to))
