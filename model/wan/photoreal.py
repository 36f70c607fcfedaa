"""The photoreal families as engine models: `--model livetalk:DIR`, `flashhead:DIR`, `livetalk-random`.

`PhotorealModel` holds a family's parts (DiT, VAE, wav2vec2 encoder, LiveTalk's prompt
embedding) under the names the engine reads (`config`, `dit`, `vae`), with a `ModelConfig`
(`engine_config`) that tells the engine, the server and the session timeline what they
need: frame size and rate, the recipe (`livetalk` / `flashhead`, model/recipe.py), the
stream knobs, and the driving timeline (wav2vec2's audio context before each chunk).

Names this module serves:

    livetalk:DIR / flashhead:DIR     the user's downloaded files (model/wan/load.py lists them)
    livetalk-random, flashhead-random the real layouts, scaled down, random weights (CPU tests)
    livetalk-1.3b, flashhead-1.3b    the released geometry with random weights (speed runs)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from model.config import DrivingConfig, ModelConfig, SamplerConfig, StreamKnobs, VAEConfig
from model.timeline import Timeline
from model.wan.families import PRESETS, FamilyConfig, FamilyModel, random_family
from model.wan.motion import MotionChunkVAE

log = logging.getLogger("knotstream.photoreal")

FAMILIES = ("livetalk", "flashhead")
SHIFT = 5.0  # both families sample with Wan's timestep shift 5 (their inference configs)


def engine_config(fam: FamilyConfig) -> ModelConfig:
    """The engine's view of a family: geometry, recipe, stream knobs and driving timeline.

    The timeline's audio context is wav2vec2's (`audio_context_s` before a chunk), its hop
    one video frame (a step's audio starts on a frame), so the session timeline hands each
    step all the audio its recipe encodes. Knots and running ahead are off (the families'
    own loops have neither); rebasing keeps LiveTalk's positions small on endless streams."""
    ts = fam.vae.temporal_stride
    driving = DrivingConfig(sample_rate=fam.sample_rate, hop_length=fam.sample_rate // fam.fps,
                            audio_context_frames=round(fam.audio_context_s * fam.fps),
                            lookahead_frames=fam.audio_lookahead_frames)
    vae = VAEConfig(z_channels=fam.vae.z_dim, base_channels=fam.vae.base_dim, channel_mults=fam.vae.dim_mult,
                    temporal_stride=ts, spatial_stride=fam.vae.spatial_stride,
                    latent_mean=fam.vae.latents_mean, latent_std=fam.vae.latents_std)
    knobs = StreamKnobs(chunk_frames=fam.chunk_frames, window_frames=fam.window_frames, knot_frames=0,
                        ahead_frames=0, denoise_steps=4, rewind_denoise_steps=0, shift=SHIFT)
    return ModelConfig(name=fam.name, dit=fam.dit, vae=vae, driving=driving, sampler=SamplerConfig(shift=SHIFT),
                       stream=knobs, height=fam.height, width=fam.width, fps=fam.fps, reference_hint=False,
                       domain="photoreal", recipe=fam.family)


class PhotorealModel(nn.Module):
    """A family's parts as the engine reads them: `config`, `dit`, `vae` (`encode`,
    `stream_decoder`), plus `family`, `audio` (wav2vec2 + its feature recipe), `prompt`."""

    def __init__(self, bundle: FamilyModel):
        super().__init__()
        self.family: FamilyConfig = bundle.config
        self.config = engine_config(self.family)
        self.dit = bundle.dit
        if self.family.family == "flashhead":
            self.vae = MotionChunkVAE(bundle.vae, self.family.motion_latents, self.family.colour_strength)
        else:
            self.vae = bundle.vae
        self.audio = bundle.audio
        self.wav2vec = bundle.audio.model  # a child, so .to() moves it with the rest
        self.register_buffer("prompt", bundle.prompt, persistent=False)

    @property
    def wan_vae(self):
        """The Wan2.1 VAE itself (FlashHead's is wrapped in its chunk decoding)."""
        return self.vae.wan if isinstance(self.vae, MotionChunkVAE) else self.vae

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.family.wav2vec_float32:  # the family's own precision for its audio encoder
            self.wav2vec.float()
        return self


class PhotorealRecipe:
    """What each photoreal recipe (model/wan/livetalk.py, model/wan/flashhead.py) holds: the
    loaded `PhotorealModel`, its engine config and family config, the timeline, device, dtype."""

    def __init__(self, model: PhotorealModel, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.cfg = model.config
        self.family = model.family
        self.timeline = Timeline.of(self.cfg)
        self.device, self.dtype = device, dtype


def is_photoreal(name: str) -> bool:
    """Whether `name` is served by this module (a family folder spec or a family preset)."""
    return name in PRESETS or (":" in name and name.partition(":")[0] in FAMILIES)


def check_photoreal(name: str) -> None:
    """Raise what loading `name` would raise for a missing package or file, without loading
    weights: ImportError without transformers, FileNotFoundError naming each missing file."""
    from model.wan.audio import require_transformers
    from model.wan.load import FLASHHEAD_FILES, LIVETALK_FILES
    from model.wan.checkpoints import check_files

    require_transformers()
    if name in PRESETS:
        return
    family, _, root = name.partition(":")
    if family not in FAMILIES or not root:
        raise ValueError(f"model {name!r}: expected livetalk:DIR, flashhead:DIR or one of {sorted(PRESETS)}")
    check_files(root, LIVETALK_FILES if family == "livetalk" else FLASHHEAD_FILES)


def load_photoreal(name: str, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[PhotorealModel, bool]:
    """(model, trained) for a name `is_photoreal` accepts. Presets get seeded random weights."""
    from model.wan.load import load_family

    check_photoreal(name)
    if name in PRESETS:
        log.warning("%s: seeded random weights (untrained): the real layout, for tests and speed runs", name)
        return PhotorealModel(random_family(name, device=device, dtype=dtype)), False
    return PhotorealModel(load_family(name, device=device, dtype=dtype)), True

