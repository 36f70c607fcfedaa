"""Playout: generated chunks -> output slots on the media clock (video frames and their audio).

The generation worker `put()`s chunks (frames plus the driving audio of exactly those
frames). Output slot n (released at `t0 + n / fps`) gets the next generated frame when
one is queued. **Underrun policy**: when none is queued, the slot repeats the last frame
(the reference portrait before the first chunk) with silence, and the hold is counted;
the stream then continues from where generation is, so the timeline slips by the held
slots and audio slips with it (lips stay on their sound). Slots are assigned lazily and
in order by whichever track asks first, so the video and audio tracks always agree.

Audio of slot n is the driving audio of the frame shown in it: output driving samples
[sample_of(n), sample_of(n + 1)) at the driving rate. Thread-safe: the worker thread
puts, the event loop's tracks read.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from model.timeline import sample_of_frame
from streaming.clock import MediaClock


@dataclass
class Chunk:
    """One generated chunk. frames: (n, H, W, 3) uint8 for generated frames [first_frame, first_frame + n);
    audio: (sample_of(first + n) - sample_of(first),) float32 driving audio of those frames."""

    first_frame: int
    frames: np.ndarray
    audio: np.ndarray
    created: float = field(default_factory=time.monotonic)


@dataclass
class PlayoutStats:
    released: int = 0      # slots assigned a generated frame
    held: int = 0          # slots that repeated the last frame (underrun)
    muted_frames: int = 0  # queued frames whose audio an interrupt silenced
    dropped: int = 0       # frames discarded (close)
    flushed: int = 0       # generated frames an interrupt discarded to regenerate them


class Playout:
    """Assigns generated frames (and their audio) to output slots; bounded to `max_frames`."""

    def __init__(self, clock: MediaClock, sample_rate: int, placeholder: np.ndarray, max_frames: int,
                 on_slot: Callable[[int, int | None], None] | None = None):
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        self.clock = clock
        self.fps = clock.fps
        self.sample_rate = sample_rate
        self.max_frames = max_frames
        self.on_slot = on_slot
        self.stats = PlayoutStats()
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, np.ndarray, np.ndarray]] = deque()  # (generated frame, image, audio)
        self._last = np.ascontiguousarray(placeholder)
        self._next_slot = 0                       # first slot not yet assigned
        self.mutes = 0                            # mute_queued() calls (see put)
        self._slots: dict[int, tuple[np.ndarray, np.ndarray, int | None]] = {}
        self.closed = False

    # ----- timeline -------------------------------------------------------------------

    def sample_of(self, frame: int) -> int:
        return sample_of_frame(frame, self.fps, self.sample_rate)

    # ----- producer (worker thread) ---------------------------------------------------

    def put(self, chunk: Chunk, mutes_seen: int | None = None) -> None:
        """Queue a generated chunk. mutes_seen: `self.mutes` when its audio was read from the
        driving; an interrupt since then (`mute_queued`) means the audio is speech the user cut
        off, so the chunk is queued silent (it was being generated while the interrupt came)."""
        n = len(chunk.frames)
        base = self.sample_of(chunk.first_frame)
        want = self.sample_of(chunk.first_frame + n) - base
        if chunk.audio.shape != (want,):
            raise ValueError(f"chunk audio must have {want} samples for frames "
                             f"[{chunk.first_frame}, {chunk.first_frame + n}), got {chunk.audio.shape}")
        with self._lock:
            if len(self._queue) + n > self.max_frames:
                raise OverflowError(f"playout holds {len(self._queue)} frames; {n} more exceed {self.max_frames}")
            if mutes_seen is not None and mutes_seen != self.mutes:
                chunk = Chunk(chunk.first_frame, chunk.frames, np.zeros_like(chunk.audio))
                self.stats.muted_frames += n
            for i in range(n):
                f = chunk.first_frame + i
                a = chunk.audio[self.sample_of(f) - base: self.sample_of(f + 1) - base]
                self._queue.append((f, chunk.frames[i], a))

    def buffered_frames(self, now: float | None = None) -> int:
        """Generated frames not yet due: queued minus slots already due but not assigned."""
        with self._lock:
            due = self.clock.slot_at(now) - self._next_slot if self.clock.started else 0
            return len(self._queue) - max(0, due)

    def queued_frames(self) -> int:
        with self._lock:
            return len(self._queue)

    # ----- consumers (tracks) ---------------------------------------------------------

    def video(self, slot: int) -> tuple[np.ndarray, int | None]:
        """(image (H, W, 3) uint8, generated frame index or None when held) of slot `slot`."""
        with self._lock:
            self._advance(slot)
            image, _, gen = self._slots[slot]
            self._forget_before(slot)
            return image, gen

    def audio(self, start: int, n: int) -> np.ndarray:
        """Output driving-rate samples [start, start + n) (float32); assigns the slots they cover."""
        with self._lock:
            first = (start * self.fps) // self.sample_rate
            last = ((start + n - 1) * self.fps) // self.sample_rate
            self._advance(last)
            out = np.zeros(n, np.float32)
            for slot in range(first, last + 1):
                if slot not in self._slots:
                    continue  # already forgotten by the video side: silence
                a = self._slots[slot][1]
                s0 = self.sample_of(slot)
                lo, hi = max(start, s0), min(start + n, s0 + len(a))
                if hi > lo:
                    out[lo - start: hi - start] = a[lo - s0: hi - s0]
            return out

    def _advance(self, slot: int) -> None:
        while self._next_slot <= slot:
            s = self._next_slot
            length = self.sample_of(s + 1) - self.sample_of(s)
            if self._queue:
                gen, image, a = self._queue.popleft()
                # A frame's own sample count can differ by one from the slot's (fractional fps).
                a = a[:length] if len(a) >= length else np.pad(a, (0, length - len(a)))
                self._last = image
                self.stats.released += 1
            else:
                gen, image, a = None, self._last, np.zeros(length, np.float32)
                self.stats.held += 1
            self._slots[s] = (image, a, gen)
            self._next_slot += 1
            if self.on_slot is not None:
                self.on_slot(s, gen)

    def _forget_before(self, slot: int) -> None:
        # Keep a few slots back: the audio track may still read the one before.
        for s in [s for s in self._slots if s < slot - 4]:
            del self._slots[s]

    # ----- control --------------------------------------------------------------------

    def mute_queued(self) -> int:
        """Interrupt: silence the audio of every frame generated but not yet played. Returns the count."""
        with self._lock:
            self._queue = deque((g, img, np.zeros_like(a)) for g, img, a in self._queue)
            self.mutes += 1
            self.stats.muted_frames += len(self._queue)
            return len(self._queue)

    def first_queued(self) -> int | None:
        """Generated frame index of the next frame to be released, None when none is queued."""
        with self._lock:
            return self._queue[0][0] if self._queue else None

    def flush(self) -> tuple[int | None, int]:
        """Interrupt: discard every generated frame not yet released (the worker regenerates
        from the first of them). Returns (that frame's index or None, count)."""
        with self._lock:
            if not self._queue:
                return None, 0
            first, n = self._queue[0][0], len(self._queue)
            self._queue.clear()
            self.stats.flushed += n
            return first, n

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.stats.dropped += len(self._queue)
            self._queue.clear()
            self._slots.clear()
