"""A stream's timeline: where video frames, driving samples and latent frames sit.

The one copy of that arithmetic (everything else asks a `Timeline`):

- video frame v starts at driving sample ceil(v * R / fps) (R = sample rate), in exact
  integer arithmetic, so rounding never drifts over an endless stream;
- the causal VAE compresses `temporal_stride` (s) video frames into one latent frame, the
  first frame alone: latent 0 is video frame 0, latent f >= 1 covers frames
  [s*f - s + 1, s*f]. A stream's first chunk of n latents decodes to 1 + s(n - 1) frames,
  every later chunk to s*n;
- driving tokens come in groups of s frames per latent; latent 0's group reaches s - 1
  frames before the stream start (they read as silence and "not given");
- a step's audio starts `audio_context_frames` (plus a margin, hop-aligned) before its
  first frame and ends `lookahead_frames` after the last frame it drives.

`StepSpan` is what one step makes and reads on that timeline; `StepInput` carries the
driving of exactly one span (the engine's `Stream.step` takes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.config import ModelConfig

# A step's audio starts this many frames before its first window: the mel frames at the
# cut's left edge see reflect padding, and these frames keep them out of every window.
_CONTEXT_MARGIN_FRAMES = 8


def sample_of_frame(frame: int, fps: int, sample_rate: int) -> int:
    """First driving sample at or after the start of video frame `frame`: ceil(frame * R / fps)."""
    return -((-frame * sample_rate) // fps)


def frames_for_latents(n_latents: int, first: bool, temporal_stride: int = 4) -> int:
    """Video frames that `n_latents` latent frames cover: 1 + s(n - 1) for a clip's first
    chunk (frame 0 stands alone), s*n for any later chunk."""
    if n_latents < 1:
        raise ValueError(f"n_latents must be >= 1, got {n_latents}")
    return 1 + temporal_stride * (n_latents - 1) if first else temporal_stride * n_latents


def latents_for_frames(n_frames: int, first: bool, temporal_stride: int = 4) -> int:
    """Inverse of `frames_for_latents`; ValueError if `n_frames` is not a whole number of latents."""
    rest = n_frames - 1 if first else n_frames
    if n_frames < 1 or rest % temporal_stride:
        rule = f"1 + {temporal_stride}k" if first else f"{temporal_stride}k (k >= 1)"
        raise ValueError(f"{'a first' if first else 'a later'} chunk needs {rule} frames, got {n_frames}")
    return rest // temporal_stride + 1 if first else rest // temporal_stride


def frames_of_latent(latent: int, temporal_stride: int = 4) -> range:
    """The video frames decoded from latent frame `latent` (latent 0 is frame 0 alone)."""
    if latent == 0:
        return range(0, 1)
    return range(temporal_stride * latent - temporal_stride + 1, temporal_stride * latent + 1)


@dataclass(frozen=True)
class StepSpan:
    """One step on the timeline: it returns video frames [frame, frame + frames), reads
    motion for [frame, frame + driving_frames) (its own frames, the knot frames it also
    predicts, and the audio lookahead) and driving samples [audio_from, audio_to)."""

    frame: int
    frames: int
    driving_frames: int
    audio_from: int
    audio_to: int

    @property
    def samples(self) -> int:
        return self.audio_to - self.audio_from


@dataclass(frozen=True)
class Timeline:
    """The arithmetic of one model's timeline (see the module docstring); `Timeline.of(config)`."""

    fps: int                         # video frames per second
    sample_rate: int = 16000         # driving audio samples per second
    temporal_stride: int = 4         # video frames per latent frame (the VAE's)
    hop_length: int = 160            # samples per mel frame: a step's audio starts on this grid
    audio_context_frames: int = 2    # video frames of audio each frame hears before itself
    lookahead_frames: int = 1        # ... and after itself

    def __post_init__(self) -> None:
        for name in ("fps", "sample_rate", "temporal_stride", "hop_length"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Timeline":
        d = cfg.driving
        return cls(cfg.fps, d.sample_rate, cfg.vae.temporal_stride, d.hop_length, d.audio_context_frames,
                   d.lookahead_frames)

    # ----- frames <-> samples ----------------------------------------------------------

    def sample_of(self, frame: int) -> int:
        """First driving sample of video frame `frame` (negative frames give negative samples)."""
        return sample_of_frame(frame, self.fps, self.sample_rate)

    def frame_of(self, sample: int) -> int:
        """The video frame that sample `sample` drives."""
        return (sample * self.fps) // self.sample_rate

    def samples_between(self, first_frame: int, end_frame: int) -> int:
        return self.sample_of(end_frame) - self.sample_of(first_frame)

    # ----- latents <-> frames ----------------------------------------------------------

    def latent_first_frame(self, latent: int) -> int:
        """First video frame decoded from latent frame `latent` (latent 0 is frame 0 alone)."""
        return frames_of_latent(latent, self.temporal_stride).start

    def latent_of(self, frame: int) -> int:
        """The latent frame that video frame `frame` (>= 0) is decoded from."""
        return -(-frame // self.temporal_stride)

    def group_start(self, latent: int) -> int:
        """First video frame of latent `latent`'s group of driving tokens (latent 0's group
        reaches before the stream start)."""
        return self.temporal_stride * latent - self.temporal_stride + 1

    def frames_for_latents(self, n_latents: int, first: bool) -> int:
        return frames_for_latents(n_latents, first, self.temporal_stride)

    # ----- a step's driving ------------------------------------------------------------

    def context_start(self, frame: int) -> int:
        """First (hop-aligned) driving sample a step starting at video frame `frame` reads."""
        first = self.sample_of(max(0, frame - self.audio_context_frames - _CONTEXT_MARGIN_FRAMES))
        return (first // self.hop_length) * self.hop_length

    def context_before(self, frame: int) -> tuple[int, int]:
        """Samples [lo, hi) of the audio context the model hears for video frame `frame`: the
        `audio_context_frames` frames before it plus one for the mel window's reach."""
        return self.sample_of(max(0, frame - self.audio_context_frames - 1)), self.sample_of(frame)

    def span(self, first_latent: int, out_latents: int, driving_latents: int) -> StepSpan:
        """The step that denoises latents [first_latent, first_latent + driving_latents) and
        returns the video frames of the first `out_latents` of them."""
        frame = self.latent_first_frame(first_latent)
        frames = self.frames_for_latents(out_latents, first=first_latent == 0)
        last = self.temporal_stride * (first_latent + driving_latents - 1)  # last frame of the last latent
        driving = last + 1 - frame + self.lookahead_frames
        return StepSpan(frame, frames, driving, self.context_start(frame), self.sample_of(frame + driving))


@dataclass
class StepInput:
    """The driving of one step, on its span's timeline.

    audio:  float32 mono samples from `span.audio_from` (the context before the step's
            frames included); a shorter array means the rest is not known yet (it reads as
            silence), a longer one is cut at `span.audio_to`. None: silence.
    motion: (rows, motion_dim) vectors of `model.driving.motion_vector` for frames
            `span.frame`, `span.frame + 1`, ...; rows past `span.driving_frames` are cut,
            missing rows (or None) are "not given".
    """

    span: StepSpan
    audio: np.ndarray | None = None
    motion: np.ndarray | None = None

    @classmethod
    def from_clip(cls, span: StepSpan, audio: np.ndarray | None, motion: np.ndarray | None) -> "StepInput":
        """The step's slice of a whole clip: `audio` from sample 0, `motion` from frame 0."""
        a = None if audio is None else audio[span.audio_from:span.audio_to]
        m = None if motion is None else motion[span.frame:span.frame + span.driving_frames]
        return cls(span, a, m if m is not None and len(m) else None)

    def checked(self, span: StepSpan, motion_dim: int) -> "StepInput":
        """This input as float32 arrays cut to `span`; ValueError when it is for another span
        or malformed (the engine checks every input once, before any stream changes)."""
        if self.span != span:
            raise ValueError(f"driving is for {self.span}, the stream's next step is {span}")
        audio = motion = None
        if self.audio is not None:
            audio = np.asarray(self.audio, dtype=np.float32).reshape(-1)[: span.samples]
            if not np.isfinite(audio).all():
                raise ValueError("driving audio contains NaN or infinite samples")
        if self.motion is not None:
            motion = np.asarray(self.motion, dtype=np.float32)
            if motion.ndim != 2 or motion.shape[1] != motion_dim:
                raise ValueError(f"motion must be (frames, {motion_dim}), got {motion.shape}")
            motion = motion[: span.driving_frames]
            if not np.isfinite(motion).all():
                raise ValueError("motion contains NaN or infinite values")
        return StepInput(span, audio, motion)
