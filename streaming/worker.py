"""The generation worker: ONE thread per process stepping every session's stream.

Model work never runs on the event loop. Each loop iteration the worker picks the
sessions whose playout holds fewer than `lead_frames` generated frames (the generation
lead: how far generation runs ahead of the output), most urgent deadline first (the
time their playout would run dry; ties go to the least recently served), takes up to
`max_batch` of them and calls `engine.step_many` once (one batched forward per model
pass for streams of the same chunk geometry). Each step gets exactly its driving from the
session's `DrivingBuffer` (`take(stream.next_span())`). Chunks go to each session's
bounded `Playout`; the lead bound is the hand-off's backpressure, so no queue grows
without bound. The worker sees the engine only through `StepEngine` / `EngineStream`.

Failures are per session: a step that raises closes that session's stream and calls its
`on_error` (the session then tells its client and closes); other sessions go on. When a
batch of several sessions fails as a whole the worker cannot tell whose input was at
fault (the streams may be half-stepped), so every session of that batch fails; with the
default `max_batch=1` that never happens.

Engine calls that are not steps (starting a stream: reference encoding; closing one) go
through `call()`, so the engine is only ever used from this one thread.

**Barge-in** (`rewind_unplayed`): frames generated but not yet released are discarded,
and generation goes back to the start of the chunk holding the first of them: the stream
is restored to its snapshot of that chunk (`stream.restore(snapshot, remake_from=cut)`:
the caches are put back as they were) and the driving timeline is rewound to the same
frame (`driving.rewind(frame, cut=cut)`); generation goes on from there with the new
driving; regenerated frames before the cut are not sent again (they were shown). The
picture continues from what the viewer saw, so there is no jump. Three things make the
closed mouth come sooner: the remade chunk runs fewer denoising steps
(`rewind_denoise_steps`), the stream drops a knot predicted while the speech went on,
and the timeline mutes the model's audio context just before the cut, so the first new
frame is already driven by silence. When the stream has no history that far back, the
fallback keeps the queued frames (their audio is already muted) and says so in the result.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from model.config import ModelConfig, StreamKnobs
from model.timeline import StepInput, StepSpan, Timeline
from streaming.driving import DrivingBuffer
from streaming.playout import Chunk, Playout

log = logging.getLogger("knotstream.worker")


class RewindPoint(Protocol):
    frame: int  # where the step after the snapshot starts


class EngineStream(Protocol):
    """What the worker needs of one session's stream (model.engine.Stream)."""

    def next_span(self) -> StepSpan:
        """The frames the next step returns and the driving it reads."""

    def keep_history(self, steps: int) -> None:
        """Keep snapshots of the last `steps` steps (0: none; then nothing can be rewound)."""

    def rewind_point(self, frame: int) -> RewindPoint | None:
        """The kept snapshot from which the stream makes `frame` again (its `.frame` is where
        that step starts), or None."""

    def restore(self, snapshot: RewindPoint, remake_from: int | None = None) -> None:
        """Back to a snapshot of `rewind_point`; the driving changes from `remake_from` on."""

    def clear_abort(self) -> None: ...

    def close(self) -> None: ...


class SessionStream(EngineStream, Protocol):
    """What a live session reads of its stream besides the worker's part."""

    timeline: Timeline
    knobs: StreamKnobs
    cfg: ModelConfig
    reference_image: np.ndarray  # the portrait as fitted to the frame: the placeholder before the first frame

    @property
    def driving_frames(self) -> int:
        """Video frames of motion the next step reads."""

    def request_abort(self) -> bool:
        """Stop the step in progress (from another thread); False when nothing could be undone."""


class StepEngine(Protocol):
    """What the worker needs of the engine (model.engine.Engine)."""

    def step_many(self, streams: Sequence[EngineStream], inputs: Sequence[StepInput | None],
                  on_frames: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray | None]:
        """One chunk per stream from its driving; None for a stream whose step was aborted."""


@dataclass
class Generation:
    """What the worker needs of one session."""

    id: str
    stream: EngineStream
    driving: DrivingBuffer
    playout: Playout
    lead_frames: int
    on_error: Callable[[BaseException], None] = lambda exc: None
    on_chunk: Callable[[float, int], None] | None = None  # (step seconds, frames) after each chunk
    chunks: int = 0
    frames: int = 0
    last_step_s: float = 0.0
    last_served: float = 0.0
    failed: bool = False
    removed: bool = False
    rewind_chunks: int = 0   # steps the stream keeps history for (0: interrupts cannot regenerate)
    skip_before: int = 0     # regenerated frames before this were already shown: not sent again


@dataclass
class WorkerStats:
    steps: int = 0      # step_many calls
    chunks: int = 0
    errors: int = 0
    busy_s: float = 0.0  # time spent in step_many
    started: float = field(default_factory=time.monotonic)


class GenerationWorker:
    """One worker thread serving every session of a process (see the module docstring)."""

    def __init__(self, engine: StepEngine, max_batch: int = 1, now: Callable[[], float] = time.monotonic,
                 idle_wait_s: float = 0.01):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.now = now
        self.idle_wait_s = idle_wait_s
        self.stats = WorkerStats()
        self._sessions: dict[str, Generation] = {}
        self._calls: list[tuple[Callable, tuple, concurrent.futures.Future]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ----- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._run, name="knotstream-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after the current step; closes every remaining stream."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("generation worker did not stop within %.1f s", timeout)
        for g in list(self._sessions.values()):
            _close_stream(g)
        self._sessions.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----- sessions -------------------------------------------------------------------

    def add(self, gen: Generation) -> None:
        with self._cond:
            if gen.id in self._sessions:
                raise ValueError(f"session {gen.id!r} is already served")
            if gen.rewind_chunks:
                gen.stream.keep_history(gen.rewind_chunks)  # not stepped yet: safe off-thread
            self._sessions[gen.id] = gen
            self._cond.notify_all()

    def remove(self, session_id: str) -> concurrent.futures.Future:
        """Stop serving a session; its stream is closed on the worker thread. Returns a future."""
        with self._cond:
            gen = self._sessions.pop(session_id, None)
            if gen is not None:
                gen.removed = True
        if gen is None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(None)
            return fut
        return self.call(_close_stream, gen)

    def sessions(self) -> list[Generation]:
        with self._cond:
            return list(self._sessions.values())

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run `fn(*args)` on the worker thread between steps (engine.start, stream.close)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stop or self._thread is None:
                fut.set_exception(RuntimeError("generation worker is not running"))
                return fut
            self._calls.append((fn, args, fut))
            self._cond.notify_all()
        return fut

    def rewind_unplayed(self, session_id: str) -> concurrent.futures.Future:
        """Barge-in: regenerate what was generated but not played (see the module docstring).
        The future's result: {"flushed_frames", "rewound_to"} or {"fallback": reason}."""
        with self._cond:
            gen = self._sessions.get(session_id)
        if gen is None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result({"fallback": "session is not served"})
            return fut
        return self.call(_rewind_unplayed, gen)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ----- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    break
                calls, self._calls = self._calls, []
            for fn, args, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as exc:  # handed to the caller, never kills the loop
                        fut.set_exception(exc)
            batch = self._pick()
            if batch:
                self._step(batch)
                continue
            with self._cond:
                if not self._calls and not self._stop:
                    self._cond.wait(self.idle_wait_s)
        # Stopping: streams removed but not yet closed are still closed (frees their caches);
        # other pending calls (a stream start) are cancelled.
        for fn, args, fut in self._calls:
            if fn is _close_stream and fut.set_running_or_notify_cancel():
                fut.set_result(fn(*args))
            else:
                fut.cancel()
        self._calls = []

    def _pick(self) -> list[Generation]:
        now = self.now()
        due = []
        with self._cond:
            sessions = list(self._sessions.values())
        for g in sessions:
            if g.failed or g.removed or g.playout.closed:
                continue
            buffered = g.playout.buffered_frames(now)
            room = g.playout.max_frames - g.playout.queued_frames()
            if buffered < g.lead_frames and room >= g.stream.next_span().frames:
                due.append((now + buffered / g.playout.fps, g.last_served, g))
        due.sort(key=lambda d: (d[0], d[1]))
        return [g for _, _, g in due[: self.max_batch]]

    def _read_driving(self, batch: list[Generation]) -> tuple[list[StepSpan], list[StepInput], list[tuple]]:
        """Each session's next span, its driving and (playback audio, mutes). A session whose
        input cannot be read fails alone and leaves `batch`; the thread goes on."""
        spans, inputs, own = [], [], []
        for g in list(batch):
            try:
                span = g.stream.next_span()
                mutes = g.playout.mutes  # before the driving is read: an interrupt after it mutes this chunk
                d = g.driving.take(span)
            except Exception as exc:
                log.exception("reading the driving input of session %s failed", g.id)
                batch.remove(g)
                self._fail(g, exc)
                continue
            spans.append(span)
            inputs.append(d.input)
            own.append((d.playback, mutes))
        return spans, inputs, own

    def _step(self, batch: list[Generation]) -> None:
        spans, inputs, own = self._read_driving(batch)
        if not batch:
            return
        delivered: dict[int, bool] = {}

        def deliver(i: int, frames: np.ndarray) -> None:
            """Frames of batch[i] straight to its playout (the engine calls this as soon as
            they are decoded, before its cache write); False when the session failed."""
            g, span, (playback, mutes) = batch[i], spans[i], own[i]
            try:
                if frames.shape[0] != span.frames:
                    raise RuntimeError(f"engine returned {frames.shape[0]} frames, expected {span.frames}")
                shown = min(span.frames, max(0, g.skip_before - span.frame))  # regenerated after a rewind, shown
                if shown < span.frames:
                    cut = g.driving.sample_of(span.frame + shown) - g.driving.sample_of(span.frame)
                    g.playout.put(Chunk(span.frame + shown, frames[shown:], playback[cut:]), mutes)
                delivered[i] = True
            except Exception as exc:
                delivered[i] = False
                self._fail(g, exc)

        t = time.perf_counter()
        try:
            outs = self.engine.step_many([g.stream for g in batch], inputs, on_frames=deliver)
        except Exception as exc:
            self.stats.errors += 1
            log.exception("generation failed for session(s) %s", [g.id for g in batch])
            for g in batch:
                if not g.failed:
                    self._fail(g, exc)
            return
        dt = time.perf_counter() - t
        self.stats.steps += 1
        self.stats.busy_s += dt
        now = self.now()
        for i, (g, frames, span) in enumerate(zip(batch, outs, spans)):
            g.last_served = now
            if frames is None:  # aborted for an interrupt: the stream is as before this step
                g.driving.rewind(span.frame)
                continue
            if i not in delivered:  # an engine that does not call on_frames
                deliver(i, frames)
            if delivered[i]:
                self._count_chunk(g, dt, span.frames)

    def _count_chunk(self, g: Generation, dt: float, frames: int) -> None:
        g.chunks += 1
        g.frames += frames
        g.last_step_s = dt
        self.stats.chunks += 1
        if g.on_chunk is not None:
            try:
                g.on_chunk(dt, frames)
            except Exception:
                log.exception("on_chunk callback of session %s failed", g.id)

    def _fail(self, g: Generation, exc: BaseException) -> None:
        g.failed = True
        with self._cond:
            self._sessions.pop(g.id, None)
        _close_stream(g)
        try:
            g.on_error(exc)
        except Exception:
            log.exception("on_error callback of session %s failed", g.id)


def _rewind_unplayed(g: Generation) -> dict:
    """Runs on the worker thread between steps (see GenerationWorker.rewind_unplayed)."""
    g.stream.clear_abort()  # the abort asked with this rewind has been served (or is moot)
    first = g.playout.first_queued()
    if first is None:
        return {"flushed_frames": 0, "rewound_to": None}
    if g.stream.rewind_point(first) is None:
        return {"fallback": f"no stream history back to frame {first}"}
    first, n = g.playout.flush()
    if first is None:  # the tracks released the rest meanwhile: nothing left to regenerate
        return {"flushed_frames": 0, "rewound_to": None}
    snapshot = g.stream.rewind_point(first)  # first only grew: still kept
    g.driving.interrupt(from_frame=first)
    g.stream.restore(snapshot, remake_from=first)  # the mouth closes from the first regenerated frame
    g.driving.rewind(snapshot.frame, cut=first)
    g.skip_before = first
    return {"flushed_frames": n, "rewound_to": snapshot.frame, "driving_from": g.driving.next_frame}


def _close_stream(g: Generation) -> None:
    try:
        g.stream.close()
    except Exception:
        log.exception("closing the stream of session %s failed", g.id)
