"""examples/pipecat_bot.py end to end: Pipecat's SmallWebRTC transport to headless Chromium.

The example app runs in a thread (its own event loop, as `uvicorn` runs it); the page
connects as a user does (Connect), the bot greets through espeak-ng -> the knotstream
avatar -> Pipecat's output transport, and the test reads the browser's own WebRTC stats:
video frames decoded at the avatar's size, decoded pictures that change, and audio
energy once the greeting plays; then a line typed into the page is spoken too.
Needs Debian's chromium, espeak-ng and the playwright package (as tests/test_browser.py),
and the `pipecat` extra; skipped with a reason without them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed (pip install -e '.[pipecat]')")

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent

STATS = """async () => {
  const out = {video: 0, width: 0, energy: 0};
  (await window.bot.pc.getStats()).forEach(s => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') { out.video = s.framesDecoded || 0; out.width = s.frameWidth || 0; }
    if (s.type === 'inbound-rtp' && s.kind === 'audio') out.energy = s.totalAudioEnergy || 0;
  });
  return out;
}"""

GRAB = """() => {
  const v = document.getElementById('video'), c = document.createElement('canvas');
  c.width = 64; c.height = 64;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0, 64, 64);
  return Array.from(g.getImageData(0, 0, 64, 64).data);
}"""


def _requirements() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; the browser is Debian's chromium)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing (apt-get install chromium; scripts/setup.sh does)"
    if shutil.which("espeak-ng") is None:
        return "espeak-ng missing (apt-get install espeak-ng): the example bot's TTS"
    return None


@pytest.fixture(scope="module")
def bot_url():
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    import uvicorn

    from integrations.avatar import AvatarHost
    from integrations.pipecat_service import KnotstreamVideoService
    from server.avatars import avatar_image
    from server.testing import free_port
    from streaming.ice import allow_loopback, has_non_loopback_ipv4

    if not has_non_loopback_ipv4():
        allow_loopback()
    sys.path.insert(0, str(ROOT / "examples"))
    import pipecat_bot

    host = AvatarHost.load("tiny")
    app = pipecat_bot.create_app(lambda: KnotstreamVideoService.in_process(host, avatar_image("ada")),
                                 host.width, host.height, host.fps)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "example app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)
    host.close()


def test_example_bot_streams_the_avatar_to_chromium(bot_url):
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--autoplay-policy=no-user-gesture-required",
            "--disable-background-networking", "--allow-loopback-in-peer-connection",
            "--disable-features=WebRtcHideLocalIpsWithMdns"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(bot_url + "/")
            page.click("#connect")
            page.wait_for_function("() => document.getElementById('video').videoWidth > 0")
            first = page.evaluate(STATS)
            page.wait_for_function("() => window.bot.pc && window.bot.pc.connectionState === 'connected'")
            page.wait_for_timeout(3000)
            later = page.evaluate(STATS)
            assert later["video"] > first["video"] + 25, f"frames decoded {first} -> {later}"
            assert later["width"] == 128
            a = page.evaluate(GRAB)
            page.wait_for_timeout(1000)
            b = page.evaluate(GRAB)
            assert max(a) > 20, "decoded video is black"
            assert sum(abs(x - y) for x, y in zip(a, b)) / len(a) > 0.1, "decoded frames do not change"
            assert later["energy"] > 0, "the greeting's audio never reached the browser"

            # Once the greeting is over (energy stops growing), a typed line is heard too.
            energy, end = -1.0, time.monotonic() + 20
            while time.monotonic() < end:
                now = page.evaluate(STATS)["energy"]
                if now == energy:
                    break
                energy = now
                page.wait_for_timeout(700)
            page.click("#say")
            page.wait_for_timeout(4000)
            assert page.evaluate(STATS)["energy"] > energy, "the typed line was not heard"
        finally:
            browser.close()
