"""The photoreal families through the whole server: `--model livetalk-random` on CPU, a real
aiortc client receiving the video, an uploaded portrait cropped around its face to the
model's frame, the encoder bitrate by frame size, and `knotstream serve` refusing a folder
with missing files before it starts (each file named, exit code 2)."""

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

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def server():
    if not has_non_loopback_ipv4():
        allow_loopback()
    engine = Engine.from_pretrained("livetalk-random")
    with LiveServer(Settings(max_sessions=2, disconnect_grace_s=2.0, encoder="x264", codec="h264"), engine) as srv:
        yield srv


async def until(pred, timeout_s):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_livetalk_random_streams_its_frames_over_webrtc(server):
    client = AvatarClient(server.url, keep_images=True)
    session = await client.connect("ada")
    try:
        assert session["video"] == {"width": 64, "height": 64, "fps": 16, "codec": "h264"}
        assert session["model"] == {"name": "livetalk-random", "trained": False, "domain": "photoreal",
                                    "motion_fields": []}   # driven by audio alone
        async with httpx.AsyncClient(base_url=server.url) as http:
            tone = (9000 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)).astype("<i2").tobytes()
            r = await http.post(f"{session['location']}/audio", content=tone, params={"rate": 16000},
                                headers={**client.headers, "Content-Type": "audio/pcm"})
            assert r.status_code == 202, r.text
        assert await until(lambda: len(client.got.video) >= 40, 120), len(client.got.video)
        video = list(client.got.video)
        assert all(img.shape == (64, 64, 3) for _, _, img in video)
        pts = [p for p, _, _ in video]
        steps = {b - a for a, b in zip(pts, pts[1:])}
        assert steps == {90000 // 16}, steps  # one frame per 1/16 s on the media clock
        live = server.manager.sessions[session["id"]]
        status = live.status()
        assert status["chunks"] >= 3 and status["state"] == "live"
        assert status["encoder"]["kind"] == "x264" and status["encoder"]["bitrate"] == 1_000_000
    finally:
        await client.close()


def face_portrait() -> bytes:
    """A procedural face the Haar cascade finds, off-centre on a wide canvas (as tests/test_media.py)."""
    from model.train import world

    face = world.render_frame(world.identity_from_seed(0), world.neutral_motion(), 160)
    canvas = np.full((480, 900, 3), 120, np.uint8)
    canvas[260:420, 40:200] = face  # a centre crop (x 210..690) misses it
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def test_an_uploaded_portrait_is_cropped_around_its_face_to_the_model_frame(server):
    from model.media import find_face, fit_portrait, load_image

    data = face_portrait()
    r = httpx.post(f"{server.url}/v1/sessions", files={"image": ("me.png", data, "image/png")}, timeout=60)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["notices"] == []  # a photo on a photoreal model: nothing to warn about
    ref = server.manager.sessions[body["id"]].stream.reference_image
    canvas = load_image(data)
    assert ref.shape == (64, 64, 3)
    assert np.array_equal(ref, fit_portrait(canvas, 64, 64))
    x, y, w, h = find_face(canvas)
    # The crop is the head-and-shoulders box around the face (twice its size), not the centre.
    assert ref.std() > 20
    big = fit_portrait(canvas, 256, 256)
    fx, fy, fw, fh = find_face(big)
    assert abs(fx + fw / 2 - 128) < 30 and fw > 80
    httpx.delete(f"{server.url}{body['location']}", headers={"Authorization": f"Bearer {body['token']}"})


def test_encoder_bitrate_grows_with_the_frame_size():
    from streaming.encode import DEFAULT_BITRATE, MAX_BITRATE, default_bitrate

    assert default_bitrate(128, 128, 25) == DEFAULT_BITRATE
    assert default_bitrate(512, 512, 25) == 1_966_000 and default_bitrate(512, 512, 16) == 1_258_000
    assert default_bitrate(832, 480, 16) > default_bitrate(512, 512, 16)
    assert default_bitrate(3840, 2160, 60) == MAX_BITRATE


def test_serve_names_each_missing_file_and_exits_2(tmp_path, capsys):
    from server.cli import main

    (tmp_path / "wav2vec2").mkdir()
    (tmp_path / "wav2vec2" / "config.json").write_text("{}")
    assert main(["serve", "--model", f"livetalk:{tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "3 file(s) missing" in err
    for name in ("LiveTalk-1.3B-V0.1/model.safetensors", "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
                 "prompt_embedding.safetensors"):
        assert name in err
    assert "huggingface.co/GAIR/LiveTalk-1.3B-V0.1" in err and "wav2vec2/config.json" not in err
    assert main(["serve", "--model", "nosuch-model"]) == 2
    assert "livetalk:DIR" in capsys.readouterr().err
