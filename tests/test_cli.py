"""`knotstream` CLI: render writes a playable MP4 with audio; bad input exits 2 with a message."""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from server.cli import main


@pytest.fixture
def portrait(tmp_path):
    p = tmp_path / "face.png"
    img = np.zeros((200, 160, 3), np.uint8)
    img[:] = (90, 140, 200)
    img[50:150, 40:120] = (230, 190, 160)
    Image.fromarray(img).save(p)
    return p


@pytest.fixture
def speech(tmp_path):
    from tests.test_media import wav_bytes

    t = np.arange(int(22050 * 1.2)) / 22050
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    p = tmp_path / "speech.wav"
    p.write_bytes(wav_bytes(tone, 22050))
    return p


def test_render_writes_mp4_with_video_and_audio(tmp_path, portrait, speech, capsys):
    out = tmp_path / "out.mp4"
    motion = tmp_path / "motion.jsonl"
    motion.write_text(json.dumps({"t": 0.0, "yaw": 0.2}) + "\n" + json.dumps({"t": 0.5, "yaw": None, "blink": 1}) + "\n")
    rc = main(["render", "--reference", str(portrait), "--audio", str(speech), "--motion", str(motion),
               "--knob", "denoise_steps=2", "-o", str(out)])
    assert rc == 0
    assert "real-time factor" in capsys.readouterr().out
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert c.streams.audio, "audio must be muxed"
        assert (v.codec_context.width, v.codec_context.height) == (128, 128)
        n = sum(1 for _ in c.decode(video=0))
    assert n == 30  # 1.2 s at 25 fps


@pytest.mark.parametrize("args, needle", [
    (["--reference", "{bad}"], "not a readable image"),
    (["--reference", "{missing}"], "not found"),
    (["--reference", "{face}", "--audio", "{bad}"], "not readable audio"),
    (["--reference", "{face}", "--knob", "chunk_frames=x"], "chunk_frames"),
    (["--reference", "{face}", "--knob", "knot_frames=9"], "knot_frames"),
    (["--reference", "{face}", "--seconds", "-1"], "--seconds"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, portrait, capsys, args, needle):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"garbage" * 10)
    subst = {"bad": bad, "missing": tmp_path / "nope.png", "face": portrait}
    args = [a.format(**subst) for a in args]
    rc = main(["render", *args, "-o", str(tmp_path / "x.mp4")])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_help_runs_without_loading_a_model():
    r = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "render" in r.stdout
    r = subprocess.run([sys.executable, "-m", "server.cli", "render"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--reference" in r.stderr
