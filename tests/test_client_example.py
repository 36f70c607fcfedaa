"""examples/client.py against a live server that requires an API key: it creates the session
with the key, streams a wav as its microphone and records the avatar to an MP4."""

import asyncio
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from model.engine import Engine
from server.settings import Settings
from server.testing import LiveServer
from streaming.ice import allow_loopback, has_non_loopback_ipv4

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server():
    if not has_non_loopback_ipv4():
        allow_loopback()
    with LiveServer(Settings(max_sessions=2, api_keys=[KEY]), Engine.from_pretrained("tiny")) as srv:
        yield srv


def write_wav(path: Path, seconds=2.0, rate=16000):
    import wave
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


async def test_client_example_records_the_avatar_with_an_api_key(server, tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    import client as example

    wav, out = tmp_path / "speech.wav", tmp_path / "avatar.mp4"
    write_wav(wav)
    with pytest.raises(RuntimeError, match="unauthorized"):
        await example.run(server.url, wav, out, tail_s=0.5)  # no key: refused with the server's reason
    info = await example.run(server.url, wav, out, tail_s=1.0, api_key=KEY)
    assert info["recorded_seconds"] >= 2.0
    with av.open(str(out)) as f:
        kinds = {s.type for s in f.streams}
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert {"video", "audio"} <= kinds
    assert len(frames) >= 25 and frames[0].shape[:2] == (128, 128)
    assert np.std(np.stack(frames[-20:]).astype(np.float32), axis=0).mean() > 0.5  # not a still image


def test_client_example_cli_without_a_key_exits_with_a_clear_message(server, tmp_path):
    wav = tmp_path / "speech.wav"
    write_wav(wav, seconds=0.5)
    r = subprocess.run([sys.executable, str(REPO / "examples" / "client.py"), str(wav), str(tmp_path / "o.mp4"),
                        "--url", server.url], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and "error:" in r.stderr and "API key" in r.stderr, r.stderr[-500:]
    assert "Traceback" not in r.stderr
