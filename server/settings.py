"""Server settings: flags and `KNOTSTREAM_*` environment variables (pydantic-settings).

Example: `KNOTSTREAM_PORT=9000 KNOTSTREAM_ICE_SERVERS='[{"urls": ["stun:stun.example.org"]}]'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent


class IceServer(BaseModel):
    """One STUN/TURN server as in the WebRTC API (RTCIceServer)."""

    urls: list[str]
    username: str | None = None
    credential: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KNOTSTREAM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str = "tiny"                      # preset name (bundled weights) or a local safetensors path
    device: str = "cpu"
    # None by default: aiortc would otherwise use a public STUN server (nothing offline).
    ice_servers: list[IceServer] = Field(default_factory=list)
    codec: Literal["vp8", "h264"] = "vp8"
    max_sessions: int = Field(4, ge=1)
    max_batch: int = Field(1, ge=1)          # sessions per engine.step_many call
    lead_frames: int | None = Field(None, ge=1)  # generation lead; None = 1.5 chunks
    prebuffer_timeout_s: float = Field(2.0, ge=0)
    offer_timeout_s: float = Field(60.0, gt=0)   # a session without an offer closes after this
    disconnect_grace_s: float = Field(5.0, ge=0)
    max_upload_bytes: int = Field(10_000_000, ge=1024)   # reference portraits
    max_audio_bytes: int = Field(20_000_000, ge=1024)    # one /audio request
    max_speech_seconds: float = Field(300.0, gt=0)       # queued pushed speech per session
    web_dir: Path = REPO / "web"
    # aioice skips 127.0.0.1 when gathering candidates; turn on in a namespace with only `lo`.
    loopback_ice: bool = False

    def ice_dicts(self) -> list[dict]:
        return [s.model_dump(exclude_none=True) for s in self.ice_servers]
