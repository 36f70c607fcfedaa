"""One media clock per session: every pts and every send time derives from one start.

Video slot n is released at `t0 + n / fps` with `pts = n * 90000 / fps`; audio frame m
(20 ms) at `t0 + m * 0.02` with `pts = m * 960` at 48 kHz. Both tracks ask the same
clock, so the browser (which pairs RTP time with wall-clock send time through RTCP
sender reports) lip-syncs them, and sleeps are anchored to `t0` so timing error never
accumulates.
"""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction
from typing import Callable

VIDEO_CLOCK_RATE = 90000
AUDIO_RATE = 48000
AUDIO_FRAME_SAMPLES = 960  # 20 ms at 48 kHz


class MediaClock:
    """Media time of one session. `now` is injectable so tests never depend on wall-clock speed."""

    def __init__(self, fps: int, now: Callable[[], float] = time.monotonic):
        if not isinstance(fps, int) or fps <= 0 or VIDEO_CLOCK_RATE % fps:
            raise ValueError(f"fps must be a positive integer dividing {VIDEO_CLOCK_RATE}, got {fps!r}")
        self.fps = fps
        self.now = now
        self.t0: float | None = None
        self.video_time_base = Fraction(1, VIDEO_CLOCK_RATE)
        self.audio_time_base = Fraction(1, AUDIO_RATE)

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def start(self, t0: float | None = None) -> float:
        """Fix t0 once (the first track to start does it); later calls return the same t0."""
        if self.t0 is None:
            self.t0 = self.now() if t0 is None else t0
        return self.t0

    # ----- video ----------------------------------------------------------------------

    def video_pts(self, slot: int) -> int:
        return slot * (VIDEO_CLOCK_RATE // self.fps)

    def video_time(self, slot: int) -> float:
        """Release time of video slot `slot` (needs a started clock)."""
        return self._t0() + slot / self.fps

    def slot_at(self, t: float | None = None) -> int:
        """The video slot being shown at time t (0 before the start)."""
        if self.t0 is None:
            return 0
        t = self.now() if t is None else t
        return max(0, int((t - self.t0) * self.fps))

    # ----- audio ----------------------------------------------------------------------

    @staticmethod
    def audio_pts(frame: int) -> int:
        return frame * AUDIO_FRAME_SAMPLES

    def audio_time(self, frame: int) -> float:
        return self._t0() + frame * AUDIO_FRAME_SAMPLES / AUDIO_RATE

    # ----- waiting --------------------------------------------------------------------

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    def _t0(self) -> float:
        if self.t0 is None:
            raise RuntimeError("media clock not started")
        return self.t0
