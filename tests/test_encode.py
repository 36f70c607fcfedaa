"""Video encoder selection and the pre-encoded (av.Packet) video path.

On CPU hosts the packet path runs with libx264 (`encoder: "x264"`); the NVENC path is the
same track with `h264_nvenc` and is checked by the `gpu`-marked test where CUDA is present.
"""

import asyncio
import ctypes
import logging
import time
from fractions import Fraction

import av
import httpx
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from aiortc.codecs.h264 import H264Encoder

from streaming.encode import (DEFAULT_BITRATE, EncodedVideoTrack, EncoderError, VideoEncoder, choose_video_encoder,
                              open_encoder, probe)
from streaming.session import SessionOptions

FPS = 25
NVENC_FAILURE = probe("h264_nvenc", 128, 128)  # None where NVENC really opens


class MovingSource(MediaStreamTrack):
    """Unpaced video source: a moving gradient with noise, pts = n * 3600 at 1/90000."""

    kind = "video"

    def __init__(self, width=128, height=128, frames=None):
        super().__init__()
        self.width, self.height, self.frames, self.n = width, height, frames, 0
        self.rng = np.random.default_rng(0)

    async def recv(self):
        if self.frames is not None and self.n >= self.frames:
            self.stop()
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError
            raise MediaStreamError
        y, x = np.mgrid[: self.height, : self.width]
        img = np.stack([(x + 3 * self.n) % 256, (y + 2 * self.n) % 256, (x + y) % 256], -1)
        img = (img + self.rng.integers(0, 24, img.shape)).clip(0, 255).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = self.n * (90000 // FPS), Fraction(1, 90000)
        self.n += 1
        return frame


def nal_types(data: bytes) -> list[int]:
    return [nal[0] & 0x1F for nal in data.split(b"\x00\x00\x01")[1:] if nal]


async def encode_frames(kind: str, bitrate: int, n: int = 60, size=(128, 128)):
    track = EncodedVideoTrack(MovingSource(*size), VideoEncoder(kind, "h264", "test"), FPS, bitrate)
    track.encoded = []
    packets = [await track.recv() for _ in range(n)]
    track.stop()
    return track, packets


def check_packets(track, packets, size=(128, 128)):
    """Annex-B H264 with SPS/PPS/IDR first, a keyframe every 2 s, 90 kHz pts of the frames,
    what aiortc's H264 packetizer takes, and decodable."""
    assert track.fallback is None
    assert all(isinstance(p, av.Packet) for p in packets)
    assert [p.pts for p in packets] == [i * 3600 for i in range(len(packets))]
    assert all(p.time_base == Fraction(1, 90000) for p in packets)
    first = bytes(packets[0])
    assert first.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")), first[:8].hex()
    assert {7, 8, 5} <= set(nal_types(first)), nal_types(first)
    keys = [i for i, p in enumerate(packets) if p.is_keyframe]
    assert keys[:2] == [0, 2 * FPS], keys
    assert all(7 in nal_types(bytes(packets[i])) for i in keys)  # SPS again before every keyframe
    payloads, timestamp = H264Encoder().pack(packets[5])
    assert payloads and timestamp == 5 * 3600
    decoder = av.CodecContext.create("h264", "r")
    frames = [f for p in packets for f in decoder.decode(av.Packet(bytes(p)))]
    assert len(frames) >= len(packets) - 1
    assert (frames[0].width, frames[0].height) == size
    images = np.stack([f.to_ndarray(format="rgb24") for f in frames[:10]]).astype(np.float32)
    assert images.std(axis=0).mean() > 5.0  # moving content survived the round trip


# ----- selection ----------------------------------------------------------------------------------

def test_auto_picks_nvenc_only_where_it_opens_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="knotstream.encode"):
        choice = choose_video_encoder("h264", "auto", (128, 128))
        again = choose_video_encoder("h264", "auto", (128, 128))
    assert again is choice
    if NVENC_FAILURE is None:
        assert choice.kind == "nvenc" and choice.pre_encoded
    else:  # CPU hosts (here): aiortc's software encoder, and the reason names nvenc's failure
        assert choice.kind == "software" and not choice.pre_encoded
        assert "nvenc unavailable" in choice.reason and "h264_nvenc" in choice.reason
    vp8 = choose_video_encoder("vp8", "auto")
    assert vp8.kind == "software" and "vp8" in vp8.reason
    assert choose_video_encoder("h264", "software").kind == "software"


def test_each_choice_is_logged_once_with_its_reason(caplog):
    with caplog.at_level(logging.INFO, logger="knotstream.encode"):
        choice = choose_video_encoder("h264", "x264", (64, 48))
        choose_video_encoder("h264", "x264", (64, 48))
    lines = [r.getMessage() for r in caplog.records if "64x48" in r.getMessage()]
    if lines:  # not logged here only if an earlier test made the same choice
        assert len(lines) == 1 and choice.reason in lines[0]
    assert choice.kind == "x264" and choice.ffmpeg_name == "libx264"


def test_explicit_nvenc_that_cannot_open_is_an_error_not_a_fallback():
    if NVENC_FAILURE is None:
        pytest.skip("h264_nvenc opens on this host")
    with pytest.raises(EncoderError) as err:
        choose_video_encoder("h264", "nvenc", (128, 128))
    assert err.value.code == "encoder_unavailable" and "h264_nvenc" in str(err.value)


@pytest.mark.parametrize("preference", ["nvenc", "x264"])
def test_vp8_with_a_pre_encoded_h264_encoder_is_refused(preference):
    with pytest.raises(EncoderError) as err:
        choose_video_encoder("vp8", preference)
    assert err.value.code == "encoder_codec_mismatch" and "h264" in str(err.value)


def test_bad_names_and_bitrates_are_refused():
    with pytest.raises(ValueError):
        choose_video_encoder("h265", "auto")
    with pytest.raises(ValueError):
        choose_video_encoder("h264", "quicksync")
    with pytest.raises(ValueError):
        SessionOptions(encoder="quicksync")
    for bad in (50_000, 30_000_000, 1.5e6, True):
        with pytest.raises(ValueError):
            SessionOptions(codec="h264", encoder="x264", bitrate=bad)
    assert SessionOptions(codec="h264", encoder="x264", bitrate=200_000).bitrate == 200_000


# ----- the packet path (libx264 here) --------------------------------------------------------------

def test_the_encoder_settings_are_all_understood():
    ctx = open_encoder("libx264", 128, 128, FPS, 500_000)
    assert dict(ctx.options) == {}  # FFmpeg leaves unknown options in the dict
    assert (ctx.gop_size, ctx.max_b_frames, ctx.bit_rate) == (2 * FPS, 0, 500_000)


async def test_x264_track_returns_annexb_packets_with_the_frames_pts():
    track, packets = await encode_frames("x264", DEFAULT_BITRATE)
    check_packets(track, packets)
    assert track.packets == len(packets) and track.bytes == sum(p.size for p in packets)
    assert track.keyframes == 2


async def test_bitrate_changes_the_encoded_size():
    low, _ = await encode_frames("x264", 200_000, n=75)
    high, _ = await encode_frames("x264", 2_000_000, n=75)
    seconds = 75 / FPS
    low_bps, high_bps = 8 * low.bytes / seconds, 8 * high.bytes / seconds
    assert high_bps > 3 * low_bps, (low_bps, high_bps)
    assert low_bps < 2 * 200_000, low_bps  # rate control holds the low target (one IDR of slack)


async def test_an_encoder_that_fails_hands_raw_frames_to_aiortc_as_a_named_fallback(caplog):
    # libx264 refuses odd sizes in yuv420p: the track falls back at the first frame.
    track = EncodedVideoTrack(MovingSource(127, 95), VideoEncoder("x264", "h264", "test"), FPS)
    with caplog.at_level(logging.WARNING, logger="knotstream.encode"):
        first = await track.recv()
        second = await track.recv()
    assert isinstance(first, av.VideoFrame) and isinstance(second, av.VideoFrame)
    assert (first.pts, second.pts) == (0, 3600) and first.time_base == Fraction(1, 90000)
    assert track.fallback and "software" in track.fallback and "127x95" in track.fallback
    assert any("fallback" in r.getMessage() for r in caplog.records)
    track.stop()


async def test_the_encode_runs_off_the_event_loop():
    track = EncodedVideoTrack(MovingSource(256, 256), VideoEncoder("x264", "h264", "test"), FPS)
    await track.recv()  # the encoder opens
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    for _ in range(10):
        await track.recv()
    task.cancel()
    track.stop()
    assert ticks >= 10  # the loop kept running while frames were encoded in a worker thread


# ----- end to end: aiortc client, live server, real tiny engine -------------------------------------

@pytest.fixture(scope="module")
def server():
    from model.engine import Engine
    from server.settings import Settings
    from server.testing import LiveServer
    from streaming.ice import allow_loopback, has_non_loopback_ipv4

    if not has_non_loopback_ipv4():
        allow_loopback()  # aioice skips 127.0.0.1 (see research/webrtc.md)
    with LiveServer(Settings(max_sessions=4, disconnect_grace_s=2.0), Engine.from_pretrained("tiny")) as srv:
        yield srv


async def until(pred, timeout_s):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


def answer_video_codec(sdp: str) -> str:
    """The first (sending) codec of the answer's video m-line."""
    lines = sdp.splitlines()
    m = next(line for line in lines if line.startswith("m=video"))
    pt = m.split()[3]
    return next(line.split()[1].split("/")[0] for line in lines if line.startswith(f"a=rtpmap:{pt} "))


async def test_x264_sessions_stream_decodable_h264_and_bitrate_sets_the_size(server):
    from server.testing import AvatarClient

    clients = {b: AvatarClient(server.url, keep_images=True) for b in (100_000, 2_000_000)}
    try:
        sessions = {b: await c.connect("ada", options={"encoder": "x264", "bitrate": b}) for b, c in clients.items()}
        for b, s in sessions.items():
            assert answer_video_codec(s["answer"]["sdp"]) == "H264"
            assert s["video"]["codec"] == "h264"  # x264 implies h264 when no codec is given
        lives = {b: server.manager.sessions[s["id"]] for b, s in sessions.items()}
        assert await until(lambda: all(len(c.got.video) >= 60 for c in clients.values()), 40)
        for b, client in clients.items():
            pts = [p for p, _, _ in client.got.video]
            assert all(y > x for x, y in zip(pts, pts[1:])), "video pts not strictly increasing"
            images = np.stack([img for _, _, img in client.got.video[-40:]]).astype(np.float32)
            assert images.shape[1:] == (128, 128, 3)
            assert images.std(axis=0).mean() > 0.5, "decoded frames are constant"
            st = lives[b].status()["encoder"]
            assert st["kind"] == "x264" and st["bitrate"] == b and st["fallback"] is None, st
            assert st["packets"] >= 60 and st["keyframes"] >= 1
        # Server side: bytes of the packets the tracks produced, per packet.
        per_packet = {b: live.encoded_video.bytes / live.encoded_video.packets for b, live in lives.items()}
        # The low rate holds its budget (bitrate / 8 / 25 fps bytes per frame, with room for
        # the keyframes); the high one spends more. How much more depends on the picture:
        # a clean, slowly changing face needs far less than 2 Mbps (about 1.1 kB per frame).
        budget = 100_000 / 8 / 25
        assert per_packet[100_000] <= 1.5 * budget, per_packet
        assert per_packet[2_000_000] > 1.3 * per_packet[100_000], per_packet
    finally:
        for c in clients.values():
            await c.close()


async def test_sessions_default_to_the_software_encoder_and_refuse_impossible_encoders(server):
    from server.testing import AvatarClient

    client = AvatarClient(server.url)
    try:
        s = await client.connect("ben", options={"codec": "h264", "encoder": "software"})
        # The codec option is honoured in the answer (aiortc's own H264 encoder here).
        assert answer_video_codec(s["answer"]["sdp"]) == "H264"
        st = server.manager.sessions[s["id"]].status()["encoder"]
        assert st["kind"] == "software" and st["bitrate"].startswith("adaptive") and "packets" not in st
    finally:
        await client.close()
    async with httpx.AsyncClient(base_url=server.url) as http:
        async def create(options):
            return await http.post("/v1/sessions", json={"avatar": "ada", "options": options})

        r = await create({"codec": "vp8", "encoder": "nvenc"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "encoder_codec_mismatch"
        r = await create({"bitrate": 50_000})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        if NVENC_FAILURE is not None:
            r = await create({"encoder": "nvenc"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "encoder_unavailable"
            assert "h264_nvenc" in r.json()["error"]["message"]
        # An offer without H264 cannot carry the packets of the x264/nvenc paths.
        from aiortc import RTCPeerConnection, RTCRtpReceiver

        pc = RTCPeerConnection()
        try:
            video = pc.addTransceiver("video", direction="recvonly")
            video.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("video").codecs
                                       if c.mimeType == "video/VP8"])
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            r = await http.post("/v1/sessions", json={"avatar": "ada", "options": {"encoder": "x264"},
                                                      "offer": {"sdp": pc.localDescription.sdp, "type": "offer"}})
            assert r.status_code == 400 and r.json()["error"]["code"] == "offer_codec_unsupported", r.text
        finally:
            await pc.close()
        r = await create({})
        assert r.status_code == 201
        sid, token = r.json()["id"], r.json()["token"]
        st = (await http.get(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})).json()
        assert st["encoder"]["kind"] == "software" and st["encoder"]["codec"] == "vp8"
        await http.delete(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})


# ----- NVENC, on GPU hosts -------------------------------------------------------------------------

def cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.gpu
async def test_nvenc_track_on_a_gpu_host():
    if not cuda_driver():
        pytest.skip("no CUDA driver (libcuda.so.1) on this host")
    failure = probe("h264_nvenc", 256, 256)
    if failure is not None:
        # A CUDA GPU without a usable NVENC (the H100/H200 have none): auto must say so.
        choice = choose_video_encoder("h264", "auto", (256, 256))
        assert choice.kind == "software" and failure in choice.reason
        pytest.skip(f"CUDA present but NVENC unusable, auto falls back to software: {failure}")
    assert choose_video_encoder("h264", "auto", (256, 256)).kind == "nvenc"
    assert dict(open_encoder("h264_nvenc", 256, 256, FPS, 500_000).options) == {}
    track, packets = await encode_frames("nvenc", DEFAULT_BITRATE, n=60, size=(256, 256))
    check_packets(track, packets, size=(256, 256))
    low, _ = await encode_frames("nvenc", 200_000, n=75, size=(256, 256))
    high, _ = await encode_frames("nvenc", 2_000_000, n=75, size=(256, 256))
    assert high.bytes > 3 * low.bytes, (low.bytes, high.bytes)
    print(f"nvenc: {1000 * track.encode_s / track.packets:.2f} ms/frame at 256x256")
