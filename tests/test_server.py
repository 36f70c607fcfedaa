"""server/: the HTTP API against a live in-process server with the real tiny engine:
status codes and stable JSON error codes, auth, uploads, audio push, speak, metrics."""

import asyncio
import io
import json
import shutil
import time
import wave

import httpx
import numpy as np
import pytest
from PIL import Image

from model.engine import Engine
from server.settings import Settings
from server.testing import LiveServer


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny")


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    web = tmp_path_factory.mktemp("web")
    (web / "index.html").write_text("<!doctype html><title>knotstream</title>")
    settings = Settings(max_sessions=3, max_upload_bytes=200_000, offer_timeout_s=120, web_dir=web)
    with LiveServer(settings, engine) as srv:
        yield srv


def offer_sdp(audio=True, video=True, video_codec: str | None = None) -> str:
    """An aiortc offer; `video_codec` ("video/VP8") offers only that video codec."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.rtcrtpsender import RTCRtpSender

    async def make():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if video:
            tr = pc.addTransceiver("video", direction="recvonly")
            if video_codec:
                tr.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                        if c.mimeType == video_codec])
        if audio:
            pc.addTransceiver("audio", direction="recvonly")
        pc.createDataChannel("driving")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def assert_error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def png_bytes(size=96):
    img = np.zeros((size, size, 3), np.uint8)
    img[20:70, 30:66] = (200, 150, 120)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds=0.5, rate=22050):
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 200 * t)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def create(http, **json_body):
    r = http.post("/v1/sessions", json={"avatar": "ada", **json_body})
    assert r.status_code == 201, r.text
    return r.json(), {"Authorization": f"Bearer {r.json()['token']}"}


# ----- health, static, metrics ----------------------------------------------------------

def test_health_ready_metrics_and_static_web(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"] == "tiny"
    metrics = http.get("/metrics").text
    for name in ("knotstream_sessions", "knotstream_chunk_seconds", "knotstream_generated_fps",
                 "knotstream_queue_depth_frames", "knotstream_late_frames_total",
                 "knotstream_dropped_frames_total", "knotstream_driving_to_frame_seconds"):
        assert name in metrics, name
    # Process gauges (what a leak grows; the soak test reads them).
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values["process_resident_memory_bytes"] > 50e6 and values["process_open_fds"] > 3
    assert values["knotstream_threads"] >= 2      # the event loop's and the generation worker's
    assert values["knotstream_asyncio_tasks"] >= 1  # at least the scrape itself
    assert "knotstream" in http.get("/").text
    assert http.get("/v1/avatars").json()["avatars"] == ["ada", "ben", "cleo", "dev"]
    png = http.get("/v1/avatars/ada.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert_error(http.get("/v1/avatars/zed.png"), 404, "avatar_not_found")
    assert_error(http.get("/v1/nothing-here"), 404, "not_found")


# ----- session lifecycle and auth -------------------------------------------------------

def test_create_without_offer_then_status_auth_and_delete(http, server):
    body, auth = create(http, options={"seed": 3, "knobs": {"denoise_steps": 2}})
    sid = body["id"]
    assert body["location"] == f"/v1/sessions/{sid}" and body["answer"] is None
    assert body["video"] == {"width": 128, "height": 128, "fps": 25, "codec": "vp8"}
    assert server.manager.sessions[sid].stream.knobs.denoise_steps == 2
    st = http.get(f"/v1/sessions/{sid}", headers=auth)
    assert st.status_code == 200 and st.json()["state"] == "new"
    assert_error(http.get(f"/v1/sessions/{sid}"), 401, "unauthorized")
    assert_error(http.get(f"/v1/sessions/{sid}", headers={"Authorization": "Bearer nope"}), 404, "session_not_found")
    assert_error(http.get("/v1/sessions/0123456789abcdef", headers=auth), 404, "session_not_found")
    assert http.delete(f"/v1/sessions/{sid}", headers=auth).status_code == 204
    assert_error(http.get(f"/v1/sessions/{sid}", headers=auth), 404, "session_not_found")
    assert sid not in server.manager.sessions


def test_create_with_offer_returns_answer_and_location(http):
    r = http.post("/v1/sessions", json={"avatar": "ben", "offer": {"sdp": offer_sdp(), "type": "offer"}})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/sessions/{r.json()['id']}"
    answer = r.json()["answer"]
    assert answer["type"] == "answer" and "m=video" in answer["sdp"] and "m=audio" in answer["sdp"]
    assert "VP8" in answer["sdp"].split("m=video", 1)[1].split("m=", 1)[0]


def test_offer_later_with_application_sdp_and_second_offer_conflicts(http):
    body, auth = create(http)
    r = http.post(f"/v1/sessions/{body['id']}/offer", content=offer_sdp(),
                  headers={**auth, "Content-Type": "application/sdp"})
    assert r.status_code == 201 and r.headers["content-type"].startswith("application/sdp")
    assert r.text.startswith("v=0")
    r = http.post(f"/v1/sessions/{body['id']}/offer", json={"sdp": offer_sdp(), "type": "offer"}, headers=auth)
    assert_error(r, 409, "offer_exists")


def test_bad_offers_are_400_json(http, server):
    before = len(server.manager.sessions)
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "offer": "garbage"}), 400, "bad_offer")
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "offer": {"sdp": "v=0\r\nnonsense", "type": "offer"}}),
                 400, "offer_missing_video")
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "offer": {"sdp": offer_sdp(audio=False)}}),
                 400, "offer_missing_audio")
    # Parses as far as the m-lines but aiortc cannot use it: still 400, and no session is left over.
    broken = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "offer": broken}), 400, "bad_offer")
    assert len(server.manager.sessions) == before


def test_uploads(http, server):
    r = http.post("/v1/sessions", files={"image": ("me.png", png_bytes(), "image/png")},
                  data={"options": json.dumps({"seed": 1})})
    assert r.status_code == 201, r.text
    ref = server.manager.sessions[r.json()["id"]].stream.reference_image
    assert ref.shape == (128, 128, 3)
    assert_error(http.post("/v1/sessions", files={"image": ("x.png", b"not an image at all", "image/png")}),
                 415, "image_unreadable")
    assert_error(http.post("/v1/sessions", files={"image": ("big.png", b"\0" * 300_000, "image/png")}),
                 413, "image_too_large")
    assert_error(http.post("/v1/sessions", files={"image": ("me.png", png_bytes(), "image/png")},
                           data={"avatar": "ada"}), 422, "invalid_request")
    assert_error(http.post("/v1/sessions", json={}), 422, "reference_required")
    assert_error(http.post("/v1/sessions", json={"avatar": "zed"}), 404, "avatar_not_found")
    assert_error(http.post("/v1/sessions", content=b"x", headers={"Content-Type": "text/plain"}),
                 415, "unsupported_media_type")


def test_an_uploaded_photo_on_the_cartoon_model_gets_a_notice_a_bundled_avatar_none(http):
    r = http.post("/v1/sessions", files={"image": ("me.png", png_bytes(), "image/png")})
    assert r.status_code == 201, r.text
    upload = r.json()
    assert upload["model"]["domain"] == "cartoon"   # the bundled tiny weights' metadata
    assert "yaw" in upload["model"]["motion_fields"] and "head_x" not in upload["model"]["motion_fields"]
    [notice] = upload["notices"]
    assert notice["code"] == "cartoon_model" and notice["model_domain"] == "cartoon"
    assert "knotstream avatar create" in notice["message"] and "docs/personal-avatars.md" in notice["message"]
    bundled, auth = create(http)
    assert bundled["notices"] == [] and bundled["model"]["domain"] == "cartoon"
    for body, headers in ((upload, {"Authorization": f"Bearer {upload['token']}"}), (bundled, auth)):
        assert http.delete(body["location"], headers=headers).status_code == 204


def test_notices_follow_the_model_files_domain_not_the_image():
    from dataclasses import replace

    from model.config import ModelConfig, from_name
    from model.sources import ASSETS
    from model.weights import read_metadata
    from server.notices import session_notices

    tiny = from_name("tiny")
    assert read_metadata(ASSETS / "tiny.safetensors")["config"].domain == "cartoon"
    legacy = tiny.to_dict()
    del legacy["domain"]   # a model file written without the field
    assert ModelConfig.from_dict(legacy).domain == "cartoon"
    assert ModelConfig.from_dict(replace(tiny, domain="personal").to_dict()).domain == "personal"
    assert from_name("wan-1.3b").domain == "photoreal"
    with pytest.raises(ValueError, match="domain"):
        replace(tiny, domain="anime")
    assert [n["code"] for n in session_notices(tiny, uploaded=True)] == ["cartoon_model"]
    assert session_notices(tiny, uploaded=False) == []
    for domain in ("photoreal", "personal"):
        assert session_notices(replace(tiny, domain=domain), uploaded=True) == []


def test_options_are_validated(http):
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "options": {"colour": "red"}}),
                 422, "invalid_request")
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "options": {"seed": -1}}), 422, "invalid_request")
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "options": {"knobs": {"warp": 2}}}),
                 422, "invalid_knob")
    assert_error(http.post("/v1/sessions", json={"avatar": "ada", "options": {"knobs": {"knot_frames": 9}}}),
                 422, "invalid_knob")


def test_validation_errors_use_the_json_error_format(http):
    body, auth = create(http)
    r = http.post(f"/v1/sessions/{body['id']}/speak", json={"words": "hi"}, headers=auth)
    assert_error(r, 422, "invalid_request")
    assert r.json()["error"]["details"][0]["loc"][-1] == "text"


def test_session_limit_is_503(http):
    for _ in range(3):
        create(http)
    r = http.post("/v1/sessions", json={"avatar": "ada"})
    assert_error(r, 503, "too_many_sessions")
    assert r.headers["retry-after"]


# ----- driving routes ---------------------------------------------------------------------

def test_audio_push_speak_and_interrupt(http, server):
    body, auth = create(http)
    sid = body["id"]
    base = f"/v1/sessions/{sid}"
    r = http.post(f"{base}/audio", content=wav_bytes(0.5), headers={**auth, "Content-Type": "audio/wav"})
    assert r.status_code == 202, r.text
    assert r.json()["seconds"] == pytest.approx(0.5, abs=0.01)
    pcm = (np.zeros(8000, "<i2")).tobytes()
    r = http.post(f"{base}/audio?rate=8000&segment=s2&end=false", content=pcm,
                  headers={**auth, "Content-Type": "audio/pcm"})
    assert r.status_code == 202 and r.json() == {"segment": "s2", "seconds": 1.0}
    segs = server.manager.sessions[sid].driving.segments()
    assert [s.id for s in segs][-1] == "s2" and segs[-1].start == segs[-2].end  # queued in order
    assert_error(http.post(f"{base}/audio", content=b"RIFF garbage", headers={**auth, "Content-Type": "audio/wav"}),
                 415, "audio_unreadable")
    assert_error(http.post(f"{base}/audio", content=b"\x01", headers={**auth, "Content-Type": "audio/pcm"}),
                 400, "audio_invalid")
    r = http.post(f"{base}/interrupt", headers=auth)
    assert r.status_code == 200 and "s2" in r.json()["interrupted_segments"]
    r = http.post(f"{base}/speak", json={"text": "hello there"}, headers=auth)
    if shutil.which("espeak-ng") or shutil.which("flite"):
        assert r.status_code == 202, r.text
        assert r.json()["seconds"] > 0.3
    else:
        assert_error(r, 501, "tts_unavailable")


def test_shutdown_closes_every_session(engine):
    with LiveServer(Settings(max_sessions=2), engine) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for name in ("ada", "ben"):
                assert c.post("/v1/sessions", json={"avatar": name}).status_code == 201
        lives = list(srv.manager.sessions.values())
        worker = srv.manager.worker
        assert len(lives) == 2 and len(worker.sessions()) == 2
    assert all(lv.state == "closed" and lv.close_reason == "server shutting down" for lv in lives)
    assert srv.manager.sessions == {} and not worker.alive
    assert all(lv.stream.closed for lv in lives)


def test_a_session_that_never_closes_does_not_hold_up_shutdown(engine, monkeypatch):
    """A session close that hangs (a peer connection that never closes, say) is cancelled after
    SHUTDOWN_STEP_S: the other sessions close, the worker stops and the server exits."""
    from server import manager as mgr

    monkeypatch.setattr(mgr, "SHUTDOWN_STEP_S", 1.0)
    srv = LiveServer(Settings(max_sessions=2), engine)
    with srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for name in ("ada", "ben"):
                assert c.post("/v1/sessions", json={"avatar": name}).status_code == 201
        stuck, other = list(srv.manager.sessions.values())

        async def never(reason="closed"):
            await asyncio.Event().wait()

        stuck.close = never
        t0 = time.monotonic()
    assert not srv.thread.is_alive() and time.monotonic() - t0 < 20
    assert other.state == "closed" and not srv.manager.worker.alive


def test_settings_from_env_and_flags(monkeypatch):
    import argparse

    from server import serve

    monkeypatch.setenv("KNOTSTREAM_PORT", "9123")
    monkeypatch.setenv("KNOTSTREAM_ICE_SERVERS", '[{"urls": ["stun:stun.example.org:3478"]}]')
    s = Settings()
    assert s.port == 9123 and s.host == "127.0.0.1" and s.model == "tiny"
    assert s.ice_dicts() == [{"urls": ["stun:stun.example.org:3478"]}]
    monkeypatch.delenv("KNOTSTREAM_ICE_SERVERS")
    assert Settings().ice_servers == []  # none by default: no public STUN offline
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    s = serve.settings_from_args(p.parse_args(["--port", "8100", "--ice-server", "turn:t.example.org", "--codec", "h264"]))
    assert (s.port, s.codec, s.ice_dicts()) == (8100, "h264", [{"urls": ["turn:t.example.org"]}])
    monkeypatch.setenv("KNOTSTREAM_PORT", "not-a-port")
    with pytest.raises(ValueError):
        Settings()


def test_a_refused_offer_leaves_the_session_ready_for_a_corrected_one(http):
    """An offer the session cannot answer (here: VP8 only, for an H264-only encoder) is
    refused without taking the session's one peer slot; the corrected offer is answered."""
    r = http.post("/v1/sessions", json={"avatar": "ada", "options": {"encoder": "x264"}})
    assert r.status_code == 201, r.text
    sid, auth = r.json()["id"], {"Authorization": f"Bearer {r.json()['token']}"}
    bad = http.post(f"/v1/sessions/{sid}/offer", content=offer_sdp(video_codec="video/VP8"),
                    headers={**auth, "Content-Type": "application/sdp"})
    assert_error(bad, 400, "offer_codec_unsupported")
    good = http.post(f"/v1/sessions/{sid}/offer", content=offer_sdp(), headers={**auth, "Content-Type": "application/sdp"})
    assert good.status_code == 201, good.text
    assert "H264" in good.text.split("m=video", 1)[1].split("m=", 1)[0]
