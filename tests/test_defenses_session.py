"""Nothing is held forever, and a session only takes what it asked for: the ICE-connect
deadline, the maximum session duration, a client's video answered sendonly, interrupts
rate-limited and coalesced while a rewind is pending, signed worker-to-worker forwarding,
and SIGTERM ending the process within the drain timeout while a request still computes."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from model.engine import Engine
from server.settings import Settings
from server.testing import LiveServer, free_port


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny")


async def until(pred, timeout_s):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def offer_and_keep(video: str = "recvonly"):
    """A client peer connection and its offer; the caller decides whether it ever takes the answer."""
    from aiortc import AudioStreamTrack, RTCPeerConnection, VideoStreamTrack

    pc = RTCPeerConnection()
    if video == "sendrecv":   # a camera the server should never receive, and a microphone it takes
        pc.addTransceiver(VideoStreamTrack(), direction="sendrecv")
        pc.addTransceiver(AudioStreamTrack(), direction="sendrecv")
    else:
        pc.addTransceiver("video", direction=video)
        pc.addTransceiver("audio", direction="recvonly")
    pc.createDataChannel("driving")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


def section(sdp: str, kind: str) -> str:
    return sdp.split(f"m={kind}", 1)[1].split("\nm=", 1)[0]


# ----- deadlines ------------------------------------------------------------------------------

async def test_a_session_whose_ice_never_connects_is_closed_at_the_deadline(engine):
    with LiveServer(Settings(ice_connect_timeout_s=2.0, offer_timeout_s=120), engine) as srv:
        pc = await offer_and_keep()
        try:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                r = await c.post("/v1/sessions", json={"avatar": "ada", "offer": pc.localDescription.sdp})
            assert r.status_code == 201, r.text
            live = srv.manager.sessions[r.json()["id"]]    # the answer is never applied: ICE cannot connect
            t0 = time.monotonic()
            assert await until(lambda: live.state == "closed", 10)
            assert 1.5 <= time.monotonic() - t0 <= 4.0
            assert live.close_reason == "ICE did not connect within 2 s of the answer"
            # ... and forgotten once its peer connection has closed (LiveSession.close awaits
            # it after the state turns "closed": under load that took longer than one poll).
            sid = r.json()["id"]
            assert await until(lambda: sid not in srv.manager.sessions and not srv.manager.records, 5)
        finally:
            await pc.close()


async def test_sessions_end_at_the_maximum_duration(engine):
    with LiveServer(Settings(max_session_s=1.5), engine) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            r = await c.post("/v1/sessions", json={"avatar": "ada"})
        live = srv.manager.sessions[r.json()["id"]]
        assert await until(lambda: live.state == "closed", 10)
        assert live.close_reason == "maximum session duration (1.5 s) reached"


# ----- what the answer takes --------------------------------------------------------------------

async def test_client_video_is_answered_sendonly(engine):
    with LiveServer(Settings(), engine) as srv:
        pc = await offer_and_keep(video="sendrecv")
        try:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                r = await c.post("/v1/sessions", json={"avatar": "ada", "offer": pc.localDescription.sdp})
            answer = r.json()["answer"]["sdp"]
            assert "a=sendonly" in section(answer, "video") and "a=sendrecv" not in section(answer, "video")
            assert "a=sendrecv" in section(answer, "audio")   # the microphone is still taken
        finally:
            await pc.close()


# ----- interrupts --------------------------------------------------------------------------------

async def test_interrupts_are_rate_limited_and_coalesced_while_a_rewind_is_pending(engine):
    settings = Settings(interrupt_rate_per_s=0.1, interrupt_burst=25)   # next token after 10 s
    with LiveServer(settings, engine) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            r = await c.post("/v1/sessions", json={"avatar": "ada"})
            sid, auth = r.json()["id"], {"Authorization": f"Bearer {r.json()['token']}"}
            live = srv.manager.sessions[sid]
            assert await until(lambda: live.playout.queued_frames() > 0, 30)
            # Hold the generation worker, so the first interrupt's rewind stays pending.
            release = threading.Event()
            srv.app.state.worker.call(release.wait, 30)
            try:
                answers = [await c.post(f"/v1/sessions/{sid}/interrupt", headers=auth) for _ in range(30)]
            finally:
                release.set()
            codes = [a.status_code for a in answers]
            assert codes == [200] * 25 + [429] * 5, codes
            assert answers[-1].json()["error"]["code"] == "rate_limited" and "retry-after" in answers[-1].headers
            coalesced = [a.json()["coalesced"] for a in answers[:25]]
            assert coalesced == [False] + [True] * 24, coalesced
            # The data channel spends the same budget.
            reply = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                live.handle_message('{"type": "interrupt"}'), srv.app.state.loop))
            assert reply["type"] == "error" and reply["code"] == "rate_limited"
            assert await until(lambda: len(live.rewinds) == 1, 10)
            await asyncio.sleep(0.3)
            assert len(live.rewinds) == 1        # one regeneration for 25 interrupts


# ----- forwarding between workers ---------------------------------------------------------------

def test_forwarded_requests_are_signed():
    from server.routing import forwarded_header, forwarded_ok

    secret, now = "cluster-secret-0123456789", 1_700_000_000
    h = forwarded_header(secret, "worker-a", "GET", "/v1/sessions/0123456789abcdef", now)
    assert forwarded_ok(secret, h, "GET", "/v1/sessions/0123456789abcdef", now + 5)
    assert not forwarded_ok(secret, h, "DELETE", "/v1/sessions/0123456789abcdef", now)       # other method
    assert not forwarded_ok(secret, h, "GET", "/v1/sessions/fedcba9876543210", now)          # other target
    assert not forwarded_ok(secret, h, "GET", "/v1/sessions/0123456789abcdef", now + 120)    # too old
    assert not forwarded_ok("another-secret-0123456789", h, "GET", "/v1/sessions/0123456789abcdef", now)
    assert not forwarded_ok(None, h, "GET", "/v1/sessions/0123456789abcdef", now)
    for junk in ("worker-a", "a;b;c", "", ";;"):
        assert not forwarded_ok(secret, junk, "GET", "/", now)


def test_a_cluster_needs_its_secret(engine):
    from server.app import create_app

    with pytest.raises(ValueError, match="CLUSTER_SECRET"):
        create_app(Settings(redis_url="redis://127.0.0.1:1/0"), engine=engine)


def test_a_forged_forwarded_header_is_refused(engine):
    with LiveServer(Settings(), engine) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.get("/readyz", headers={"X-Knotstream-Forwarded": "some-worker"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forwarded_refused"


# ----- SIGTERM ----------------------------------------------------------------------------------

APP = textwrap.dedent("""
    import asyncio, sys, time
    from contextlib import asynccontextmanager
    import uvicorn
    from fastapi import FastAPI
    from server.serve import draining_server

    class Manager:                       # what the drain needs of a session manager
        async def drain(self, timeout_s):
            await asyncio.sleep(0)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # As the server's own shutdown joins its generation thread: here one that is in the
        # middle of a computation that will not end in time.
        await asyncio.to_thread(time.sleep, 60)

    app = FastAPI(lifespan=lifespan)
    app.state.manager = Manager()

    @app.get("/compute")
    async def compute():                 # a request computing in a thread
        await asyncio.to_thread(time.sleep, 3600)

    config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                            timeout_graceful_shutdown=1)
    draining_server(config, app, drain_timeout_s=float(sys.argv[2])).run()
""")


def test_sigterm_ends_the_process_within_the_drain_timeout_mid_computation(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(APP)
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), str(port), "4"], cwd=root,
                            env={**os.environ, "PYTHONPATH": root}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < end and proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.2)
        threading.Thread(target=lambda: httpx.get(f"http://127.0.0.1:{port}/compute", timeout=60),
                         daemon=True).start()
        time.sleep(1.0)   # the request is in its thread
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 15 s after SIGTERM (drain timeout 4 s)")
        took = time.monotonic() - t0
        assert took <= 4.0 + 1.0, f"exited {took:.1f} s after SIGTERM, drain timeout 4 s"
        assert "exiting now" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
