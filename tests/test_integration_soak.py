"""10-minute runs of both integrations (marked slow): continuous speech segments at random
lengths and TTS speeds with random barge-ins.

Every segment gets exactly one playback_finished (a whole one with its full length as the
position), video never stalls (no gap over 1 s between frames, as many frames as the run
lasts at the model's fps) and the process's RSS stays flat after warm-up.

    scripts/test.sh -m slow tests/test_integration_soak.py     # KNOTSTREAM_SOAK_S=600 each
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SOAK_S = float(os.environ.get("KNOTSTREAM_SOAK_S", "600"))
RATE = 24000
CHUNK = 480
WARMUP_S = min(120.0, SOAK_S / 4)
RSS_GROWTH_MB = 40.0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Watch:
    """Video frame gaps and RSS over the run, without keeping any frame."""

    def __init__(self):
        self.frames, self.max_gap, self._last = 0, 0.0, None
        self.rss: list[tuple[float, float]] = []
        self.t0 = time.monotonic()

    def video(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.max_gap = max(self.max_gap, now - self._last)
        self._last, self.frames = now, self.frames + 1

    async def sample_rss(self) -> None:
        while True:
            self.rss.append((time.monotonic() - self.t0, rss_mb()))
            await asyncio.sleep(10)

    def check(self, fps: int) -> None:
        elapsed = time.monotonic() - self.t0
        assert self.max_gap < 1.0, f"video stalled for {self.max_gap:.2f} s"
        assert self.frames >= 0.9 * elapsed * fps, f"{self.frames} frames in {elapsed:.0f} s"
        after = [m for t, m in self.rss if t >= WARMUP_S]
        assert len(after) >= 3, self.rss
        growth = np.median(after[-3:]) - np.median(after[:3])
        assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.1f} MB after warm-up: {self.rss}"


def plan(rng, seconds: float) -> list[tuple[np.ndarray, float, float | None]]:
    """(speech, TTS speed-up, interrupt after this many seconds of playback or None)."""
    out, total = [], 0.0
    while total < seconds:
        dur = float(rng.uniform(0.5, 4.0))
        pcm = (rng.choice([-1, 1]) * rng.integers(500, 20000, int(dur * RATE))).astype(np.int16)
        cut = float(rng.uniform(0.1, dur)) if rng.random() < 0.3 else None
        out.append((pcm, float(rng.uniform(2.0, 10.0)), cut))
        total += (cut or dur) + 0.5
    return out


@pytest.fixture(scope="module")
def host():
    from integrations.avatar import AvatarHost

    h = AvatarHost.load("tiny")
    yield h
    h.close()


@pytest.fixture(scope="module")
def portrait():
    from server.avatars import avatar_image
    return avatar_image("ada")


async def test_pipecat_ten_minutes(host, portrait):
    pytest.importorskip("pipecat", reason="the pipecat extra is not installed")
    from pipecat.frames.frames import (InterruptionFrame, OutputImageRawFrame, TTSAudioRawFrame,
                                       TTSStartedFrame, TTSStoppedFrame)
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.tests.utils import SleepFrame, run_test

    from integrations.pipecat_service import KnotstreamVideoService

    watch = Watch()

    class Count(FrameProcessor):
        """Counts video frames and drops them here (a recorder would hold 10 minutes of video)."""

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, OutputImageRawFrame):
                watch.video()
                return
            if isinstance(frame, TTSAudioRawFrame):
                return
            await self.push_frame(frame, direction)

    service = KnotstreamVideoService.in_process(host, portrait, audio_rate=RATE)
    finished: list[tuple] = []

    @service.event_handler("on_playback_finished")
    async def on_finished(_, segment, position_s, interrupted):
        finished.append((segment, position_s, interrupted))

    frames, lengths = [], []
    for i, (pcm, speed, cut) in enumerate(plan(np.random.default_rng(18), SOAK_S)):
        frames.append(TTSStartedFrame(context_id=f"c{i}"))
        for j in range(0, len(pcm), CHUNK):
            frames += [TTSAudioRawFrame(audio=pcm[j:j + CHUNK].tobytes(), sample_rate=RATE, num_channels=1,
                                        context_id=f"c{i}"), SleepFrame(sleep=CHUNK / RATE / speed)]
        frames.append(TTSStoppedFrame(context_id=f"c{i}"))
        if cut is not None:
            frames += [SleepFrame(sleep=cut), InterruptionFrame(), SleepFrame(sleep=0.5)]
        else:
            frames.append(SleepFrame(sleep=len(pcm) / RATE * (1 - 1 / speed) + 0.5))
        lengths.append(len(pcm) / RATE)
    rss = asyncio.ensure_future(watch.sample_rss())
    try:
        await run_test(Pipeline([service, Count()]), frames_to_send=frames)
    finally:
        rss.cancel()

    ids = [f[0] for f in finished]
    assert len(ids) == len(set(ids)) == len(lengths), f"{len(lengths)} segments, {len(ids)} finished events"
    whole = {f"tts-{i + 1}": n for i, n in enumerate(lengths)}
    for segment, position, interrupted in finished:
        if not interrupted:
            assert position == whole[segment], (segment, position, whole[segment])
    watch.check(host.fps)


async def test_livekit_ten_minutes(host, portrait):
    pytest.importorskip("livekit.agents", reason="the livekit extra is not installed")
    from livekit import rtc
    from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

    from integrations.livekit_avatar import KnotstreamVideoGenerator, avatar_options
    from tests.livekit_memory_room import MemoryRoom

    watch = Watch()

    class Counting(KnotstreamVideoGenerator):
        def __aiter__(self):
            return self._counted()

        async def _counted(self):
            async for item in self._stream():
                if isinstance(item, rtc.VideoFrame):
                    watch.video()
                yield item

    avatar = await host.open(portrait, audio_rate=RATE)
    audio = QueueAudioOutput(sample_rate=RATE)
    runner = AvatarRunner(MemoryRoom("avatar"), audio_recv=audio, video_gen=Counting(avatar),
                          options=avatar_options(avatar))
    finished: list = []
    audio.on("playback_finished", finished.append)
    await runner.start()
    rss = asyncio.ensure_future(watch.sample_rss())
    segments = plan(np.random.default_rng(19), SOAK_S)
    try:
        for pcm, speed, cut in segments:
            # As an AgentSession: one utterance at a time, the next after the last one's playout.
            started = asyncio.Event()
            audio.once("playback_started", lambda _: started.set())
            for j in range(0, len(pcm), CHUNK):
                part = pcm[j:j + CHUNK]
                await audio.capture_frame(rtc.AudioFrame(part.tobytes(), RATE, 1, len(part)))
                await asyncio.sleep(CHUNK / RATE / speed)
            audio.flush()
            if cut is not None:
                await asyncio.wait_for(started.wait(), 30)
                await asyncio.sleep(cut)
                audio.clear_buffer()
            await asyncio.wait_for(audio.wait_for_playout(), 60)
    finally:
        rss.cancel()
        await runner.aclose()
        await avatar.aclose()

    assert len(finished) == len(segments), f"{len(segments)} segments, {len(finished)} finished events"
    for ev, (pcm, _, cut) in zip(finished, segments):
        if not ev.interrupted:
            assert ev.playback_position == pytest.approx(len(pcm) / RATE, abs=1e-6)
    watch.check(avatar.fps)
