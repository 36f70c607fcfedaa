"""End to end over WebRTC: an aiortc client against the live server with the real tiny engine.

Pacing and A/V sync are asserted from pts and send/arrival times; the output fps does
not depend on how fast the engine runs (slow steps hold the last frame, see
streaming/playout.py), so these tests hold on a loaded CPU.
"""

import asyncio
import statistics
import time

import httpx
import numpy as np
import pytest

from model.engine import Engine
from server.settings import Settings
from server.testing import AvatarClient, LiveServer, ToneTrack
from streaming.ice import allow_loopback, has_non_loopback_ipv4

FPS = 25


@pytest.fixture(scope="module")
def server():
    if not has_non_loopback_ipv4():
        allow_loopback()  # aioice skips 127.0.0.1 (see research/webrtc.md)
    engine = Engine.from_pretrained("tiny")
    with LiveServer(Settings(max_sessions=4, disconnect_grace_s=2.0), engine) as srv:
        yield srv


async def until(pred, timeout_s):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


def offsets(records, rate, t_from, t_to):
    """(arrival or send time) - pts / rate for records inside [t_from, t_to]."""
    return [t - pts / rate for pts, t, *_ in records if t_from <= t <= t_to]


async def test_frames_arrive_at_fps_with_monotonic_pts_and_audio_video_in_sync(server):
    await check_pacing(server, 20.0)


@pytest.mark.slow
async def test_audio_video_stay_in_sync_over_60_s(server):
    await check_pacing(server, 60.0)


async def check_pacing(server, seconds: float):
    client = AvatarClient(server.url)
    session = await client.connect("ada")
    live = server.manager.sessions[session["id"]]
    live.video.sent, live.audio.sent = [], []  # server-side (pts, send time) records
    try:
        assert await until(lambda: len(client.got.video) > 10, 30)
        t_start = time.monotonic() + 1.0
        await asyncio.sleep(seconds + 1.5)
        t_end = t_start + seconds
        video, audio = list(client.got.video), list(client.got.audio)
        pts = [p for p, _, _ in video]
        assert all(b > a for a, b in zip(pts, pts[1:])), "video pts not strictly increasing"
        apts = [p for p, _, _ in audio]
        assert all(b > a for a, b in zip(apts, apts[1:])), "audio pts not strictly increasing"
        n = sum(1 for _, t, _ in video if t_start <= t < t_end)
        assert abs(n / seconds - FPS) <= 0.05 * FPS, f"{n / seconds:.2f} fps over {seconds:.0f} s"
        # Server side: both tracks release media at t0 + pts (one clock): equal offsets.
        sv = offsets(live.video.sent, 90000, t_start, t_end)
        sa = offsets(live.audio.sent, 48000, t_start, t_end)
        skew = statistics.median(sv) - statistics.median(sa)
        assert abs(skew) < 1 / FPS, f"server A/V skew {skew * 1000:.1f} ms"
        # Client side: the offset between the two streams' arrival-vs-pts does not drift.
        cv0, cv1 = offsets(video, 90000, t_start, t_start + 3), offsets(video, 90000, t_end - 3, t_end)
        ca0, ca1 = offsets(audio, 48000, t_start, t_start + 3), offsets(audio, 48000, t_end - 3, t_end)
        drift = (statistics.median(cv1) - statistics.median(ca1)) - (statistics.median(cv0) - statistics.median(ca0))
        assert abs(drift) < 1 / FPS, f"client A/V drift {drift * 1000:.1f} ms over {seconds:.0f} s"
        st = live.status()
        assert st["chunks"] > 0 and st["state"] == "live"
    finally:
        await client.close()


async def test_malformed_data_channel_messages_get_errors_and_the_session_goes_on(server):
    client = AvatarClient(server.url)
    session = await client.connect("ben")
    try:
        client.send("{not json")
        err = await client.wait_message(lambda m: m["type"] == "error")
        assert err["code"] == "bad_json"
        client.send({"type": "motion", "fields": {"yaw": 9.0}})
        err = await client.wait_message(lambda m: m["type"] == "error" and m["code"] == "bad_motion")
        assert "yaw" in err["message"]
        client.send({"type": "motion", "fields": {"yaw": 0.3, "smile": 0.8}, "t": 1000})
        ack = await client.wait_message(lambda m: m["type"] == "ack" and m["ref"] == "motion")
        assert ack["frame"] >= 0 and "ignored" not in ack
        # A valid field the model does not read (the cartoon model's head stays in its frame)
        # is taken and named in the ack, not dropped in silence.
        client.send({"type": "motion", "fields": {"head_x": 0.1, "yaw": 0.2}})
        ack = await client.wait_message(lambda m: m["type"] == "ack" and m["ref"] == "motion" and "ignored" in m)
        assert ack["ignored"] == ["head_x"] and "head_x" not in session["model"]["motion_fields"]
        client.send({"type": "ping", "id": 7})
        assert (await client.wait_message(lambda m: m["type"] == "pong"))["id"] == 7
        n = len(client.got.video)
        assert await until(lambda: len(client.got.video) > n + 25, 10), "frames stopped after bad messages"
        live = server.manager.sessions[session["id"]]
        assert live.state == "live" and live.messages["errors"] == 2
        # The motion message reached the frames that left: its latency was observed.
        assert await until(lambda: "knotstream_driving_to_frame_seconds_count{kind=\"motion\"}"
                           in server.app.state.metrics.render().decode(), 60)
    finally:
        await client.close()


async def test_microphone_drives_the_avatar_and_closing_the_peer_frees_the_session(server):
    client = AvatarClient(server.url, keep_audio=True)
    session = await client.connect("cleo", options={"echo_mic": True}, mic=ToneTrack(amplitude=0.3))
    sid = session["id"]
    live = server.manager.sessions[sid]
    assert await until(lambda: live.status()["mic_seconds"] > 1.0, 20), live.status()
    # The mic tone comes back on the avatar's audio track (echo_mic), delayed to the lips.
    def loud():
        tail = [pcm for _, _, pcm in client.got.audio[-25:]]
        return bool(tail) and np.sqrt(np.mean(np.concatenate(tail).astype(np.float64) ** 2)) > 0.1 * 32767
    assert await until(loud, 30), "the mic tone never came back on the audio track"
    t = time.monotonic()
    await client.close()
    assert await until(lambda: sid not in server.manager.sessions, 10), "session not freed within 10 s"
    assert time.monotonic() - t < 10
    assert live.gen.removed or live.gen.failed
    assert sid not in {g.id for g in server.manager.worker.sessions()}
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get(f"/v1/sessions/{sid}", headers=client.headers)
    assert r.status_code == 404


async def test_data_channel_interrupt_finishes_speech_with_the_interrupted_flag(server):
    client = AvatarClient(server.url)
    session = await client.connect("dev")
    try:
        pcm = (0.3 * 32767 * np.sin(np.arange(16000 * 5) * 2 * np.pi * 180 / 16000)).astype("<i2")
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.post(f"/v1/sessions/{session['id']}/audio?segment=long", content=pcm.tobytes(),
                                headers={**client.headers, "Content-Type": "audio/pcm"})
        assert r.status_code == 202
        client.send({"type": "interrupt"})
        ack = await client.wait_message(lambda m: m["type"] == "ack" and m["ref"] == "interrupt")
        assert ack["interrupted_segments"] == ["long"]
        fin = await client.wait_message(lambda m: m["type"] == "playback_finished")
        assert fin["segment"] == "long" and fin["interrupted"] is True and fin["position_ms"] < 5000
    finally:
        await client.close()


def ada_mouth_box():
    """The bundled avatar's mouth region in the 128x128 output (the renderer knows it)."""
    from model.train.world import identity_from_seed, mouth_box, neutral_motion
    from server.avatars import AVATARS
    return mouth_box(identity_from_seed(AVATARS["ada"]), neutral_motion(), 128)


async def test_speech_moves_the_mouth_more_than_silence(server):
    """Typed speech (offline TTS, the kind of speech the model was trained on) makes the
    mouth of the received video open and close far more than the idle avatar's does."""
    from model.train.world import measure_mouth_open
    from streaming.tts import available_engine
    if available_engine() is None:
        pytest.skip("no espeak-ng/flite installed (scripts/setup.sh installs them)")
    x0, y0, x1, y1 = ada_mouth_box()

    async def mouth_motion(speak: bool) -> float:
        client = AvatarClient(server.url, keep_images=True)
        session = await client.connect("ada", options={"seed": 5})
        try:
            live = server.manager.sessions[session["id"]]
            assert await until(lambda: live.playout.stats.released >= 25, 60)
            if speak:
                client.send({"type": "speak", "text": "Hello there, I am a small avatar and I can talk to you "
                                                      "for a long while about many things."})
                await client.wait_message(lambda m: m["type"] == "playback_started", 60)
            t0 = time.monotonic()
            await asyncio.sleep(3.0)
            frames = np.stack([img for _, t, img in client.got.video if t0 <= t]).astype(np.float32)
        finally:
            await client.close()
        assert len(frames) >= 50
        # Mouth opening (dark cavity in the mouth box): head sway and blinks barely move it.
        opening = measure_mouth_open(frames.astype(np.uint8), (x0, y0, x1, y1))
        return float(opening.std()), float(opening.max())

    silent = await mouth_motion(False)
    spoken = await mouth_motion(True)
    # (std, max) of the opening: bundled model 0.028 / 0.17 spoken vs 0.002 / 0.05 silent.
    assert spoken[0] > 4 * silent[0] + 0.005 and spoken[1] > silent[1] + 0.05, (spoken, silent)


async def test_a_failing_session_gets_an_error_event_and_others_go_on(server):
    good, bad = AvatarClient(server.url), AvatarClient(server.url)
    await good.connect("ada")
    s_bad = await bad.connect("ben")
    try:
        stream = server.manager.sessions[s_bad["id"]].stream

        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")

        stream._checked = broken  # the next step of this session fails on the worker thread
        err = await bad.wait_message(lambda m: m["type"] == "error", timeout_s=60)
        assert err["code"] == "generation_failed" and "injected failure" in err["message"]
        assert await until(lambda: s_bad["id"] not in server.manager.sessions, 10)
        n = len(good.got.video)
        assert await until(lambda: len(good.got.video) > n + 50, 10)
        assert server.manager.sessions[good.session["id"]].state == "live"
        assert server.manager.worker.alive
    finally:
        await good.close()
        await bad.close()


async def test_pushed_speech_plays_on_the_audio_track_with_playback_events(server):
    client = AvatarClient(server.url, keep_audio=True)
    session = await client.connect("ada")
    try:
        pcm = (0.4 * 32767 * np.sin(np.arange(16000) * 2 * np.pi * 300 / 16000)).astype("<i2")
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.post(f"/v1/sessions/{session['id']}/audio?segment=hello", content=pcm.tobytes(),
                                headers={**client.headers, "Content-Type": "audio/pcm"})
        assert r.status_code == 202
        started = await client.wait_message(lambda m: m["type"] == "playback_started", timeout_s=60)
        finished = await client.wait_message(lambda m: m["type"] == "playback_finished", timeout_s=60)
        assert started["segment"] == finished["segment"] == "hello"
        assert finished["interrupted"] is False and finished["position_ms"] == 1000
        await asyncio.sleep(1.0)  # the event leaves when the last slot is assigned; its audio follows
        rms = [np.sqrt(np.mean(p.astype(np.float64) ** 2)) / 32767 for _, _, p in client.got.audio]
        loud = [i for i, v in enumerate(rms) if v > 0.1]
        assert loud, "speech never reached the audio track"
        # 1 s of speech: its energy adds up to 1 s of the tone at the level of a whole loud frame,
        # whether it arrives in 50 whole 20 ms frames or split by held slots (slow generation
        # pauses audio with video) into more, partly silent ones.
        full = float(np.median([rms[i] ** 2 for i in loud]))
        seconds = sum(v * v for v in rms) * 0.02 / full
        assert 0.9 <= seconds <= 1.1, seconds
        assert len(loud) >= 49, len(loud)  # never shortened
        assert all(v < 0.01 for v in rms[: loud[0]])  # silence before it
    finally:
        await client.close()
