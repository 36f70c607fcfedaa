"""In-process avatar for the framework integrations: the ONE module of integrations/ that
touches the streaming layer (LiveSession, GenerationWorker, the playout and media clock).

Its surface is what a voice-agent framework needs and nothing more:

- `push(pcm, rate, segment)` speech of a segment, as fast as the TTS makes it (never blocks);
- `end(segment)` the segment is complete;
- `interrupt()` barge-in: returns at once with the cut segments' `finished` events;
- `frames()` an async iterator, paced in real time on the session's media clock, of
  `VideoOut` (every output frame, at the model's fps), `AudioOut` (the pushed audio that
  plays with that frame, at the caller's sample rate, exactly as pushed) and
  `PlaybackEvent` (`started` before a segment's first audio, `finished` after its last,
  exactly once per segment, with the position played);
- `aclose()`.

The engine runs in a `LiveSession` without a peer connection, so lips, barge-in
regeneration and pacing are the server's own. The speech a caller hears back is kept at
its own rate in a `SpeechTape` (integrations/tape.py) and laid where the session's
driving buffer put the 16 kHz copy that drives the lips.

A barge-in is answered in two steps: `interrupt()` cuts the tape and mutes the queued
frames at once; the generation worker then discards the unplayed frames and rewinds
(`GenerationWorker.rewind_unplayed`, between two steps). Speech pushed before that rewind
has run is moved by it (the driving buffer pulls it to the first regenerated frame), which
the tape, laid when the speech is pushed, would not follow; so it is held here and pushed
right after (a barrier call on the worker thread, which runs its calls in order).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Union

import numpy as np

from integrations.tape import PlaybackEvent, SpeechTape
from streaming.resample import StreamResampler
from streaming.session import LiveSession, SessionOptions
from streaming.worker import GenerationWorker

log = logging.getLogger("knotstream.integrations")

MAX_HELD_SECONDS = 60.0  # speech held while a barge-in rewind runs (it takes one step)


@dataclass
class VideoOut:
    image: np.ndarray   # (H, W, 3) uint8 RGB
    index: int          # output frame number since the stream started
    time_s: float       # media time of the frame on the stream's clock: index / fps


@dataclass
class AudioOut:
    pcm: np.ndarray     # (n,) int16 mono at `rate`
    rate: int
    index: int          # the video frame it plays with
    speech: bool = True  # False: a remote stream's idle audio (silence between segments)


Output = Union[VideoOut, AudioOut, PlaybackEvent]


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 samples as they are; float samples in [-1, 1] scaled (clipped) to int16."""
    a = np.asarray(pcm).reshape(-1)
    if a.dtype == np.int16:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio must be int16 or float samples, got {a.dtype}")
    return (np.clip(a, -1.0, 1.0) * 32767.0).round().astype(np.int16)


class AvatarHost:
    """An engine and the generation worker thread that steps it, shared by every avatar of
    the process (one thread serves many sessions, as in the server)."""

    def __init__(self, engine, max_batch: int = 1):
        self.engine = engine
        self.worker = GenerationWorker(engine, max_batch=max_batch)
        self.worker.start()
        cfg = engine.config
        self.fps, self.width, self.height = cfg.fps, cfg.width, cfg.height
        self.driving_rate = cfg.driving.sample_rate

    @classmethod
    def load(cls, model: str = "tiny", device: str = "cpu") -> "AvatarHost":
        from model.engine import Engine

        return cls(Engine.from_pretrained(model, device=device))

    async def open(self, reference: np.ndarray, *, audio_rate: int | None = None, seed: int = 0,
                   knobs=None, options: SessionOptions | None = None) -> "LocalAvatar":
        """Start a stream of `reference` ((H, W, 3) uint8 RGB portrait). audio_rate: the rate of
        the audio `frames()` hands back (None: the rate of the first audio pushed)."""
        stream = await asyncio.wrap_future(self.worker.call(self.engine.start, reference, knobs, seed))
        session = LiveSession(f"local-{secrets.token_hex(4)}", self.worker, stream, self.fps, self.driving_rate,
                              stream.reference_image, options)
        return LocalAvatar(session, (self.width, self.height), audio_rate)

    def close(self) -> None:
        self.worker.stop()


class LocalAvatar:
    """One in-process avatar stream (see the module docstring). Use on one event loop."""

    def __init__(self, session: LiveSession, size: tuple[int, int], audio_rate: int | None = None):
        self._session = session
        self.fps = session.clock.fps
        self.width, self.height = size
        self.driving_rate = session.sample_rate
        self.audio_rate = audio_rate
        self._tape = SpeechTape(self.fps, audio_rate, self.driving_rate) if audio_rate else None
        self._resamplers: dict[tuple[str, str], StreamResampler] = {}  # (segment, "drive"|"tape")
        self._events: deque[PlaybackEvent] = deque()   # interrupt events, handed out by frames()
        self._held: list[tuple] | None = None           # calls held while a barge-in rewind runs
        self._barrier: asyncio.Future | None = None
        self._held_samples = 0
        self._last_gen = -1                              # last generated frame handed out
        self.errors: list[str] = []                      # what could not be played, and why

    @property
    def closed(self) -> bool:
        return self._session.state == "closed"

    @property
    def error(self) -> str | None:
        """Why the stream stopped, when generation failed."""
        return self._session.error

    def status(self) -> dict:
        return self._session.status()

    # ----- input -------------------------------------------------------------------------

    def push(self, pcm: np.ndarray, rate: int, segment: str) -> None:
        """Speech for `segment`: int16 (or float in [-1, 1]) mono samples at `rate`. Raises
        ValueError for bad audio, streaming.driving.BufferFull past the session's limit."""
        if self.closed:
            raise RuntimeError(f"avatar stream is closed ({self._session.close_reason})")
        pcm = to_int16(pcm)
        if self._held is not None:
            self._held_samples += len(pcm) / rate
            if self._held_samples > MAX_HELD_SECONDS:
                raise ValueError(f"more than {MAX_HELD_SECONDS:.0f} s of speech pushed during a barge-in")
            self._held.append((self.push, pcm, rate, segment))
            return
        if self._tape is None:
            self.audio_rate = rate
            self._tape = SpeechTape(self.fps, rate, self.driving_rate)
        drive = self._resampler(segment, "drive", rate, self.driving_rate).push(pcm.astype(np.float32) / 32768.0)
        start = self._push_driving(segment, drive)
        self._tape.place(segment, self._for_tape(segment, pcm, rate), start, len(drive))

    def end(self, segment: str) -> None:
        """`segment` is complete: its `finished` event follows its last audio."""
        if self._held is not None:
            self._held.append((self.end, segment))
            return
        drive = self._resamplers.pop((segment, "drive"), None)
        tape = self._resamplers.pop((segment, "tape"), None)
        if self._tape is None:  # no audio ever pushed: nothing plays, so it finishes at once
            self._events.append(PlaybackEvent("finished", segment))
            return
        if drive is not None:
            tail = drive.flush()
            start = self._push_driving(segment, tail)
            self._tape.place(segment, np.zeros(0, np.int16), start, len(tail))
        if tape is not None:
            self._tape.place(segment, to_int16(tape.flush()), None, 0)
        try:
            # Speech reaches the session at the driving rate (resampled here), so the session
            # holds no resampler tail for it: the segment ends at once, without awaiting.
            self._session.driving.end_segment(segment)
        except KeyError:
            pass  # no driving sample was ever pushed for it
        self._tape.end(segment)

    def interrupt(self) -> list[PlaybackEvent]:
        """Barge-in: speech stops with the next frame; returns (and hands out through
        `frames()`) a `finished` event, interrupted, for every segment not finished."""
        events = self._tape.cut(self._last_gen + 1) if self._tape is not None else []
        self._resamplers.clear()
        self._held, self._held_samples = [], 0.0  # held speech belonged to the cut segments
        if not self.closed:
            self._session.interrupt()
            self._barrier = asyncio.wrap_future(self._session.worker.call(lambda: None))
            self._barrier.add_done_callback(self._release_held)
        else:
            self._held = None
        self._events.extend(events)
        return events

    def _release_held(self, fut: asyncio.Future) -> None:
        if fut is not self._barrier:  # a later interrupt set its own barrier
            return
        held, self._held, self._barrier = self._held or [], None, None
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("barge-in barrier failed: %s", fut.exception())
        for fn, *args in held:
            try:
                fn(*args)
            except Exception as exc:  # the caller has returned: say what was not played
                self.errors.append(f"speech pushed during a barge-in not played: {type(exc).__name__}: {exc}")
                log.warning("avatar: %s", self.errors[-1])

    def _resampler(self, segment: str, kind: str, src: int, dst: int) -> StreamResampler:
        key = (segment, kind)
        rs = self._resamplers.get(key)
        if rs is None or rs.in_rate != src:
            if len(self._resamplers) >= 64:  # segments never ended: keep the newest
                self._resamplers.pop(next(iter(self._resamplers)))
            rs = self._resamplers[key] = StreamResampler(src, dst)
        return rs

    def _for_tape(self, segment: str, pcm: np.ndarray, rate: int) -> np.ndarray:
        if rate == self.audio_rate:
            return pcm
        return to_int16(self._resampler(segment, "tape", rate, self.audio_rate).push(pcm.astype(np.float32) / 32768.0))

    def _push_driving(self, segment: str, drive: np.ndarray) -> int | None:
        """Push driving samples; returns where the driving buffer put them (None when empty)."""
        if not len(drive):
            return None
        seg = self._session.push_audio(drive, segment, end=False)
        return seg.end - len(drive)

    # ----- output ------------------------------------------------------------------------

    async def frames(self) -> AsyncIterator[Output]:
        """Every output frame at the model's fps, its audio and the playback events (see the
        module docstring). Ends when the stream closes. One consumer only."""
        s = self._session
        await s.pacer.start()
        slot = 0
        while not self.closed:
            await s.clock.sleep_until(s.clock.video_time(slot))
            if self.closed:
                break
            image, gen = s.playout.video(slot)
            for item in [*self._drain_events(), VideoOut(image, slot, slot / self.fps)]:
                yield item
            # The audio is taken only now that the consumer asks for it: an interrupt while it
            # handled the picture has cut it already, and no cut speech is handed out.
            if gen is not None:
                self._last_gen = gen
                audio, events = self._tape.take(gen) if self._tape is not None else (None, [])
                if audio is not None:
                    yield AudioOut(audio, self.audio_rate, slot)
                for item in events:
                    yield item
            slot += 1
        for item in self._drain_events():
            yield item

    def _drain_events(self) -> list[PlaybackEvent]:
        out = list(self._events)
        self._events.clear()
        return out

    def pending_segments(self) -> list[str]:
        """Segments whose `finished` event has not been handed out yet."""
        return self._tape.pending() if self._tape is not None else []

    async def aclose(self) -> None:
        await self._session.close("closed by the integration")
