"""The hostile-input battery against a real `knotstream serve` process.

Every request of the battery is a 4xx within 2 s. After it: no session is left, the process
is idle (CPU under 10 % over 3 s), /readyz answers, a normal session still streams 25 fps
to an aiortc client, a session whose client never completes ICE is gone within the ICE
deadline, 60 interrupts/s on one session leave another session's generation where it was,
an idle keep-alive connection is still served after 6 s, and SIGTERM ends the process within 15 s. The tests of this module run in file order on one
server process; each measured number is printed (`-s`) and written to the pytest log.
"""

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.testing import AvatarClient, free_port

ROOT = Path(__file__).resolve().parent.parent
METRICS_KEY = "hostile-metrics-key-0123456789"
ICE_DEADLINE_S = 4.0


class Served:
    def __init__(self, tmp: Path):
        from streaming.ice import has_non_loopback_ipv4

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
               "KNOTSTREAM_PORT": str(self.port), "KNOTSTREAM_MAX_SESSIONS": "4",
               "KNOTSTREAM_ICE_CONNECT_TIMEOUT_S": str(ICE_DEADLINE_S), "KNOTSTREAM_DRAIN_TIMEOUT_S": "10",
               "KNOTSTREAM_METRICS_KEY": METRICS_KEY, "KNOTSTREAM_DOCS": "false",
               "KNOTSTREAM_LOOPBACK_ICE": "false" if has_non_loopback_ipv4() else "true"}
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=tmp, env=env,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"knotstream serve did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("hostile"))
    yield s
    s.stop()


def report(name: str, **numbers) -> None:
    print(f"[hostile] {name}: {json.dumps(numbers)}")


async def offer_sdp() -> str:
    """An aiortc offer whose peer is gone before the answer comes: ICE never completes."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    pc.createDataChannel("driving")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return pc.localDescription.sdp


def au_file() -> bytes:
    data = np.zeros(4000, ">i2").tobytes()
    return struct.pack(">4sIIIII", b".snd", 24, len(data), 3, 8000, 1) + data


def png_bomb() -> bytes:
    """A PNG header that declares 60000 x 60000 pixels (the data is never there)."""
    import zlib
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def raw_multipart_flood(port: int) -> tuple[int, str]:
    """A chunked multipart image far over the upload limit; only the status line is read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
        head = b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for piece in [head] + [b"\0" * 1_000_000] * 11:   # the limit is 10 MB + the form's slack
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        answer = b""
        while b"}}" not in answer:   # the JSON error body ends the answer
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
    finally:
        sock.close()
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), json.loads(body)["error"]["code"]


# ----- the battery ------------------------------------------------------------------------------

def battery(c: httpx.Client, served: Served) -> tuple[list, str, dict]:
    """(name, request) pairs (a request returns an httpx.Response or a (status, code) pair; name
    None: a request that only spends a budget before the refusal that is checked), and the
    battery session's location and auth header."""
    made = c.post("/v1/sessions", json={"avatar": "ada", "offer": asyncio.run(offer_sdp())})
    assert made.status_code == 201, made.text
    s = made.json()
    loc, auth = s["location"], {"Authorization": f"Bearer {s['token']}"}
    pcm = {**auth, "Content-Type": "audio/pcm"}
    frag = {**auth, "Content-Type": "application/trickle-ice-sdpfrag"}
    cand = "a=candidate:1 1 udp 2130706431 192.0.2.{} 9 typ host\r\n"

    def create(options=None, raw=None, **kw):
        if raw is not None:
            return lambda: c.post("/v1/sessions", content=raw, headers={"Content-Type": "application/json", **kw})
        return lambda: c.post("/v1/sessions", json={"avatar": "ada", "options": options}, headers=kw or None)

    cases = [(f"knob {k}={v!r}", create({"knobs": {k: v}})) for k, v in (
        ("window_frames", 2.5), ("window_frames", 10**6), ("ahead_frames", 10**9), ("chunk_frames", 400),
        ("knot_frames", 0.5), ("denoise_steps", 2.5), ("denoise_steps", 99), ("denoise_steps", True),
        ("denoise_steps", "inf"), ("seam_blend", 1e308), ("rebase_every", 16))]
    cases += [
        ("knob NaN literal", create(raw=b'{"avatar": "ada", "options": {"knobs": {"denoise_steps": NaN}}}')),
        ("lead_frames 10**6", create({"lead_frames": 10**6})),
        ("lead_frames 2.5", create({"lead_frames": 2.5})),
        ("deeply nested JSON", create(raw=b"[" * 200_000)),
        ("JSON body over 1 MB", create(raw=b"{" + b" " * 1_000_001 + b"}")),
        ("PNG bomb 60000x60000", lambda: c.post("/v1/sessions", files={"image": ("b.png", png_bomb(), "image/png")})),
        ("multipart image flood (chunked)", lambda: raw_multipart_flood(served.port)),
        ("garbage offer", lambda: c.post("/v1/sessions", json={"avatar": "ada", "offer": "v=0\r\nx"})),
        ("offer over 200 kB", lambda: c.post(f"{loc}/offer", content=b"v=0" + b"x" * 200_001,
                                             headers={**auth, "Content-Type": "application/sdp"})),
        ("PCM rate 47999", lambda: c.post(f"{loc}/audio?rate=47999", content=b"\0" * 3200, headers=pcm)),
        ("PCM rate 10**9", lambda: c.post(f"{loc}/audio?rate=1000000000", content=b"\0" * 3200, headers=pcm)),
        ("Sun .au container", lambda: c.post(f"{loc}/audio", content=au_file(),
                                             headers={**auth, "Content-Type": "audio/basic"})),
        ("HLS playlist as audio", lambda: c.post(f"{loc}/audio", content=b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n",
                                                 headers={**auth, "Content-Type": "audio/wav"})),
        ("speak with NUL", lambda: c.post(f"{loc}/speak", json={"text": "a\u0000b"}, headers=auth)),
        ("speak 2001 chars", lambda: c.post(f"{loc}/speak", json={"text": "a" * 2001}, headers=auth)),
        ("trickle body 100 kB", lambda: c.patch(loc, content=b"a" * 100_000, headers=frag)),
        ("trickle 60 candidates", lambda: c.patch(loc, content="".join(cand.format(i) for i in range(60)),
                                                  headers=frag)),
        ("foreign Host (DNS rebinding)", lambda: c.get("/readyz", headers={"Host": "rebind.attacker.example"})),
        ("foreign Origin", lambda: c.post("/v1/sessions", json={"avatar": "ada"},
                                          headers={"Origin": "https://attacker.example"})),
        ("forged forwarded header", lambda: c.get(loc, headers={**auth, "X-Knotstream-Forwarded": "w;1;ab"})),
        ("no session token", lambda: c.get(loc)),
        ("another session's token", lambda: c.get(loc, headers={"Authorization": "Bearer not-the-token"})),
        ("metrics without key", lambda: c.get("/metrics")),
        ("docs in production", lambda: c.get("/docs")),
    ]
    cases += [(f"open segment {i}" if i == 16 else None,   # 16 may be open at once (an audio budget
               lambda i=i: c.post(f"{loc}/audio?segment=s{i}&end=false", content=b"\0" * 320, headers=pcm))
              for i in range(17)]                          # of 20 covers them: the 17th is refused)
    cases += [(f"interrupt {i}" if i >= 10 else None,   # a burst of 10, then refused
               lambda: c.post(f"{loc}/interrupt", headers=auth)) for i in range(15)]
    return cases, loc, auth


def test_every_hostile_request_is_a_4xx_within_2_s(served):
    results = []
    with httpx.Client(base_url=served.url, timeout=30) as c:
        cases, loc, auth = battery(c, served)
        try:
            for name, request in cases:
                t = time.monotonic()
                try:
                    r = request()
                except (httpx.TransportError, OSError) as exc:   # no answer at all: status 0
                    r = (0, type(exc).__name__)
                took = time.monotonic() - t
                status, code = r if isinstance(r, tuple) else (r.status_code, _code(r))
                if name is not None:
                    results.append((name, status, code, round(took, 3)))
        finally:
            assert c.delete(loc, headers=auth).status_code == 204
    bad = [r for r in results if not (400 <= r[1] < 500 and r[3] < 2.0)]
    for r in results:
        report("battery", case=r[0], status=r[1], code=r[2], seconds=r[3])
    assert not bad, bad
    assert {r[2] for r in results} >= {"invalid_knob", "audio_bad_rate", "audio_unreadable", "bad_text",
                                       "sdpfrag_too_large", "too_many_candidates", "forbidden_host",
                                       "forbidden_origin", "forwarded_refused", "too_many_segments",
                                       "rate_limited", "image_too_large"}


def _code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


# ----- after the battery ------------------------------------------------------------------------

def test_the_server_is_idle_and_ready_after_the_battery(served):
    with httpx.Client(base_url=served.url, timeout=10) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["sessions"] == 0, ready.text
    time.sleep(1.0)
    cpu0, t0 = served.cpu_seconds(), time.monotonic()
    time.sleep(3.0)
    share = (served.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    report("idle", cpu_share=round(share, 4))
    assert share < 0.10, f"the server uses {100 * share:.1f} % of a core with no session"


async def streamed_fps(served: Served, seconds: float = 5.0) -> dict:
    client = AvatarClient(served.url)
    session = await client.connect("ada")
    auth = {"Authorization": f"Bearer {session['token']}"}
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as c:
            end = time.monotonic() + 30
            while len(client.got.video) < 25 and time.monotonic() < end:
                await asyncio.sleep(0.1)
            t0, n0 = time.monotonic(), len(client.got.video)
            s0 = (await c.get(session["location"], headers=auth)).json()
            await asyncio.sleep(seconds)
            t1, n1 = time.monotonic(), len(client.got.video)
            s1 = (await c.get(session["location"], headers=auth)).json()
            await c.delete(session["location"], headers=auth)
        return {"received_fps": round((n1 - n0) / (t1 - t0), 2),
                "generated_fps": round((s1["frame_index"] - s0["frame_index"]) / (t1 - t0), 2),
                "held_frames": s1["held_frames"] - s0["held_frames"]}
    finally:
        await client.close()


async def test_a_normal_session_still_streams_25_fps(served):
    got = await streamed_fps(served)
    report("normal session after the battery", **got)
    assert got["received_fps"] >= 0.95 * 25, got   # the pacing tolerance of tests/test_webrtc.py


async def test_a_session_that_never_completes_ice_is_gone_within_the_deadline(served):
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as c:
        r = await c.post("/v1/sessions", json={"avatar": "ada", "offer": await offer_sdp()})
        assert r.status_code == 201, r.text
        auth = {"Authorization": f"Bearer {r.json()['token']}"}
        t0 = time.monotonic()
        while (await c.get(r.json()["location"], headers=auth)).status_code == 200:
            assert time.monotonic() - t0 < ICE_DEADLINE_S + 3, "still there after the ICE deadline"
            await asyncio.sleep(0.2)
        report("never-connecting session", gone_after_s=round(time.monotonic() - t0, 2), deadline_s=ICE_DEADLINE_S)


async def test_an_interrupt_flood_leaves_another_session_generating(served):
    """Victim: a streaming session. Attacker: a second streaming session sending 60 interrupts/s.
    This 2-core CPU does not generate two sessions in real time, so what is compared is the
    victim's generated fps next to a quiet attacker (before and after) and next to a flooding
    one; the numbers are reported. Asserted: the flood is refused past the interrupt budget,
    and it does not starve the victim (at least half its quiet rate)."""
    victim, attacker = AvatarClient(served.url), AvatarClient(served.url)
    v = await victim.connect("ada")
    a = await attacker.connect("ben")
    va, aa = ({"Authorization": f"Bearer {x['token']}"} for x in (v, a))
    codes = []
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as c:
            async def generated(seconds):
                s0 = (await c.get(v["location"], headers=va)).json()
                t0 = time.monotonic()
                await asyncio.sleep(seconds)
                s1 = (await c.get(v["location"], headers=va)).json()
                return round((s1["frame_index"] - s0["frame_index"]) / (time.monotonic() - t0), 2)

            async def flood(seconds):
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    codes.append((await c.post(f"{a['location']}/interrupt", headers=aa)).status_code)
                    await asyncio.sleep(1 / 60)

            await asyncio.sleep(3.0)   # both sessions past their start
            before = await generated(5.0)
            flooding, _ = await asyncio.gather(generated(5.0), flood(5.5))
            after = await generated(5.0)
            status = (await c.get(a["location"], headers=aa)).json()
        report("interrupt flood", victim_generated_fps_before=before, victim_generated_fps_flood=flooding,
               victim_generated_fps_after=after, interrupts_sent=len(codes), accepted=codes.count(200),
               refused_429=codes.count(429), attacker_regenerated_frames=status["regenerated_frames"])
        assert set(codes) <= {200, 429} and codes.count(429) > 0
        assert codes.count(200) <= 10 + 5 * 6 + 1        # burst + 5/s over the flood: the rest refused
        assert flooding >= 0.5 * min(before, after), (before, flooding, after)
    finally:
        await victim.close()
        await attacker.close()


def test_an_idle_connection_is_reused_past_5_s(served):
    """A client that polls every ~5 s on one keep-alive connection (httpx's pool keeps one 5 s)
    must not race the server closing it: the server keeps idle connections longer."""
    request = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        reader = sock.makefile("rb")
        for i in range(2):
            sock.sendall(request)
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), (i, status)
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(reader.read(length))["status"] == "ready"
            if i == 0:
                time.sleep(6.0)


def test_sigterm_ends_the_process_within_15_s(served):
    t0 = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    try:
        served.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 15 s after SIGTERM: {served.log.read_text()[-2000:]}")
    report("SIGTERM", exit_after_s=round(time.monotonic() - t0, 2), returncode=served.proc.returncode)
