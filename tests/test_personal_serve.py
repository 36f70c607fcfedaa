"""Personal avatars, serving: `knotstream serve --avatar FILE`, /v1/avatars, sessions that
stream the avatar's own model and portrait, and the fit jobs behind the web demo's upload
flow (bounded, clear 4xx errors, a real fit in a subprocess on a small synthetic clip)."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from model.engine import Engine
from server.settings import Settings
from server.testing import AvatarClient, LiveServer
from streaming.ice import allow_loopback, has_non_loopback_ipv4
from tests.test_personal import synthetic_clip  # noqa: F401  (the clip fixture)
from tests.test_server import assert_error


def make_avatar(path, name: str, seed: int = 11) -> np.ndarray:
    """An avatar file without a fit (the bundled weights as a personal model): serving does not
    care how the weights were made. Returns its portrait."""
    from model.sources import ASSETS
    from model.personal import avatar_file
    from model.train import world
    from model.weights import load_model

    model = load_model(ASSETS / "tiny.safetensors")
    model.config.domain = "personal"
    model.config.speech_mouth = (0.5, 0.3)
    model.config.stream = model.config.stream.replace(knot_frames=0, window_frames=2)  # as a fit writes it
    portrait = world.render_frame(world.identity_from_seed(seed), world.neutral_motion(), 256)
    avatar_file.save(model, portrait, path, name, {"complete": True, "dit_steps": 0, "decoder_steps": 0})
    return portrait


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    folder = tmp_path_factory.mktemp("avatars")
    path = folder / "me.safetensors"
    return path, make_avatar(path, "me")


@pytest.fixture(scope="module")
def server(avatar, tmp_path_factory):
    if not has_non_loopback_ipv4():
        allow_loopback()
    settings = Settings(avatars=[str(avatar[0])], avatar_dir=tmp_path_factory.mktemp("fitted"),
                        fit_decoder_steps=1, fit_dit_steps=1, fit_max_upload_bytes=2_000_000, fit_max_video_s=60)
    with LiveServer(settings, Engine.from_pretrained("tiny")) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_avatars_lists_the_personal_avatar_with_its_portrait(http, avatar):
    body = http.get("/v1/avatars").json()
    assert "me" in body["avatars"] and "ada" in body["avatars"]
    [me] = body["personal"]
    assert me["name"] == "me" and me["portrait"] == "/v1/avatars/me.png" and me["domain"] == "personal"
    png = http.get(me["portrait"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")), avatar[1])
    assert_error(http.get("/v1/avatars/nobody.png"), 404, "avatar_not_found")


async def test_a_session_on_the_avatar_streams_its_own_model_and_face(server, avatar):
    client = AvatarClient(server.url, keep_images=True)
    session = await client.connect("me")
    try:
        assert session["model"]["domain"] == "personal" and session["notices"] == []
        # This avatar file has no portrait warp (the bundled weights, unfitted): no head fields.
        assert "mouth_open" in session["model"]["motion_fields"] and "head_x" not in session["model"]["motion_fields"]
        live = server.manager.sessions[session["id"]]
        loaded = server.app.state.personal.get("me")
        assert live.stream.engine is loaded.engine and live.stream.engine is not server.app.state.engine
        # The avatar's own stream defaults (the bundled model streams a window of 6).
        assert (live.stream.knobs.knot_frames, live.stream.knobs.window_frames) == (0, 2)
        end = time.monotonic() + 60
        while len(client.got.video) < 10 and time.monotonic() < end:
            await asyncio.sleep(0.1)
        frames = np.stack([img for _, _, img in client.got.video[-10:]]).astype(np.float32)
    finally:
        await client.close()
    from model.media import fit_portrait
    from server.avatars import avatar_image

    mine = fit_portrait(avatar[1], 128, 128).astype(np.float32)
    ada = fit_portrait(avatar_image("ada"), 128, 128).astype(np.float32)
    assert frames.shape[1:] == (128, 128, 3)
    assert np.abs(frames - mine).mean() < np.abs(frames - ada).mean()


def test_serve_refuses_bad_avatars_before_starting(tmp_path, avatar, capsys):
    from model.sources import ASSETS
    from server.cli import main
    from server.personal import PersonalAvatars

    assert main(["serve", "--avatar", str(tmp_path / "none.safetensors")]) == 2
    assert "avatar file not found" in capsys.readouterr().err
    assert main(["serve", "--avatar", str(ASSETS / "tiny.safetensors")]) == 2
    assert "not a personal avatar" in capsys.readouterr().err
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(avatar[0].read_bytes())
    assert main(["serve", "--avatar", str(avatar[0]), "--avatar", str(twin)]) == 2
    assert "both avatar 'me'" in capsys.readouterr().err
    registry = PersonalAvatars(Engine.from_pretrained("tiny"), 100)
    ada = tmp_path / "ada.safetensors"
    make_avatar(ada, "ada")
    with pytest.raises(ValueError, match="bundled avatar"):
        registry.add(ada)


# ------------------------------------------------------------------------------------------
# Fit jobs (the web demo's upload flow)
# ------------------------------------------------------------------------------------------


def test_fit_job_refusals_are_clear_4xx(http, server, synthetic_clip):  # noqa: F811
    from model.render import write_mp4

    assert_error(http.post("/v1/avatars?name=Bad%20Name", content=b"x"), 422, "invalid_name")
    assert_error(http.post("/v1/avatars?name=ada", content=b"x"), 409, "avatar_exists")
    assert_error(http.post("/v1/avatars?name=me", content=b"x"), 409, "avatar_exists")
    assert_error(http.post("/v1/avatars?name=junk", content=b"not a video" * 20), 422, "video_unreadable")
    assert_error(http.post("/v1/avatars?name=big", content=b"\0" * 2_000_001), 413, "video_too_large")
    short = server.settings.avatar_dir / "short.mp4"
    write_mp4(str(short), [np.zeros((25, 64, 64, 3), np.uint8)], 25, None, 16000)
    assert_error(http.post("/v1/avatars?name=short", content=short.read_bytes()), 422, "video_too_short")
    assert_error(http.get("/v1/avatar-jobs/0123456789abcdef"), 404, "job_not_found")
    jobs = server.app.state.fitjobs
    assert not any(j.active for j in jobs.jobs.values())   # a refused upload holds no slot
    server.app.state.fitjobs = None
    try:
        assert_error(http.post("/v1/avatars?name=off", content=b"x"), 403, "fitting_disabled")
    finally:
        server.app.state.fitjobs = jobs


def test_fit_job_makes_an_avatar_sessions_can_open(http, server, synthetic_clip):  # noqa: F811
    path, _ = synthetic_clip
    r = http.post("/v1/avatars?name=clip", content=path.read_bytes(), headers={"Content-Type": "video/mp4"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["location"] and job["state"] == "running"
    assert_error(http.post("/v1/avatars?name=other", content=path.read_bytes()), 409, "fit_busy")
    end = time.monotonic() + 600
    seen = set()
    while job["state"] in ("running", "loading") and time.monotonic() < end:
        time.sleep(1)
        job = http.get(job["location"]).json()
        seen.add(job["stage"])
        assert 0 <= job["progress"] <= 1
    assert job["state"] == "done", job
    assert job["progress"] == 1 and job["complete"] is True and {"prepare", "dit"} & seen
    assert (server.settings.avatar_dir / "clip.safetensors").is_file()
    assert "clip" in http.get("/v1/avatars").json()["avatars"]
    r = http.post("/v1/sessions", json={"avatar": "clip"})
    assert r.status_code == 201, r.text
    assert r.json()["model"]["domain"] == "personal"
    assert http.delete(r.json()["location"], headers={"Authorization": f"Bearer {r.json()['token']}"}).status_code == 204


def test_an_avatar_must_match_the_servers_model():
    from dataclasses import replace

    from model.config import from_name
    from server.personal import check_compatible

    tiny = from_name("tiny")
    check_compatible(replace(tiny, domain="personal"), tiny)
    for other in (replace(tiny, fps=30), replace(tiny, height=256, width=256), from_name("wan-1.3b")):
        with pytest.raises(ValueError, match="fit it to the server's model"):
            check_compatible(other, tiny)
