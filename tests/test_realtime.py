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


async def next_json(ws, pred, timeout_s=60.0):
    end = time.monotonic() + timeout_s
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, end - time.monotonic())))
        if pred(msg):
            return msg


async def test_websocket_push_faster_than_real_time_plays_in_order_with_events(server):
    """3 s of 24 kHz speech pushed in 100 ms pieces at once: it plays at real time, in order,
    and the socket reports playback_started / playback_finished with the played length."""
    client = AvatarClient(server.url)
    session = await client.connect("ada")
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
            assert time.monotonic() - t_push < 2.0  # pushing did not wait for playback
            started = await next_json(ws, lambda m: m["type"] == "playback_started")
            t_start = time.monotonic()
            finished = await next_json(ws, lambda m: m["type"] == "playback_finished")
            played_s = time.monotonic() - t_start
        assert started["segment"] == finished["segment"] == "ws-1"
        assert finished["interrupted"] is False
        assert abs(finished["position_ms"] - 3000) <= 20, finished
        assert 2.5 < played_s < 4.5, played_s  # real time, not as fast as it was pushed
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
