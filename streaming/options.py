"""What a live session is configured with (SessionOptions) and how it refuses a driving
request (SessionRefused). No session state here: streaming/session.py uses both."""

from __future__ import annotations

from dataclasses import dataclass, field

from streaming.codecs import CODECS, ENCODER_PREFERENCES
from streaming.encode import check_bitrate


class SessionRefused(ValueError):
    """A driving request the session will not take now; `code` is stable, `retry_after_s`
    says when to try again (None: not by waiting)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass
class SessionOptions:
    """Per-session gateway options (model knobs are the engine's business)."""

    codec: str = "vp8"
    lead_frames: int | None = None          # generation lead; None = 1.5 chunks
    prebuffer_timeout_s: float = 2.0
    max_speech_seconds: float = 300.0
    disconnect_grace_s: float = 5.0         # "disconnected" this long -> the session closes
    echo_mic: bool = False                  # play the mic back on the audio track (puppet demos)
    # The server's own STUN/TURN servers: the only ones its peer connection uses.
    ice_servers: list[dict] = field(default_factory=list)  # [{"urls": [...], "username", "credential"}]
    # What the client is told to use (its own choice, echoed); None: the server's list.
    client_ice_servers: list[dict] | None = None
    # A peer connection not `connected` this long after the answer is closed (no half-open
    # sessions holding a slot); None: no deadline.
    ice_connect_timeout_s: float | None = 30.0
    max_ice_candidates: int = 50        # trickled candidates per session
    max_open_segments: int = 16         # pushed speech segments not yet ended
    # Video encoder, one of streaming.codecs.ENCODER_PREFERENCES (chosen by streaming/encode.py).
    encoder: str = "auto"
    # Target bps of the pre-encoded paths (nvenc, x264); None = 1 Mbps. aiortc's software encoder
    # ignores it and follows the receiver's REMB estimate instead.
    bitrate: int | None = None

    @property
    def ice_for_client(self) -> list[dict]:
        return self.ice_servers if self.client_ice_servers is None else self.client_ice_servers

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {list(CODECS)}, got {self.codec!r}")
        if self.encoder not in ENCODER_PREFERENCES:
            raise ValueError(f"encoder must be one of {list(ENCODER_PREFERENCES)}, got {self.encoder!r}")
        check_bitrate(self.bitrate)
        lead = self.lead_frames
        if lead is not None and (isinstance(lead, bool) or not isinstance(lead, int) or lead < 1):
            raise ValueError(f"lead_frames must be a positive integer, got {lead!r}")
