"""Server settings: flags and `KNOTSTREAM_*` environment variables (pydantic-settings).

Example: `KNOTSTREAM_PORT=9000 KNOTSTREAM_ICE_SERVERS='[{"urls": ["stun:stun.example.org"]}]'`.
List settings of plain strings (`api_keys`, `cors_origins`) also take a comma-separated
value: `KNOTSTREAM_API_KEYS=key-one,key-two`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from streaming.codecs import EncoderPreference, VideoCodec

REPO = Path(__file__).resolve().parent.parent


class IceServer(BaseModel):
    """One STUN/TURN server as in the WebRTC API (RTCIceServer)."""

    urls: list[str] = Field(..., min_length=1, max_length=8)
    username: str | None = Field(None, max_length=256)
    credential: str | None = Field(None, max_length=256)

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")) or len(url) > 512 \
                    or any(c in url for c in '<> \t\r\n"'):
                raise ValueError(f"ICE server URL must be stun:, stuns:, turn: or turns: without spaces, "
                                 f"quotes or angle brackets, got {url[:80]!r}")
        return urls

    @field_validator("username", "credential")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and not v.isprintable():
            raise ValueError("ICE server username/credential must be printable text (no line breaks)")
        return v


class Settings(BaseSettings):
    # An empty variable counts as unset (compose passes `${X:-}` for optional secrets).
    model_config = SettingsConfigDict(env_prefix="KNOTSTREAM_", extra="ignore", env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str = "tiny"                      # preset, safetensors path, livetalk:DIR, flashhead:DIR (model/sources.py)
    device: str = "cpu"
    # Weights and activations: auto = bfloat16 on CUDA; on a CPU float32 weights computed in
    # bfloat16 where the CPU has it natively (Engine.from_pretrained); float32 = float32 throughout.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def torch_dtype(self):
        """The engine's dtype; None for auto (Engine.from_pretrained chooses)."""
        import torch

        return None if self.dtype == "auto" else getattr(torch, self.dtype)
    # None by default: aiortc would otherwise use a public STUN server (nothing offline).
    ice_servers: list[IceServer] = Field(default_factory=list)
    codec: VideoCodec = "vp8"
    # Video encoder (streaming/encode.py): auto = NVENC when codec is h264 and NVENC opens, else
    # aiortc's software encoder; nvenc / x264 = pre-encoded H264 (a 422 where it cannot work).
    encoder: EncoderPreference = "auto"
    # Target bps of the nvenc/x264 paths (None = by frame size, streaming/encode.py default_bitrate);
    # the software encoder adapts to REMB.
    video_bitrate: int | None = Field(None, ge=100_000, le=20_000_000)
    max_sessions: int = Field(4, ge=1)
    max_batch: int = Field(1, ge=1)          # sessions per engine.step_many call
    lead_frames: int | None = Field(None, ge=1)  # generation lead; None = 1.5 chunks
    prebuffer_timeout_s: float = Field(2.0, ge=0)
    offer_timeout_s: float = Field(60.0, gt=0)   # a session without an offer closes after this
    disconnect_grace_s: float = Field(5.0, ge=0)
    max_upload_bytes: int = Field(10_000_000, ge=1024)   # reference portraits
    max_image_pixels: int = Field(16_000_000, ge=4096)   # decoded portrait width x height
    max_audio_bytes: int = Field(20_000_000, ge=1024)    # one /audio request
    max_speech_seconds: float = Field(300.0, gt=0)       # queued pushed speech per session
    web_dir: Path = REPO / "web"
    audio_rate_per_s: float = Field(10.0, gt=0)          # /audio and /speak requests per session per second
    audio_burst: int = Field(20, ge=1)                   # ... and how many may come at once
    retry_after_s: int = Field(10, ge=1)                 # Retry-After of a 503 when every slot is taken
    max_lead_frames: int = Field(100, ge=1)              # largest `lead_frames` a client may ask for
    tts_concurrency: int = Field(2, ge=1)                # TTS syntheses at once in this process
    max_open_segments: int = Field(16, ge=1)             # pushed speech segments left open per session
    max_ice_candidates: int = Field(50, ge=1)            # trickled ICE candidates per session
    interrupt_rate_per_s: float = Field(5.0, gt=0)       # interrupts per session per second (all paths)
    interrupt_burst: int = Field(10, ge=1)
    # A session whose peer connection is not `connected` this long after its answer is closed.
    ice_connect_timeout_s: float = Field(30.0, gt=0)
    max_session_s: float | None = Field(None, gt=0)      # None: sessions may run forever
    max_sessions_per_key: int | None = Field(None, ge=1)  # live sessions one API key may hold (None: no quota)

    # Operations endpoints. A metrics key makes /metrics need `Authorization: Bearer <key>`;
    # `docs=false` turns off /docs, /redoc and /openapi.json (the Docker image does).
    metrics_key: str | None = Field(None, min_length=16)
    docs: bool = True

    # TURN with time-limited credentials (coturn `use-auth-secret`): each session gets its own
    # username `<expiry>:<session id>` and password HMAC-SHA1(secret, username), valid this long
    # for new allocations. Needs `turn_urls`; both go to the client and to the server's own peer.
    turn_secret: str | None = Field(None, min_length=16)
    turn_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    turn_ttl_s: int = Field(600, ge=60, le=86400)
    # Several workers: proxied requests carry an HMAC of this secret (server/routing.py); every
    # worker needs the same one. Required with `redis_url`.
    cluster_secret: str | None = Field(None, min_length=16)

    # Auth (server/auth.py). API keys create sessions; each session's own token covers
    # the rest. With no keys, auth is off only when bound to loopback (local demo) or
    # when `auth_disabled` is set; any other bind refuses to start.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auth_disabled: bool | None = None                    # None: off on loopback without keys, else on
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # browser origins allowed
    # Without API keys, requests must name one of these hosts (besides the loopback names, the
    # bind address and public_url's host): DNS-rebinding protection (server/guard.py).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Scale-out: with a Redis URL, workers share one session registry (server/store_redis.py).
    redis_url: str | None = None
    redis_prefix: str = "knotstream:"
    worker_id: str | None = None                         # default <hostname>:<pid>
    public_url: str | None = None                        # this worker's address; default http://<host>:<port>
    store_ttl_s: float = Field(15.0, gt=0)               # records expire this long after the last heartbeat
    heartbeat_s: float | None = Field(None, gt=0)        # default store_ttl_s / 3
    # SIGTERM: running sessions get this long to end before they are closed (server/serve.py).
    drain_timeout_s: float = Field(30.0, ge=0)
    # aioice skips 127.0.0.1 when gathering candidates; turn on in a namespace with only `lo`.
    loopback_ice: bool = False

    # Personal avatars (server/personal.py): files to serve (`--avatar`, repeatable), and the
    # folder the server's fit jobs write to and loads at start (server/fitjobs.py).
    avatars: Annotated[list[str], NoDecode] = Field(default_factory=list)
    avatar_dir: Path = Path("~/.local/share/knotstream/avatars")
    fit_jobs: bool = True                                # POST /v1/avatars: fit an avatar from an uploaded clip
    fit_max_upload_bytes: int = Field(300_000_000, ge=1024)
    fit_max_video_s: float = Field(300.0, gt=0)          # longest clip a fit job takes
    fit_max_minutes: float = Field(30.0, gt=0)           # a fit job's time limit
    fit_threads: int = Field(1, ge=1)                    # torch threads of the fit process
    fit_decoder_steps: int | None = Field(None, ge=0)    # None: the fit's defaults (model/personal/fit.py)
    fit_dit_steps: int | None = Field(None, ge=0)

    @field_validator("api_keys", "cors_origins", "turn_urls", "allowed_hosts", "avatars", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def ice_dicts(self) -> list[dict]:
        return [s.model_dump(exclude_none=True) for s in self.ice_servers]
