"""The names of the video codecs and encoders a session can ask for, declared once.

Server settings, request bodies, the CLI, session options, the encoder chooser
(streaming/encode.py) and the SDP answer (streaming/peer.py) all take them from here.
Nothing heavy is imported, so settings can use the types without loading aiortc or PyAV.
"""

from __future__ import annotations

from typing import Literal, get_args

VideoCodec = Literal["vp8", "h264"]
EncoderPreference = Literal["auto", "software", "nvenc", "x264"]

CODECS: tuple[str, ...] = get_args(VideoCodec)
ENCODER_PREFERENCES: tuple[str, ...] = get_args(EncoderPreference)

# The pre-encoded kinds hand aiortc finished H264 packets: kind -> FFmpeg (PyAV) encoder.
PRE_ENCODED = {"nvenc": "h264_nvenc", "x264": "libx264"}
PRE_ENCODED_CODEC = "h264"


def mime_type(codec: str) -> str:
    """The RTP mime type of a codec name ("vp8" -> "video/VP8")."""
    return f"video/{codec.upper()}"


def default_codec(encoder: str, configured: str) -> str:
    """The codec of a session that names none: H264 with a pre-encoded encoder (the only
    codec it produces), else the server's configured codec."""
    return PRE_ENCODED_CODEC if encoder in PRE_ENCODED else configured
