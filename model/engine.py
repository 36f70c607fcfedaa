"""Engine and Stream: the chunk loop, generic over the model family's recipe.

One `Stream` per live session. `Stream.step(StepInput)` generates one chunk from exactly
the driving of that chunk's span (model/timeline.py): the recipe (model/recipe.py; the
Knot Forcing one in model/knot_forcing.py) plans and denoises the chunk's latents, the
streaming VAE decoder turns the committed ones into frames (then the seam blend,
`seam_blend`, spreads each latent frame's step over its video frames: model/seams.py), and
the recipe updates its caches for the next chunk. The stream keeps no driving history:
whoever owns the session's timeline (streaming/driving.py) hands each step its driving.

The generation worker steps many streams at once (`Engine.step_many`): streams with the
same `batch_key` share every model pass. A stream that keeps history (`keep_history`)
can be rewound by whole steps (`rewind_point` + `restore`) and a step in progress can be
aborted from another thread (`request_abort`), leaving the stream as before that step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.avatar import AvatarModel
from model.config import ModelConfig, StreamKnobs
from model.media import fit_portrait
from model.recipe import Recipe, recipe_for
from model.seams import spread_latent_steps
from model.timeline import StepInput, StepSpan, Timeline
from model.vae import DecoderSnapshot

log = logging.getLogger("knotstream.engine")

OnFrames = Callable[[int, np.ndarray], None]


def native_cpu_bf16() -> bool:
    """True where this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): oneDNN's matmuls
    and convolutions then run in bfloat16 faster than in float32. Elsewhere bfloat16 is
    emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: assume not
        return False


class Engine:
    """A loaded model; starts streams. Thread-compatible: one stream is stepped by one thread at a time.

    `autocast`: a lower precision the chunk loop computes in (torch.autocast) while the weights
    stay in `dtype`; None computes in `dtype`. `from_pretrained` chooses bfloat16 on a CPU
    that has it natively (`native_cpu_bf16`): 1.14-1.29x faster per chunk (medians) on the
    development VM, frames ~61 dB PSNR from float32's (docs/benchmarks.md)."""

    def __init__(self, model: AvatarModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trained: bool = True, autocast: torch.dtype | None = None):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config: ModelConfig = model.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.autocast = autocast
        self.trained = trained
        self.max_group = 8  # streams per batched forward (step_many)
        self.recipe: Recipe = recipe_for(self.model, self.device, dtype)
        self.timeline = Timeline.of(self.config)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "tiny", device: str = "cpu",
                        dtype: torch.dtype | None = None) -> "Engine":
        """A preset, a model file, or a photoreal family's folder (`livetalk:DIR`,
        `flashhead:DIR`): the names of model/sources.py. Nothing is downloaded.
        dtype None ("auto"): bfloat16 on CUDA; on a CPU float32 weights, computed in bfloat16
        (autocast) where the CPU has it natively, else in float32 (bfloat16 weights on a CPU
        are slower). An explicit dtype is used as it is, without autocast."""
        from model.sources import open_model

        autocast = None
        if dtype is None:
            on_cuda = str(device).startswith("cuda")
            dtype = torch.bfloat16 if on_cuda else torch.float32
            autocast = torch.bfloat16 if not on_cuda and native_cpu_bf16() else None
        model, trained = open_model(name_or_path, device, dtype)
        return cls(model, device, dtype, trained=trained, autocast=autocast)

    def compute(self) -> contextlib.AbstractContextManager:
        """The precision context of every model pass of a stream (see `autocast`)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @property
    def precision(self) -> str:
        """What the chunk loop computes in, for logs and benchmarks: "float32", or
        "float32 weights, bfloat16 autocast"."""
        name = str(self.dtype).removeprefix("torch.")
        return name if self.autocast is None else f"{name} weights, {str(self.autocast).removeprefix('torch.')} autocast"

    def start(self, reference: np.ndarray, knobs: StreamKnobs | None = None, seed: int = 0) -> "Stream":
        """reference: (H, W, 3) uint8 RGB portrait of any size (cropped/resized to the model's)."""
        return Stream(self, reference, knobs or self.config.stream, seed)

    def step_many(self, streams: Sequence["Stream"], inputs: Sequence[StepInput | None],
                  on_frames: OnFrames | None = None) -> list[np.ndarray | None]:
        """The generation worker's batch: streams with the same `batch_key` are stepped
        together (one forward per model pass, `step_group`), up to `max_group` at a time;
        the result equals stepping each alone. A group whose step was aborted
        (`Stream.request_abort`) gives None for each of its streams. on_frames(i, frames):
        called with stream i's frames as soon as they are decoded, before the step's
        cache-writing pass (the frames can go out one model pass sooner)."""
        out: list[np.ndarray | None] = [None] * len(streams)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(streams):
            groups.setdefault(batch_key(s), []).append(i)
        for idx in groups.values():
            for j in range(0, len(idx), self.max_group):
                part = idx[j:j + self.max_group]
                early = None if on_frames is None else (lambda j, f, part=part: on_frames(part[j], f))
                try:
                    frames = step_group([streams[i] for i in part], [inputs[i] for i in part], early)
                except StepAborted:
                    continue
                for i, f in zip(part, frames):
                    out[i] = f
        return out


class StepAborted(Exception):
    """A step stopped early at `request_abort()`; the stream is as before the step."""


def batch_key(stream: "Stream") -> tuple:
    """Streams with equal keys can be stepped in one batched forward (same recipe, chunk
    geometry and sampler schedule); positions, caches, driving and knots may differ."""
    return id(stream.engine), stream.engine.recipe.batch_key(stream.knobs), stream.denoise_steps_now


@torch.inference_mode()
def step_group(streams: Sequence["Stream"], inputs: Sequence[StepInput | None],
               on_frames: OnFrames | None = None) -> list[np.ndarray]:
    """One chunk for every stream (all with the same `batch_key`), each model pass as ONE
    forward over the batch; the VAE decode stays per stream. The result equals stepping
    them one by one:

    1. per stream: its driving checked (before any stream changes: a bad input changes
       nothing), a snapshot kept when it keeps history, the recipe's plan;
    2. the recipe denoises every chunk, batched;
    3. per stream: the committed latents decoded (`on_frames(i, frames)` hands them out now);
    4. the recipe's write pass, batched (after the decode: no frame of this step depends on
       it, so the frames go out one model pass sooner).
    Raises StepAborted when an abort was requested for any stream and every stream keeps
    history (all are then restored as before the step)."""
    if len({batch_key(s) for s in streams}) != 1:
        raise ValueError("step_group needs streams with the same batch_key (recipe, chunk geometry and sampler)")
    with streams[0].engine.compute():
        return _step_group(streams, inputs, on_frames)


def _step_group(streams: Sequence["Stream"], inputs: Sequence[StepInput | None],
                on_frames: OnFrames | None) -> list[np.ndarray]:
    checked = [s._checked(inp) for s, inp in zip(streams, inputs)]
    s0 = streams[0]
    recipe, knobs = s0.engine.recipe, s0.knobs
    plans = _plan(streams, checked)
    abortable = all(s._history is not None for s in streams)

    def abort_if_requested() -> None:
        """Checked before every model pass and the decode: until the write pass nothing is
        committed, so the step can still be undone. An interrupt then waits for at most
        one model pass or one decode."""
        if abortable and any(s._abort.is_set() for s in streams):
            for s in streams:  # as if the step never started
                s._abort.clear()
                s.restore(s._history[-1])
            raise StepAborted(f"step of {[s.frame_index for s in streams]} aborted")

    x0 = recipe.denoise([s.state for s in streams], plans, knobs, s0.denoise_steps_now, abort_if_requested)
    committed = torch.cat([recipe.finish(s.state, s.knobs, x0[i:i + 1]) for i, s in enumerate(streams)])
    abort_if_requested()
    frames, decoded = [], []
    for i, s in enumerate(streams):
        video = s._decode(committed[i:i + 1], plans[i])
        decoded.append(video)
        frames.append(_to_uint8(video))
        if on_frames is not None:
            on_frames(i, frames[-1])
    # Frames handed out by on_frames belong to the step being undone: the interrupt that
    # asked for the abort flushes them from the playout with everything else not yet shown.
    abort_if_requested()
    recipe.write([s.state for s in streams], plans, knobs, committed, decoded)
    for s in streams:
        s.chunks += 1
        s._remake = False
    return frames


def _plan(streams: Sequence["Stream"], inputs: Sequence[StepInput]) -> list:
    """Each stream's recipe plan, after keeping a snapshot where it keeps history; when a
    plan fails every stream is restored as it was."""
    for s in streams:
        if s._history is not None:
            s._history.append(s._snapshot())
    try:
        return [s.engine.recipe.plan(s.state, s.knobs, inp, s.generator) for s, inp in zip(streams, inputs)]
    except Exception:
        for s in streams:
            if s._history is not None:
                s.restore(s._history[-1])
        raise


def _to_uint8(video: Tensor) -> np.ndarray:
    """(1, 3, n, H, W) in [-1, 1] -> (n, H, W, 3) uint8."""
    out = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return out.permute(1, 2, 3, 0).cpu().numpy()


@dataclass(frozen=True)
class StreamSnapshot:
    """A stream as it was before one step (`Stream.rewind_point`)."""

    frame: int                 # the stream's frame_index then
    chunks: int
    generator: Tensor
    state: object              # the recipe's snapshot of its state
    decoder: DecoderSnapshot
    last_frame: Tensor | None
    remake: bool


class Stream:
    """One endless video. Not thread-safe; the generation worker owns it."""

    def __init__(self, engine: Engine, reference: np.ndarray, knobs: StreamKnobs, seed: int):
        self.engine = engine
        self.knobs = knobs
        self.cfg = engine.config
        self.timeline = engine.timeline
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.chunks = 0
        self.closed = False
        self._closed_span: StepSpan | None = None
        self._history: deque[StreamSnapshot] | None = None  # snapshots before the last steps (keep_history)
        self._abort = threading.Event()  # set from another thread: stop the step in progress
        self._remake = False  # the next step remakes frames after a rewind (rewind_denoise_steps)
        self._last_frame: Tensor | None = None  # last decoded frame (1, 3, H, W): the seam blend's past

        image = fit_portrait(reference, self.cfg.height, self.cfg.width)
        self.reference_image = image
        m, dev, dt = engine.model, engine.device, engine.dtype
        with torch.inference_mode():
            video = torch.from_numpy(image).to(dev, dt).permute(2, 0, 1)[None, :, None] / 127.5 - 1  # (1, 3, 1, H, W)
            reference_latent = m.vae.encode(video)  # (1, z, 1, h, w)
            self.decoder = m.vae.stream_decoder(reference=video)  # a reference-conditioned decoder copies from it
            self.state = engine.recipe.start(reference_latent, knobs, video)

    # ----- geometry -------------------------------------------------------------------

    def next_span(self) -> StepSpan:
        """The frames the next step returns and the driving it reads."""
        if self._closed_span is not None:
            return self._closed_span
        return self.engine.recipe.span(self.state, self.knobs)

    @property
    def frame_index(self) -> int:
        """Index of the first video frame the next step() returns."""
        return self.next_span().frame

    @property
    def next_frames(self) -> int:
        """Video frames the next step() returns."""
        return self.next_span().frames

    @property
    def driving_frames(self) -> int:
        """Video frames of motion the next step() reads, from `frame_index`."""
        return self.next_span().driving_frames

    @property
    def denoise_steps_now(self) -> int:
        """Denoising steps of the next step: `rewind_denoise_steps` for the chunk remade right
        after a rewind, when set; `denoise_steps` otherwise."""
        k = self.knobs
        return k.rewind_denoise_steps if self._remake and k.rewind_denoise_steps else k.denoise_steps

    def cache_nbytes(self) -> int:
        return self.engine.recipe.cache_nbytes(self.state)

    # ----- stepping -------------------------------------------------------------------

    def step(self, inp: StepInput | None = None) -> np.ndarray:
        """Generate the next chunk from its driving (`next_span()`; None: silence, no motion).
        Returns (next_frames, H, W, 3) uint8. Raises StepAborted after `request_abort()`
        (the stream is as before the step)."""
        return step_group([self], [inp])[0]

    def _checked(self, inp: StepInput | None) -> StepInput:
        if self.closed:
            raise RuntimeError("stream is closed")
        span = self.next_span()
        return StepInput(span) if inp is None else inp.checked(span, self.cfg.driving.motion_dim)

    def _decode(self, committed: Tensor, plan) -> Tensor:
        """Committed latents -> video (1, 3, n, H, W) in [-1, 1], seam-blended when asked."""
        first = self.decoder.frames_out
        n = self.timeline.frames_for_latents(committed.shape[2], first=self.decoder.latents_in == 0)
        blend = self.engine.recipe.blend_frames(self.state, plan, first, n)  # a motion warp's, else None
        # Only the reference-conditioned VAE's decoder blends (the Wan families' does not).
        frames = self.decoder.decode(committed) if blend is None else self.decoder.decode(committed, blend=blend)
        if self.knobs.seam_blend:
            frames = spread_latent_steps(frames, first, self._last_frame, self.knobs.seam_blend,
                                         self.timeline.temporal_stride)
        self._last_frame = frames[:, :, -1].clone()  # a latent's last frame: the blend leaves it as decoded
        return frames

    # ----- rewinding (barge-in) and aborts ----------------------------------------------

    def keep_history(self, steps: int) -> None:
        """Keep a snapshot before each of the last `steps` steps, so the stream can go back over
        them (`rewind_point`, `restore`) and a step can be aborted. Costs per step one chunk's
        window slots, the reference keys and the VAE decoder's causal caches (copies); 0
        turns it off. The generation worker turns it on so an interrupt can regenerate the
        frames generated but not yet played."""
        self._history = deque(maxlen=steps) if steps > 0 else None

    def rewind_point(self, frame: int) -> StreamSnapshot | None:
        """The kept snapshot from which the stream makes video frame `frame` again: the one
        taken before the step that made it. None when `frame` was not generated yet or the
        history does not reach back that far."""
        if frame >= self.frame_index:
            return None
        return next((snap for snap in reversed(self._history or ()) if snap.frame <= frame), None)

    @torch.inference_mode()  # the caches are inference tensors (made under it in __init__)
    def restore(self, snap: StreamSnapshot, remake_from: int | None = None) -> None:
        """Go back to `snap` (from `rewind_point`): the stream continues as if the steps
        after it never ran (same caches, positions, knot, RNG, decoder state).

        remake_from: the driving changes from this video frame on (a barge-in cut the
        speech there). The recipe drops predictions made with the old driving, and the next
        step, the chunk remade, denoises with `rewind_denoise_steps` so the new picture
        comes sooner. The frames before `remake_from` were shown already."""
        if self._history is None or not any(s is snap for s in self._history):
            raise ValueError("not a kept snapshot of this stream (see keep_history)")
        while True:
            u = self._history.pop()
            self.engine.recipe.restore(self.state, u.state)
            self.decoder.restore(u.decoder)
            self.generator.set_state(u.generator)
            self.chunks, self._last_frame, self._remake = u.chunks, u.last_frame, u.remake
            if u is snap:
                break
        if remake_from is not None:
            self._remake = True
            self.engine.recipe.forget_from(self.state, remake_from)

    def _snapshot(self) -> StreamSnapshot:
        return StreamSnapshot(self.frame_index, self.chunks, self.generator.get_state(),
                              self.engine.recipe.snapshot(self.state, self.knobs), self.decoder.snapshot(),
                              self._last_frame, self._remake)

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

    def close(self) -> None:
        """Free the caches (the worker calls this when a session ends)."""
        self._closed_span = self.next_span()  # where it stopped, for anyone still asking
        self.closed = True
        self.state = self.decoder = self._last_frame = None
        self._history = None
