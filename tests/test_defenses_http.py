"""Hostile input at the HTTP routes, one finding each, against a live in-process server with
the real tiny engine: DNS rebinding without keys, the metrics key and docs switch, generic
500 bodies, trickle caps, open segments, PCM rates and container formats, TTS text and
concurrency, the speak budget shared with the data channel, the multipart image counted as
it arrives, and the per-key session quota."""

import asyncio
import io
import json
import logging
import struct
import threading

import httpx
import numpy as np
import pytest
import websockets

from model.engine import Engine
from server.settings import Settings
from server.testing import LiveServer

KEY = "hostile-test-key-0123456789"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny")


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    settings = Settings(max_sessions=4, audio_rate_per_s=1.0, audio_burst=3, max_open_segments=3,
                        max_ice_candidates=5, metrics_key="metrics-key-0123456789", docs=False,
                        web_dir=tmp_path_factory.mktemp("none") / "absent")
    with LiveServer(settings, engine) as srv:
        @srv.app.get("/boom")
        async def boom():
            raise RuntimeError("secret path /srv/private/weights.bin and 10.0.0.7")
        yield srv


def err(r, status, code):
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]


def session(http, **body):
    r = http.post("/v1/sessions", json={"avatar": "ada", **body})
    assert r.status_code == 201, r.text
    return r.json(), {"Authorization": f"Bearer {r.json()['token']}"}


def unlimited(server, session_id):
    """Lift a session's request budget for a test about something else."""
    limits = server.manager.limits[session_id]
    limit = getattr(limits, "requests", limits)   # (a bare RateLimit before the interrupt budget existed)
    limit.burst = limit.tokens = 1000.0


def pcm(seconds, rate=16000):
    return np.zeros(int(seconds * rate), "<i2").tobytes()


# ----- without API keys: only this machine's names (DNS rebinding) ------------------------------

def test_foreign_host_or_origin_is_refused_without_keys(http, server):
    err(http.get("/healthz", headers={"Host": "attacker.example:8000"}), 403, "forbidden_host")
    err(http.post("/v1/sessions", json={"avatar": "ada"}, headers={"Host": "rebound.attacker.example"}),
        403, "forbidden_host")
    err(http.post("/v1/sessions", json={"avatar": "ada"}, headers={"Origin": "http://attacker.example"}),
        403, "forbidden_origin")
    err(http.get("/healthz", headers={"Origin": "null"}), 403, "forbidden_origin")
    assert http.get("/healthz", headers={"Host": "localhost:1234"}).status_code == 200
    assert http.get("/healthz", headers={"Origin": server.url}).status_code == 200
    assert not server.manager.sessions

    async def ws(origin):
        url = server.url.replace("http", "ws") + "/v1/sessions/0123456789abcdef/audio/ws?token=x"
        async with websockets.connect(url, origin=origin) as sock:
            return json.loads(await sock.recv())

    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        asyncio.run(ws("http://attacker.example"))
    assert e.value.response.status_code == 403
    assert asyncio.run(ws(server.url))["code"] == "session_not_found"   # same origin: reaches the route


def test_with_keys_the_host_guard_is_off(engine):
    settings = Settings(api_keys=[KEY], host="127.0.0.1")
    with LiveServer(settings, engine) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/healthz", headers={"Host": "api.example.com"}).status_code == 200
        err(c.post("/v1/sessions", json={"avatar": "ada"}, headers={"Host": "api.example.com"}), 401,
            "unauthorized")


# ----- operations endpoints -----------------------------------------------------------------------

def test_metrics_need_their_key_and_docs_can_be_off(http):
    err(http.get("/metrics"), 401, "unauthorized")
    err(http.get("/metrics", headers={"Authorization": "Bearer wrong-key-0123456789"}), 401, "unauthorized")
    ok = http.get("/metrics", headers={"Authorization": "Bearer metrics-key-0123456789"})
    assert ok.status_code == 200 and "knotstream" in ok.text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(path).status_code == 404, path


def test_internal_errors_say_nothing_but_an_id_that_is_in_the_log(http, caplog):
    with caplog.at_level(logging.ERROR, logger="knotstream.server"):
        r = http.get("/boom")
    e = err(r, 500, "internal_error")
    assert "secret" not in r.text and "10.0.0.7" not in r.text and "RuntimeError" not in r.text
    assert e["id"] in e["message"]
    logged = [rec for rec in caplog.records if e["id"] in rec.getMessage()]
    assert logged and "10.0.0.7" in str(logged[0].exc_info[1])


# ----- trickle ICE ---------------------------------------------------------------------------------

def test_trickle_body_and_candidate_caps(http, server):
    from tests.test_server import offer_sdp

    body, auth = session(http, offer=offer_sdp())
    url, frag = body["location"], {**auth, "Content-Type": "application/trickle-ice-sdpfrag"}
    err(http.patch(url, content=b"a" * 64_001, headers=frag), 413, "sdpfrag_too_large")

    def chunked():   # no Content-Length: the cap holds while reading
        for _ in range(100):
            yield b"a=candidate:" + b"x" * 1000 + b"\r\n"
    err(http.patch(url, content=chunked(), headers=frag), 413, "sdpfrag_too_large")
    line = "a=candidate:1 1 udp 2130706431 192.0.2.{} 9 typ host\r\n"
    r = http.patch(url, content="".join(line.format(i) for i in range(4)), headers=frag)
    assert r.status_code == 204 and r.headers["x-candidates-added"] == "4"
    e = err(http.patch(url, content="".join(line.format(i) for i in range(10, 12)), headers=frag), 409,
            "too_many_candidates")
    assert "1 more" in e["message"]
    assert server.manager.sessions[body["id"]].candidates == 4   # nothing of the refused fragment was added


# ----- pushed audio -------------------------------------------------------------------------------

def test_pcm_rates_are_an_allowlist(http, server):
    body, auth = session(http)
    hdr = {**auth, "Content-Type": "audio/pcm"}
    for rate in (47999, 0, -16000, 192000, 7):
        e = err(http.post(f"{body['location']}/audio?rate={rate}", content=pcm(0.1, 8000), headers=hdr), 422,
                "audio_bad_rate")
        assert e["field"] == "rate" and "44100" in e["message"]
    r = http.post(f"{body['location']}/audio?rate=44100", content=pcm(0.5, 44100), headers=hdr)
    assert r.status_code == 202 and r.json()["seconds"] == 0.5, r.text


def test_pcm_is_resampled_off_the_event_loop(http, server, monkeypatch):
    from streaming.resample import StreamResampler

    threads, push = [], StreamResampler.push

    def spy(self, samples, flush=False):
        threads.append(threading.get_ident())
        return push(self, samples, flush)

    monkeypatch.setattr(StreamResampler, "push", spy)
    body, auth = session(http)
    r = http.post(f"{body['location']}/audio?rate=48000", content=pcm(1.0, 48000),
                  headers={**auth, "Content-Type": "audio/pcm"})
    assert r.status_code == 202, r.text
    loop_thread = server.call(_current_thread())
    assert threads and loop_thread not in threads


async def _current_thread():
    return threading.get_ident()


def au_file(seconds=0.5, rate=8000) -> bytes:
    """Sun .au audio: decodable by FFmpeg, but not one of the containers /audio takes."""
    data = (np.sin(np.arange(int(seconds * rate)) / 3) * 8000).astype(">i2").tobytes()
    return struct.pack(">4sIIIII", b".snd", 24, len(data), 3, rate, 1) + data


def test_only_wav_ogg_mp3_flac_are_demuxed(http):
    import av

    assert av.open(io.BytesIO(au_file())).format.name == "au"   # FFmpeg would probe and decode it
    body, auth = session(http)
    for data in (au_file(), b"#EXTM3U\n#EXTINF:1,\nfile:///etc/hostname\n", b"\x1aE\xdf\xa3" + b"\0" * 64):
        e = err(http.post(f"{body['location']}/audio", content=data, headers={**auth, "Content-Type": "audio/wav"}),
                415, "audio_unreadable")
        assert "wav, ogg, mp3, flac" in e["message"]


def test_open_segments_per_session_are_capped(http, server):
    body, auth = session(http)
    hdr = {**auth, "Content-Type": "audio/pcm"}
    unlimited(server, body["id"])   # this test is about segments, not the rate
    for i in range(3):
        r = http.post(f"{body['location']}/audio?segment=s{i}&end=false", content=pcm(0.1), headers=hdr)
        assert r.status_code == 202, r.text
    err(http.post(f"{body['location']}/audio?segment=s9&end=false", content=pcm(0.1), headers=hdr), 409,
        "too_many_segments")
    assert http.post(f"{body['location']}/audio?segment=s1&end=false", content=pcm(0.1), headers=hdr).status_code == 202
    assert http.post(f"{body['location']}/audio?segment=s0&end=true", content=pcm(0.1), headers=hdr).status_code == 202
    assert http.post(f"{body['location']}/audio?segment=s9&end=false", content=pcm(0.1), headers=hdr).status_code == 202


# ----- speak ----------------------------------------------------------------------------------------

def test_control_characters_in_speak_text_are_400(http, server):
    body, auth = session(http)
    unlimited(server, body["id"])
    for text in ("hello\u0000world", "\x07bell", "a\x1b[31m"):
        err(http.post(f"{body['location']}/speak", json={"text": text}, headers=auth), 400, "bad_text")
    live = server.manager.sessions[body["id"]]
    reply = server.call(live.handle_message(json.dumps({"type": "speak", "text": "hi\u0000"})))
    assert reply["type"] == "error" and reply["code"] == "bad_text"


def test_speak_on_the_data_channel_spends_the_http_budget(http, server):
    if server.manager.tts is None:
        pytest.skip("no espeak-ng/flite installed")
    body, auth = session(http)
    live = server.manager.sessions[body["id"]]
    for _ in range(3):   # the burst, spent over HTTP
        assert http.post(f"{body['location']}/audio", content=pcm(0.05),
                         headers={**auth, "Content-Type": "audio/pcm"}).status_code == 202
    reply = server.call(live.handle_message(json.dumps({"type": "speak", "text": "hello"})))
    assert reply["type"] == "error" and reply["code"] == "rate_limited", reply
    assert live.driving.segments() and len(live.driving.segments()) == 3   # nothing was synthesized


async def test_one_synthesis_per_session_and_a_process_wide_cap(http, server, monkeypatch):
    if server.manager.tts is None:
        pytest.skip("no espeak-ng/flite installed")
    from streaming import tts

    async def slow(text, sample_rate=16000):
        await asyncio.sleep(1.0)
        return np.zeros(1600, np.float32)

    monkeypatch.setattr(tts, "synthesize", slow)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        made = [(await c.post("/v1/sessions", json={"avatar": "ada"})).json() for _ in range(3)]
        for m in made:
            unlimited(server, m["id"])
        hdr = [{"Authorization": f"Bearer {m['token']}"} for m in made]
        same = await asyncio.gather(*(c.post(f"{made[0]['location']}/speak", json={"text": "hi"}, headers=hdr[0])
                                      for _ in range(2)))
        assert sorted(r.status_code for r in same) == [202, 429], [r.text for r in same]
        refused = next(r for r in same if r.status_code == 429)
        assert refused.json()["error"]["code"] == "speak_in_progress" and refused.headers["retry-after"] == "1"
        synth = server.manager.tts
        synth_cap, synth_wait = synth.max_concurrent, synth.wait_s
        synth.wait_s = 0.2
        try:   # 2 slots (the default tts_concurrency), 3 sessions at once: one waits, times out
            many = await asyncio.gather(*(c.post(f"{m['location']}/speak", json={"text": "hi"}, headers=h)
                                          for m, h in zip(made, hdr)))
        finally:
            synth.wait_s = synth_wait
        codes = sorted(r.status_code for r in many)
        assert synth_cap == 2 and codes == [202, 202, 503], [r.text for r in many]
        assert next(r for r in many if r.status_code == 503).json()["error"]["code"] == "tts_busy"


# ----- uploads --------------------------------------------------------------------------------------

def test_a_multipart_image_is_counted_while_it_arrives(engine):
    """A chunked multipart upload (no Content-Length) against a 1 MB limit: after 2 MB of the
    image the client stops sending and waits. The server has answered 413 by then; a server
    that spools the part to disk first would still be waiting for the end of the form."""
    import socket

    settings = Settings(max_upload_bytes=1_000_000)
    with LiveServer(settings, engine) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.settings.port), timeout=10)
        try:
            sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n")
            head = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                    b"Content-Type: image/png\r\n\r\n")
            for piece in [head] + [b"\0" * 100_000] * 20:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            answer = b""
            while b"}}" not in answer:   # no more is sent: only a server that counted answers
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"image_too_large"' in answer
        assert not srv.manager.sessions


# ----- who may hold how many sessions ---------------------------------------------------------------

def test_sessions_per_api_key_are_capped(engine):
    other = "second-hostile-key-0123456789"
    settings = Settings(api_keys=[KEY, other], max_sessions=4, max_sessions_per_key=2)
    with LiveServer(settings, engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        a = {"X-API-Key": KEY}
        made = [c.post("/v1/sessions", json={"avatar": "ada"}, headers=a) for _ in range(2)]
        assert [r.status_code for r in made] == [201, 201]
        e = err(c.post("/v1/sessions", json={"avatar": "ada"}, headers=a), 429, "quota_exceeded")
        assert "2" in e["message"]
        assert c.post("/v1/sessions", json={"avatar": "ada"}, headers={"Authorization": f"Bearer {other}"}
                      ).status_code == 201
        first = made[0].json()
        c.delete(first["location"], headers={"Authorization": f"Bearer {first['token']}"})
        assert c.post("/v1/sessions", json={"avatar": "ada"}, headers=a).status_code == 201   # live ones count
