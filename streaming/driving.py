"""Driving signals of one session, indexed by *output frame time*, not arrival time.

Three sources land on one timeline of driving samples (16 kHz) and video frames:

- pushed speech (HTTP upload, data channel, TTS): segments with ids, played in order.
  A segment starts at the first frame not yet generated (or right after the previous
  segment, whichever is later), so pushing faster than real time just queues audio.
- live microphone audio: arrives in real time and lands at `slot_now + latency_frames`
  (a fixed delay the session chooses so generation never waits for it); contiguous
  while it keeps up, re-anchored when it falls behind generation (the late part is
  counted and dropped) or runs too far ahead (jitter burst).
- motion/expression messages: piecewise-constant pose state; a message with a client
  timestamp lands at the frame its timestamp maps to (the first message anchors the
  client clock to the first frame not yet generated), clamped to that frame when late,
  re-anchored when it would land more than `max_motion_ahead_frames` (1 s) ahead.

It is the one owner of the session's timeline: the engine's stream keeps no driving.
`take(span)` (the generation worker) reads exactly one step's driving: the audio of the
step's span with the context before its first frame, dense motion, and the playback audio
of the step's own frames. Afterwards it forgets everything no later step reads, except the
last `history_frames` frames: `rewind()` can send generation back over those (barge-in
regenerates frames generated but not yet played; the stream is restored alongside).
`interrupt()` flushes pushed speech that has not been generated (or, given a frame,
everything from that frame on). The frame <-> sample arithmetic is the model's
`Timeline` (model/timeline.py).
Thread-safe: the event loop writes, the worker thread reads.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np

from model.config import MOTION_FIELDS
from model.driving import motion_vector
from model.timeline import StepInput, StepSpan, Timeline

N_FIELDS = len(MOTION_FIELDS)


class StepDriving(NamedTuple):
    input: StepInput             # what drives the model for the span
    playback: np.ndarray         # what the audio track plays for the span's own frames


class BufferFull(ValueError):
    """Pushed speech would exceed the session's buffer limit."""

    code = "audio_buffer_full"


@dataclass
class Segment:
    """One pushed speech segment; samples [start, end) of the driving timeline."""

    id: str
    start: int
    end: int
    ended: bool = False          # the client said no more audio follows
    interrupted: bool = False
    started_event: bool = False  # playback_started already reported
    finished_event: bool = False
    # (timeline sample, length) of the segment's own audio. Audio that arrives after its frames
    # were made goes on at the next frame, so [start, end) may hold gaps of silence that are
    # not the client's: positions reported back count the client's samples only.
    # A segment stays open as long as its client keeps pushing, so the list is bounded: past
    # MAX_PIECES the two oldest pieces fold into one that counts the gap between them.
    pieces: list[tuple[int, int]] = field(default_factory=list)
    MAX_PIECES: ClassVar[int] = 256

    def add_piece(self, at: int, n: int) -> None:
        if self.pieces and sum(self.pieces[-1]) == at:
            self.pieces[-1] = (self.pieces[-1][0], self.pieces[-1][1] + n)
        elif n:
            self.pieces.append((at, n))
            if len(self.pieces) > self.MAX_PIECES:
                (a, _), (b, m) = self.pieces[:2]
                self.pieces[:2] = [(a, b + m - a)]

    def audio_before(self, sample: int) -> int:
        """Samples of the segment's own audio placed before timeline sample `sample`."""
        return sum(min(max(sample - at, 0), n) for at, n in self.pieces)

    def shift(self, delta: int) -> None:
        self.start, self.end = self.start + delta, self.end + delta
        self.pieces = [(at + delta, n) for at, n in self.pieces]


@dataclass
class Marker:
    """A driving input (arrival time) landed at frame `frame`: driving-to-frame latency probe."""

    frame: int
    arrival: float
    kind: str


class _Samples:
    """A growable float32 timeline of samples starting at `origin` (absolute sample index)."""

    def __init__(self) -> None:
        self.origin = 0
        self.data = np.zeros(0, np.float32)

    def _ensure(self, end: int) -> None:
        need = end - self.origin
        if need > len(self.data):
            grown = np.zeros(max(need, 2 * len(self.data)), np.float32)
            grown[: len(self.data)] = self.data
            self.data = grown

    def write(self, at: int, samples: np.ndarray) -> None:
        """Overwrite samples [at, at + n); the part before `origin` (already consumed) is dropped."""
        skip = max(0, self.origin - at)
        samples, at = samples[skip:], at + skip
        if len(samples):
            self._ensure(at + len(samples))
            self.data[at - self.origin: at - self.origin + len(samples)] = samples

    def read(self, at: int, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        lo, hi = max(at, self.origin), min(at + n, self.origin + len(self.data))
        if hi > lo:
            out[lo - at: hi - at] = self.data[lo - self.origin: hi - self.origin]
        return out

    def zero_from(self, at: int) -> None:
        self.data[max(0, at - self.origin):] = 0.0

    def drop_before(self, at: int) -> None:
        cut = min(max(0, at - self.origin), len(self.data))
        self.data = self.data[cut:].copy()
        self.origin += cut


class DrivingBuffer:
    """Per-session driving, by output frame time. See the module docstring for the rules."""

    def __init__(self, timeline: Timeline, max_speech_seconds: float = 300.0,
                 max_mic_lead_frames: int = 50, max_motion_ahead_frames: int | None = None,
                 echo_mic: bool = False, history_frames: int = 0, now=time.monotonic):
        self.timeline = timeline
        self.fps = fps = timeline.fps
        self.sample_rate = sample_rate = timeline.sample_rate
        self.max_speech_samples = int(max_speech_seconds * sample_rate)
        self.max_mic_lead_frames = max_mic_lead_frames
        # The audio track plays pushed speech; the user's own mic is not echoed back unless asked.
        self.echo_mic = echo_mic
        # A timestamped motion message may land at most this far (1 s) past the next frame.
        self.max_motion_ahead_frames = fps if max_motion_ahead_frames is None else max_motion_ahead_frames
        self.now = now
        self.history_frames = history_frames  # generated frames kept for rewind()
        self._lock = threading.Lock()
        self._speech = _Samples()
        self._mic = _Samples()
        self._next_frame = 0          # first frame whose driving has not been generated
        self._speech_end = 0          # sample where the next pushed speech goes
        self._pushed_since_interrupt: int | None = None  # barge-in floor until the worker's rewind
        self._mic_cursor: int | None = None
        self._segments: list[Segment] = []
        self._ids = itertools.count(1)
        # Motion: piecewise constant; list of (frame, vector) sorted by frame.
        self._motion_state = np.zeros(2 * N_FIELDS, np.float32)
        self._motion_changes: list[tuple[int, np.ndarray]] = []
        self._client_anchor: tuple[float, int] | None = None  # (client ms, frame)
        self._markers: list[Marker] = []
        self._model_muted = (0, 0)    # samples [lo, hi) the model hears as silence (rewind(cut=...))
        self.stats = {"mic_late_samples": 0, "mic_reanchors": 0, "motion_late": 0, "motion_reanchors": 0,
                      "speech_samples": 0, "interrupts": 0}

    # ----- geometry -------------------------------------------------------------------

    def sample_of(self, frame: int) -> int:
        """First driving sample of video frame `frame`."""
        return self.timeline.sample_of(frame)

    def frame_of(self, sample: int) -> int:
        """The video frame that sample `sample` drives."""
        return self.timeline.frame_of(sample)

    @property
    def next_frame(self) -> int:
        with self._lock:
            return self._next_frame

    # ----- pushed speech --------------------------------------------------------------

    def push_speech(self, samples: np.ndarray, segment_id: str | None = None, end: bool = False) -> Segment:
        """Append float32 mono samples (driving rate) to segment `segment_id` (a new one when the
        id is unknown or None). `end=True` closes the segment. Raises BufferFull past the limit."""
        samples = _mono_f32(samples)
        with self._lock:
            start = max(self._speech_end, self.sample_of(self._next_frame))
            queued = start + len(samples) - self.sample_of(self._next_frame)
            if queued > self.max_speech_samples:
                raise BufferFull(f"pushed speech would queue {queued / self.sample_rate:.1f} s, "
                                 f"limit {self.max_speech_samples / self.sample_rate:.0f} s")
            seg = self._segment(segment_id)
            if seg is None or seg.ended or seg.interrupted:
                seg = Segment(segment_id or f"seg-{next(self._ids)}", start, start)
                self._segments.append(seg)
                self._markers.append(Marker(self.frame_of(start), self.now(), "speech"))
            self._speech.write(start, samples)
            self._speech_end = start + len(samples)
            seg.add_piece(start, len(samples))
            seg.end = self._speech_end
            seg.ended = seg.ended or end
            self.stats["speech_samples"] += len(samples)
            return seg

    def end_segment(self, segment_id: str) -> Segment:
        with self._lock:
            seg = self._segment(segment_id)
            if seg is None:
                raise KeyError(segment_id)
            seg.ended = True
            return seg

    def _segment(self, segment_id: str | None) -> Segment | None:
        if segment_id is None:
            return None
        return next((s for s in reversed(self._segments) if s.id == segment_id), None)

    @property
    def speech_pending(self) -> bool:
        """True while pushed speech reaches past the generated frames."""
        with self._lock:
            return self._speech_end > self.sample_of(self._next_frame)

    def segments(self) -> list[Segment]:
        with self._lock:
            return list(self._segments)

    # ----- microphone -----------------------------------------------------------------

    def push_mic(self, samples: np.ndarray, slot_now: int, latency_frames: int) -> None:
        """Live samples arriving now; they drive frames from `slot_now + latency_frames` on."""
        samples = _mono_f32(samples)
        with self._lock:
            target = self.sample_of(slot_now + latency_frames)
            cur = self._mic_cursor
            floor = self.sample_of(self._next_frame)
            too_far = self.sample_of(slot_now + latency_frames + self.max_mic_lead_frames)
            if cur is None or cur < floor or cur > too_far:
                if cur is not None:
                    self.stats["mic_reanchors"] += 1
                    if cur < floor:
                        self.stats["mic_late_samples"] += floor - cur
                cur = max(target, floor)
            self._mic.write(cur, samples)
            self._mic_cursor = cur + len(samples)

    # ----- motion ---------------------------------------------------------------------

    def set_motion(self, fields: Mapping, client_ms: float | None = None) -> int:
        """Merge motion/expression fields into the pose state from the frame they land on.

        A field set to None is cleared (back to "not given"). Returns the landing frame.
        Raises ValueError for unknown fields or out-of-range values (nothing is changed).
        """
        vec = motion_vector(fields)  # validates everything first
        if client_ms is not None and not np.isfinite(client_ms):
            raise ValueError(f"motion timestamp must be a finite number of ms, got {client_ms!r}")
        with self._lock:
            floor = self._next_frame
            if client_ms is None:
                frame = floor
            else:
                if self._client_anchor is None:
                    self._client_anchor = (float(client_ms), floor)
                ms0, f0 = self._client_anchor
                frame = f0 + int(round((client_ms - ms0) * self.fps / 1000.0))
                if frame < floor:
                    self.stats["motion_late"] += 1
                    # Persistently late (the client clock runs slow or we skipped): re-anchor.
                    if floor - frame > self.fps:
                        self._client_anchor = (float(client_ms), floor)
                    frame = floor
                elif frame > floor + self.max_motion_ahead_frames:
                    # Generation runs slower than the client's clock (overload: the output holds
                    # frames) or the client clock jumped: re-anchor so latency stays bounded.
                    self.stats["motion_reanchors"] += 1
                    self._client_anchor = (float(client_ms), floor)
                    frame = floor
            base = self._state_at(frame).copy()
            for name in fields:
                i = MOTION_FIELDS.index(name)
                base[i], base[N_FIELDS + i] = vec[i], vec[N_FIELDS + i]
            # A new message replaces every later change (the newest message wins).
            self._motion_changes = [(f, v) for f, v in self._motion_changes if f < frame]
            self._motion_changes.append((frame, base))
            self._markers.append(Marker(frame, self.now(), "motion"))
            return frame

    def _state_at(self, frame: int) -> np.ndarray:
        state = self._motion_state
        for f, v in self._motion_changes:
            if f <= frame:
                state = v
            else:
                break
        return state

    # ----- interrupt ------------------------------------------------------------------

    def interrupt(self, from_frame: int | None = None) -> list[Segment]:
        """Barge-in: drop pushed speech not yet generated; returns the segments newly cut short.

        from_frame: the generation rewinds to that already generated frame (the worker, once
        it has discarded the unplayed frames; within the kept history). The speech said
        before the barge-in goes from that frame on; speech pushed since the barge-in (a
        client answering it before the rewind ran) moves to start there, whole."""
        with self._lock:
            if from_frame is not None:
                return self._cut_and_pull(self.sample_of(from_frame))
            floor = self.sample_of(self._next_frame)
            self._speech.zero_from(floor)
            self._speech_end = self._pushed_since_interrupt = floor
            self.stats["interrupts"] += 1
            return self._cut_segments(floor)

    def _cut_segments(self, at: int, before: int | None = None) -> list[Segment]:
        """Segments (starting before `before`, when given) reaching past sample `at` end there."""
        cut = []
        for seg in self._segments:
            if seg.end > at and (before is None or seg.start < before):
                if not seg.interrupted:
                    cut.append(seg)
                seg.interrupted = True
                seg.end = max(seg.start, at)
                seg.ended = True
        return cut

    def _cut_and_pull(self, at: int) -> list[Segment]:
        since = self._pushed_since_interrupt
        self._pushed_since_interrupt = None
        if since is None:  # no barge-in pending: everything from `at` on goes
            since = self._speech_end
        new = self._speech.read(since, max(0, self._speech_end - since))
        cut = self._cut_segments(at, before=since)
        self._speech.zero_from(min(at, since))
        if len(new):
            self._speech.write(at, new)
            for seg in self._segments:
                if seg.start >= since:
                    seg.shift(at - since)
            first = self.frame_of(since)
            self._markers = [Marker(m.frame + self.frame_of(at) - first, m.arrival, m.kind)
                             if m.kind == "speech" and m.frame >= first else m for m in self._markers]
            self._speech_end = at + len(new)
        else:
            self._speech_end = min(self._speech_end, at)
        return cut

    def rewind(self, frame: int, cut: int | None = None) -> None:
        """Generation goes back to `frame` (the stream was restored to its snapshot of that
        frame): the next take() reads from there again. ValueError when `frame` is before
        the kept history.

        cut: the frame where the driving changed (a barge-in stopped the speech there). The
        model hears silence in the audio context of `cut` (`Timeline.context_before`), in
        this and every later take: those frames were shown (and played) with the speech,
        and without this the mouth would close up to a latent frame late."""
        with self._lock:
            oldest = self._next_frame - self.history_frames
            if frame < max(0, oldest) or frame > self._next_frame:
                raise ValueError(f"cannot rewind driving to frame {frame}: kept frames "
                                 f"[{max(0, oldest)}, {self._next_frame}]")
            self._next_frame = frame
            if cut is not None:
                self._model_muted = self.timeline.context_before(cut)

    # ----- the worker's side ----------------------------------------------------------

    def take(self, span: StepSpan) -> StepDriving:
        """Driving of one step: the model's audio for [span.audio_from, span.audio_to) (speech +
        mic, the `rewind(cut=...)` range silent), motion for span.driving_frames frames from
        span.frame (None when nothing was ever given), and the playback audio of the step's
        own frames (speech; + mic with `echo_mic`).

        Afterwards frames before `span.frame + span.frames` count as generated: driving
        arriving for them later lands on the next frame instead.
        """
        with self._lock:
            lo, n = span.audio_from, span.samples
            speech, mic = self._speech.read(lo, n), self._mic.read(lo, n)
            audio = np.clip(speech + mic, -1.0, 1.0)
            own = slice(self.sample_of(span.frame) - lo, self.sample_of(span.frame + span.frames) - lo)
            playback = (audio if self.echo_mic else speech)[own].copy()
            m_lo, m_hi = (min(max(0, b - lo), n) for b in self._model_muted)
            audio[m_lo:m_hi] = 0.0
            motion = None
            if self._motion_changes or self._motion_state.any():
                motion = np.stack([self._state_at(span.frame + i) for i in range(span.driving_frames)])
            done = span.frame + span.frames
            self._next_frame = max(self._next_frame, done)
            self._forget_before(max(0, done - self.history_frames))
            return StepDriving(StepInput(span, audio, motion), playback)

    def _forget_before(self, base: int) -> None:
        """Drop what no later step (nor a rewind to `base` or later) reads; keep the motion
        state before that, and the audio context of a step starting at `base`."""
        self._motion_state = self._state_at(base - 1) if base > 0 else self._motion_state
        self._motion_changes = [(f, v) for f, v in self._motion_changes if f >= base]
        keep = self.timeline.context_start(base)
        self._speech.drop_before(keep)
        self._mic.drop_before(keep)

    def pop_markers(self, up_to_frame: int) -> list[Marker]:
        """Markers whose frame is <= `up_to_frame` (the frame just released), removed."""
        with self._lock:
            out = [m for m in self._markers if m.frame <= up_to_frame]
            self._markers = [m for m in self._markers if m.frame > up_to_frame]
            return out

    def segment_audio_span(self, sample_lo: int, sample_hi: int) -> list[Segment]:
        """Segments overlapping samples [lo, hi) or ending inside it (for playback events)."""
        with self._lock:
            return [s for s in self._segments if s.start < sample_hi and s.end >= sample_lo]

    def forget_segments(self, before_sample: int) -> None:
        with self._lock:
            self._segments = [s for s in self._segments if not (s.finished_event and s.end <= before_sample)]


def _mono_f32(samples: np.ndarray) -> np.ndarray:
    a = np.asarray(samples, dtype=np.float32)
    if a.ndim != 1:
        raise ValueError(f"driving audio must be 1D mono samples, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("driving audio contains NaN or infinite samples")
    return a
