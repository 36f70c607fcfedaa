"""Configuration of the model and of a stream: one dataclass per part, presets in one table.

Every knob of the Knot Forcing recipe lives in `StreamKnobs`, which is chosen per stream
(per session, per evaluation run) so the paper's ablations can be reproduced without
touching code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


# Per-video-frame motion/expression driving, in this order. Pose angles are in radians
# (yaw left/right, pitch up/down, roll tilt); blink 0 open .. 1 closed; gaze in [-1, 1]
# (x right, y down); mouth_open/mouth_wide/smile/brow in [0, 1] (brow: 0.5 neutral).
# The driving vector carries each value plus a "given" flag (1 = set by the client), so
# "not given" (the model chooses, e.g. idle motion or lips from audio) differs from 0.
# head_x, head_y, head_scale: where the head sits in the frame relative to its rest place
# (the centre of the crop that follows it smoothly): offset in frame widths (x right, y
# down) and log size ratio. A personal avatar's portrait warp moves the face by them (a real
# head jitters in its smoothed crop by a few tenths of a pixel, docs/benchmarks.md); the
# cartoon world never moves the head in its frame, so the bundled model ignores them.
MOTION_FIELDS = ("yaw", "pitch", "roll", "blink", "gaze_x", "gaze_y",
                 "mouth_open", "mouth_wide", "smile", "brow", "head_x", "head_y", "head_scale")
HEAD_FIELDS = ("head_x", "head_y", "head_scale")
# The fields of files written before the head fields (2026-12-02): their motion encoder and
# portrait warp are widened on load with zero weights for the new fields (model/weights.py).
LEGACY_MOTION_FIELDS = MOTION_FIELDS[:10]
MAX_TORSO_POINTS = 16  # ModelConfig.warp_torso: a model file's value sizes a buffer

# What a model's weights were trained on: the procedural cartoon heads of model/train/world.py,
# real video (photoreal checkpoints), or one person's clip (a personal avatar).
TRAINING_DOMAINS = ("cartoon", "photoreal", "personal")


@dataclass
class VAEConfig:
    """Causal video VAE: temporal x`temporal_stride` (first frame alone), spatial x`spatial_stride`."""

    z_channels: int = 16
    base_channels: int = 32
    # Channel multiplier per resolution level, from full resolution down.
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    temporal_stride: int = 4
    spatial_stride: int = 8
    # Per-channel latent normalisation, filled in after VAE training (Wan keeps these too).
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None
    # Decoder sees the reference portrait (features added at every level, plus a learned
    # per-pixel blend with the reference at full resolution): what does not move is copied
    # instead of re-drawn from the latent every frame. Trained by `knotstream train --stage
    # decoder --reference-decoder`; the encoder and the latent space are unchanged.
    reference_decoder: bool = False


@dataclass
class DrivingConfig:
    """Driving encoders: audio (log-mel) and motion vectors -> per-video-frame tokens."""

    sample_rate: int = 16000
    n_mels: int = 80
    hop_length: int = 160  # 10 ms mel hop at 16 kHz
    n_fft: int = 400
    # Mel frames of context each video frame sees: `audio_context_frames` video frames
    # before it, itself, and `lookahead_frames` after it.
    audio_context_frames: int = 2
    lookahead_frames: int = 1
    # Motion vector layout (see model/driving.py MOTION_FIELDS): pose, blinks, gaze,
    # mouth/expression, each with a "given" flag so absent fields differ from zero.
    motion_dim: int = 2 * len(MOTION_FIELDS)
    hidden: int = 256
    tokens_per_frame: int = 2  # one audio token + one motion token per video frame


@dataclass
class DiTConfig:
    """Wan2.1-compatible causal DiT geometry."""

    latent_channels: int = 16
    # Image-to-video condition channels concatenated to the noisy latent: a mask
    # (`cond_mask_channels`) plus the condition latent (`latent_channels`). Wan I2V uses
    # 4 mask channels (one per frame of the temporal stride); we do the same.
    cond_mask_channels: int = 4
    dim: int = 256
    ffn_dim: int = 1024
    num_heads: int = 4
    num_layers: int = 8
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    # Text cross-attention context width (umT5 4096 for Wan); 0 = no text cross-attention.
    text_dim: int = 0
    # Driving cross-attention width; 0 = no driving cross-attention.
    drive_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    cross_attn_norm: bool = True

    in_channels: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        self.head_dim = self.dim // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        self.in_channels = self.latent_channels + self.cond_mask_channels + self.latent_channels


@dataclass
class SamplerConfig:
    """Flow-matching schedule the model was trained with (the steps a stream runs are `StreamKnobs`)."""

    # Training noise levels are shifted toward high noise by this (model/train/chunks.py).
    shift: float = 5.0
    # Training runs on 1000 discrete timesteps, as Wan; the model sees t in [0, 1000].
    num_train_timesteps: int = 1000


def _is_number(v, integer: bool) -> bool:
    if isinstance(v, bool):
        return False
    if integer:
        return isinstance(v, int)
    return isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class StreamKnobs:
    """Per-stream knobs of the chunk loop; all in latent frames unless named otherwise."""

    chunk_frames: int = 2
    window_frames: int = 6
    knot_frames: int = 1
    # Reference temporal coordinate is kept this many frames ahead of the end of the
    # current chunk (running ahead). 0 turns running ahead off: the reference stays at
    # temporal position 0 and frames start at position 1.
    ahead_frames: int = 4
    denoise_steps: int = 4
    # Steps of the one chunk regenerated after a rewind (barge-in): it stands between the
    # viewer and a closed mouth, so it is made faster. 0 = denoise_steps.
    rewind_denoise_steps: int = 1
    shift: float = 5.0
    # Absolute positions are rebased once they exceed this many frames.
    rebase_every: int = 1024
    # Weight of the previous chunk's prediction when fusing knot frames (0.5 = average).
    knot_fusion: float = 0.5
    # Fraction of the picture's jump into each latent frame spread over that latent's 4
    # video frames (model/seams.py): a small decoder moves in steps at latent borders.
    # 0 = off (frames as decoded).
    seam_blend: float = 0.0

    def __post_init__(self) -> None:
        # Integers size caches and loops: 2.5 or True must never get that far. Floats are finite.
        wrong = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if not _is_number(getattr(self, f.name), integer=f.type in ("int", int))]
        if wrong:
            raise ValueError(f"invalid stream knobs (integers must be int, numbers finite): {', '.join(wrong)}")
        checks = {
            "chunk_frames": self.chunk_frames >= 1,
            "window_frames": self.window_frames >= 0,
            "knot_frames": 0 <= self.knot_frames <= self.chunk_frames,
            "ahead_frames": self.ahead_frames >= 0,
            "denoise_steps": 1 <= self.denoise_steps <= 100,
            "rewind_denoise_steps": 0 <= self.rewind_denoise_steps <= 100,
            "shift": self.shift > 0,
            "rebase_every": self.rebase_every >= 16,
            "knot_fusion": 0.0 <= self.knot_fusion <= 1.0,
            "seam_blend": 0.0 <= self.seam_blend <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid stream knobs: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    def replace(self, **changes) -> "StreamKnobs":
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig:
    """Everything needed to build a model, plus the stream defaults it was trained for."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    driving: DrivingConfig
    sampler: SamplerConfig
    stream: StreamKnobs
    height: int = 128
    width: int = 128
    fps: int = 25
    # Give every frame the reference latent in the condition channels (mask 0; knot
    # frames carry their knot latent with mask 1). A copy shortcut that lets a small
    # model start from "repeat the reference" (see research/training-feasibility.md);
    # off for Wan checkpoints, whose I2V condition is zero outside given frames.
    reference_hint: bool = True
    # What the weights were trained on (TRAINING_DOMAINS): the server tells a client whose
    # uploaded photo the model has never seen the like of (server/notices.py).
    domain: str = "cartoon"
    # The model family's chunk step (model/recipe.py RECIPES).
    recipe: str = "knot-forcing"
    # Personal avatars: speech drives the mouth through the motion fields, with these
    # (mouth_open, mouth_wide) gains, wherever a session gives no mouth of its own
    # (model/personal/speech_mouth.py). None: the mouth comes from the model's audio path.
    speech_mouth: tuple[float, float] | None = None
    # Personal avatars: the number of face-mesh landmarks of the portrait warp the model
    # carries (model/motion_warp.py: the DiT's condition and the decoder's blend copy from
    # the portrait warped onto each frame's motion). 0: no warp, the still portrait.
    motion_warp: int = 0
    # Personal avatars with a warp: which of its landmarks ring the mouth, and the offsets
    # added to the decoder blend's logit outside / inside the box around them (calibrated
    # at the end of the fit, model/personal/blend_calibration.py). (0, 0): as trained.
    warp_mouth: tuple[int, ...] = ()
    warp_blend: tuple[float, float] = (0.0, 0.0)
    # Personal avatars with a warp: warp onto the landmarks the motion predicts (True), or onto
    # the portrait's landmarks moved by the prediction's change from the portrait's motion
    # (False, the avatars fitted before 2026-12-02; model/motion_warp.py).
    warp_absolute: bool = False
    # Personal avatars with a warp: the (upper, lower) inner-lip landmarks whose gap is the
    # mouth's opening, when the model carries a second, open-mouth portrait that the warp
    # takes the mouth from as the motion opens it (model/motion_warp.py); (): none.
    warp_open: tuple[int, ...] = ()
    # Personal avatars with a warp: how many points along a line below the chin carry the
    # body's displacement, regressed on the motion (model/motion_warp.py, set_torso); 0: the
    # body stays where the portrait has it (the avatars fitted before 2026-12-03).
    warp_torso: int = 0

    def __post_init__(self) -> None:
        if self.domain not in TRAINING_DOMAINS:
            raise ValueError(f"{self.name}: domain must be one of {TRAINING_DOMAINS}, got {self.domain!r}")
        s = self.vae.spatial_stride * self.dit.patch_size[1]
        if self.height % s or self.width % s:
            raise ValueError(f"{self.name}: {self.height}x{self.width} is not a multiple of {s}")
        if self.dit.latent_channels != self.vae.z_channels:
            raise ValueError("dit.latent_channels must equal vae.z_channels")
        if self.motion_warp and (self.height != self.width or self.motion_warp < 3 or not self.vae.reference_decoder):
            raise ValueError(f"{self.name}: motion_warp needs a square frame, >= 3 landmarks and the reference "
                             f"decoder, got {self.motion_warp} at {self.width}x{self.height}")
        self.warp_mouth = tuple(int(i) for i in self.warp_mouth)
        if any(not 0 <= i < self.motion_warp for i in self.warp_mouth):
            raise ValueError(f"{self.name}: warp_mouth indexes landmarks outside the warp's {self.motion_warp}")
        self.warp_open = tuple(int(i) for i in self.warp_open)
        if self.warp_open and (len(self.warp_open) != 2 or not self.warp_mouth
                               or any(not 0 <= i < self.motion_warp for i in self.warp_open)):
            raise ValueError(f"{self.name}: warp_open must be two of the warp's landmarks, with warp_mouth set, "
                             f"got {self.warp_open}")
        if not 0 <= self.warp_torso <= MAX_TORSO_POINTS or (self.warp_torso and not self.motion_warp):
            raise ValueError(f"{self.name}: warp_torso must be 0-{MAX_TORSO_POINTS} body points of a motion warp, "
                             f"got {self.warp_torso}")
        self.warp_blend = tuple(float(b) for b in self.warp_blend)
        if len(self.warp_blend) != 2 or not all(math.isfinite(b) for b in self.warp_blend):
            raise ValueError(f"{self.name}: warp_blend must be two finite logit offsets, got {self.warp_blend}")
        if self.speech_mouth is not None:
            self.speech_mouth = tuple(float(g) for g in self.speech_mouth)
            if len(self.speech_mouth) != 2 or not all(0 <= g <= 1 for g in self.speech_mouth):
                raise ValueError(f"{self.name}: speech_mouth must be two gains in [0, 1], got {self.speech_mouth}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae.spatial_stride, self.width // self.vae.spatial_stride

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.latent_hw
        return (h // self.dit.patch_size[1]) * (w // self.dit.patch_size[2])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind) if f.init}
            values = {k: v for k, v in values.items() if k not in _RETIRED_FIELDS.get(kind.__name__, ())}
            unknown = set(values) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
            return kind(**kw)

        return cls(
            name=d["name"],
            dit=build(DiTConfig, d["dit"]),
            vae=build(VAEConfig, d["vae"]),
            driving=build(DrivingConfig, _current_motion_dim(d["driving"])),
            sampler=build(SamplerConfig, d["sampler"]),
            stream=build(StreamKnobs, d["stream"]),
            height=d.get("height", 128),
            width=d.get("width", 128),
            fps=d.get("fps", 25),
            reference_hint=d.get("reference_hint", True),
            # A file without the field is one of the project's own procedural-world models (the bundled tiny).
            domain=d.get("domain", "cartoon"),
            recipe=d.get("recipe", "knot-forcing"),
            speech_mouth=d.get("speech_mouth"),
            motion_warp=d.get("motion_warp", 0),
            warp_mouth=tuple(d.get("warp_mouth", ())),
            warp_blend=tuple(d.get("warp_blend", (0.0, 0.0))),
            warp_absolute=bool(d.get("warp_absolute", False)),
            warp_open=tuple(d.get("warp_open", ())),
            warp_torso=int(d.get("warp_torso", 0)),
        )


def motion_fields_read(config: "ModelConfig") -> tuple[str, ...]:
    """The motion fields a model with `config` moves anything with: a photoreal family is
    driven by audio (and its prompt) alone; a personal avatar's portrait warp reads every
    field; the models of the cartoon world read all but the head fields (its heads never
    move in their frame). A session tells its client what it ignores (streaming/messages.py)."""
    if config.domain == "photoreal":
        return ()
    if config.motion_warp:
        return MOTION_FIELDS
    return tuple(f for f in MOTION_FIELDS if f not in HEAD_FIELDS)


def _current_motion_dim(driving: dict) -> dict:
    """A stored DrivingConfig with the motion width of today's MOTION_FIELDS: a file of the
    10 legacy fields has its weights widened on load (model/weights.widen_motion_state)."""
    if driving.get("motion_dim") == 2 * len(LEGACY_MOTION_FIELDS):
        return {**driving, "motion_dim": 2 * len(MOTION_FIELDS)}
    return driving


# Fields older model files carry that no longer configure anything: the number of
# denoising steps is a stream knob (`StreamKnobs.denoise_steps`), read from "stream".
_RETIRED_FIELDS = {"SamplerConfig": ("denoise_steps",)}


def _tiny() -> ModelConfig:
    # Sized for real time on 2 CPU cores at 128x128, 25 fps: 64 tokens per latent frame, a
    # decoder of widths 32/64/128 (the full-resolution level is encoder-only). Measured
    # costs: docs/benchmarks.md.
    return ModelConfig(
        name="tiny",
        dit=DiTConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=6, drive_dim=256),
        vae=VAEConfig(z_channels=16, base_channels=32, channel_mults=(1, 1, 2, 4)),
        driving=DrivingConfig(hidden=256),
        sampler=SamplerConfig(shift=3.0),
        stream=StreamKnobs(chunk_frames=2, window_frames=6, knot_frames=1, ahead_frames=4,
                           denoise_steps=4, shift=3.0),
        height=128,
        width=128,
        fps=25,
    )


def _wan_1_3b() -> ModelConfig:
    # Wan2.1-T2V-1.3B geometry; 36 input channels as Wan I2V (16 noisy + 4 mask + 16 latent).
    return ModelConfig(
        name="wan-1.3b",
        dit=DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096,
                      drive_dim=1536, latent_channels=16, cond_mask_channels=4),
        vae=VAEConfig(z_channels=16, base_channels=96, channel_mults=(1, 2, 4, 4)),
        driving=DrivingConfig(hidden=1024),
        sampler=SamplerConfig(shift=5.0),
        stream=StreamKnobs(chunk_frames=3, window_frames=12, knot_frames=1, ahead_frames=4,
                           denoise_steps=4, shift=5.0),
        height=480,
        width=832,
        fps=16,
        reference_hint=False,
        domain="photoreal",
    )


PRESETS = {"tiny": _tiny, "wan-1.3b": _wan_1_3b}


def from_name(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
