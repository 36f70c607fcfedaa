"""Prometheus metrics of one app (its own registry: several apps in one process never mix).

Observed as they happen: chunk time, generated frames, driving-to-frame latency.
Collected at scrape time from the live sessions (plus totals of closed ones): sessions,
queue depth, held (late) and dropped frames, generated fps over the last 10 s; and from
the process: resident memory, open files, threads and asyncio tasks (what a leak grows;
the soak test watches them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.32, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self, sessions: Callable[[], Iterable]):
        """sessions: returns the live `LiveSession`s at scrape time."""
        self.registry = CollectorRegistry()
        self._sessions = sessions
        self._window: deque[tuple[float, int]] = deque()
        self.closed_totals = {"held": 0, "dropped": 0}
        self.chunk_seconds = Histogram("knotstream_chunk_seconds", "Time of one engine step (one chunk)",
                                       buckets=CHUNK_BUCKETS, registry=self.registry)
        self.frames = Counter("knotstream_generated_frames", "Video frames generated", registry=self.registry)
        self.latency = Histogram("knotstream_driving_to_frame_seconds",
                                 "Driving input arrival -> first frame driven by it leaves the server",
                                 ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("knotstream_session_errors", "Sessions closed by a generation error",
                              registry=self.registry)
        self.registry.register(_Live(self))
        # process_resident_memory_bytes, process_open_fds, ... (Linux /proc; nothing elsewhere)
        ProcessCollector(registry=self.registry)

    def chunk(self, seconds: float, frames: int) -> None:
        """Worker thread: one chunk generated."""
        self.chunk_seconds.observe(seconds)
        self.frames.inc(frames)
        now = time.monotonic()
        self._window.append((now, frames))
        while self._window and self._window[0][0] < now - 10.0:
            self._window.popleft()

    def generated_fps(self) -> float:
        now = time.monotonic()
        frames = sum(n for t, n in list(self._window) if t >= now - 10.0)
        return frames / 10.0

    def session_closed(self, status: dict) -> None:
        self.closed_totals["held"] += status["held_frames"]
        self.closed_totals["dropped"] += status["dropped_frames"]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Scrape-time metrics read from the live sessions."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self):
        return []

    def collect(self):
        statuses = [s.status() for s in self.m._sessions()]
        yield GaugeMetricFamily("knotstream_sessions", "Live sessions", value=len(statuses))
        yield GaugeMetricFamily("knotstream_queue_depth_frames", "Generated frames waiting to be sent (all sessions)",
                                value=sum(s["buffered_frames"] for s in statuses))
        yield GaugeMetricFamily("knotstream_generated_fps", "Frames generated per second over the last 10 s",
                                value=self.m.generated_fps())
        yield CounterMetricFamily("knotstream_late_frames", "Output slots that held the last frame (underrun)",
                                  value=self.m.closed_totals["held"] + sum(s["held_frames"] for s in statuses))
        yield CounterMetricFamily("knotstream_dropped_frames", "Frames skipped or discarded",
                                  value=self.m.closed_totals["dropped"] + sum(s["dropped_frames"] for s in statuses))
        yield GaugeMetricFamily("knotstream_threads", "Live threads of the process", value=threading.active_count())
        try:  # scraped from the event loop (the /metrics handler is async)
            tasks = len(asyncio.all_tasks())
        except RuntimeError:
            tasks = 0
        yield GaugeMetricFamily("knotstream_asyncio_tasks", "Pending asyncio tasks of the event loop", value=tasks)
