"""Training and evaluation data from the avatar world: a speech bank plus on-the-fly renders.

Only speech is stored (a few MB of 16 kHz audio in `<folder>/speech_bank.npz`); frames
are rendered when a clip is drawn (under a millisecond per frame, and exact).

Held-out split, fixed: identity seeds >= `HELD_OUT_IDENTITY_SEED` and every sentence
whose index is a multiple of 10 are never used for training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.config import MOTION_FIELDS, ModelConfig
from model.timeline import Timeline
from model.train import speech as sp
from model.train import world

HELD_OUT_IDENTITY_SEED = 1_000_000
TRAIN_IDENTITIES = 5000
_F = {name: i for i, name in enumerate(MOTION_FIELDS)}
# The model is told pose, blinks, gaze, smile and brow; the mouth must come from the audio.
GIVEN_TO_MODEL = ("yaw", "pitch", "roll", "blink", "gaze_x", "gaze_y", "smile", "brow")
MOUTH = ("mouth_open", "mouth_wide")   # what `give_mouth` adds to them


def model_motion(motion: np.ndarray, given: tuple[str, ...] = GIVEN_TO_MODEL) -> np.ndarray:
    """(T, fields) ground-truth motion -> (T, 2 * fields) driving vectors (values + given flags)."""
    T, n = motion.shape
    out = np.zeros((T, 2 * n), np.float32)
    for name in given:
        i = _F[name]
        out[:, i] = motion[:, i]
        out[:, n + i] = 1.0
    return out


def give_mouth(batch, share: float, fps: int, gen: torch.Generator, sample_rate: int = 16000,
               alone: float = 0.0):
    """World clips only: `batch` (a ClipBatch) with the mouth fields given in a random `share`
    of its clips, their values the world's own mouth (`speech.mouth_track` of the clip's
    audio, which is what `draw_clip` rendered; a latent pool keeps the audio, not the mouth).
    Of those clips, a share `alone` also has its audio zeroed.

    Why: the mouth is otherwise never given, so the model never learns to read the mouth
    fields, and a client's mouth motion (or a personal avatar's fitted speech -> mouth
    path) moves nothing. A share, not all: the rest still teaches speech -> mouth. And
    some with the audio gone: in the world the mouth is a function of the audio, so beside
    the audio the fields add nothing to learn from (measured: 400 steps with the mouth given
    and the audio kept left the fields ignored, docs/benchmarks.md)."""
    if share <= 0:
        return batch
    pick = (torch.rand(len(batch.audio), generator=gen) < share).tolist()
    silence = (torch.rand(len(batch.audio), generator=gen) < alone).tolist()
    if not any(pick):
        return batch
    motion, audio = batch.motion.clone(), batch.audio.clone()
    n, T = len(MOTION_FIELDS), motion.shape[1]
    for b in (i for i, p in enumerate(pick) if p):
        track = sp.mouth_track(batch.audio[b].float().numpy(), fps, sample_rate, n_frames=T)
        for k, name in enumerate(MOUTH):
            motion[b, :, _F[name]] = torch.from_numpy(track[:, k])
            motion[b, :, n + _F[name]] = 1.0
        if silence[b]:
            audio[b] = 0.0
    return dataclasses.replace(batch, motion=motion, audio=audio)


@dataclass
class SpeechBank:
    audio: np.ndarray      # all sentences concatenated, float32 16 kHz
    offsets: np.ndarray    # (n + 1,) start sample of each sentence
    texts: list[str]

    def sentence(self, i: int) -> np.ndarray:
        return self.audio[self.offsets[i]:self.offsets[i + 1]]

    def split(self, held_out: bool) -> list[int]:
        return [i for i in range(len(self.texts)) if (i % 10 == 0) == held_out]

    @classmethod
    def build(cls, n: int, seed: int, sample_rate: int = 16000, progress: bool = True) -> "SpeechBank":
        from tqdm import tqdm

        if not sp.tts_available():
            raise sp.TTSUnavailable("no offline TTS: install Debian's espeak-ng and/or flite")
        rng = np.random.default_rng(seed)
        voices = [v for v in sp.VOICES if v[0] in sp.tts_available()]
        texts, chunks = [], []
        for _ in tqdm(range(n), desc="speech bank", disable=not progress):
            text = sp.make_sentence(rng)
            voice = voices[rng.integers(len(voices))]
            texts.append(text)
            chunks.append(sp.synthesize(text, voice, sample_rate))
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
        return cls(np.concatenate(chunks).astype(np.float32), offsets, texts)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, audio=self.audio, offsets=self.offsets, texts=np.array(self.texts))

    @classmethod
    def load(cls, path: Path) -> "SpeechBank":
        d = np.load(path)
        return cls(d["audio"], d["offsets"], [str(t) for t in d["texts"]])


def speech_bank(folder: str | Path, n: int = 300, seed: int = 0) -> SpeechBank:
    """The bank in `folder`, generated (with a progress bar) on first use."""
    path = Path(folder) / "speech_bank.npz"
    if path.exists():
        return SpeechBank.load(path)
    bank = SpeechBank.build(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    bank.save(path)
    return bank


@dataclass
class Clip:
    """One ground-truth clip: identity, per-frame motion (truth), audio from frame 0."""

    identity: world.Identity
    motion: np.ndarray     # (T, fields)
    audio: np.ndarray      # float32 16 kHz, sample 0 = frame 0
    reference_motion: np.ndarray


def draw_clip(bank: SpeechBank, n_frames: int, fps: int, rng: np.random.Generator, held_out: bool = False,
              silence_prob: float = 0.15, identity_seed: int | None = None, sentence: int | None = None,
              sample_rate: int = 16000, extra_samples: int = 0) -> Clip:
    """A clip of `n_frames` where one sentence (or silence) is spoken at a random offset."""
    if identity_seed is None:
        base = HELD_OUT_IDENTITY_SEED if held_out else 0
        identity_seed = base + int(rng.integers(100 if held_out else TRAIN_IDENTITIES))
    ident = world.identity_from_seed(identity_seed)
    n_samples = int(round(n_frames * sample_rate / fps)) + extra_samples
    audio = np.zeros(n_samples, np.float32)
    if sentence is not None or rng.random() > silence_prob:
        idx = sentence if sentence is not None else int(rng.choice(bank.split(held_out)))
        s = bank.sentence(idx) * rng.uniform(0.6, 1.0)
        start = int(rng.integers(-len(s) // 2, max(1, n_samples - len(s) // 2)))
        lo, hi = max(0, start), min(n_samples, start + len(s))
        if hi > lo:
            audio[lo:hi] = s[lo - start:hi - start]
    motion = sp.speaking_motion(audio, fps, rng, sample_rate, n_frames=n_frames)
    ref = sp.idle_motion(1, fps, rng)[0]
    ref[_F["mouth_open"]] = ref[_F["mouth_wide"]] = 0.0
    ref[_F["blink"]] = 0.0
    return Clip(ident, motion, audio, ref)


class TrainingData:
    """Batches of rendered clips for the trainer (`clips()` returns a `ClipBatch`)."""

    def __init__(self, folder: str | Path, config: ModelConfig, seed: int = 0, n_sentences: int = 300):
        self.config = config
        self.bank = speech_bank(folder, n_sentences, seed)

    def clips(self, batch: int, n_latents: int, gen: torch.Generator, held_out: bool = False):
        from model.train.chunks import ClipBatch

        cfg = self.config
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
        tl = Timeline.of(cfg)
        T = tl.frames_for_latents(n_latents, first=True)
        # Audio runs past the last frame by the lookahead the model reads (and a latent more).
        extra = tl.sample_of(tl.lookahead_frames + tl.temporal_stride)
        frames, refs, audio, motion, weight = [], [], [], [], []
        for _ in range(batch):
            clip = draw_clip(self.bank, T, cfg.fps, rng, held_out=held_out, extra_samples=extra)
            frames.append(world.render_clip(clip.identity, clip.motion, cfg.height))
            refs.append(world.render_frame(clip.identity, clip.reference_motion, cfg.height))
            audio.append(clip.audio)
            motion.append(model_motion(clip.motion))
            weight.append(world.region_weights(clip.identity, clip.motion, cfg.height))
        to_video = lambda a: torch.from_numpy(np.stack(a)).float().div(127.5).sub(1)  # noqa: E731
        return ClipBatch(
            frames=to_video(frames).permute(0, 4, 1, 2, 3).contiguous(),   # (B, 3, T, H, W)
            reference=to_video(refs).permute(0, 3, 1, 2).contiguous(),     # (B, 3, H, W)
            audio=torch.from_numpy(np.stack(audio)),
            motion=torch.from_numpy(np.stack(motion)),
            weight=torch.from_numpy(np.stack(weight))[:, None],
        )


class LatentPool:
    """Clips encoded once by the (frozen) VAE and reused across DiT steps.

    Encoding 29 frames at 128x128 costs seconds on a CPU, far more than a DiT step on
    its latents, so the DiT stage draws from a pool of pre-encoded clips (saved next to
    the checkpoints so a resumed run does not encode again)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = tensors

    def __len__(self) -> int:
        return len(self.t["latents"])

    @classmethod
    def build(cls, data: TrainingData, vae, size: int, n_latents: int, gen: torch.Generator, batch: int = 8):
        from tqdm import tqdm

        from model.train.losses import latent_weight

        parts: dict[str, list] = {k: [] for k in ("latents", "ref_latent", "latent_weight", "audio", "motion")}
        vae.eval()
        with torch.no_grad(), tqdm(total=size, desc="encode latent pool", unit="clip") as bar:
            while bar.n < size:
                b = data.clips(min(batch, size - bar.n), n_latents, gen)
                parts["latents"].append(vae.encode(b.frames).half())
                parts["ref_latent"].append(vae.encode(b.reference[:, :, None]).half())
                parts["latent_weight"].append(latent_weight(b.weight, 0, n_latents).half())
                parts["audio"].append(b.audio.half())
                parts["motion"].append(b.motion.half())
                if b.hints is not None:  # a model with a motion warp: its condition latents
                    from model.train.chunks import encode_hints
                    parts.setdefault("hint_latent", []).append(encode_hints(vae, b.hints).half())
                bar.update(len(b.audio))
        return cls({k: torch.cat(v) for k, v in parts.items()})

    def save(self, path: Path) -> None:
        torch.save(self.t, path)

    @classmethod
    def load(cls, path: Path) -> "LatentPool":
        return cls(torch.load(path, map_location="cpu"))

    def clips(self, batch: int, gen: torch.Generator):
        return self.take(torch.randint(len(self), (batch,), generator=gen))

    def take(self, idx: torch.Tensor):
        """The pool's clips `idx` (B,) as a `ClipBatch` (float32)."""
        from model.train.chunks import ClipBatch

        t = {k: self.t[k][idx].float() for k in ("audio", "motion", "latents", "ref_latent", "latent_weight",
                                                  "hint_latent") if k in self.t}
        return ClipBatch(frames=None, reference=None, audio=t["audio"], motion=t["motion"], weight=None,
                         latents=t["latents"], ref_latent=t["ref_latent"], latent_weight=t["latent_weight"],
                         hint_latent=t.get("hint_latent"))
