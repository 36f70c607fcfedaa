"""aiortc tracks: they only pace and convert.

`AvatarVideoTrack` and `AvatarAudioTrack` read one `Playout` on one `MediaClock`: video
slot n leaves at `t0 + n / fps` with `pts = n * 90000 / fps`; audio frame m (20 ms, 960
samples s16 mono at 48 kHz) leaves at `t0 + m / 50` with `pts = m * 960`. The first
`recv()` of either track starts the clock after the prebuffer (first chunk, or
`prebuffer_timeout_s`), so neither track starts early. The audio is the driving speech of
the frames shown, so the sound is delayed exactly as much as the lips.

If the encoder calls `recv()` so late that the video is more than `max_late_slots`
behind the clock, the late slots are skipped (counted as `dropped`; pts stay monotonic)
rather than sent as a burst.

`consume_audio()` reads an incoming (microphone) track to the end, resampled to the
driving rate; `consume_blackhole()` reads and discards any other incoming track, since
aiortc's receive queue is unbounded (aiortc#554).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from streaming.clock import AUDIO_RATE, MediaClock
from streaming.playout import Playout

log = logging.getLogger("knotstream.tracks")


class Upsampler:
    """Stateful integer-factor upsampler (driving rate -> 48 kHz): zero stuffing and a
    Kaiser-windowed sinc low-pass, history kept between blocks so block edges are seamless.
    Delay: (taps - 1) / 2 output samples (0.5 ms at 48 kHz for 49 taps)."""

    def __init__(self, factor: int, taps_per_phase: int = 16):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        n = factor * taps_per_phase + 1
        t = (np.arange(n) - (n - 1) / 2) / factor
        self.taps = (np.sinc(t) * np.kaiser(n, 6.0)).astype(np.float64)  # DC gain = factor
        self._hist = np.zeros(n - 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n,) float -> (n * factor,) float32."""
        if self.factor == 1:
            return x.astype(np.float32)
        up = np.zeros(len(x) * self.factor)
        up[:: self.factor] = x
        buf = np.concatenate([self._hist, up])
        y = np.convolve(buf, self.taps, mode="valid")
        self._hist = buf[len(buf) - len(self._hist):]
        return y.astype(np.float32)


class Pacer:
    """Starts the shared clock once, after the prebuffer: the first chunk or a timeout."""

    def __init__(self, clock: MediaClock, playout: Playout, prebuffer_timeout_s: float = 2.0,
                 prebuffer_frames: int = 1, on_start: Callable[[], None] | None = None):
        self.clock = clock
        self.playout = playout
        self.prebuffer_timeout_s = prebuffer_timeout_s
        self.prebuffer_frames = prebuffer_frames
        self.on_start = on_start
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self.clock.started:
                return
            deadline = self.clock.now() + self.prebuffer_timeout_s
            while self.playout.queued_frames() < self.prebuffer_frames and self.clock.now() < deadline:
                await asyncio.sleep(0.01)
            self.clock.start()
            if self.on_start is not None:
                self.on_start()


class PacedTrack(MediaStreamTrack):
    """What both avatar tracks share: one pacer (its clock and playout), the start of every
    `recv`, and the stamping of each frame, recorded as (pts, send time) in `sent` when it
    is a list (tests measure pacing and A/V sync from it)."""

    def __init__(self, pacer: Pacer):
        super().__init__()
        self.pacer = pacer
        self.clock = pacer.clock
        self.playout = pacer.playout
        self.sent: list[tuple[int, float]] | None = None

    async def _ready(self) -> None:
        if self.readyState != "live":
            raise MediaStreamError
        await self.pacer.start()

    def _stamped(self, frame, pts: int, time_base):
        frame.pts, frame.time_base = pts, time_base
        if self.sent is not None:
            self.sent.append((pts, self.clock.now()))
        return frame


class AvatarVideoTrack(PacedTrack):
    kind = "video"

    def __init__(self, pacer: Pacer, max_late_slots: int = 3):
        super().__init__(pacer)
        self.max_late_slots = max_late_slots
        self.slot = 0
        self.dropped = 0

    async def recv(self) -> av.VideoFrame:
        await self._ready()
        behind = self.clock.slot_at() - self.slot
        if behind > self.max_late_slots:
            # The encoder fell behind: skip to the present rather than send a burst.
            self.playout.video(self.slot + behind - 1)
            self.dropped += behind
            self.slot += behind
        await self.clock.sleep_until(self.clock.video_time(self.slot))
        image, _ = self.playout.video(self.slot)
        frame = self._stamped(av.VideoFrame.from_ndarray(image, format="rgb24"), self.clock.video_pts(self.slot),
                              self.clock.video_time_base)
        self.slot += 1
        return frame


class AvatarAudioTrack(PacedTrack):
    kind = "audio"

    def __init__(self, pacer: Pacer, sample_rate: int):
        if AUDIO_RATE % sample_rate or sample_rate % 50:
            raise ValueError(f"driving sample rate must divide {AUDIO_RATE} and be a multiple of 50 Hz, "
                             f"got {sample_rate}")
        super().__init__(pacer)
        self.block = sample_rate // 50  # driving samples per 20 ms; x (48000 / rate) = 960 out
        self.upsample = Upsampler(AUDIO_RATE // sample_rate)
        self.index = 0

    async def recv(self) -> av.AudioFrame:
        await self._ready()
        await self.clock.sleep_until(self.clock.audio_time(self.index))
        pcm = self.upsample(self.playout.audio(self.index * self.block, self.block))
        s16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int16)
        frame = av.AudioFrame.from_ndarray(s16.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame = self._stamped(frame, self.clock.audio_pts(self.index), self.clock.audio_time_base)
        self.index += 1
        return frame


async def frames_of(track: MediaStreamTrack) -> AsyncIterator:
    """The frames a (remote) track delivers, until it ends."""
    while True:
        try:
            yield await track.recv()
        except MediaStreamError:
            return


async def consume_audio(track: MediaStreamTrack, on_samples: Callable[[np.ndarray], None],
                        sample_rate: int = 16000) -> None:
    """Read `track` until it ends; every frame -> float32 mono at `sample_rate` -> on_samples."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    async for frame in frames_of(track):
        for out in resampler.resample(frame):
            pcm = out.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
            try:
                on_samples(pcm)
            except Exception:
                log.exception("microphone audio handler failed; audio dropped")


async def consume_blackhole(track: MediaStreamTrack) -> None:
    """Read and discard `track` until it ends (an unread remote track leaks memory)."""
    async for _ in frames_of(track):
        pass


def track_task(coro: Awaitable, name: str) -> asyncio.Task:
    """A task whose failure is logged, not lost."""
    task = asyncio.ensure_future(coro)
    task.set_name(name)

    def done(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("task %s failed: %r", name, t.exception())

    task.add_done_callback(done)
    return task
