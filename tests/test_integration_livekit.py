"""KnotstreamVideoGenerator under livekit-agents' own AvatarRunner (real A/V synchroniser and
native audio/video sources) and the avatar worker against the framework's own data-stream
sender, with an in-memory stand-in for the LiveKit server (tests/livekit_memory_room.py).

In-process: QueueAudioOutput (what an AgentSession writes to) -> AvatarRunner -> generator:
speech pushed 5-10x faster than real time comes out sample-exact, playback_finished
arrives once per segment after its last frame with the played position, clear_buffer is
answered at once and the next segment plays whole. Remote: DataStreamAudioOutput (the
agent's side of the lk.audio_stream / lk.clear_buffer / lk.playback_* protocol) talks to
`serve_room`. Skipped with a reason when the `livekit` extra is not installed.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the livekit extra is not installed (pip install -e '.[livekit]')")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarRunner, DataStreamAudioOutput,  # noqa: E402
                                         QueueAudioOutput)

from integrations.avatar import AvatarHost  # noqa: E402
from integrations.livekit_avatar import KnotstreamVideoGenerator, avatar_options, serve_room  # noqa: E402
from tests.livekit_memory_room import MemoryRoom, link  # noqa: E402

pytestmark = pytest.mark.timeout(300)

RATE = 24000
CHUNK = 480
BARGE_IN_BAR_S = 0.3


@pytest.fixture(scope="module")
def host():
    h = AvatarHost.load("tiny")
    yield h
    h.close()


@pytest.fixture(scope="module")
def portrait():
    from server.avatars import avatar_image
    return avatar_image("ada")


def speech(seconds: float, sign: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (sign * rng.integers(500, 20000, int(seconds * RATE))).astype(np.int16)


async def say(output, pcm: np.ndarray, speedup: float, flush: bool = True) -> None:
    """What an AgentSession does with TTS audio: capture frames (here `speedup`x real time), flush."""
    for i in range(0, len(pcm), CHUNK):
        part = pcm[i:i + CHUNK]
        await output.capture_frame(rtc.AudioFrame(part.tobytes(), RATE, 1, len(part)))
        await asyncio.sleep(len(part) / RATE / speedup)
    if flush:
        output.flush()


class Recording(KnotstreamVideoGenerator):
    """The generator, noting what it hands the runner and when."""

    def __init__(self, avatar):
        super().__init__(avatar)
        self.out: list[tuple[float, object]] = []

    def __aiter__(self):
        return self._recorded()

    async def _recorded(self):
        async for item in self._stream():
            self.out.append((time.monotonic(), item))
            yield item

    def audio(self, since: float = 0.0) -> np.ndarray:
        parts = [np.frombuffer(x.data, np.int16) for t, x in self.out if isinstance(x, rtc.AudioFrame) and t >= since]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)


async def started(output) -> None:
    fut = asyncio.get_running_loop().create_future()
    output.once("playback_started", lambda ev: fut.done() or fut.set_result(ev))
    await asyncio.wait_for(fut, 30)


async def playing(gen: Recording, after: int, timeout: float = 30.0) -> None:
    """Until the generator has handed out more than `after` audio samples."""
    deadline = time.monotonic() + timeout
    while len(gen.audio()) <= after:
        assert time.monotonic() < deadline, "the generator put out no audio of the new segment"
        await asyncio.sleep(0.02)


async def test_generator_under_the_avatar_runner(host, portrait):
    avatar = await host.open(portrait, audio_rate=RATE)
    gen = Recording(avatar)
    audio = QueueAudioOutput(sample_rate=RATE)
    runner = AvatarRunner(MemoryRoom("avatar"), audio_recv=audio, video_gen=gen, options=avatar_options(avatar))
    await runner.start()
    try:
        # 1. A whole segment, 5x real time: every sample out, finished after it, full position.
        one = speech(2.0, +1, 1)
        await say(audio, one, speedup=5)
        ev = await asyncio.wait_for(audio.wait_for_playout(), 30)
        assert not ev.interrupted and ev.playback_position == pytest.approx(2.0, abs=1e-6)
        assert np.array_equal(gen.audio(), one)
        ends = [i for i, (_, x) in enumerate(gen.out) if isinstance(x, AudioSegmentEnd)]
        last_audio = max(i for i, (_, x) in enumerate(gen.out) if isinstance(x, rtc.AudioFrame))
        assert ends == [last_audio + 1], "AudioSegmentEnd must follow the segment's last audio frame"
        video = [x for _, x in gen.out if isinstance(x, rtc.VideoFrame)]
        assert all((v.width, v.height) == (avatar.width, avatar.height) for v in video)

        # 2. Barge-in while a 4 s segment plays: answered at once, position = what was played.
        two = speech(4.0, -1, 2)
        feeding = asyncio.ensure_future(say(audio, two, speedup=10, flush=False))
        await started(audio)
        # Cut once the generator has put out some of segment two (how long that takes depends on
        # the machine's speed, so no fixed sleep), then let a little more play.
        await playing(gen, after=len(one))
        await asyncio.sleep(0.3)
        t_clear = time.monotonic()
        audio.clear_buffer()
        ev = await asyncio.wait_for(audio.wait_for_playout(), 5)
        answered = time.monotonic() - t_clear
        await feeding
        audio.flush()
        assert ev.interrupted and answered < BARGE_IN_BAR_S, f"clear_buffer answered after {answered:.3f} s"
        played = gen.audio(since=0.0)[len(one):]
        assert 0 < len(played) < len(two) and np.array_equal(played, two[:len(played)])
        assert ev.playback_position == pytest.approx(len(played) / RATE, abs=1.5 / avatar.fps)
        late = [t for t, x in gen.out if isinstance(x, rtc.AudioFrame) and t > t_clear + BARGE_IN_BAR_S]
        assert not late, "old speech went on after the barge-in bar"
        assert sum(isinstance(x, AudioSegmentEnd) for _, x in gen.out) == 1, "no AudioSegmentEnd for a cut segment"

        # 3. The next segment plays whole and finishes normally.
        three = speech(1.0, +1, 3)
        mark = time.monotonic()
        await say(audio, three, speedup=10)
        ev = await asyncio.wait_for(audio.wait_for_playout(), 30)
        assert not ev.interrupted and ev.playback_position == pytest.approx(1.0, abs=1e-6)
        assert np.array_equal(gen.audio(since=mark), three)
        assert audio._pending_playback_count == 0
    finally:
        await runner.aclose()
        await avatar.aclose()


async def test_avatar_worker_speaks_the_data_stream_protocol(host, portrait):
    agent_room, avatar_room = MemoryRoom("agent"), MemoryRoom("knotstream-avatar")
    link(agent_room, avatar_room)
    worker = asyncio.ensure_future(serve_room(avatar_room, host, portrait, audio_rate=RATE, sender_identity="agent"))
    out = DataStreamAudioOutput(agent_room, destination_identity="knotstream-avatar", sample_rate=RATE,
                                wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True)
    try:
        await say(out, speech(1.5, +1, 4), speedup=5)
        ev = await asyncio.wait_for(out.wait_for_playout(), 30)
        assert not ev.interrupted and ev.playback_position == pytest.approx(1.5, abs=1e-6)

        feeding = asyncio.ensure_future(say(out, speech(3.0, +1, 5), speedup=10, flush=False))
        await started(out)
        await asyncio.sleep(0.8)
        t_clear = time.monotonic()
        out.clear_buffer()
        ev = await asyncio.wait_for(out.wait_for_playout(), 5)
        answered = time.monotonic() - t_clear
        await feeding
        out.flush()
        assert ev.interrupted and 0 < ev.playback_position < 3.0
        assert answered < 1.0, f"the worker answered clear_buffer after {answered:.2f} s (the agent gives up at 2 s)"

        await say(out, speech(1.0, +1, 6), speedup=10)
        ev = await asyncio.wait_for(out.wait_for_playout(), 30)
        assert not ev.interrupted and ev.playback_position == pytest.approx(1.0, abs=1e-6)

        calls = avatar_room.local_participant.rpc_calls
        finished = [json.loads(p) for m, p in calls if m == "lk.playback_finished"]
        assert [f["interrupted"] for f in finished] == [False, True, False]
        assert sum(m == "lk.playback_started" for m, _ in calls) == 3
        assert [m for m, _ in agent_room.local_participant.rpc_calls] == ["lk.clear_buffer"]
        assert {p.kind for p in avatar_room.local_participant.track_publications.values()} == {
            rtc.TrackKind.KIND_AUDIO, rtc.TrackKind.KIND_VIDEO}
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_plugin_sends_an_avatar_through_the_dispatch_service(host, portrait):
    """The agent-side plugin against the avatar service app (in the same loop, through ASGI),
    whose room connection is the one step replaced: it hands the avatar's MemoryRoom back."""
    import httpx
    from livekit import api
    from livekit.agents import AgentSession

    from integrations.livekit_dispatch import create_app
    from integrations.livekit_plugin import KnotstreamAvatarSession

    agent_room, avatar_room = MemoryRoom("agent"), MemoryRoom("knotstream-avatar")
    link(agent_room, avatar_room)
    joined: list[tuple[str, str]] = []

    async def connect(url: str, token: str):
        joined.append((url, token))
        return avatar_room

    key, secret = "k" * 24, "s" * 40
    app = create_app(host, api_keys=[key], connect=connect)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dispatch") as http:
        r = await http.post("/v1/livekit/avatars", json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await http.post("/v1/livekit/avatars", json={"livekit_url": "x"}, headers={"X-API-Key": key})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"

        plugin = KnotstreamAvatarSession(service_url="http://dispatch", api_key=key, http_client=http,
                                         audio_rate=RATE)
        session = AgentSession()
        await plugin.start(session, agent_room, livekit_url="wss://livekit.invalid", livekit_api_key="devkey",
                           livekit_api_secret=secret)
        claims = api.TokenVerifier("devkey", secret).verify(joined[0][1])
        assert joined[0][0] == "wss://livekit.invalid"
        assert claims.identity == "knotstream-avatar" and claims.kind == "agent"
        assert claims.attributes == {"lk.publish_on_behalf": "agent"}
        assert claims.video.room_join and claims.video.room == agent_room.name

        out = session.output.audio
        assert isinstance(out, DataStreamAudioOutput)
        await say(out, speech(1.0, +1, 7), speedup=5)
        ev = await asyncio.wait_for(out.wait_for_playout(), 30)
        assert not ev.interrupted and ev.playback_position == pytest.approx(1.0, abs=1e-6)
        state = (await http.get(f"/v1/livekit/avatars/{plugin.avatar_id}", headers={"X-API-Key": key})).json()
        assert state["state"] == "serving", state

        avatar_id = plugin.avatar_id
        await plugin.aclose()
        state = (await http.get(f"/v1/livekit/avatars/{avatar_id}", headers={"X-API-Key": key})).json()
        assert state["state"] == "ended", state
