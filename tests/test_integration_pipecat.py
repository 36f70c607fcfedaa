"""KnotstreamVideoService in real Pipecat pipelines (pipecat's own test runner and frames).

A TTS audio source runs 5-10x faster than real time (TTSStarted/Audio/Stopped frames as a
TTS service sends them); the service's output is recorded after it in the pipeline.
In-process mode: frames come at the model's fps with pts one frame apart on the pipeline
clock, the speech that comes out is the speech that went in (every sample, in order, at
its own rate), spread over exactly as many frames as it lasts (no slow motion), each
TTSStoppedFrame comes after its segment's last audio, playback_finished fires once per
segment with the played position; a barge-in cuts the old speech at the next frame and a
new segment then plays whole. Remote mode: the same pipeline against a live knotstream
server. Skipped with a reason when the `pipecat` extra is not installed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed (pip install -e '.[pipecat]')")

from pipecat.frames.frames import (InterruptionFrame, OutputImageRawFrame, TTSAudioRawFrame,  # noqa: E402
                                   TTSStartedFrame, TTSStoppedFrame)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from integrations.avatar import AvatarHost  # noqa: E402
from integrations.pipecat_service import KnotstreamVideoService  # noqa: E402

pytestmark = pytest.mark.timeout(300)

RATE = 24000
CHUNK = 480  # 20 ms TTS frames
BARGE_IN_BAR_S = 0.3  # the server's barge-in target (docs/benchmarks.md): silence within 300 ms


class Recorder(FrameProcessor):
    """Records every downstream frame with its arrival time; passes it on."""

    def __init__(self):
        super().__init__()
        self.frames: list[tuple[float, object]] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


def speech(seconds: float, sign: int, seed: int) -> np.ndarray:
    """Never-zero int16 samples of one sign, so the test can tell segments and padding apart."""
    rng = np.random.default_rng(seed)
    return (sign * rng.integers(500, 20000, int(seconds * RATE))).astype(np.int16)


def tts_frames(pcm: np.ndarray, context: str, speedup: float) -> list:
    """What a TTS service sends for one utterance, `speedup` times faster than real time."""
    out: list = [TTSStartedFrame(context_id=context)]
    for i in range(0, len(pcm), CHUNK):
        out.append(TTSAudioRawFrame(audio=pcm[i:i + CHUNK].tobytes(), sample_rate=RATE, num_channels=1,
                                    context_id=context))
        out.append(SleepFrame(sleep=CHUNK / RATE / speedup))
    out.append(TTSStoppedFrame(context_id=context))
    return out


@pytest.fixture(scope="module")
def host():
    h = AvatarHost.load("tiny")
    yield h
    h.close()


@pytest.fixture(scope="module")
def portrait():
    from server.avatars import avatar_image
    return avatar_image("ada")


def events_of(service) -> list:
    got: list = []

    @service.event_handler("on_playback_started")
    async def started(_, segment):
        got.append(("started", segment))

    @service.event_handler("on_playback_finished")
    async def finished(_, segment, position_s, interrupted):
        got.append(("finished", segment, position_s, interrupted))

    return got


def late_placements(avatar) -> int:
    """Speech pieces the driving buffer placed after a gap: the TTS fell behind the frames
    already generated, so the piece went on at the next frame not yet made."""
    pieces = sorted(p for seg in avatar._session.driving.segments() for p in seg.pieces)
    return sum(at != prev_at + prev_n for (prev_at, prev_n), (at, _) in zip(pieces, pieces[1:]))


def audio_of(frames) -> list[tuple[float, np.ndarray]]:
    return [(t, np.frombuffer(f.audio, np.int16)) for t, f in frames if isinstance(f, TTSAudioRawFrame)]


async def test_in_process_fast_tts_plays_every_sample_at_the_model_fps(host, portrait):
    service = KnotstreamVideoService.in_process(host, portrait, audio_rate=RATE)
    events = events_of(service)
    rec = Recorder()
    one, two = speech(2.0, +1, 1), speech(1.0, -1, 2)
    frames = tts_frames(one, "a", speedup=5) + tts_frames(two, "b", speedup=10) + [SleepFrame(sleep=0.5)]
    await run_test(Pipeline([service, rec]), frames_to_send=frames)

    # Every sample out, in order: segment one then two, and nothing else.
    pcm = np.concatenate([a for _, a in audio_of(rec.frames)])
    want = np.concatenate([one, two])
    assert len(pcm) >= len(want) and np.array_equal(pcm[:len(want)], want), "speech out differs from speech in"
    assert len(pcm) == len(want), "audio after the last sample"

    # Video at the model's fps on the pipeline clock, never faster than real time.
    video = [(t, f) for t, f in rec.frames if isinstance(f, OutputImageRawFrame)]
    assert all(f.size == (host.width, host.height) and len(f.image) == host.width * host.height * 3 for _, f in video)
    steps = np.diff([f.pts for _, f in video])
    assert np.all(steps == 1e9 / host.fps), f"pts steps {set(steps.tolist())}"
    t0 = video[0][0]
    early = [i for i, (t, _) in enumerate(video) if t < t0 + i / host.fps - 0.05]
    assert not early, f"frames {early[:5]} came before their time"

    # No slow motion: 3 s of speech ride on exactly 75 generated frames, one frame's worth
    # each. (A frame the engine was late for is shown again without sound: the whole
    # timeline waits, lips and sound together.) The one exception is a TTS that fell behind
    # the generator (a starved event loop on a loaded CI machine can make the "5x" TTS slower
    # than real time): its late audio goes on at the next frame not yet made, lips and sound
    # together, which leaves one short frame before it. Those placements are the driving
    # buffer's record, so every short frame must be one of them.
    speech_frames = [i for i, (t, f) in enumerate(rec.frames) if isinstance(f, TTSAudioRawFrame)]
    sizes = [len(a) for _, a in audio_of(rec.frames)]
    late = late_placements(service.avatar)
    short = [i for i, n in enumerate(sizes[:-1]) if n < RATE // host.fps]
    assert max(sizes) == RATE // host.fps
    assert len(short) <= late, f"{len(short)} short frames mid-speech, {late} late placements"
    if late == 0:
        assert len(speech_frames) == round(3.0 * host.fps)
    assert len(speech_frames) <= round(3.0 * host.fps) + late

    # Each stop frame after its segment's last audio; one started/finished per segment.
    stops = [i for i, (_, f) in enumerate(rec.frames) if isinstance(f, TTSStoppedFrame)]
    assert len(stops) == 2 and stops[-1] > speech_frames[-1]
    last_one = max(i for i in speech_frames if np.frombuffer(rec.frames[i][1].audio, np.int16).max() > 0)
    assert stops[0] > last_one
    assert [e[0] for e in events] == ["started", "finished", "started", "finished"], events
    assert [e[2:] for e in events if e[0] == "finished"] == [(2.0, False), (1.0, False)]


class Marker(FrameProcessor):
    """Notes when the interruption passes (just before the service)."""

    def __init__(self):
        super().__init__()
        self.interrupted_at: float | None = None

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            self.interrupted_at = time.monotonic()
        await self.push_frame(frame, direction)


async def test_in_process_barge_in_cuts_at_the_next_frame_then_a_new_segment_plays(host, portrait):
    service = KnotstreamVideoService.in_process(host, portrait, audio_rate=RATE)
    events = events_of(service)
    marker, rec = Marker(), Recorder()
    old, new = speech(4.0, +1, 3), speech(1.0, -1, 4)
    frames = (tts_frames(old, "old", speedup=10)[:-1]  # interrupted before its TTS finished
              + [SleepFrame(sleep=2.0), InterruptionFrame(), SleepFrame(sleep=0.3)]
              + tts_frames(new, "new", speedup=10) + [SleepFrame(sleep=0.5)])
    await run_test(Pipeline([marker, service, rec]), frames_to_send=frames)

    audio = audio_of(rec.frames)
    assert marker.interrupted_at is not None
    old_out = [(t, a) for t, a in audio if a.max() > 0]
    assert old_out, "the old segment never played"
    last_old = old_out[-1][0]
    assert last_old - marker.interrupted_at < BARGE_IN_BAR_S, f"old speech went on {last_old - marker.interrupted_at:.3f} s"
    video_after = [t for t, f in rec.frames if isinstance(f, OutputImageRawFrame) and marker.interrupted_at < t <= last_old]
    assert len(video_after) <= 1, "old speech played more than one frame past the interruption"

    # What played of the old segment is a prefix of it, and its finished event says how much.
    played = np.concatenate([a[a > 0] for _, a in old_out])
    assert np.array_equal(played, old[:len(played)]) and 0 < len(played) < len(old)
    finished = [e for e in events if e[0] == "finished"]
    assert finished[0][1:] == ("tts-1", len(played) / RATE, True)
    # The new segment plays whole after it, and finishes normally, once.
    new_out = np.concatenate([a[a < 0] for _, a in audio if a.min() < 0])
    assert np.array_equal(new_out, new)
    assert [e[1:] for e in finished[1:]] == [("tts-2", 1.0, False)]
    stops = [f for _, f in rec.frames if isinstance(f, TTSStoppedFrame)]
    assert [s.context_id for s in stops] == ["new"], "the cut segment's stop frame must not follow the interruption"


@pytest.fixture(scope="module")
def server():
    from model.engine import Engine
    from server.settings import Settings
    from server.testing import LiveServer
    from streaming.ice import allow_loopback, has_non_loopback_ipv4

    if not has_non_loopback_ipv4():
        allow_loopback()
    with LiveServer(Settings(max_sessions=2), Engine.from_pretrained("tiny")) as srv:
        yield srv


async def test_remote_mode_against_a_live_server(server):
    service = KnotstreamVideoService.remote(server.url, avatar="ada")
    events = events_of(service)
    marker, rec = Marker(), Recorder()
    first, second = speech(1.5, +1, 5), speech(3.0, +1, 6)
    frames = ([SleepFrame(sleep=1.0)] + tts_frames(first, "a", speedup=5) + [SleepFrame(sleep=2.5)]
              + tts_frames(second, "b", speedup=5)[:-1] + [SleepFrame(sleep=1.5), InterruptionFrame(),
                                                           SleepFrame(sleep=1.0)])
    await run_test(Pipeline([marker, service, rec]), frames_to_send=frames)

    video = [t for t, f in rec.frames if isinstance(f, OutputImageRawFrame)]
    assert len(video) > 2 * 25, f"only {len(video)} frames from the server"
    finished = [e for e in events if e[0] == "finished"]
    assert [e[3] for e in finished] == [False, True], events
    assert abs(finished[0][2] - 1.5) < 0.05, finished
    assert 0 < finished[1][2] < 3.0
    # The server's speech comes back over WebRTC (Opus, 48 kHz): as much as the server says
    # played, and nothing of the cut segment long after the interruption.
    loud = [(t, a) for t, a in audio_of(rec.frames) + [(t, np.frombuffer(f.audio, np.int16)) for t, f in rec.frames
                                                          if type(f).__name__ == "OutputAudioRawFrame"]
            if np.abs(a).max() > 300]
    heard = sum(len(a) for _, a in loud) / 48000
    assert abs(heard - (finished[0][2] + finished[1][2])) < 0.2, (heard, finished)
    late = [t - marker.interrupted_at for t, _ in loud if t > marker.interrupted_at + 0.5]
    assert not late, f"speech went on {max(late):.2f} s after the interruption"
