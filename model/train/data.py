"""Training and evaluation data from the avatar world: a speech bank plus on-the-fly renders.

Only speech is stored (a few MB of 16 kHz audio in `<folder>/speech_bank.npz`); frames
are rendered when a clip is drawn (under a millisecond per frame, and exact).

Held-out split, fixed: identity seeds >= `HELD_OUT_IDENTITY_SEED` and every sentence
whose index is a multiple of 10 are never used for training.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from model.config import MOTION_FIELDS, ModelConfig
from model.train import speech as sp
from model.train import world

HELD_OUT_IDENTITY_SEED = 1_000_000
TRAIN_IDENTITIES = 5000
_F = {name: i for i, name in enumerate(MOTION_FIELDS)}
# The model is told pose, blinks, gaze, smile and brow; the mouth must come from the audio.
GIVEN_TO_MODEL = ("yaw", "pitch", "roll", "blink", "gaze_x", "gaze_y", "smile", "brow")


def model_motion(motion: np.ndarray, given: tuple[str, ...] = GIVEN_TO_MODEL) -> np.ndarray:
    """(T, fields) ground-truth motion -> (T, 2 * fields) driving vectors (values + given flags)."""
    T, n = motion.shape
    out = np.zeros((T, 2 * n), np.float32)
    for name in given:
        i = _F[name]
        out[:, i] = motion[:, i]
        out[:, n + i] = 1.0
    return out


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
        T = 1 + 4 * (n_latents - 1)
        # Audio runs past the last frame by the lookahead the model reads.
        extra = int(round((cfg.driving.lookahead_frames + 4) * cfg.driving.sample_rate / cfg.fps))
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
                bar.update(len(b.audio))
        return cls({k: torch.cat(v) for k, v in parts.items()})

    def save(self, path: Path) -> None:
        torch.save(self.t, path)

    @classmethod
    def load(cls, path: Path) -> "LatentPool":
        return cls(torch.load(path, map_location="cpu"))

    def clips(self, batch: int, gen: torch.Generator):
        from model.train.chunks import ClipBatch

        idx = torch.randint(len(self), (batch,), generator=gen)
        t = {k: self.t[k][idx].float() for k in ("audio", "motion", "latents", "ref_latent", "latent_weight")}
        return ClipBatch(frames=None, reference=None, audio=t["audio"], motion=t["motion"], weight=None,
                         latents=t["latents"], ref_latent=t["ref_latent"], latent_weight=t["latent_weight"])


# ------------------------------------------------------------------------------------------
# Stored datasets: identity + motion + audio per clip (frames rendered on the fly, exact),
# windows for the trainer, and a loader for real talking-head videos.
# ------------------------------------------------------------------------------------------

SPLITS = ("train", "test")
HELD_OUT_IDENTITY_RANGE = 100_000   # test identity seeds: HELD_OUT_IDENTITY_SEED + [0, this)
_SENTENCE_SEED = 4_2024             # sentence id -> text is the same in every dataset
_VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def sentence_text(sentence_id: int) -> str:
    """The sentence with this id (fixed for all datasets and seeds)."""
    return sp.make_sentence(np.random.default_rng([_SENTENCE_SEED, int(sentence_id)]))


def sentence_held_out(text: str) -> bool:
    """Held-out sentences are decided by their text (crc32 % 10 == 0), so a held-out text can
    never reach training under another id."""
    return zlib.crc32(text.encode()) % 10 == 0


def identity_seeds(split: str, n: int, seed: int) -> list[int]:
    """`n` distinct identity seeds of `split`: train in [0, TRAIN_IDENTITIES), test
    >= HELD_OUT_IDENTITY_SEED."""
    _check_split(split)
    lo, span = (0, TRAIN_IDENTITIES) if split == "train" else (HELD_OUT_IDENTITY_SEED, HELD_OUT_IDENTITY_RANGE)
    if n > span:
        raise ValueError(f"{split} has {span} identities, asked for {n}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    return [lo + int(s) for s in rng.choice(span, n, replace=False)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _draw_sentence(rng: np.random.Generator, split: str) -> tuple[int, str]:
    held_out = split == "test"
    while True:
        sid = int(rng.integers(1_000_000))
        text = sentence_text(sid)
        if sentence_held_out(text) == held_out:
            return sid, text


@dataclass(frozen=True)
class _ClipJob:
    path: str
    split: str
    identity_seed: int
    clip_seed: tuple[int, ...]
    n_frames: int
    fps: int
    size: int
    cache_frames: bool
    sample_rate: int = 16000


def _make_clip(job: _ClipJob) -> str:
    """Generate and store one clip (atomically: a crash never leaves a half-written file)."""
    if os.path.exists(job.path):
        return job.path
    rng = np.random.default_rng(list(job.clip_seed))
    spf = job.sample_rate // job.fps
    n_samples = job.n_frames * spf
    audio = np.zeros(n_samples, np.float32)
    mouth = np.zeros((job.n_frames, 2), np.float32)
    voices = [v for v in sp.VOICES if v[0] in sp.tts_available()]
    if not voices:
        raise sp.TTSUnavailable("no offline TTS: install Debian's espeak-ng and/or flite")
    sids, texts, sources, names, starts, ends = [], [], [], [], [], []
    v = int(rng.integers(0, max(1, job.fps)))  # the first sentence starts within a second
    while v < job.n_frames - job.fps // 2:
        if rng.random() < 0.15:  # a pause: the mouth must rest in silence too
            v += int(rng.integers(job.fps // 2, 2 * job.fps))
            continue
        sid, text = _draw_sentence(rng, job.split)
        speech = sp.synthesize(text, voices[int(rng.integers(len(voices)))], job.sample_rate)
        speech = speech * np.float32(rng.uniform(0.6, 1.0))
        track, source, phones = sp.speech_mouth_track(speech, text, job.fps, job.sample_rate)
        n = min(len(track), job.n_frames - v)
        s0 = v * spf  # sentences start on a frame so their tracks line up with the frame grid
        m = min(len(speech), n_samples - s0)
        audio[s0:s0 + m] = speech[:m]
        mouth[v:v + n] = np.maximum(mouth[v:v + n], track[:n])
        sids.append(sid), texts.append(text), sources.append(source)
        for p in phones:
            names.append(p.name), starts.append(p.start + v / job.fps), ends.append(p.end + v / job.fps)
        v += len(track) + int(rng.integers(job.fps // 5, job.fps))
    motion = sp.idle_motion(job.n_frames, job.fps, rng)
    motion[:, _F["mouth_open"]], motion[:, _F["mouth_wide"]] = mouth[:, 0], mouth[:, 1]
    ref = sp.idle_motion(1, job.fps, rng)[0]
    ref[_F["mouth_open"]] = ref[_F["mouth_wide"]] = ref[_F["blink"]] = 0.0
    ident = world.identity_from_seed(job.identity_seed)
    arrays = dict(
        identity_seed=np.int64(job.identity_seed), identity=np.array(json.dumps(ident.to_dict())),
        motion=motion, reference_motion=ref, audio=audio, visemes=mouth, fps=np.int64(job.fps),
        sample_rate=np.int64(job.sample_rate), size=np.int64(job.size), sentence_ids=np.array(sids, np.int64),
        texts=np.array(texts, dtype=str), mouth_sources=np.array(sources, dtype=str),
        phone_names=np.array(names, dtype=str), phone_start=np.array(starts, np.float32),
        phone_end=np.array(ends, np.float32))
    if job.cache_frames:
        arrays["frames"] = world.render_clip(ident, motion, job.size)
        arrays["reference_frame"] = world.render_frame(ident, ref, job.size)
    tmp = f"{job.path}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, job.path)
    return job.path


def generate_dataset(out_dir: str | Path, n_identities: int, clips_per_identity: int, seconds: float,
                     fps: int = 25, size: int = 128, seed: int = 0, split: str = "train",
                     cache_frames: bool = False, workers: int = 1, progress: bool = True) -> list[Path]:
    """Write `n_identities * clips_per_identity` clips of `split` to `out_dir` and return their paths.

    Each clip `<split>_<identity seed>_<clip>.npz` holds identity_seed, motion (T, F) truth,
    reference_motion (F,), audio (T * 16000 / fps,) float32 (sample 0 = frame 0), visemes
    (T, 2) mouth_open/mouth_wide targets, the sentences (ids, texts, and per sentence the
    mouth source "alignment" or the fallback "loudness"), phone timings (seconds), and with
    `cache_frames` the rendered frames (T, size, size, 3) uint8. Every clip has its own seed
    (seed, split, identity, clip), so the output does not depend on `workers` or on which
    clips already exist (existing files are kept: generation resumes)."""
    _check_split(split)
    if n_identities < 1 or clips_per_identity < 1 or seconds <= 0:
        raise ValueError("n_identities and clips_per_identity must be >= 1 and seconds > 0, got "
                         f"{n_identities}, {clips_per_identity}, {seconds}")
    if 16000 % fps:
        raise ValueError(f"fps must divide 16000 (whole audio samples per frame), got {fps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_frames = int(round(seconds * fps))
    jobs = [_ClipJob(str(out / f"{split}_{ident:07d}_{c:03d}.npz"), split, ident, (seed, SPLITS.index(split), ident, c),
                     n_frames, fps, size, cache_frames)
            for ident in identity_seeds(split, n_identities, seed) for c in range(clips_per_identity)]
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"{split} clips", disable=not progress)
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_make_clip, jobs):
                bar.update()
    else:
        for job in jobs:
            _make_clip(job)
            bar.update()
    bar.close()
    return [Path(j.path) for j in jobs]


def _window_item(frames: np.ndarray, reference: np.ndarray, audio: np.ndarray, start: int, n_frames: int,
                 spf: int, before: int, after: int, motion: np.ndarray, weight: np.ndarray, **extra) -> dict:
    """One training window as tensors (see `WorldClipDataset`)."""
    padded = np.pad(audio, (before * spf, (n_frames + after) * spf))
    a0 = start * spf  # index of frame `start` in `padded` is a0 + before * spf
    video = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1)
    item = dict(
        frames=video.permute(3, 0, 1, 2).contiguous(),
        reference=torch.from_numpy(reference).float().div(127.5).sub(1).permute(2, 0, 1).contiguous(),
        audio=torch.from_numpy(padded[a0 + before * spf:a0 + (before + n_frames + after) * spf].copy()),
        audio_before=torch.from_numpy(padded[a0:a0 + before * spf].copy()),
        motion=torch.from_numpy(motion), weight=torch.from_numpy(weight)[None], start=start)
    item.update({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in extra.items()})
    return item


class WorldClipDataset(torch.utils.data.Dataset):
    """Random windows of the clips `generate_dataset` wrote for `split`.

    Item i (window `i % windows_per_clip` of clip `i // windows_per_clip`; the start is
    drawn from (seed, i, epoch), so it is reproducible and changes with `set_epoch`):
      frames (3, n_frames, H, W) float in [-1, 1]; reference (3, H, W) (the identity at
      rest); audio (S,) float32 16 kHz, sample 0 = the window's first frame, running
      `after_frames` frames past the last one; audio_before (B,) the `before_frames`
      frames of audio preceding it (zeros before the clip start); motion (n_frames, 2F)
      as given to the model (`model_motion`); truth (n_frames, F); visemes (n_frames, 2);
      weight (1, n_frames, H, W) pixel loss weights; identity_seed; start (frame index).
    `collate_windows` stacks items into the trainer's `ClipBatch`."""

    def __init__(self, folder: str | Path, split: str = "train", n_frames: int = 9, windows_per_clip: int = 1,
                 seed: int = 0, before_frames: int = 2, after_frames: int = 5, given: tuple[str, ...] = GIVEN_TO_MODEL):
        _check_split(split)
        if n_frames < 1 or (n_frames - 1) % 4:
            raise ValueError(f"n_frames must be 1 + 4k (the VAE's time stride), got {n_frames}")
        self.paths = sorted(Path(folder).glob(f"{split}_*.npz"))
        if not self.paths:
            raise ValueError(f"no {split}_*.npz clips in {folder}; write them with generate_dataset")
        self.n_frames, self.windows_per_clip, self.seed, self.epoch = n_frames, windows_per_clip, seed, 0
        self.before, self.after, self.given = before_frames, after_frames, given

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths) * self.windows_per_clip

    def __getitem__(self, i: int) -> dict:
        with np.load(self.paths[i // self.windows_per_clip]) as d:
            clip = {k: d[k] for k in d.files}
        T = len(clip["motion"])
        if T < self.n_frames:
            raise ValueError(f"{self.paths[i // self.windows_per_clip]} has {T} frames, windows need {self.n_frames}")
        start = int(np.random.default_rng([self.seed, i, self.epoch]).integers(T - self.n_frames + 1))
        sl = slice(start, start + self.n_frames)
        ident = world.identity_from_seed(int(clip["identity_seed"]))
        size, motion = int(clip["size"]), clip["motion"][sl]
        frames = clip["frames"][sl] if "frames" in clip else world.render_clip(ident, motion, size)
        ref = clip["reference_frame"] if "reference_frame" in clip else \
            world.render_frame(ident, clip["reference_motion"], size)
        return _window_item(frames, ref, clip["audio"], start, self.n_frames, int(clip["sample_rate"] // clip["fps"]),
                            self.before, self.after, model_motion(motion, self.given),
                            world.region_weights(ident, motion, size), truth=motion, visemes=clip["visemes"][sl],
                            identity_seed=int(clip["identity_seed"]))


def collate_windows(items: list[dict]):
    """Window items -> the trainer's `ClipBatch` (frames, reference, audio, motion, weight)."""
    from model.train.chunks import ClipBatch

    return ClipBatch(*(torch.stack([it[k] for it in items]) for k in ("frames", "reference", "audio", "motion", "weight")))


@dataclass
class RealClip:
    """A decoded real video: frames cropped around the face, audio at 16 kHz from frame 0."""

    frames: np.ndarray     # (T, size, size, 3) uint8 RGB at the dataset's fps
    audio: np.ndarray      # (S,) float32 16 kHz mono
    face_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) crop in source pixels
    face_found: bool       # False: no face detected, the centre-square fallback crop was used


def _face_box(gray_frames: list[np.ndarray], scale: float, width: int, height: int) -> tuple[tuple, bool]:
    """Square crop around the median of the largest Haar face per frame (face x1.8, centred a
    little below the face box so chin and hair fit); fallback: the centre square."""
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
    faces = []
    for g in gray_frames:
        found = cascade.detectMultiScale(g, scaleFactor=1.1, minNeighbors=4, minSize=(24, 24))
        if len(found):
            x, y, w, h = max(found, key=lambda f: f[2] * f[3])
            faces.append((x + w / 2, y + h / 2, max(w, h)))
    if not faces:
        side = min(width, height)
        x0, y0 = (width - side) // 2, (height - side) // 2
        return (x0, y0, x0 + side, y0 + side), False
    cx, cy, s = (float(np.median(c)) / scale for c in zip(*faces))
    half = 0.9 * s
    cy += 0.1 * s
    return (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half))), True


def _crop(frame: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop `box` (may reach outside the frame: edges are replicated) and resize to size x size."""
    x0, y0, x1, y1 = box
    h, w = frame.shape[:2]
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    crop = frame[y0 + pad:y1 + pad, x0 + pad:x1 + pad]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def load_real_clip(path: str | Path, size: int = 128, fps: int = 25, sample_rate: int = 16000,
                   detect_frames: int = 16) -> RealClip:
    """Decode a talking-head video with PyAV: frames resampled to `fps` (each output frame is
    the latest source frame at its time), cropped with one fixed box around the face
    (OpenCV Haar cascade on `detect_frames` frames, so the crop does not jitter) and resized;
    audio mixed to mono and resampled to `sample_rate`, aligned to the first video frame."""
    import av

    path = str(path)
    # Pass 1: frame times and small grey copies of every 5th frame for face detection, so a
    # long high-resolution video is never held in memory at full size.
    times, gray, scale = [], [], 1.0
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream (real clips must carry speech)")
        for k, f in enumerate(container.decode(video=0)):
            times.append(float(f.time))
            if k % 5 == 0:
                rgb = f.to_ndarray(format="rgb24")
                h, w = rgb.shape[:2]
                scale = min(1.0, 320 / max(h, w))  # a face is still found at 320 px, faster
                gray.append(cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None, fx=scale, fy=scale,
                                       interpolation=cv2.INTER_AREA))
    if not times:
        raise ValueError(f"{path}: no decodable video frames")
    t0 = times[0]
    rel = np.array(times) - t0
    n_out = int(np.floor(rel[-1] * fps + 1e-6)) + 1
    pick = np.searchsorted(rel, np.arange(n_out) / fps + 1e-6, side="right") - 1
    idx = np.unique(np.linspace(0, len(gray) - 1, min(detect_frames, len(gray))).round().astype(int))
    box, found = _face_box([gray[i] for i in idx], scale, w, h)
    # Pass 2: crop and resize the source frames that the output frames pick.
    frames = np.zeros((n_out, size, size, 3), np.uint8)
    with av.open(path) as container:
        for k, f in enumerate(container.decode(video=0)):
            outs = np.nonzero(pick == k)[0]
            if len(outs):
                frames[outs] = _crop(f.to_ndarray(format="rgb24"), box, size)

    chunks, a_start = [], None
    with av.open(path) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(audio=0):
            if a_start is None and frame.time is not None:
                a_start = float(frame.time)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    shift = int(round(((a_start or 0.0) - t0) * sample_rate))  # audio sample 0 = video frame 0
    audio = np.pad(audio, (shift, 0)) if shift > 0 else audio[-shift:]
    return RealClip(frames, audio, box, found)


class RealClipDataset(torch.utils.data.Dataset):
    """Random windows of real talking-head videos in `folder` (mp4, mov, mkv, avi, webm, m4v),
    in the same item format as `WorldClipDataset`. Nothing about motion is known: motion is
    all zeros with every "given" flag off; weight is 1 everywhere; truth and visemes are
    absent. The reference is a frame of the same video outside the window when there is room
    (else its first frame). Decoded clips are kept in memory (`cache_clips` of them)."""

    def __init__(self, folder: str | Path, n_frames: int = 9, size: int = 128, fps: int = 25,
                 windows_per_clip: int = 1, seed: int = 0, before_frames: int = 2, after_frames: int = 5,
                 cache_clips: int = 8):
        if n_frames < 1 or (n_frames - 1) % 4:
            raise ValueError(f"n_frames must be 1 + 4k (the VAE's time stride), got {n_frames}")
        self.paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _VIDEO_EXTENSIONS)
        if not self.paths:
            raise ValueError(f"no video files ({', '.join(_VIDEO_EXTENSIONS)}) in {folder}")
        self.n_frames, self.size, self.fps, self.windows_per_clip = n_frames, size, fps, windows_per_clip
        self.seed, self.epoch, self.before, self.after = seed, 0, before_frames, after_frames
        self.cache_clips = cache_clips
        self._cache: dict[Path, RealClip] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths) * self.windows_per_clip

    def clip(self, j: int) -> RealClip:
        path = self.paths[j]
        if path not in self._cache:
            if len(self._cache) >= self.cache_clips:
                self._cache.pop(next(iter(self._cache)))
            self._cache[path] = load_real_clip(path, self.size, self.fps)
        return self._cache[path]

    def __getitem__(self, i: int) -> dict:
        j = i // self.windows_per_clip
        clip = self.clip(j)
        T = len(clip.frames)
        if T < self.n_frames:
            raise ValueError(f"{self.paths[j]} has {T} frames at {self.fps} fps, windows need {self.n_frames}")
        rng = np.random.default_rng([self.seed, i, self.epoch])
        start = int(rng.integers(T - self.n_frames + 1))
        outside = [t for t in range(T) if not start <= t < start + self.n_frames]
        ref = clip.frames[outside[int(rng.integers(len(outside)))] if outside else 0]
        n_fields = len(MOTION_FIELDS)
        return _window_item(clip.frames[start:start + self.n_frames], ref, clip.audio, start, self.n_frames,
                            16000 // self.fps, self.before, self.after,
                            np.zeros((self.n_frames, 2 * n_fields), np.float32),
                            np.ones((self.n_frames, self.size, self.size), np.float32))
