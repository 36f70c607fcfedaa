"""Video encoders: which one a session uses, and the pre-encoded video track.

Three kinds, chosen once per (codec, preference, frame size) by `choose_video_encoder`:

- `software`: aiortc encodes the frames itself (libvpx VP8 or libx264 H264). The default
  and the fallback. Its target bitrate follows the receiver's REMB estimate between
  aiortc's module constants, so it adapts to the path; `SessionOptions.bitrate` does not
  apply to it (aiortc has no API to pin it, and pinning it would lose that adaptation).
- `nvenc`: H264 encoded by NVENC (`h264_nvenc` through PyAV) on GPU hosts; the track hands
  aiortc finished `av.Packet`s, which aiortc only packetizes (aiortc >= 1.10). Frees the
  CPU of the encode.
- `x264`: the same packet path with `libx264` through PyAV. It exists so that the packet
  path runs (and is tested) on CPU hosts, and for a fixed bitrate on the software codec.

`auto` (the default) picks nvenc when the codec is h264 and an `h264_nvenc` encoder really
opens and encodes a frame at the session's size (PyAV's wheels list h264_nvenc even where
no NVIDIA driver is, and NVENC has size limits and is absent on some GPUs such as the
H100/H200), else software; every choice is logged once with its reason. An explicit
`nvenc` or `x264` that cannot be used raises `EncoderError` (code `encoder_unavailable`
or `encoder_codec_mismatch`): no silent fallback.

The pre-encoded paths encode at a fixed target (`bitrate`; the server's default grows with
the frame size, `default_bitrate`: 1 Mbps for small frames, ~2 Mbps at 512x512) with no
B-frames, zero-latency tuning and a keyframe every `KEYFRAME_INTERVAL_S`: aiortc cannot
ask a pre-encoded stream for a keyframe, so a receiver's PLI (picture loss) is answered by
the next scheduled keyframe (at most 2 s; NACK retransmission covers most losses before
that). No congestion control either: set `bitrate` to what the path can carry. Packets
are Annex-B H.264 (start codes, SPS/PPS repeated before every keyframe), which is what
aiortc's `H264Encoder.pack` splits into NAL units.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from streaming.clock import VIDEO_CLOCK_RATE
from streaming.codecs import CODECS, ENCODER_PREFERENCES, PRE_ENCODED, PRE_ENCODED_CODEC

log = logging.getLogger("knotstream.encode")

NVENC = PRE_ENCODED["nvenc"]
DEFAULT_BITRATE = 1_000_000
MIN_BITRATE, MAX_BITRATE = 100_000, 20_000_000
KEYFRAME_INTERVAL_S = 2.0
PROBE_SIZE = (256, 256)  # (width, height) probed when the session's size is not known


class EncoderError(ValueError):
    """The requested encoder cannot serve this session; `code` is stable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VideoEncoder:
    """A session's video encoder: `kind` software | nvenc | x264, `codec` vp8 | h264."""

    kind: str
    codec: str
    reason: str

    @property
    def pre_encoded(self) -> bool:
        return self.kind in PRE_ENCODED

    @property
    def ffmpeg_name(self) -> str | None:
        return PRE_ENCODED.get(self.kind)


def default_bitrate(width: int, height: int, fps: int) -> int:
    """Target bps of the pre-encoded paths when none is set: 0.3 bits per pixel, at least
    DEFAULT_BITRATE (small frames), at most MAX_BITRATE. 512x512 at 25 fps: 1.97 Mbps;
    at 16 fps: 1.26 Mbps; 128x128 at 25 fps: 1 Mbps."""
    return int(min(MAX_BITRATE, max(DEFAULT_BITRATE, round(0.3 * width * height * fps, -3))))


def check_bitrate(bitrate: int | None) -> None:
    if bitrate is not None and (isinstance(bitrate, bool) or not isinstance(bitrate, int)
                                or not MIN_BITRATE <= bitrate <= MAX_BITRATE):
        raise ValueError(f"bitrate must be an integer in [{MIN_BITRATE}, {MAX_BITRATE}] bps, got {bitrate!r}")


def choose_video_encoder(codec: str, preference: str = "auto",
                         size: tuple[int, int] | None = None) -> VideoEncoder:
    """The encoder for `codec` ("vp8" | "h264") under `preference` (auto | software | nvenc |
    x264) at frame `size` (width, height). Cached; may open an encoder once (call it off
    the event loop the first time). Raises EncoderError for an explicit choice that cannot
    be served, ValueError for unknown names."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {list(CODECS)}, got {codec!r}")
    if preference not in ENCODER_PREFERENCES:
        raise ValueError(f"encoder must be one of {list(ENCODER_PREFERENCES)}, got {preference!r}")
    return _choose(codec, preference, tuple(size) if size else PROBE_SIZE)


@functools.lru_cache(maxsize=64)
def _choose(codec: str, preference: str, size: tuple[int, int]) -> VideoEncoder:
    if preference == "software":
        choice = VideoEncoder("software", codec, f"software {codec} requested (aiortc's encoder)")
    elif preference in PRE_ENCODED:
        name = PRE_ENCODED[preference]
        if codec != PRE_ENCODED_CODEC:
            raise EncoderError("encoder_codec_mismatch",
                               f"encoder {preference!r} ({name}) encodes {PRE_ENCODED_CODEC} only, got codec "
                               f"{codec!r}; use codec {PRE_ENCODED_CODEC!r} or encoder 'software'")
        failure = probe(name, *size)
        if failure is not None:
            raise EncoderError("encoder_unavailable", f"encoder {preference!r} ({name}) cannot be used on this "
                                                      f"host: {failure}")
        choice = VideoEncoder(preference, codec, f"{name} requested and opens at {size[0]}x{size[1]}")
    elif codec != PRE_ENCODED_CODEC:
        choice = VideoEncoder("software", codec, f"auto: codec {codec} (NVENC encodes {PRE_ENCODED_CODEC} only)")
    else:
        failure = probe(NVENC, *size)
        if failure is None:
            choice = VideoEncoder("nvenc", codec, f"auto: {NVENC} opens at {size[0]}x{size[1]}")
        else:
            choice = VideoEncoder("software", codec, f"auto: nvenc unavailable ({failure})")
    log.info("video encoder for codec %s, preference %s, %dx%d: %s (%s)", codec, preference, *size,
             choice.kind, choice.reason)
    return choice


_probe_lock = threading.Lock()


@functools.lru_cache(maxsize=32)
def _probe(name: str, width: int, height: int) -> str | None:
    frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
    frame.pts, frame.time_base = 0, Fraction(1, VIDEO_CLOCK_RATE)
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # FFmpeg's own message ends up in the exception
    try:
        with av.logging.Capture():  # the expected failure is reported by our reason, not logged as ERROR
            ctx = open_encoder(name, width, height, fps=25, bitrate=DEFAULT_BITRATE)
            out = list(ctx.encode(_to_encoder(frame, ctx, 0)))
            out += list(ctx.encode(None))
        if not out or out[0].size == 0:
            return f"{name} produced no packet for a test frame"
        return None
    except Exception as exc:  # av.FFmpegError (no driver, no device, size limits), missing codec
        return f"{name} does not open at {width}x{height}: {_ffmpeg_message(exc)}"
    finally:
        av.logging.set_level(previous)


def probe(name: str, width: int, height: int) -> str | None:
    """None if encoder `name` opens and encodes a frame at width x height, else why not. Cached."""
    with _probe_lock:
        return _probe(name, width, height)


def _ffmpeg_message(exc: Exception) -> str:
    """PyAV's exception text plus FFmpeg's logged line (e.g. "Cannot load libcuda.so.1")."""
    text = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
    logged = getattr(exc, "log", None)
    if logged and len(logged) == 3 and logged[2]:
        text += f" ({str(logged[2]).strip()})"
    return text


def open_encoder(name: str, width: int, height: int, fps: int, bitrate: int) -> av.VideoCodecContext:
    """An opened low-latency H264 encoder: constrained baseline (what WebRTC peers decode,
    no B-frames), one keyframe every KEYFRAME_INTERVAL_S (no scene-cut keyframes), CBR-like
    rate control around `bitrate` with a half-second buffer. Frames go in with pts in 1/fps."""
    ctx = av.CodecContext.create(name, "w")
    ctx.width, ctx.height = width, height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, fps)
    ctx.framerate = Fraction(fps, 1)
    ctx.bit_rate = bitrate
    ctx.gop_size = max(1, round(KEYFRAME_INTERVAL_S * fps))
    ctx.max_b_frames = 0
    rate = {"maxrate": str(bitrate), "bufsize": str(bitrate // 2)}
    if name == NVENC:
        # p2: a fast preset; ull + zerolatency + delay 0: one packet out per frame in.
        ctx.options = {"preset": "p2", "tune": "ull", "zerolatency": "1", "delay": "0", "rc": "cbr",
                       "profile": "baseline", **rate}
    else:
        ctx.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline",
                       "sc_threshold": "0", **rate}
    ctx.open()
    if ctx.options:  # what FFmpeg did not recognise stays in the dict
        log.warning("%s ignored the options %s", name, dict(ctx.options))
    return ctx


def _to_encoder(frame: av.VideoFrame, ctx: av.VideoCodecContext, pts: int) -> av.VideoFrame:
    """A new frame in the encoder's pixel format and time base (`frame` stays untouched: on a
    fallback it goes to aiortc with its own pts)."""
    if frame.format.name != ctx.pix_fmt:
        out = frame.reformat(format=ctx.pix_fmt)
    else:
        out = av.VideoFrame.from_ndarray(frame.to_ndarray(), format=ctx.pix_fmt)
    out.pts, out.time_base = pts, ctx.time_base
    return out


class EncodedVideoTrack(MediaStreamTrack):
    """Wraps a paced video track (AvatarVideoTrack) and returns its frames as encoded
    `av.Packet`s (Annex-B H264, pts and time_base of the frame), which aiortc packetizes
    without encoding. The encode runs in a worker thread (`asyncio.to_thread`), never on the
    event loop. If the encoder fails to open or encode (a lost GPU, NVENC's session limit),
    the track logs a warning and from then on returns the raw frames, which aiortc encodes
    in software: a named fallback, reported by `status()`."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, encoder: VideoEncoder, fps: int, bitrate: int | None = None):
        super().__init__()
        if not encoder.pre_encoded:
            raise ValueError(f"encoder {encoder.kind!r} is not a pre-encoded kind")
        check_bitrate(bitrate)
        self.source = source
        self.encoder = encoder
        self.fps = fps
        self.bitrate = bitrate or DEFAULT_BITRATE
        self.fallback: str | None = None  # why aiortc's software encoder took over, if it did
        self.packets = 0
        self.bytes = 0
        self.keyframes = 0
        self.encode_s = 0.0               # total time spent encoding (worker thread)
        self.encoded: list[tuple[int, int, bool]] | None = None  # (pts, bytes, keyframe) when recording
        self._ctx: av.VideoCodecContext | None = None
        self._pending: deque[av.Packet] = deque()

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        while not self._pending:
            try:
                frame = await self.source.recv()
            except MediaStreamError:
                self.stop()
                raise
            if self.fallback is not None:
                return frame
            try:
                self._pending.extend(await asyncio.to_thread(self._encode, frame))
            except Exception as exc:
                self.fallback = (f"{self.encoder.ffmpeg_name} failed at {frame.width}x{frame.height}: "
                                 f"{_ffmpeg_message(exc)}; aiortc's software H264 encoder took over")
                log.warning("video encoder fallback: %s", self.fallback)
                self._ctx = None
                return frame
        return self._pending.popleft()

    def _encode(self, frame: av.VideoFrame) -> list[av.Packet]:
        """Worker thread: one frame in, its packet(s) out with 90 kHz pts (none while the
        encoder buffers, which the zero-latency settings avoid)."""
        t = time.perf_counter()
        if self._ctx is None:
            self._ctx = open_encoder(self.encoder.ffmpeg_name, frame.width, frame.height, self.fps, self.bitrate)
        slot = round(frame.pts * frame.time_base * self.fps)  # encoder pts in frames (1/fps)
        out = []
        for packet in self._ctx.encode(_to_encoder(frame, self._ctx, slot)):
            pts = int(Fraction(packet.pts, self.fps) * VIDEO_CLOCK_RATE)
            packet.pts = packet.dts = pts
            packet.time_base = Fraction(1, VIDEO_CLOCK_RATE)
            self.packets += 1
            self.bytes += packet.size
            self.keyframes += bool(packet.is_keyframe)
            if self.encoded is not None:
                self.encoded.append((pts, packet.size, bool(packet.is_keyframe)))
            out.append(packet)
        self.encode_s += time.perf_counter() - t
        return out

    def stop(self) -> None:
        super().stop()
        self.source.stop()


def encoder_status(choose, track: EncodedVideoTrack | None, bitrate: int | None) -> dict:
    """The `encoder` part of a session's status; `choose()` returns the session's VideoEncoder."""
    try:
        choice = choose()
    except EncoderError as exc:  # a session built without the server's checks: say so, do not fail
        return {"kind": None, "error": exc.code, "reason": str(exc)}
    body = {"kind": choice.kind, "codec": choice.codec, "reason": choice.reason,
            "bitrate": (bitrate or DEFAULT_BITRATE) if choice.pre_encoded else "adaptive (aiortc, REMB)"}
    if track is not None:
        body.update(fallback=track.fallback, packets=track.packets, bytes=track.bytes, keyframes=track.keyframes,
                    encode_ms_per_frame=round(1000 * track.encode_s / max(1, track.packets), 3))
    return body
