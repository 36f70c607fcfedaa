"""The web demo (web/) in headless Chromium against the live server with the tiny engine.

Chromium's fake microphone plays an espeak-ng wav; the page connects the way a user
does (click Connect), and the test probes the live peer connection through the page's
`window.knot` handle: `framesDecoded` grows, decoded frames change (canvas read-back),
and the data channel round-trips (ping/pong, motion ack). Needs Debian's `chromium`
and the `playwright` Python package (no browser download); skipped without them.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from server.settings import Settings
from server.testing import LiveServer
from streaming.ice import allow_loopback, has_non_loopback_ipv4
from tests.test_personal import synthetic_clip  # noqa: F401  (the clip fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 45_000


def _requirements() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; the browser is Debian's chromium)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing (apt-get install chromium; scripts/setup.sh does)"
    if shutil.which("espeak-ng") is None:
        return "espeak-ng missing (apt-get install espeak-ng): it makes the fake microphone's speech"
    return None


@pytest.fixture(scope="module")
def server():
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from model.engine import Engine

    if not has_non_loopback_ipv4():
        allow_loopback()  # aioice skips 127.0.0.1 (research/webrtc.md)
    engine = Engine.from_pretrained("tiny")
    with LiveServer(Settings(max_sessions=2, disconnect_grace_s=2.0), engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("browser") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "--", "Hello, this is the fake microphone speaking."],
                   check=True, timeout=30, capture_output=True)
    return path


@pytest.fixture(scope="module")
def browser(server, speech_wav):
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={speech_wav}", "--autoplay-policy=no-user-gesture-required",
            "--disable-background-networking", "--allow-loopback-in-peer-connection",
            # Plain host candidates: aiortc cannot resolve Chromium's mDNS .local names.
            "--disable-features=WebRtcHideLocalIpsWithMdns"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.console = console
    yield page
    context.close()


def _connect(page) -> None:
    page.wait_for_selector('input[name="avatar"][value="ada"]', state="attached")
    page.click("#connect")
    try:
        page.wait_for_function("() => window.knot.conn && window.knot.conn.channel.readyState === 'open'")
    except Exception:
        raise AssertionError(f"demo did not connect; error: {page.text_content('#error')!r}; "
                             f"console: {page.console[-10:]}") from None


FRAMES_DECODED = """async () => {
  let n = 0;
  (await window.knot.conn.pc.getStats()).forEach(s => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0;
  });
  return n;
}"""

# Draw the <video> into a small canvas and return its RGBA bytes as a plain array.
GRAB = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas');
  c.width = 64; c.height = 64;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0, 64, 64);
  return Array.from(g.getImageData(0, 0, 64, 64).data);
}"""


def test_demo_connects_and_plays_changing_video_with_data_channel_round_trip(page, server, speech_wav):
    _connect(page)
    session_id = page.evaluate("() => window.knot.conn.session.id")
    assert session_id in server.manager.sessions
    page.wait_for_function("() => document.getElementById('video').videoWidth > 0")

    first = page.evaluate(FRAMES_DECODED)
    page.wait_for_timeout(2000)
    second = page.evaluate(FRAMES_DECODED)
    assert second > first, f"framesDecoded did not grow: {first} -> {second}"

    a = page.evaluate(GRAB)
    page.wait_for_timeout(1500)
    b = page.evaluate(GRAB)
    assert len(a) == len(b) == 64 * 64 * 4
    assert max(a) > 20, "decoded video is black"
    diff = sum(abs(x - y) for x, y in zip(a, b)) / len(a)
    assert diff > 0.1, f"decoded frames are constant (mean abs difference {diff:.3f})"

    live = server.manager.sessions[session_id]
    assert live.mic_samples > 0, "the fake microphone's audio never reached the server"

    pong = page.evaluate("() => window.knot.ping()")
    assert pong["type"] == "pong" and isinstance(pong["t"], (int, float)) and pong["rtt"] >= 0

    # A slider drag becomes a motion message; the server acks the frame it lands on.
    page.eval_on_selector('input[data-field="yaw"]',
                          "el => { el.value = '0.5'; el.dispatchEvent(new Event('input')); }")
    page.wait_for_function("() => window.knot.lastMotionAck !== undefined")
    assert page.evaluate("() => window.knot.lastMotionAck.frame") >= 0
    assert page.is_hidden("#error"), page.text_content("#error")

    # Speech from the page: a typed sentence (/speak) and an uploaded wav (/audio).
    page.fill("#text", "Hi")
    page.click("#speak")
    page.wait_for_function("() => document.getElementById('log').textContent.includes('speaking')")
    page.set_input_files("#wav", str(speech_wav))
    page.wait_for_function("() => document.getElementById('log').textContent.includes('queued')")
    page.wait_for_function("() => document.getElementById('log').textContent.includes('playback_started')")
    assert page.is_hidden("#error"), page.text_content("#error")

    page.click("#disconnect")
    page.wait_for_function("() => document.getElementById('stat-state').textContent === 'closed'")
    for _ in range(100):  # Disconnect deletes the session: the server frees it
        if session_id not in server.manager.sessions:
            break
        page.wait_for_timeout(100)
    assert session_id not in server.manager.sessions, "session still live after Disconnect"


def test_demo_shows_the_servers_error_message_for_a_bad_portrait(page, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a png")
    page.set_input_files("#portrait", str(bad))
    page.click("#connect")
    page.wait_for_selector("#error:not([hidden])")
    text = page.text_content("#error")
    assert "HTTP 4" in text and "(" in text, text  # the JSON `message` with its code and status
    assert page.evaluate("() => window.knot.conn") is None
    assert not page.is_disabled("#connect")


def test_demo_shows_the_cartoon_model_notice_for_an_uploaded_photo_and_none_for_an_avatar(page, tmp_path):
    import numpy as np
    from PIL import Image

    photo = tmp_path / "me.png"
    image = np.full((96, 96, 3), 180, np.uint8)
    image[20:70, 30:66] = (200, 150, 120)
    Image.fromarray(image).save(photo)
    page.set_input_files("#portrait", str(photo))
    _connect(page)
    notice = page.wait_for_selector('#notices:not([hidden]) .notice[data-code="cartoon_model"]')
    text = notice.text_content()
    assert "knotstream avatar create" in text and "docs/personal-avatars.md" in text, text
    page.click("#disconnect")
    page.wait_for_function("() => document.getElementById('stat-state').textContent === 'closed'")

    page.set_input_files("#portrait", [])   # back to the bundled avatar: no notice
    _connect(page)
    assert page.is_hidden("#notices") and page.query_selector("#notices .notice") is None
    page.click("#disconnect")


def test_demo_fit_form_shows_the_servers_refusal(page, tmp_path):
    junk = tmp_path / "clip.mp4"
    junk.write_bytes(b"not a video" * 50)
    page.set_input_files("#fit-video", str(junk))
    page.fill("#fit-name", "mine")
    page.click("#fit-start")
    page.wait_for_selector("#error:not([hidden])")
    assert "video_unreadable" in page.text_content("#error")
    assert not page.is_disabled("#fit-start")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_fits_an_avatar_from_an_uploaded_clip_and_streams_it(page, server, synthetic_clip, tmp_path):  # noqa: F811
    """The demo's whole flow: upload a clip, watch the job's progress, the avatar appears in
    the list, a session on it plays (a fit of one step per stage: the flow, not the quality)."""
    settings = server.app.state.settings
    saved = settings.fit_decoder_steps, settings.fit_dit_steps, settings.avatar_dir
    settings.fit_decoder_steps, settings.fit_dit_steps, settings.avatar_dir = 1, 1, tmp_path
    try:
        page.set_input_files("#fit-video", str(synthetic_clip[0]))
        page.fill("#fit-name", "mine")
        page.click("#fit-start")
        page.wait_for_function("() => document.getElementById('fit-status').textContent.includes('running')")
        page.wait_for_function("() => document.getElementById('log').textContent.includes('avatar mine is ready')",
                               timeout=600_000)
        assert page.evaluate("() => document.getElementById('fit-progress').value") == 1
        page.wait_for_selector('input[name="avatar"][value="mine"]:checked', state="attached")
        page.click("#connect")
        page.wait_for_function("() => window.knot.conn && window.knot.conn.channel.readyState === 'open'")
        page.wait_for_function("() => document.getElementById('video').videoWidth > 0")
        session_id = page.evaluate("() => window.knot.conn.session.id")
        assert server.manager.sessions[session_id].stream.engine is server.app.state.personal.get("mine").engine
        assert page.is_hidden("#error"), page.text_content("#error")
    finally:
        settings.fit_decoder_steps, settings.fit_dit_steps, settings.avatar_dir = saved
