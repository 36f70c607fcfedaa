"""WebSocket audio push, server-sent events and trickle ICE against the live server with the
real tiny engine and an aiortc client (server/realtime.py)."""

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect

from model.engine import Engine
from server.settings import Settings
from server.testing import AvatarClient, LiveServer
from streaming.ice import allow_loopback, has_non_loopback_ipv4

FPS = 25


@pytest.fixture(scope="module")
def server():
    if not has_non_loopback_ipv4():
        allow_loopback()
    engine = Engine.from_pretrained("tiny")
    with LiveServer(Settings(max_sessions=4, disconnect_grace_s=2.0), engine) as srv:
        yield srv


def ws_url(server, session, rate=16000, token=None):
    base = server.url.replace("http://", "ws://")
    return f"{base}/v1/sessions/{session['id']}/audio/ws?rate={rate}&token={token or session['token']}"


def pcm16(seconds, rate, freq=180.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


_seen: dict[int, list] = {}


async def next_json(ws, pred, timeout_s=60.0):
    """The first message (in arrival order) matching `pred` not returned before; messages
    that do not match are kept for later calls, so an early event is never lost."""
    seen = _seen.setdefault(id(ws), [])
    for i, msg in enumerate(seen):
        if pred(msg):
            return seen.pop(i)
    end = time.monotonic() + timeout_s
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, end - time.monotonic())))
        if pred(msg):
            return msg
        seen.append(msg)


async def test_websocket_push_faster_than_real_time_plays_in_order_with_events(server):
    """3 s of 24 kHz speech pushed in 100 ms pieces at once: it plays at real time, in order,
    and the socket reports playback_started / playback_finished with the played length."""
    client = AvatarClient(server.url)
    session = await client.connect("ada")
    live = server.manager.sessions[session["id"]]
    at_event = {}  # event type -> generated frames released when it was emitted
    live.on_event(lambda e: at_event.setdefault(e["type"], live.playout.stats.released))
    try:
        async with ws_connect(ws_url(server, session, rate=24000)) as ws:
            await ws.send(json.dumps({"type": "segment", "segment": "ws-1", "rate": 24000}))
            assert (await next_json(ws, lambda m: m["type"] == "ack"))["segment"] == "ws-1"
            data = pcm16(3.0, 24000)
            piece = 2 * 2400
            t_push = time.monotonic()
            for i in range(0, len(data), piece):
                await ws.send(data[i:i + piece])
            await ws.send(json.dumps({"type": "end", "segment": "ws-1"}))
            assert (await next_json(ws, lambda m: m["type"] == "ack" and m["ref"] == "end"))["segment"] == "ws-1"
            started = await next_json(ws, lambda m: m["type"] == "playback_started")
            finished = await next_json(ws, lambda m: m["type"] == "playback_finished")
            played_frames = at_event["playback_finished"] - at_event["playback_started"]
        assert started["segment"] == finished["segment"] == "ws-1"
        assert finished["interrupted"] is False
        assert abs(finished["position_ms"] - 3000) <= 20, finished
        # Real time: the segment spans as many output frames as its duration (a slow CPU adds
        # held frames between them, which are not counted), not as fast as it was pushed.
        assert abs(played_frames - 3.0 * FPS) <= 3, played_frames
    finally:
        await client.close()


async def test_websocket_interrupt_and_bad_messages(server):
    client = AvatarClient(server.url)
    session = await client.connect("ben")
    try:
        async with ws_connect(ws_url(server, session)) as ws:
            await ws.send(b"\x01")  # odd byte count: not PCM16
            err = await next_json(ws, lambda m: m["type"] == "error")
            assert err["code"] == "bad_pcm"
            await ws.send("{not json")
            assert (await next_json(ws, lambda m: m["type"] == "error"))["code"] == "bad_json"
            await ws.send(json.dumps({"type": "segment", "segment": "long"}))
            await next_json(ws, lambda m: m["type"] == "ack")
            await ws.send(pcm16(6.0, 16000))
            await next_json(ws, lambda m: m["type"] == "playback_started")
            await ws.send(json.dumps({"type": "interrupt"}))
            ack = await next_json(ws, lambda m: m["type"] == "ack" and m["ref"] == "interrupt")
            assert ack["interrupted_segments"] == ["long"]
            fin = await next_json(ws, lambda m: m["type"] == "playback_finished")
            assert fin["segment"] == "long" and fin["interrupted"] is True and fin["position_ms"] < 6000
            # A flood of messages is cut by the session's message rate limit, with errors.
            for i in range(400):
                await ws.send(json.dumps({"type": "ping", "id": i}))
            limited = await next_json(ws, lambda m: m["type"] == "error" and m["code"] == "rate_limited")
            assert "messages/s" in limited["message"]
        # The session lives on after all of that.
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.get(f"/v1/sessions/{session['id']}", headers=client.headers)
        assert r.status_code == 200 and r.json()["state"] in ("live", "connecting")
    finally:
        await client.close()


async def test_websocket_with_a_wrong_token_is_refused_with_a_reason(server):
    client = AvatarClient(server.url)
    session = await client.connect("cleo")
    try:
        async with ws_connect(ws_url(server, session, token="not-the-token")) as ws:
            err = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert err["type"] == "error" and err["status"] in (401, 403, 404)
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 1008
        assert server.manager.sessions[session["id"]].state != "closed"
    finally:
        await client.close()


async def test_server_sent_events_report_playback_and_the_end_of_the_session(server):
    client = AvatarClient(server.url)
    session = await client.connect("dev")
    events = []

    async def read_events():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            async with http.stream("GET", f"/v1/sessions/{session['id']}/events",
                                   params={"token": session["token"]}) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))

    reader = asyncio.create_task(read_events())
    try:
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.post(f"/v1/sessions/{session['id']}/audio?segment=sse-1", content=pcm16(1.0, 16000),
                                headers={**client.headers, "Content-Type": "audio/pcm"})
            assert r.status_code == 202
            end = time.monotonic() + 30
            while not any(e["type"] == "playback_finished" for e in events) and time.monotonic() < end:
                await asyncio.sleep(0.1)
            r = await http.delete(f"/v1/sessions/{session['id']}", headers=client.headers)
            assert r.status_code == 204
        await asyncio.wait_for(reader, 15)  # the stream ends when the session closes
    finally:
        reader.cancel()
        await client.close()
    kinds = [(e["type"], e.get("segment")) for e in events]
    assert kinds[:2] == [("playback_started", "sse-1"), ("playback_finished", "sse-1")], kinds
    assert events[1]["position_ms"] == 1000 and events[1]["interrupted"] is False
    assert events[-1]["type"] == "closed"


async def test_trickle_ice_patch(server):
    client = AvatarClient(server.url)
    session = await client.connect("ada")
    url = f"/v1/sessions/{session['id']}"
    frag = "a=mid:0\r\na=candidate:1 1 udp 2130706431 192.0.2.7 50000 typ host\r\na=end-of-candidates\r\n"
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            ok = await http.patch(url, content=frag, headers={**client.headers,
                                                              "Content-Type": "application/trickle-ice-sdpfrag"})
            assert ok.status_code == 204 and ok.headers["x-candidates-added"] == "1"
            bad = await http.patch(url, content="a=candidate:garbage\r\n",
                                   headers={**client.headers, "Content-Type": "application/trickle-ice-sdpfrag"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_sdpfrag"
            wrong_type = await http.patch(url, content=frag, headers={**client.headers, "Content-Type": "text/plain"})
            assert wrong_type.status_code == 415
            anonymous = await http.patch(url, content=frag, headers={"Content-Type": "application/trickle-ice-sdpfrag"})
            assert anonymous.status_code == 401
    finally:
        await client.close()


def gated_tone(seconds, rate, seed=0):
    """A 200 Hz tone switched on and off at random 0.2-0.6 s intervals; returns (pcm16 bytes,
    onset times in s): a pattern whose timing can be found again in the received audio."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    gate = np.zeros(n, np.float32)
    t, on, onsets = 0.0, True, []
    while t < seconds:
        d = rng.uniform(0.2, 0.6)
        if on:
            gate[int(t * rate):int(min(seconds, t + d) * rate)] = 1.0
            onsets.append(t)
        t, on = t + d, not on
    tone = np.sin(2 * np.pi * 200 * np.arange(n) / rate) * gate
    return (0.3 * 32767 * tone).astype("<i2").tobytes(), onsets


@pytest.mark.slow
async def test_30_s_pushed_in_2_s_plays_at_real_time_in_sync(server):
    from tests.test_webrtc import offsets

    client = AvatarClient(server.url)
    session = await client.connect("ada")
    live = server.manager.sessions[session["id"]]
    data, onsets = gated_tone(30.0, 24000)
    at_event = {}  # event type -> generated frames released when it was emitted
    live.on_event(lambda e: at_event.setdefault(e["type"], live.playout.stats.released))
    put_audio = []  # (first frame, driving audio) of every generated chunk
    put = live.playout.put
    live.playout.put = lambda chunk, *a: (put_audio.append((chunk.first_frame, chunk.audio.copy())), put(chunk, *a))[1]
    try:
        async with ws_connect(ws_url(server, session, rate=24000)) as ws:
            await ws.send(json.dumps({"type": "segment", "segment": "long", "rate": 24000}))
            piece = 2 * 24000 // 5  # 200 ms per message, 150 messages over 2 s (15x real time)
            for i in range(0, len(data), piece):
                await ws.send(data[i:i + piece])
                await asyncio.sleep(2.0 / 150)
            await ws.send(json.dumps({"type": "end", "segment": "long"}))
            await next_json(ws, lambda m: m["type"] == "ack" and m["ref"] == "end")
            live.video.sent, live.audio.sent = [], []
            await next_json(ws, lambda m: m["type"] == "playback_started")
            t_start = time.monotonic()
            fin = await next_json(ws, lambda m: m["type"] == "playback_finished", timeout_s=120)
            t_end = time.monotonic()
            played_frames = at_event["playback_finished"] - at_event["playback_started"]
        assert fin["interrupted"] is False and abs(fin["position_ms"] - 30000) <= 20, fin
        assert abs(played_frames - 30 * FPS) <= 3, played_frames
        sv = offsets(live.video.sent, 90000, t_start, t_end)
        sa = offsets(live.audio.sent, 48000, t_start, t_end)
        skew = np.median(sv) - np.median(sa)
        assert abs(skew) < 1 / FPS, f"server A/V skew {skew * 1000:.1f} ms"
        # The audio of the generated frames, in frame time, has the pushed on/off pattern at its
        # real-time spacing (server side, before held frames, which a loaded CPU adds, so this
        # holds at any generation speed; A/V sync of the output is the skew check above).
        frames = sorted(put_audio)
        audio = np.concatenate([a for _, a in frames])
        env = np.array([np.sqrt(np.mean(audio[i:i + 320] ** 2)) for i in range(0, len(audio) - 320, 320)])
        loud = np.flatnonzero(env > 0.05) * 0.02
        got_onsets = [loud[0]] + [b for a, b in zip(loud, loud[1:]) if b - a > 0.1]
        got = np.array(got_onsets) - got_onsets[0]
        want = np.array(onsets) - onsets[0]
        assert len(got) == len(want), (len(got), len(want))
        assert np.abs(got - want).max() < 1 / FPS, np.abs(got - want).max()
    finally:
        await client.close()


def test_ice_servers_per_session_reach_the_client_as_json_and_link_headers(server):
    turn = {"urls": ["turn:turn.example.net:3478?transport=udp"], "username": "u1", "credential": "s3cret"}
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/sessions", json={"avatar": "ada", "options": {"ice_servers": [turn]}})
        assert r.status_code == 201, r.text
        assert r.json()["ice_servers"] == [turn]
        assert r.headers["link"] == ('<turn:turn.example.net:3478?transport=udp>; rel="ice-server"; '
                                     'username="u1"; credential="s3cret"; credential-type="password"')
        http.delete(r.json()["location"], headers={"Authorization": f"Bearer {r.json()['token']}"})
        # Header injection and non-ICE URLs are refused.
        for bad in ({"urls": ["http://x"]}, {"urls": ["turn:x>; rel=evil"]},
                    {"urls": ["turn:x"], "username": "a\r\nSet-Cookie: x"}):
            r = http.post("/v1/sessions", json={"avatar": "ada", "options": {"ice_servers": [bad]}})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad


def free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stun_answers(port: int, timeout_s: float) -> bool:
    """True once a STUN binding request to 127.0.0.1:port gets an answer (the server is up)."""
    import os as _os
    import socket
    import struct

    request = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, _os.urandom(12))
    end = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < end:
            sock.sendto(request, ("127.0.0.1", port))
            try:
                data, _ = sock.recvfrom(2048)
                if len(data) >= 20 and data[8:20] == request[8:20]:
                    return True
            except OSError:
                pass
    return False


@pytest.fixture()
def coturn(tmp_path):
    """A coturn TURN server on loopback with one static user (Debian's coturn package)."""
    import shutil
    import subprocess

    exe = shutil.which("turnserver")
    if exe is None:
        pytest.skip("coturn is not installed (scripts/setup.sh installs it: apt-get install coturn)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
         "--min-port=49152", "--max-port=65535", "--lt-cred-mech", "--user=knot:stream", "--realm=knotstream",
         "--no-tls", "--no-dtls", "--no-cli", "--allow-loopback-peers", "--fingerprint",
         f"--pidfile={tmp_path}/turn.pid", "--log-file=stdout", "--simple-log"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not stun_answers(port, timeout_s=20.0):
        proc.terminate()
        pytest.fail(f"turnserver did not answer on port {port}: {proc.stdout.read().decode()[-2000:]}")
    yield {"urls": [f"turn:127.0.0.1:{port}?transport=udp"], "username": "knot", "credential": "stream"}
    proc.terminate()
    proc.wait(10)


async def test_turn_only_connection_streams_through_coturn(server, coturn):
    """The client takes the ICE servers of its session and allows relay candidates only: media
    can then only flow through the TURN server."""
    client = AvatarClient(server.url)
    session = await client.connect("ada", options={"ice_servers": [coturn]}, ice_servers=[coturn], relay_only=True)
    try:
        assert session["ice_servers"] == [coturn]
        assert 'rel="ice-server"' in client.response_headers["link"]
        t = time.monotonic()
        while len(client.got.video) < 25 and time.monotonic() - t < 60:
            await asyncio.sleep(0.1)
        assert len(client.got.video) >= 25
        local = client.pc.getTransceivers()[0].receiver.transport.transport.iceGatherer.getLocalCandidates()
        assert local and all(c.type == "relay" for c in local), [c.type for c in local]
    finally:
        await client.close()
