"""Engine and Stream: the chunk loop of Knot Forcing.

One `Stream` per live session. Each `step()` generates one chunk:

1. running ahead: if the chunk would pass the reference's temporal coordinate, move the
   reference forward by `ahead_frames` (a rotation of the cached reference keys);
2. denoise `chunk_frames + knot_frames` latent frames with few-step Euler; queries see
   the reference cache, the window ring buffer and the chunk itself; the first
   `knot_frames` are conditioned (image-to-video mask + latent) on the previous chunk's
   knot prediction, and fused with it at the last step;
3. write the committed `chunk_frames` clean frames into the window cache by one extra
   pass at noise level 0 (as Self Forcing), condition without knot; knot frames are never
   cached, they become the next chunk's condition;
4. decode the committed latents with the streaming VAE decoder (then the seam blend,
   `seam_blend`, spreads each latent frame's step over its video frames: model/seams.py);
5. rebase positions when they exceed `rebase_every` (rotate every cached key by the
   same negative offset: attention is unchanged, numbers stay small).

Latent frame f covers video frames [4f - 3, 4f] (frame 0 alone, as Wan's VAE), so the
first step returns 4c - 3 frames and every later one 4c.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from model import driving as drv
from model.avatar import AvatarModel
from model.cache import ReferenceCache, WindowCache
from model.config import PRESETS, ModelConfig, StreamKnobs, from_name
from model.dit import BatchedStreaming, EncodeReference, Streaming
from model.media import fit_portrait
from model.sampler import denoise, get_sigmas
from model.seams import spread_latent_steps

log = logging.getLogger("knotstream.engine")

ASSETS = Path(__file__).parent / "assets"


def build_cond(cfg: ModelConfig, reference_latent: Tensor, knot: Tensor | None, n_frames: int) -> Tensor:
    """Image-to-video condition of a chunk: (B, mask + z, n_frames, h, w).

    The first knot frames carry the previous chunk's knot prediction with mask 1; the
    other frames carry the reference latent with mask 0 when `cfg.reference_hint` is on
    (zeros otherwise). The trainer builds its conditions with this same function.
    """
    B, z, _, h, w = reference_latent.shape
    n_mask = cfg.dit.in_channels - 2 * z
    cond = reference_latent.new_zeros(B, n_mask + z, n_frames, h, w)
    if cfg.reference_hint:
        cond[:, n_mask:] = reference_latent
    if knot is not None:
        kn = knot.shape[2]
        cond[:, :n_mask, :kn] = 1.0
        cond[:, n_mask:, :kn] = knot
    return cond


def latent_driving_tokens(encoder, cfg: ModelConfig, mel: Tensor, mel_offset: int, motion: Tensor,
                          first_frame: int, n_latents: int) -> Tensor:
    """Driving tokens of `n_latents` latent frames whose video frames start at `first_frame`.

    mel: (B, n_mel, n_mels) log-mel whose row 0 is mel frame `mel_offset` of the stream;
    motion: (B, 4 * n_latents, motion_dim) for those video frames.
    Returns (B, n_latents, 4 * tokens_per_frame, drive_dim): each latent frame gets the
    tokens of its own 4 video frames (and, inside each audio window, the lookahead).
    The engine and the trainer both call this.
    """
    n_frames = 4 * n_latents
    win = torch.stack([drv.audio_windows(m, cfg.fps, first_frame, n_frames, cfg.driving, mel_offset=mel_offset)
                       for m in mel])  # (B, n_frames, win, n_mels)
    tokens = encoder(win, motion)  # (B, n_frames, M, D)
    B, _, M, D = tokens.shape
    return tokens.reshape(B, n_latents, 4 * M, D)


class Engine:
    """A loaded model; starts streams. Thread-compatible: one stream is stepped by one thread at a time."""

    def __init__(self, model: AvatarModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trained: bool = True):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config: ModelConfig = model.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.trained = trained
        self.max_group = 8  # streams per batched forward (step_many)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "tiny", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Engine":
        """A preset name (its bundled weights when shipped, seeded random weights otherwise) or a
        local safetensors path written by `model.weights.save_model`. Nothing is downloaded."""
        from model.weights import load_model

        path = Path(name_or_path)
        if name_or_path in PRESETS:
            bundled = ASSETS / f"{name_or_path}.safetensors"
            if bundled.exists():
                return cls(load_model(bundled, device=device), device, dtype)
            log.warning("no bundled weights for preset %r: using seeded random weights (untrained)", name_or_path)
            return cls(AvatarModel.random(from_name(name_or_path)), device, dtype, trained=False)
        if path.exists():
            return cls(load_model(path, device=device), device, dtype)
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing file")

    def start(self, reference: np.ndarray, knobs: StreamKnobs | None = None, seed: int = 0) -> "Stream":
        """reference: (H, W, 3) uint8 RGB portrait of any size (cropped/resized to the model's)."""
        return Stream(self, reference, knobs or self.config.stream, seed)

    def step_many(self, streams: list["Stream"], audios: list[np.ndarray | None],
                  motions: list[np.ndarray | None],
                  on_frames: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray]:
        """The generation worker's batch: streams with the same `batch_key` are stepped
        together (one forward per denoising pass, `step_group`), up to `max_group` at a time;
        the result equals stepping each alone. A group whose step was aborted
        (`Stream.request_abort`) gives None for each of its streams. on_frames(i, frames):
        called with stream i's frames as soon as they are decoded, before the step's
        cache-writing pass (the frames can go out one DiT pass sooner)."""
        out: list[np.ndarray | None] = [None] * len(streams)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(streams):
            groups.setdefault(batch_key(s), []).append(i)
        for idx in groups.values():
            for j in range(0, len(idx), self.max_group):
                part = idx[j:j + self.max_group]
                early = None if on_frames is None else (lambda j, f, part=part: on_frames(part[j], f))
                try:
                    frames = step_group([streams[i] for i in part], [audios[i] for i in part],
                                        [motions[i] for i in part], early)
                except StepAborted:
                    continue
                for i, f in zip(part, frames):
                    out[i] = f
        return out


@dataclass
class _ChunkPlan:
    pos: Tensor              # (Fr,) temporal positions
    drive: Tensor            # (1, Fr, M, drive_dim) driving tokens
    cond: Tensor             # (1, mask + z, Fr, h, w) image-to-video condition
    prev: Tensor | None      # previous knot prediction (fused at the last step)
    noise: Tensor            # (1, z, Fr, h, w)


def batch_key(stream: "Stream") -> tuple:
    """Streams with equal keys can be stepped in one batched forward (same chunk geometry and
    sampler schedule); positions, caches, driving and knots may differ."""
    k = stream.knobs
    return (id(stream.engine), k.chunk_frames, k.knot_frames, stream.denoise_steps_now, k.shift, k.knot_fusion)


@torch.inference_mode()
def step_group(streams: list["Stream"], audios: list, motions: list,
               on_frames: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray]:
    """One chunk for every stream (all with the same `batch_key`), each denoising pass and the
    cache-writing pass as ONE forward over the batch; the attention core, VAE decode and the
    cache bookkeeping stay per stream. The result equals stepping them one by one.

    1. per stream: driving in, running ahead, positions, condition (previous knot), noise;
    2. denoise chunk + knot frames with few-step Euler, batched; each row's first
       `knot_frames` are fused with its previous knot prediction at the last step;
    3. per stream: decode with the streaming VAE (`on_frames(i, frames)` hands them out now);
    4. write the committed clean frames into each window cache (one batched pass at noise
       level 0, condition without knot); knot frames are never cached; advance, rebase when due.
    The cache write comes after the decode because no frame depends on it: it is for the
    next step, so the frames go out one DiT pass sooner.
    Raises StepAborted when an abort was requested for any stream and every stream keeps
    history (all are then restored as before the step)."""
    if len({batch_key(s) for s in streams}) != 1:
        raise ValueError("step_group needs streams with the same batch_key (chunk geometry and sampler)")
    for s, a, mo in zip(streams, audios, motions):
        s._check_driving(a, mo)  # before any stream changes: a bad input changes nothing
    s0 = streams[0]
    k, eng = s0.knobs, s0.engine
    m, dev = eng.model, eng.device
    c, kn = k.chunk_frames, k.knot_frames
    Fr, B = c + kn, len(streams)
    plans = []
    try:
        for s, a, mo in zip(streams, audios, motions):
            plans.append(s._begin(a, mo))
    except Exception:
        for s in streams[:len(plans)]:  # streams already begun go back as they were
            if s._history is not None:
                s._restore(s._history.pop())
        raise
    pos = torch.stack([p.pos for p in plans])  # (B, Fr)
    drive = torch.cat([p.drive for p in plans])
    cond = torch.cat([p.cond for p in plans])
    ctx = BatchedStreaming([Streaming(s.reference, s.window, write=False) for s in streams])
    abortable = all(s._history is not None for s in streams)

    def abort_if_requested() -> None:
        """Checked before every DiT pass and the decode: until the cache write nothing is
        committed (the decoder caches and knot are in the undo entry), so the step can still
        be undone. An interrupt then waits for at most one DiT pass or one decode."""
        if abortable and any(s._abort.is_set() for s in streams):
            for s in streams:  # as if the step never started
                s._abort.clear()
                s._restore(s._history.pop())
            raise StepAborted(f"step of {[s.frame_index for s in streams]} aborted")

    def velocity(x: Tensor, sigma: float) -> Tensor:
        abort_if_requested()
        # Timesteps stay float32: in bf16, values in [512, 1000) would snap to multiples of 4.
        t = torch.full((B, Fr), sigma * s0.cfg.sampler.num_train_timesteps, device=dev, dtype=torch.float32)
        return m.dit(x, t, pos, ctx, cond=cond, drive=drive)

    def fuse_knot(x0: Tensor) -> Tensor:
        for i, p in enumerate(plans):
            if p.prev is not None:
                x0[i:i + 1, :, :kn] = k.knot_fusion * p.prev + (1 - k.knot_fusion) * x0[i:i + 1, :, :kn]
        return x0

    x0 = denoise(velocity, torch.cat([p.noise for p in plans]), get_sigmas(s0.denoise_steps_now, k.shift),
                 on_last=fuse_knot)
    committed = torch.cat([s._finish(x0[i:i + 1]) for i, s in enumerate(streams)])
    abort_if_requested()
    frames = []
    for i, s in enumerate(streams):
        frames.append(s._decode(committed[i:i + 1]))
        if on_frames is not None:
            on_frames(i, frames[-1])
    # Frames handed out by on_frames belong to the step being undone: the interrupt that
    # asked for the abort flushes them from the playout with everything else not yet shown.
    abort_if_requested()

    t0 = torch.zeros(B, c, device=dev, dtype=torch.float32)
    write = BatchedStreaming([Streaming(s.reference, s.window, write=True) for s in streams])
    cond0 = torch.cat([build_cond(s.cfg, s.reference_latent, None, c) for s in streams])
    m.dit(committed, t0, pos[:, :c], write, cond=cond0, drive=drive[:, :c])
    for s in streams:
        s.window.commit(c)
        s._advance()
    return frames


class StepAborted(Exception):
    """`Stream.step` stopped early at `request_abort()`; the stream is as before the step."""


@dataclass
class _Undo:
    """Everything one step() changes, saved before it (see `Stream.keep_history`)."""

    next_latent: int
    offset: int
    chunks: int
    knot: Tensor | None
    generator: Tensor
    audio: np.ndarray
    audio_origin: int
    motion: dict
    reference_k: Tensor
    reference_position: float
    window: object          # model.cache.SlotUndo
    decoder: list
    decoder_first: bool
    decoder_counts: tuple[int, int]
    last_frame: Tensor | None


class Stream:
    """One endless video. Not thread-safe; the generation worker owns it."""

    def __init__(self, engine: Engine, reference: np.ndarray, knobs: StreamKnobs, seed: int):
        self.engine = engine
        self.knobs = knobs
        cfg = engine.config
        self.cfg = cfg
        m = engine.model
        dev, dt = engine.device, engine.dtype
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.latent_hw = cfg.latent_hw
        T = cfg.tokens_per_frame
        d = cfg.dit
        self.reference = ReferenceCache(d.num_layers, 1, d.num_heads, T, d.head_dim, dt, dev)
        self.window = WindowCache(d.num_layers, 1, d.num_heads, knobs.window_frames, T, d.head_dim, dt, dev)
        self.rope = m.dit.rope

        self.next_latent = 0           # latent index of the next chunk's first frame
        self.offset = 0                # positions are (latent index + 1 - offset)
        self.knot: Tensor | None = None  # previous chunk's knot prediction (B, z, k, h, w)
        self.chunks = 0
        self.closed = False
        self._history: deque[_Undo] | None = None  # undo entries of the last steps (keep_history)
        self._abort = threading.Event()  # set from another thread: stop the step in progress
        self._regenerating = False  # the next step remakes frames after a rewind (rewind_denoise_steps)
        self._muted = (0, 0)  # audio samples [lo, hi) read as silence by the model (prepare_remake)
        self._last_frame: Tensor | None = None  # last decoded frame (1, 3, H, W): the seam blend's past

        self._audio = np.zeros(0, dtype=np.float32)  # history, starting at sample self._audio_origin
        self._audio_origin = 0
        self._motion: dict[int, np.ndarray] = {}     # video frame -> motion vector (given fields only)

        image = fit_portrait(reference, cfg.height, cfg.width)
        self.reference_image = image
        with torch.inference_mode():
            video = torch.from_numpy(image).to(dev, dt).permute(2, 0, 1)[None, :, None] / 127.5 - 1  # (1, 3, 1, H, W)
            self.reference_latent = m.vae.encode(video)  # (1, z, 1, h, w)
            self.decoder = m.vae.stream_decoder(reference=video)  # a reference-conditioned decoder copies from it
            # Running ahead off: the reference sits at position 0 and frames start at 1.
            self.reference.position = float(self._chunk_span_end(0) + knobs.ahead_frames) if knobs.ahead_frames else 0.0
            pos = torch.tensor([self.reference.position], dtype=torch.float64)
            zero_t = torch.zeros(1, 1, device=dev)
            m.dit(self.reference_latent, zero_t, pos, EncodeReference(self.reference))

    # ----- geometry -------------------------------------------------------------------

    def _chunk_span_end(self, latent: int) -> int:
        """Exclusive end position of the chunk (with knots) starting at `latent`."""
        return latent + 1 - self.offset + self.knobs.chunk_frames + self.knobs.knot_frames

    @property
    def frame_index(self) -> int:
        """Index of the first video frame the next step() returns."""
        return 0 if self.next_latent == 0 else 4 * self.next_latent - 3

    @property
    def next_frames(self) -> int:
        """Video frames the next step() returns."""
        c = self.knobs.chunk_frames
        return 4 * c - 3 if self.next_latent == 0 else 4 * c

    @property
    def driving_frames(self) -> int:
        """Video frames of driving the next step() reads, from `frame_index`: its own frames,
        the knot frames' and the audio lookahead."""
        last = 4 * (self.next_latent + self.knobs.chunk_frames + self.knobs.knot_frames - 1)
        return last + 1 - self.frame_index + self.cfg.driving.lookahead_frames

    @property
    def audio_samples_needed(self) -> int:
        return self._sample(self.frame_index + self.driving_frames) - self._sample(self.frame_index)

    def _sample(self, frame: int) -> int:
        """First audio sample of a video frame: the driving module's exact rule."""
        return drv.frame_start_sample(frame, self.cfg.fps, self.cfg.driving)

    # ----- driving --------------------------------------------------------------------

    def _check_driving(self, audio: np.ndarray | None, motion: np.ndarray | None) -> None:
        if self.closed:
            raise RuntimeError("stream is closed")
        if audio is not None and not np.isfinite(np.asarray(audio, dtype=np.float32)).all():
            raise ValueError("driving audio contains NaN or infinite samples")
        if motion is not None:
            shape = np.shape(motion)
            if len(shape) != 2 or shape[1] != self.cfg.driving.motion_dim:
                raise ValueError(f"motion must be (frames, {self.cfg.driving.motion_dim}), got {shape}")

    def _ingest(self, audio: np.ndarray | None, motion: np.ndarray | None) -> None:
        """Store this step's driving by output frame time; it replaces what was given before
        for the same frames (a later step re-sends its lookahead with the real audio)."""
        start = self._sample(self.frame_index)
        kept = self._audio[: max(0, start - self._audio_origin)]
        parts = [kept, np.zeros(start - self._audio_origin - len(kept), dtype=np.float32)]
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
            if not np.isfinite(audio).all():
                raise ValueError("driving audio contains NaN or infinite samples")
            parts.append(audio[: self.audio_samples_needed])
        hist = self._silence_muted(np.concatenate(parts))
        # Keep only what a later chunk can still read (its audio context reaches back).
        keep_from = self._sample(max(0, self.frame_index - self.cfg.driving.audio_context_frames - 8))
        keep_from = (keep_from // self.cfg.driving.hop_length) * self.cfg.driving.hop_length
        cut = max(0, keep_from - self._audio_origin)
        self._audio, self._audio_origin = hist[cut:], self._audio_origin + cut

        n = self.driving_frames
        for f in list(self._motion):
            if f < self.frame_index - 8 or f >= self.frame_index:
                del self._motion[f]  # new motion replaces what was given for these frames
        if motion is not None:
            motion = np.asarray(motion, dtype=np.float32)
            if motion.ndim != 2 or motion.shape[1] != self.cfg.driving.motion_dim:
                raise ValueError(f"motion must be (frames, {self.cfg.driving.motion_dim}), got {motion.shape}")
            for i, vec in enumerate(motion[:n]):
                self._motion[self.frame_index + i] = vec

    def _driving_tokens(self, first_frame: int, n_frames: int) -> Tensor:
        """Driving tokens for video frames [first_frame, first_frame + n_frames), grouped by latent frame."""
        dc = self.cfg.driving
        # Mel over the kept history (origin is hop-aligned); frames outside it read as silence.
        audio = self._audio
        if len(audio) < dc.n_fft:
            audio = np.pad(audio, (0, dc.n_fft - len(audio)))
        mel = drv.log_mel(torch.from_numpy(np.ascontiguousarray(audio)), dc)[None]
        motion = np.zeros((1, n_frames, dc.motion_dim), dtype=np.float32)
        for i in range(n_frames):
            vec = self._motion.get(first_frame + i)
            if vec is not None:
                motion[0, i] = vec
        dev, dt = self.engine.device, self.engine.dtype
        return latent_driving_tokens(self.engine.model.driving, self.cfg, mel.to(dev, dt),
                                     self._audio_origin // dc.hop_length, torch.from_numpy(motion).to(dev, dt),
                                     first_frame, n_frames // 4)

    # ----- the chunk loop -------------------------------------------------------------

    def step(self, audio: np.ndarray | None = None, motion: np.ndarray | None = None) -> np.ndarray:
        """Generate the next chunk. Returns (next_frames, H, W, 3) uint8.

        audio: float32 mono at the model's sample rate covering video frames
        [frame_index, frame_index + driving_frames); shorter = silence after it; it
        replaces earlier audio for those frames. motion: (frames, motion_dim) from
        `model.driving.motion_vector`, from frame_index; None = not given.
        Raises StepAborted after `request_abort()` (the stream is as before the step).
        """
        return step_group([self], [audio], [motion])[0]

    def _begin(self, audio: np.ndarray | None, motion: np.ndarray | None) -> "_ChunkPlan":
        """Step part 1 (per stream): driving in, running ahead, this chunk's inputs."""
        if self.closed:
            raise RuntimeError("stream is closed")
        k = self.knobs
        dev, dt = self.engine.device, self.engine.dtype
        Fr = k.chunk_frames + k.knot_frames
        if self._history is not None:
            self._history.append(self._save_undo())
        try:
            self._ingest(audio, motion)
        except Exception:
            if self._history is not None:
                self._restore(self._history.pop())
            raise
        # Running ahead: keep the reference's temporal coordinate ahead of this chunk.
        if k.ahead_frames:
            end = self._chunk_span_end(self.next_latent)
            while end > self.reference.position:
                self.reference.move(self.rope, float(k.ahead_frames))
        pos = torch.arange(Fr, dtype=torch.float64) + (self.next_latent + 1 - self.offset)
        drive = self._driving_tokens(4 * self.next_latent - 3, 4 * Fr)
        z, (h, w) = self.cfg.vae.z_channels, self.latent_hw
        noise = torch.randn(1, z, Fr, h, w, generator=self.generator).to(dev, dt)
        return _ChunkPlan(pos, drive, build_cond(self.cfg, self.reference_latent, self.knot, Fr), self.knot, noise)

    @property
    def denoise_steps_now(self) -> int:
        """Euler steps of the next step: `rewind_denoise_steps` for the chunk regenerated
        right after a rewind, when set; `denoise_steps` otherwise."""
        k = self.knobs
        return k.rewind_denoise_steps if self._regenerating and k.rewind_denoise_steps else k.denoise_steps

    def _finish(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Step part 3 (per stream, after the batched commit pass): keep the knot, count."""
        self._regenerating = False
        c = self.knobs.chunk_frames
        committed = x0[:, :, :c]
        self.knot = x0[:, :, c:].clone() if self.knobs.knot_frames else None
        return committed

    def _decode(self, committed: Tensor) -> np.ndarray:
        first = self.decoder.frames_out
        frames = self.decoder.decode(committed)  # (1, 3, n, H, W) in [-1, 1]
        if self.knobs.seam_blend:
            frames = spread_latent_steps(frames, first, self._last_frame, self.knobs.seam_blend)
        self._last_frame = frames[:, :, -1].clone()  # a latent's last frame: the blend leaves it as decoded
        out = ((frames[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return out.permute(1, 2, 3, 0).cpu().numpy()  # (n, H, W, 3)

    def _advance(self) -> None:
        """Step part 4 (per stream, after the cache write): next chunk, rebase when due."""
        self.next_latent += self.knobs.chunk_frames
        self.chunks += 1
        # Rebase: the next chunk starts again at position 1.
        if self.next_latent + 1 - self.offset > self.knobs.rebase_every:
            self.rebase()

    def rebase(self) -> None:
        """Shift every position so the next chunk starts at 1; outputs are unchanged."""
        delta = self.next_latent - self.offset
        self.reference.move(self.rope, -float(delta))
        self.window.move(self.rope, -float(delta))
        self.offset += delta

    def cache_nbytes(self) -> int:
        return self.reference.nbytes() + self.window.nbytes()

    # ----- rewinding (barge-in) -----------------------------------------------------------

    def keep_history(self, chunks: int) -> None:
        """Remember enough of the last `chunks` steps to rewind over them (`rewind_to`).

        Costs per step one chunk's window slots, the reference keys and the VAE decoder's
        causal caches (copies); 0 turns it off. The generation worker turns it on so an
        interrupt can regenerate the frames generated but not yet played."""
        self._history = deque(maxlen=chunks) if chunks > 0 else None

    def rewindable_frame(self) -> int | None:
        """The earliest frame index `rewind_to` can return to, None without history."""
        if not self._history:
            return None
        return 0 if self._history[0].next_latent == 0 else 4 * self._history[0].next_latent - 3

    def rewind_to(self, frame: int) -> int:
        """Undo the steps that generated frame `frame` and after: the stream continues from the
        start of the chunk holding `frame` as if those steps never ran (same caches, positions,
        knot, RNG and driving history). Returns the new `frame_index` (<= frame). Raises
        ValueError when the history does not reach back that far. The next step (the chunk
        remade) denoises with `rewind_denoise_steps`, so the new picture comes sooner."""
        if frame >= self.frame_index:
            return self.frame_index
        earliest = self.rewindable_frame()
        if earliest is None or frame < earliest:
            raise ValueError(f"cannot rewind to frame {frame}: history reaches back to frame {earliest}")
        self._regenerating = True
        while True:
            u = self._history.pop()
            self._restore(u)
            if self.frame_index <= frame:
                return self.frame_index

    def prepare_remake(self, frame: int) -> None:
        """Barge-in, after `rewind_to(frame)`: the driving changed from `frame` on (the speech
        stopped there), so the next step must not carry the old speech into the new frames.

        - The model hears silence in the audio context of `frame` (the `audio_context_frames`
          before it, plus one for the mel window), now and in what later steps bring for
          those frames; those frames were shown (and played) with the speech already.
        - When `frame` falls inside the chunk's knot frames, the knot (the previous chunk's
          prediction of them, made while the speech went on) is dropped: the chunk is made as
          with knots off, instead of being conditioned on, and fused with, an open mouth.
        Without these the mouth closes up to a latent frame (4 video frames) late."""
        ctx = self.cfg.driving.audio_context_frames + 1
        self._muted = (self._sample(max(0, frame - ctx)), self._sample(frame))
        self._audio = self._silence_muted(self._audio.copy())  # a copy: undo entries may hold the old array
        knot_end = 0 if self.knot is None else max(0, 4 * (self.next_latent + self.knot.shape[2]) - 3)
        if frame < knot_end:
            self.knot = None

    def _silence_muted(self, history: np.ndarray) -> np.ndarray:
        """Zero the `prepare_remake` range in an audio history starting at `_audio_origin` (in place)."""
        lo, hi = (max(0, b - self._audio_origin) for b in self._muted)
        history[lo:hi] = 0.0
        return history

    def request_abort(self) -> bool:
        """Thread-safe: make the step in progress (or the next one) stop before it commits
        anything and raise StepAborted, the stream left as before that step. Only with
        history (`keep_history`); returns whether an abort was requested."""
        if self._history is None:
            return False
        self._abort.set()
        return True

    def clear_abort(self) -> None:
        self._abort.clear()

    def _restore(self, u: _Undo) -> None:
        """Put back what one step changed (steps are undone newest first)."""
        # Slots were saved under the positions of their step: undo later rebases first.
        self.window.move(self.rope, float(self.offset - u.offset))
        self.offset = u.offset
        self.window.undo(u.window)
        self.next_latent, self.chunks, self.knot = u.next_latent, u.chunks, u.knot
        self.generator.set_state(u.generator)
        self._audio, self._audio_origin, self._motion = u.audio, u.audio_origin, u.motion
        self.reference.k.copy_(u.reference_k)
        self.reference.position = u.reference_position
        state = self.decoder.state
        state.buffers = [None if b is None else b.clone() for b in u.decoder]
        state.first = u.decoder_first
        self.decoder.frames_out, self.decoder.latents_in = u.decoder_counts
        self._last_frame = u.last_frame

    def _save_undo(self) -> _Undo:
        state = self.decoder.state
        return _Undo(self.next_latent, self.offset, self.chunks, self.knot, self.generator.get_state(),
                     self._audio, self._audio_origin, dict(self._motion), self.reference.k.clone(),
                     self.reference.position, self.window.save_slots(self.knobs.chunk_frames),
                     [None if b is None else b.clone() for b in state.buffers], state.first,
                     (self.decoder.frames_out, self.decoder.latents_in), self._last_frame)

    def close(self) -> None:
        """Free the caches (the worker calls this when a session ends)."""
        self.closed = True
        self.reference = self.window = self.decoder = self.knot = self._last_frame = None
