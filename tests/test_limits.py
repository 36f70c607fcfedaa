"""Limits, each with its error code (README "Limits"): upload bytes and pixels, request
bodies, audio push size / length / rate per session, sessions per worker, data-channel
message size and rate. Every refusal is a 4xx/503 JSON {error: {code, message}}."""

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from model.engine import Engine
from server.settings import Settings
from server.testing import LiveServer
from streaming import channel as proto


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny")


@pytest.fixture(scope="module")
def server(engine):
    s = Settings(max_sessions=3, max_upload_bytes=300_000, max_image_pixels=100_000, max_audio_bytes=64_000,
                 max_speech_seconds=3.0, audio_rate_per_s=2.0, audio_burst=3, offer_timeout_s=120)
    with LiveServer(s, engine) as srv:
        yield srv


def err(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"], body
    return r


def png(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def session(http):
    r = http.post("/v1/sessions", json={"avatar": "ada"})
    assert r.status_code == 201, r.text
    return r.json()["id"], {"Authorization": f"Bearer {r.json()['token']}"}


def pcm(seconds, rate=16000):
    return np.zeros(int(seconds * rate), "<i2").tobytes()


# ----- uploads and bodies ---------------------------------------------------------------------

def test_image_pixel_and_byte_limits(http):
    ok = http.post("/v1/sessions", files={"image": ("a.png", png(300, 300), "image/png")})   # 90k pixels
    assert ok.status_code == 201, ok.text
    r = err(http.post("/v1/sessions", files={"image": ("b.png", png(400, 300), "image/png")}), 413, "image_too_large")
    assert "pixels" in r.json()["error"]["message"]
    err(http.post("/v1/sessions", files={"image": ("c.png", b"\x89PNG" + b"\0" * 310_000, "image/png")}),
        413, "image_too_large")


def test_request_body_limits(http):
    err(http.post("/v1/sessions", content=b"{" + b" " * 1_000_001 + b"}",
                  headers={"Content-Type": "application/json"}), 413, "request_too_large")
    sid, auth = session(http)
    err(http.post(f"/v1/sessions/{sid}/offer", content=b"v" * 200_001,
                  headers={**auth, "Content-Type": "application/sdp"}), 413, "offer_too_large")


def test_audio_push_size_and_length_limits(http, server):
    sid, auth = session(http)
    hdr = {**auth, "Content-Type": "audio/pcm"}
    err(http.post(f"/v1/sessions/{sid}/audio", content=pcm(2.5), headers=hdr), 413, "audio_too_large")  # 80 kB

    def chunked():  # no Content-Length: the limit holds while streaming
        for _ in range(40):
            yield b"\0" * 2000
    err(http.post(f"/v1/sessions/{sid}/audio", content=chunked(), headers=hdr), 413, "audio_too_large")
    err(http.post(f"/v1/sessions/{sid}/audio?rate=8000", content=pcm(3.5, 8000), headers=hdr), 400, "audio_too_long")
    assert server.manager.sessions[sid].driving.segments() == []


def test_queued_speech_limit(http, server):
    sid, auth = session(http)
    hdr = {**auth, "Content-Type": "audio/pcm"}
    assert http.post(f"/v1/sessions/{sid}/audio?segment=a&end=false", content=pcm(1.9), headers=hdr).status_code == 202
    r = http.post(f"/v1/sessions/{sid}/audio?segment=a", content=pcm(1.9), headers=hdr)
    err(r, 409, "audio_buffer_full")
    assert "limit 3 s" in r.json()["error"]["message"]


def test_audio_push_rate_limit_per_session(http, server):
    a, auth_a = session(http)
    b, auth_b = session(http)
    hdr = {**auth_a, "Content-Type": "audio/pcm"}
    codes = [http.post(f"/v1/sessions/{a}/audio", content=pcm(0.05), headers=hdr).status_code for _ in range(3)]
    assert codes == [202, 202, 202]                                   # the burst
    r = err(http.post(f"/v1/sessions/{a}/audio", content=pcm(0.05), headers=hdr), 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 2
    err(http.post(f"/v1/sessions/{a}/speak", json={"text": "hi"}, headers=auth_a), 429, "rate_limited")
    # Another session has its own budget.
    r = http.post(f"/v1/sessions/{b}/audio", content=pcm(0.05), headers={**auth_b, "Content-Type": "audio/pcm"})
    assert r.status_code == 202, r.text
    assert server.manager.limits[a].requests.refused == 2


def test_sessions_per_worker(http, server):
    """20 creates at once against max_sessions=3 (in-process store): exactly 3 get in."""
    import asyncio

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/sessions", json={"avatar": "ada"}) for _ in range(20)))

    replies = asyncio.run(burst())
    assert sorted(r.status_code for r in replies) == [201] * 3 + [503] * 17
    r = err(next(r for r in replies if r.status_code == 503), 503, "too_many_sessions")
    assert int(r.headers["retry-after"]) >= 1
    assert len(server.manager.sessions) == 3


# ----- data channel -------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_rate_limit_token_bucket():
    clock = Clock()
    lim = proto.RateLimit(rate=2, burst=3, clock=clock)
    assert [lim.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.take() == pytest.approx(0.5)           # nothing left: half a second for one token
    assert lim.refused == 1
    clock.t += 0.5
    assert lim.take() == 0.0 and lim.take() > 0
    clock.t += 100                                      # refills only up to the burst
    assert sum(lim.take() == 0.0 for _ in range(10)) == 3
    assert lim.retry_after(0.01) == 1 and lim.retry_after(2.2) == 3
    with pytest.raises(ValueError):
        proto.RateLimit(rate=0)


def test_channel_messages_are_rate_limited_per_session():
    clock = Clock()
    lim = proto.RateLimit(rate=10, burst=5, clock=clock)
    ping = json.dumps({"type": "ping", "id": 1})
    for _ in range(4):
        assert proto.parse(ping, lim).type == "ping"
    with pytest.raises(proto.ChannelError):
        proto.parse("not json", lim)                    # a bad message spends a token too
    with pytest.raises(proto.ChannelError) as e:
        proto.parse(ping, lim)
    assert e.value.code == "rate_limited" and e.value.reply()["type"] == "error"
    clock.t += 0.1
    assert proto.parse(ping, lim).type == "ping"
    assert proto.parse(ping).type == "ping"             # no limiter: unlimited (unit use)


def test_channel_size_limit_counts_utf8_bytes():
    pad = proto.MAX_MESSAGE_BYTES - len('{"type": "speak", "text": ""}')
    ok = json.dumps({"type": "speak", "text": "a" * pad})
    assert len(ok.encode()) == proto.MAX_MESSAGE_BYTES and proto.parse(ok).type == "speak"
    wide = '{"type": "speak", "text": "' + "é" * (pad // 2 + 1) + '"}'   # fewer characters than the limit
    assert len(wide) < proto.MAX_MESSAGE_BYTES < len(wide.encode())
    with pytest.raises(proto.ChannelError) as e:
        proto.parse(wide)
    assert e.value.code == "message_too_large"
    with pytest.raises(proto.ChannelError) as e:
        proto.parse(b"\0" * (proto.MAX_MESSAGE_BYTES + 1))
    assert e.value.code == "message_too_large"
