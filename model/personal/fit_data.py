"""One person's prepared clip as training batches for the model's own training stages.

`PersonData.clips(batch, n_latents, gen)` answers what `model.train.data.TrainingData`
answers for the procedural world, so the bundled model's trainer (model/train/trainer.py:
the decoder stage, the DiT stage and its latent pool) fits a person without a copy of its
loops: random windows of the clip's fitting frames (`Prepared.fit_frames`; the rest stays
held out), the portrait as the reference, the clip's speech (silence when it has none),
the measured motion with every field given, and loss weights that favour the mouth and
the eyes (boxes from the real landmarks, weighted as the world's `region_weights`).

Given flags are dropped per clip and field group with `DROP_GIVEN` probability: a
session that sends no head pose (or no mouth) asks the model to choose, and a model that
only ever saw every field given would not know how.
"""

from __future__ import annotations

import numpy as np
import torch

from model.config import MOTION_FIELDS, ModelConfig
from model.timeline import Timeline

MOUTH_WEIGHT, EYE_WEIGHT = 4.0, 2.0   # as model.train.world.region_weights
EYE_MARGIN = 0.35                      # eye box margin, a share of the eye's width
DROP_GIVEN = 0.15
# Fields that come and go together in a session's motion messages.
GROUPS = (("yaw", "pitch", "roll"), ("blink", "gaze_x", "gaze_y"), ("mouth_open", "mouth_wide"), ("smile", "brow"),
          ("head_x", "head_y", "head_scale"))


def driving_motion(motion: np.ndarray) -> np.ndarray:
    """(T, fields) measured motion -> (T, 2 * fields) driving vectors, every field given."""
    return np.concatenate([motion, np.ones_like(motion)], axis=1).astype(np.float32)


def drop_groups(vectors: np.ndarray, rng: np.random.Generator, p: float = DROP_GIVEN) -> np.ndarray:
    """A copy of driving vectors (T, 2 * fields) with each field group "not given" (value and
    flag 0) with probability p."""
    out = vectors.copy()
    n = len(MOTION_FIELDS)
    for group in GROUPS:
        if rng.random() < p:
            idx = [MOTION_FIELDS.index(f) for f in group]
            out[:, idx] = 0.0
            out[:, [n + i for i in idx]] = 0.0
    return out


def region_weights(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(T, 478, 3) crop-pixel landmarks -> (T, size, size) float32 loss weights: 1, the eye
    boxes EYE_WEIGHT, the mouth box (evaluate.mouth_boxes, as the mouth PSNR) MOUTH_WEIGHT."""
    from model.personal import landmarks as L
    from model.personal.scoring import mouth_boxes

    w = np.ones((len(landmarks), size, size), np.float32)
    for t, pts in enumerate(landmarks):
        if not np.isfinite(pts).all():
            continue  # no face: the whole frame at weight 1
        for a, b in ((L.EYE_L_OUTER, L.EYE_L_INNER), (L.EYE_R_INNER, L.EYE_R_OUTER)):
            (x0, y0), (x1, y1) = pts[[a, b], :2].min(0), pts[[a, b], :2].max(0)
            m = EYE_MARGIN * (x1 - x0)
            box = [int(np.clip(v, 0, size)) for v in (x0 - m, y0 - 1.5 * m, x1 + m, y1 + 1.5 * m)]
            w[t, box[1]:box[3], box[0]:box[2]] = EYE_WEIGHT
    for t, (x0, y0, x1, y1) in enumerate(mouth_boxes(landmarks, size)):
        if np.isfinite(landmarks[t]).all():
            w[t, y0:y1, x0:x1] = MOUTH_WEIGHT
    return w


def _unit(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 images -> one float tensor in [-1, 1], channels last as given."""
    return torch.from_numpy(np.stack(images)).float().div(127.5).sub(1)


class PersonData:
    """Batches of one person's clip for the trainer's stages (see the module docstring).

    frames: the range of the prepared clip to draw from (default: its fitting frames)."""

    def __init__(self, prepared, config: ModelConfig, frames: slice | None = None, drop_given: float = DROP_GIVEN,
                 warp=None):
        from model.media import fit_portrait

        p = prepared
        if p.size != config.height or config.height != config.width:
            raise ValueError(f"the clip was prepared at {p.size} px, the model is {config.width}x{config.height}")
        if p.fps != config.fps or p.sample_rate != config.driving.sample_rate:
            raise ValueError(f"the clip was prepared at {p.fps} fps / {p.sample_rate} Hz, the model takes "
                             f"{config.fps} fps / {config.driving.sample_rate} Hz")
        rows = frames if frames is not None else slice(0, p.fit_frames)
        self.config = config
        self.timeline = Timeline.of(config)
        self.frames = p.frames[rows]
        self.landmarks = p.landmarks[rows]
        self.motion = driving_motion(p.motion[rows])
        first = rows.start or 0
        n_samples = self.timeline.sample_of(len(self.frames))
        self.audio = np.zeros(n_samples, np.float32)
        if p.audio is not None:
            part = p.audio[self.timeline.sample_of(first):][:n_samples]
            self.audio[:len(part)] = part
        self.has_speech = p.audio is not None
        self.reference = fit_portrait(p.portrait, config.height, config.width)
        self.drop_given = drop_given
        self.warp = warp  # the model's MotionWarp (model/motion_warp.py), or None

    def clip_frames(self, n_latents: int) -> int:
        return self.timeline.frames_for_latents(n_latents, first=True)

    def windows(self, n_latents: int) -> int:
        """How many distinct windows of n_latents the frames hold (ValueError when none)."""
        n = len(self.frames) - self.clip_frames(n_latents) + 1
        if n < 1:
            raise ValueError(f"the clip's {len(self.frames)} fitting frames are fewer than one training clip "
                             f"({self.clip_frames(n_latents)} frames): record a longer clip")
        return n

    def clips(self, batch: int, n_latents: int, gen: torch.Generator, held_out: bool = False):
        """`batch` random windows of `n_latents` latent frames as a `ClipBatch` (the world's
        `TrainingData.clips`); held_out is not supported (the held-out frames are the eval's)."""
        from model.train.chunks import ClipBatch

        if held_out:
            raise ValueError("PersonData has no held-out split: pass the held-out frames as their own PersonData")
        tl = self.timeline
        T = self.clip_frames(n_latents)
        starts = torch.randint(self.windows(n_latents), (batch,), generator=gen).tolist()
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
        extra = tl.sample_of(tl.lookahead_frames + tl.temporal_stride)  # audio the last frames' windows read
        n_audio = tl.sample_of(T) + extra
        frames, audio, motion, weight = [], [], [], []
        for s in starts:
            frames.append(self.frames[s:s + T])
            a = self.audio[tl.sample_of(s):][:n_audio]
            audio.append(np.pad(a, (0, n_audio - len(a))))
            motion.append(drop_groups(self.motion[s:s + T], rng, self.drop_given))
            weight.append(region_weights(self.landmarks[s:s + T], self.config.height))
        reference = _unit([self.reference] * batch).permute(0, 3, 1, 2).contiguous()
        motion = torch.from_numpy(np.stack(motion))
        blend, hints = self._warped(reference[:1], motion) if self.warp is not None else (None, None)
        return ClipBatch(frames=_unit(frames).permute(0, 4, 1, 2, 3).contiguous(), reference=reference,
                         audio=torch.from_numpy(np.stack(audio)), motion=motion,
                         weight=torch.from_numpy(np.stack(weight))[:, None], blend=blend, hints=hints)

    @torch.no_grad()
    def _warped(self, portrait: torch.Tensor, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The portrait (1, 3, H, W) warped onto clips' driving (B, T, 2F) as the engine warps
        it: per frame (B, T, 3, H, W) for the decoder's blend, per latent's group of frames
        (B, N, 3, H, W) for the DiT's condition (the first group reaches 3 rows before the
        clip: not given, as before a stream's start)."""
        warp, tl = self.warp, self.timeline
        before = torch.zeros(motion.shape[0], -tl.group_start(0), motion.shape[2])
        grouped = torch.cat([before, motion], dim=1)
        blend = torch.stack([warp.warp(portrait, warp.fields(m)) for m in motion])
        hints = torch.stack([warp.warp(portrait, warp.latent_fields(g, tl.temporal_stride)) for g in grouped])
        return blend, hints
