"""wav2vec2 driving features of the photoreal families, offline and streaming.

Both families run transformers' `Wav2Vec2Model` (wav2vec2-base-960h) with one change to
its forward: the CNN features are linearly interpolated (align_corners=True) to the
video frame count before the transformer, so the encoder yields one vector per video
frame. Per frame they then keep:

- LiveTalk (OmniAvatar): last_hidden_state followed by all 13 hidden states (14 x 768);
  `livetalk_audio_groups` repeats frame 0 three times in front and packs 4 video frames
  per latent frame (the input of the DiT's `audio_proj`, an AudioPack);
- FlashHead: hidden states 1..12 (12 x 768); `flashhead_audio_windows` cuts 5-frame
  windows for a chunk's first latent and 8-frame windows for each later one (the inputs
  of its `audio_proj.proj1` / `proj1_vf`).

The raw audio is first normalised to zero mean and unit variance over the clip (the
`Wav2Vec2FeatureExtractor` step, `do_normalize`). Normalisation, the CNN's GroupNorm over
time and the transformer's attention all see the whole clip, so a live stream cannot be
encoded exactly as offline; `StreamingWav2Vec` encodes a bounded window (context before,
lookahead after) as its own clip, and docs/models.md has the measured difference.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = ("livetalk", "flashhead")
_MIN_SAMPLES = 400  # wav2vec2-base's CNN receptive field: shorter audio gives no frame


def require_transformers():
    """The transformers package, or an ImportError that says how to get it."""
    clashing = sorted(set(packages_distributions().get("kernels", ())) - {"knotstream"})
    if clashing:
        # transformers >= 5.25 requires Hugging Face's `kernels`, which installs a module of
        # the same name as ours; transformers then imports one and expects the other.
        raise ImportError(f"{', '.join(clashing)} installs a `kernels` module, which clashes with "
                          "knotstream's own; pip uninstall it and pip install 'knotstream[photoreal]' "
                          "(transformers below 5.25)")
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("the photoreal families drive with wav2vec2 from the `transformers` package: "
                          "pip install 'knotstream[photoreal]'") from exc
    return transformers


@dataclass(frozen=True)
class AudioLayout:
    """How a family relates audio to video frames."""

    family: str
    fps: int
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose from {FAMILIES}")
        if self.sample_rate % self.fps:
            raise ValueError(f"{self.sample_rate} Hz is not a whole number of samples per frame at {self.fps} fps")

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    def frames_in(self, n_samples: int) -> int:
        """Video frames a clip of `n_samples` gives. LiveTalk: frames sit at 0, 1/fps, ...
        up to the clip's end (n - 1 intervals); FlashHead: one frame per 1/fps of audio."""
        spf = self.samples_per_frame
        return n_samples // spf + 1 if self.family == "livetalk" else n_samples // spf

    def samples_for(self, n_frames: int) -> int:
        """Samples of a clip of `n_frames` video frames (inverse of `frames_in`)."""
        return (n_frames - (self.family == "livetalk")) * self.samples_per_frame


class Wav2VecDriving:
    """A `Wav2Vec2Model` plus a family's feature recipe: audio -> (B, n_frames, L, hidden).

    L = 14 for LiveTalk (last_hidden_state, then hidden states 0..12), 12 for FlashHead
    (hidden states 1..12); fewer for a smaller wav2vec2 (tests).
    """

    def __init__(self, model, layout: AudioLayout, normalize: bool = True):
        self.model = model.eval()
        self.layout = layout
        self.normalize = normalize
        # The interpolation is a forward hook on the model's CNN (the one step a plain
        # forward lacks); one call at a time may hold it.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, folder: str | Path, layout: AudioLayout, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Wav2VecDriving":
        """A local wav2vec2 folder (config.json, weights, preprocessor_config.json); no hub access."""
        transformers = require_transformers()
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a wav2vec2 folder (no config.json)")
        model = transformers.Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True)
        prep = folder / "preprocessor_config.json"
        normalize = json.loads(prep.read_text()).get("do_normalize", True) if prep.is_file() else True
        return cls(model.to(device=device, dtype=dtype), layout, normalize=normalize)

    @property
    def layers(self) -> int:
        n = self.model.config.num_hidden_layers
        return n + 2 if self.layout.family == "livetalk" else n

    @property
    def cnn_stride(self) -> int:
        return math.prod(self.model.config.conv_stride)

    def cnn_frames(self, n_samples: int) -> int:
        """CNN output frames of `n_samples` (receptive field 400 and stride 320 for wav2vec2-base)."""
        field, step = 1, 1
        for k, s in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            field, step = field + (k - 1) * step, step * s
        return max(0, (n_samples - field) // step + 1)

    def stream_positions(self, first: int, n: int) -> Tensor:
        """CNN positions (in the frames of audio starting at video frame `first`) of video
        frames [first, first + n) under the stream alignment.

        The offline recipe spreads a clip's CNN frames over its video frames end to end
        (align_corners), so a frame's position depends on the clip's length (LiveTalk at
        16 fps: up to 1.25-2.25 CNN frames short at the clip's end; FlashHead at 25 fps:
        exactly 2 per frame). A stream has no length: frame j sits at j * spf / stride
        minus half the recipe's mean shortfall, the offline position at a clip's middle,
        the same for every window."""
        rate = self.layout.samples_per_frame / self.cnn_stride
        return (torch.arange(first, first + n, dtype=torch.float64) - first) * rate - self._stream_shift

    @functools.cached_property
    def _stream_shift(self) -> float:
        """Half the offline recipe's mean shortfall (CNN frames) over clips of 64..575 frames."""
        rate = self.layout.samples_per_frame / self.cnn_stride
        short = [rate * (T - 1) - (self.cnn_frames(self.layout.samples_for(T)) - 1) for T in range(64, 576)]
        return sum(short) / len(short) / 2

    @torch.no_grad()
    def encode(self, audio: Tensor, n_frames: int | None = None, positions: Tensor | None = None) -> Tensor:
        """audio (N,) or (B, N) at the layout's sample rate -> features (B, n_frames, L, hidden).

        n_frames defaults to the family's `frames_in(N)`. positions: (n_frames,) CNN frame
        positions to sample linearly instead of the recipe's end-to-end spread (streams:
        `stream_positions`); clamped to the CNN frames there are."""
        audio = audio[None] if audio.dim() == 1 else audio
        if audio.dim() != 2 or audio.shape[1] < _MIN_SAMPLES:
            raise ValueError(f"audio must be (N,) or (B, N) with N >= {_MIN_SAMPLES} samples, got {tuple(audio.shape)}")
        n_frames = self.layout.frames_in(audio.shape[1]) if n_frames is None else n_frames
        n_frames = n_frames if positions is None else len(positions)
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        p = next(self.model.parameters())
        x = audio.to(device=p.device, dtype=torch.float32)
        if self.normalize:  # Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm, over each clip
            x = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + 1e-7)

        def to_video_rate(module, inputs, cnn: Tensor) -> Tensor:  # (B, C, T_cnn) -> (B, C, n_frames)
            if positions is None:
                return F.interpolate(cnn, size=n_frames, mode="linear", align_corners=True)
            return _sample_linear(cnn, positions)

        with self._lock:
            hook = self.model.feature_extractor.register_forward_hook(to_video_rate)
            try:
                out = self.model(x.to(p.dtype), output_hidden_states=True)
            finally:
                hook.remove()
        states = list(out.hidden_states)
        if self.layout.family == "livetalk":
            states = [out.last_hidden_state] + states
        else:
            states = states[1:]
        return torch.stack(states, dim=2)  # (B, n_frames, L, hidden)

    def stream(self, context_frames: int, lookahead_frames: int) -> "StreamingWav2Vec":
        return StreamingWav2Vec(self, context_frames, lookahead_frames)


def _sample_linear(x: Tensor, positions: Tensor) -> Tensor:
    """x (B, C, T) sampled at float positions (n,) along T, linearly -> (B, C, n)."""
    T = x.shape[-1]
    p = positions.to(torch.float64).clamp(0, T - 1)
    lo = p.floor().long().clamp(max=max(T - 2, 0))
    w = (p - lo).to(device=x.device, dtype=x.dtype)
    hi = (lo + 1).clamp(max=T - 1)
    lo, hi = lo.to(x.device), hi.to(x.device)
    return x[..., lo] * (1 - w) + x[..., hi] * w


class StreamingWav2Vec:
    """Features of video frames [start, start + n) from a bounded window of audio.

    The caller (a recipe) asks `span(start, n)` which video frames of audio it needs
    (`context_frames` before, `lookahead_frames` after; never before frame 0), fetches
    them from the session's timeline (which owns the audio), and calls `features`. The
    window is encoded as a clip of its own, its CNN frames sampled at the stream alignment
    (`Wav2VecDriving.stream_positions`), so a frame's alignment does not depend on the
    window; with a window covering the whole clip the features equal
    `encode(audio, positions=stream_positions(0, n))` exactly.
    """

    def __init__(self, encoder: Wav2VecDriving, context_frames: int, lookahead_frames: int):
        if context_frames < 0 or lookahead_frames < 0:
            raise ValueError("context_frames and lookahead_frames must be >= 0")
        self.encoder = encoder
        self.context_frames = context_frames
        self.lookahead_frames = lookahead_frames

    def span(self, start: int, n: int) -> tuple[int, int]:
        """Video frames [first, end) whose audio `features(start, n)` needs."""
        return max(0, start - self.context_frames), start + n + self.lookahead_frames

    def features(self, audio: Tensor, first_frame: int, start: int, n: int) -> Tensor:
        """audio: (N,) or (B, N), the audio of video frames from `first_frame` on (as
        `AudioLayout.samples_for` counts them; shorter near the stream's end) -> (B, n, L, hidden)."""
        layout = self.encoder.layout
        covered = layout.frames_in(audio.shape[-1])
        offset = start - first_frame
        if offset < 0 or offset + n > covered:
            raise ValueError(f"audio of frames [{first_frame}, {first_frame + covered}) does not cover "
                             f"frames [{start}, {start + n})")
        positions = self.encoder.stream_positions(first_frame, covered)
        return self.encoder.encode(audio, positions=positions)[:, offset:offset + n]


# --------------------------------------------------------------------------------------
# Family layouts of the per-frame features (the inputs of each DiT's `audio_proj`)
# --------------------------------------------------------------------------------------


def livetalk_audio_groups(features: Tensor, first_chunk: bool) -> Tensor:
    """(B, n, L, hidden) features of a chunk's video frames -> (B, F, 4 * L * hidden), one
    row per latent frame (4 video frames, each flattened layer-major).

    The stream's first chunk starts with video frame 0 alone: it is repeated 3 times in
    front, so n = 1 + 4(F - 1); any later chunk has n = 4F."""
    B, n = features.shape[:2]
    x = features.flatten(2)  # (B, n, L * hidden)
    if first_chunk:
        x = torch.cat([x[:, :1].expand(B, 3, -1), x], dim=1)
    if x.shape[1] % 4:
        rule = "1 + 4k" if first_chunk else "4k"
        raise ValueError(f"{'a first' if first_chunk else 'a later'} chunk needs {rule} video frames, got {n}")
    return x.reshape(B, x.shape[1] // 4, 4 * x.shape[2])


FLASHHEAD_FIRST_WINDOW = (-2, 3)  # video frames around the chunk's first frame
FLASHHEAD_LATER_WINDOW = (-2, 6)  # around the first of a later latent's 4 frames


def flashhead_audio_windows(features: Tensor, start: int, n_latents: int) -> tuple[Tensor, Tensor]:
    """Windows of FlashHead's audio projection for one chunk.

    features: (B, T, L, hidden) of video frames [0, T) (what is known; windows are clamped
    to it, as FlashHead clamps to its audio buffer). The chunk's video frames are
    [start, start + 1 + 4(n_latents - 1)). Returns first (B, 1, 5, L, hidden): frames
    start-2 .. start+2; later (B, n_latents - 1, 8, L, hidden): for the latent whose video
    frames begin at f, frames f-2 .. f+5 (first frame's past, the 4 frames, last frame's future).
    """
    T = features.shape[1]
    first = torch.arange(start + FLASHHEAD_FIRST_WINDOW[0], start + FLASHHEAD_FIRST_WINDOW[1])
    starts = torch.arange(start + 1, start + 4 * (n_latents - 1), 4)  # first video frame of each later latent
    later = starts[:, None] + torch.arange(*FLASHHEAD_LATER_WINDOW)[None]  # (n_latents - 1, 8)
    first, later = first.clamp(0, T - 1).to(features.device), later.clamp(0, T - 1).to(features.device)
    return features[:, first][:, None], features[:, later]
