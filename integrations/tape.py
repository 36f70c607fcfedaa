"""The speech an avatar plays, at the caller's own sample rate, laid on the frame timeline.

The engine is driven by speech resampled to its driving rate (16 kHz), but what a voice
agent should hear back is the audio its TTS made, sample for sample: a 24 kHz voice must
not come back band-limited to 8 kHz, and "audio out == audio in" must hold exactly. So
the pushed audio is kept here at the output rate and placed where the driving buffer put
its resampled copy: generated frame g plays tape samples [T(g), T(g + 1)),
T(g) = ceil(g * rate / fps), the same geometry as the driving timeline.

Pieces that the driving buffer placed back to back stay back to back here (resampling
changes a segment's length by a few samples of filter delay, never by more), so every
pushed sample is played exactly once and in order. A piece that landed later (the TTS
fell behind real time and frames were generated in between) starts a new span where its
driving copy starts. `take(g)` returns frame g's audio and the playback events that
frame completes; `cut(g)` (barge-in) drops everything from frame g on.

Pure bookkeeping: no streaming imports, no threads; the adapter (integrations/avatar.py)
calls it from the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PlaybackEvent:
    """`started` when a segment's first sample plays, `finished` after its last one (or at
    barge-in, `interrupted`); position_s = seconds of the segment played."""

    type: str
    segment: str
    position_s: float = 0.0
    interrupted: bool = False


@dataclass
class _Span:
    start: int                      # tape sample of data[0]
    data: list[np.ndarray] = field(default_factory=list)
    length: int = 0
    taken: int = 0                  # samples from the start already handed out

    @property
    def end(self) -> int:
        return self.start + self.length

    def array(self) -> np.ndarray:
        if len(self.data) > 1:
            self.data = [np.concatenate(self.data)]
        return self.data[0] if self.data else np.zeros(0, np.int16)


@dataclass
class _Segment:
    id: str
    spans: list[_Span] = field(default_factory=list)
    total: int = 0          # samples pushed
    played: int = 0         # samples handed out by take()
    ended: bool = False
    started: bool = False
    finished: bool = False
    driving_end: int | None = None  # driving sample after this segment's last placed piece


class SpeechTape:
    """Pushed speech at `rate` on the generated-frame timeline of an `fps` stream whose
    driving audio runs at `driving_rate` (see the module docstring)."""

    def __init__(self, fps: int, rate: int, driving_rate: int):
        if fps <= 0 or rate <= 0 or driving_rate <= 0:
            raise ValueError(f"fps and rates must be positive, got {fps}, {rate}, {driving_rate}")
        self.fps, self.rate, self.driving_rate = fps, rate, driving_rate
        self._segments: dict[str, _Segment] = {}
        self._tape_end = 0             # tape sample after the last placed piece
        self._driving_end: int | None = None
        self._cursor = 0               # tape sample after the last frame taken

    def bounds(self, frame: int) -> tuple[int, int]:
        """Tape samples [lo, hi) of generated frame `frame`."""
        return -((-frame * self.rate) // self.fps), -((-(frame + 1) * self.rate) // self.fps)

    # ----- producer ---------------------------------------------------------------------

    def place(self, segment: str, pcm: np.ndarray, driving_start: int | None, driving_len: int) -> None:
        """Append int16 samples to `segment`. driving_start: where the driving buffer put the
        resampled copy (None when resampling produced no sample yet: the piece continues
        the segment); driving_len: that copy's length."""
        seg = self._segments.get(segment)
        if seg is None or seg.finished:
            seg = self._segments[segment] = _Segment(segment)
        if seg.ended:
            raise ValueError(f"segment {segment!r} has ended; audio for it cannot follow")
        contiguous = driving_start is None or driving_start == (seg.driving_end if seg.spans else self._driving_end)
        if not seg.spans or not contiguous:
            at = self._tape_end
            if not contiguous and driving_start is not None:
                at = max(at, round(driving_start * self.rate / self.driving_rate))
            seg.spans.append(_Span(max(at, self._cursor)))
        span = seg.spans[-1]
        span.data.append(np.asarray(pcm, np.int16))
        span.length += len(pcm)
        seg.total += len(pcm)
        self._tape_end = max(self._tape_end, span.end)
        if driving_start is not None:
            seg.driving_end = self._driving_end = driving_start + driving_len

    def end(self, segment: str) -> None:
        """No more audio for `segment`; its `finished` event follows its last sample."""
        seg = self._segments.get(segment)
        if seg is None:
            seg = self._segments[segment] = _Segment(segment)
        seg.ended = True

    def pending(self) -> list[str]:
        """Segments not finished yet."""
        return [s.id for s in self._segments.values() if not s.finished]

    # ----- consumer ---------------------------------------------------------------------

    def take(self, frame: int) -> tuple[np.ndarray | None, list[PlaybackEvent]]:
        """Audio of generated frame `frame` ((n,) int16, None when no speech touches it) and the
        events it completes. Frames must be taken in increasing order. The audio is one frame
        long, or shorter where the speech ends inside the frame."""
        lo, hi = self.bounds(frame)
        lo = max(lo, self._cursor)
        out, events, touched, last = np.zeros(max(0, hi - lo), np.int16), [], False, lo
        for seg in list(self._segments.values()):
            for span in seg.spans:
                a, b = span.start + span.taken, min(hi, span.end)
                if b <= a:
                    continue
                # Spans start at or after the frames already taken (place() clamps them), and
                # each take consumes a span up to the frame's end: a >= lo always holds.
                out[a - lo: b - lo] = span.array()[a - span.start: b - span.start]
                seg.played += b - a
                span.taken = b - span.start
                touched, last = True, max(last, b)
                if not seg.started:
                    seg.started = True
                    events.append(PlaybackEvent("started", seg.id))
            seg.spans = [s for s in seg.spans if s.taken < s.length]
            if seg.ended and seg.played >= seg.total:
                events.append(self._finish(seg, interrupted=False))
        # Nothing follows the last sample in this frame: end the audio there, so a segment's
        # audio is exactly its samples (the next speech starts on a later frame anyway).
        if not any(sp.start < hi for seg in self._segments.values() for sp in seg.spans):
            out = out[: last - lo]
        self._cursor = max(self._cursor, hi)
        return (out if touched else None), events

    def cut(self, frame: int) -> list[PlaybackEvent]:
        """Barge-in: drop all speech from generated frame `frame` on; every unfinished segment
        finishes now, interrupted, at the position played so far."""
        events = [self._finish(seg, interrupted=True) for seg in list(self._segments.values())]
        self._tape_end = max(self._cursor, min(self._tape_end, self.bounds(frame)[0]))
        self._driving_end = None
        return events

    def _finish(self, seg: _Segment, interrupted: bool) -> PlaybackEvent:
        seg.finished = True
        seg.spans = []
        del self._segments[seg.id]
        return PlaybackEvent("finished", seg.id, seg.played / self.rate, interrupted)
