"""FastAPI app: sessions API, WebRTC signalling (client offers, as WHIP), health, metrics,
and the web demo from `<repo>/web` at `/`. Routes validate and delegate to the session
manager; errors are JSON with stable codes (server/errors.py). Creating a session needs
an API key unless auth is off (server/auth.py); browsers of other origins are allowed
only when listed in `cors_origins`. With `redis_url` set, sessions are admitted through
the shared Redis registry (server/store_redis.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server import avatars, errors, spec
from server.auth import ApiKeys
from server.errors import ApiError
from server.manager import SessionManager
from server.metrics import Metrics
from server.settings import IceServer, Settings
from server.store import SessionStore, open_store
from streaming.encode import EncoderError, choose_video_encoder
from streaming.session import OfferError, SessionOptions, check_offer

log = logging.getLogger("knotstream.server")

PCM_TYPES = ("audio/pcm", "audio/l16", "application/octet-stream")


class CreateOptions(BaseModel):
    """Per-session options (the JSON `options` part of POST /v1/sessions)."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0, lt=2**63)
    knobs: dict[str, float] = Field(default_factory=dict, description="StreamKnobs overrides")
    codec: Literal["vp8", "h264"] | None = None
    encoder: Literal["auto", "software", "nvenc", "x264"] | None = Field(
        None, description="video encoder (default: the server's setting): auto = NVENC for h264 where it opens, "
                          "else aiortc's software encoder; nvenc and x264 send pre-encoded H264 (codec defaults "
                          "to h264 with them)")
    bitrate: int | None = Field(None, ge=100_000, le=20_000_000,
                                description="target video bps of the nvenc/x264 encoders (default: the server's "
                                            "setting, else 1 Mbps); the software encoder adapts to REMB instead")
    lead_frames: int | None = Field(None, ge=1, le=250)
    echo_mic: bool = Field(False, description="play the microphone back on the avatar's audio track")
    ice_servers: list[IceServer] | None = Field(
        None, max_length=8, description="STUN/TURN servers for this session (default: the server's setting); "
                                        "returned in the response and as Link rel=ice-server headers")


class Offer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sdp: str = Field(..., max_length=200_000)
    type: Literal["offer"] = "offer"


class SpeakRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., min_length=1, max_length=2000)


def create_app(settings: Settings | None = None, engine=None, store: SessionStore | None = None) -> FastAPI:
    """The app. `engine` may be passed in (tests share one); otherwise `settings.model` loads at
    startup. `store` likewise (default: `open_store(settings)`: Redis when `redis_url` is set).
    Raises ValueError for an auth configuration that would leave a public server open."""
    settings = settings or Settings()
    api_keys = ApiKeys(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from streaming.tts import available_engine, synthesize
        from streaming.worker import GenerationWorker

        if settings.loopback_ice:
            from streaming.ice import allow_loopback
            allow_loopback()
        eng = engine
        if eng is None:
            from model.engine import Engine
            eng = await asyncio.to_thread(Engine.from_pretrained, settings.model, settings.device,
                                          settings.torch_dtype())
        worker = GenerationWorker(eng, max_batch=settings.max_batch)
        worker.start()
        metrics = Metrics(lambda: list(app.state.manager.sessions.values()))
        app.state.loop = asyncio.get_running_loop()
        app.state.engine = eng
        app.state.worker = worker
        app.state.metrics = metrics
        own_store = store is None
        app.state.store = the_store = store or open_store(settings)
        manager = SessionManager(settings, eng, worker, the_store, metrics,
                                 tts=synthesize if available_engine() else None)
        try:
            await manager.start()
        except Exception:
            await asyncio.to_thread(worker.stop)
            raise
        app.state.manager = manager
        api_keys.log_mode()
        log.info("knotstream ready: model %s (%dx%d, %d fps)%s", eng.config.name, eng.config.width,
                 eng.config.height, eng.config.fps, "" if getattr(eng, "trained", True) else " UNTRAINED")
        try:
            yield
        finally:
            await app.state.manager.shutdown()
            await asyncio.to_thread(worker.stop)
            if own_store:
                await the_store.close()

    app = FastAPI(title="knotstream", version="0.1.0", lifespan=lifespan,
                  description="Streaming real-time avatar animation: sessions API and WebRTC signalling.")
    app.state.settings = settings
    app.state.api_keys = api_keys
    errors.install(app)
    from server.routing import ClusterRouter
    app.add_middleware(ClusterRouter)   # several workers: placement and per-session proxying
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key"],
                           expose_headers=["Location", "Retry-After"])

    def manager(request: Request) -> SessionManager:
        m = getattr(request.app.state, "manager", None)
        if m is None:
            raise ApiError(503, "not_ready", "the server is still starting")
        return m

    # ----- sessions -------------------------------------------------------------------

    @app.post("/v1/sessions", status_code=201, summary="Create a session (and answer its SDP offer)",
              openapi_extra=spec.create_body(CreateOptions, Offer))
    async def create_session(request: Request, authorization: str | None = Header(None),
                             x_api_key: str | None = Header(None)):
        """Multipart form: `image` (portrait upload) or `avatar` (bundled name), `options`
        (JSON, CreateOptions), `offer` (SDP text or {"sdp", "type"} JSON; optional: send it
        later to POST /v1/sessions/{id}/offer). Or a JSON body with `avatar`, `options`, `offer`.
        Returns 201 {id, token, answer, ...} and `Location: /v1/sessions/{id}`. Needs an API
        key (`Authorization: Bearer <key>` or `X-API-Key`) unless auth is off."""
        api_keys.check(authorization, x_api_key)   # before the body is read
        m = manager(request)
        image_bytes, fields = await _read_create(request, settings)
        options = _parse_options(fields.get("options"))
        offer_sdp = _parse_offer_field(fields.get("offer"))
        if offer_sdp is not None:
            _check_offer(offer_sdp)
        reference, avatar = await _reference(image_bytes, fields.get("avatar"), settings.max_image_pixels)
        try:
            knobs = m.engine.config.stream.replace(**{k: _knob_value(v) for k, v in options.knobs.items()})
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "bad_knobs", f"invalid stream knobs: {exc}") from None
        ice = ([x.model_dump(exclude_none=True) for x in options.ice_servers] if options.ice_servers is not None
               else settings.ice_dicts())
        encoder = options.encoder or settings.encoder
        codec = options.codec or ("h264" if encoder in ("nvenc", "x264") else settings.codec)
        try:  # probes an encoder once per size (off the loop); explicit choices that cannot work: 422
            await asyncio.to_thread(choose_video_encoder, codec, encoder, (m.engine.config.width,
                                                                           m.engine.config.height))
        except EncoderError as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        sopts = SessionOptions(codec=codec,
                               lead_frames=options.lead_frames or settings.lead_frames,
                               prebuffer_timeout_s=settings.prebuffer_timeout_s,
                               max_speech_seconds=settings.max_speech_seconds,
                               disconnect_grace_s=settings.disconnect_grace_s,
                               ice_servers=ice, echo_mic=options.echo_mic, encoder=encoder,
                               bitrate=options.bitrate or settings.video_bitrate)
        session, token = await m.create(reference, knobs, options.seed, sopts, avatar)
        answer = None
        if offer_sdp is not None:
            answer = await _answer(session, offer_sdp, close_on_error=True)
        cfg = m.engine.config
        location = f"/v1/sessions/{session.id}"
        body = {"id": session.id, "token": token, "location": location,
                "answer": {"type": "answer", "sdp": answer} if answer else None,
                "ice_servers": ice,
                "video": {"width": cfg.width, "height": cfg.height, "fps": cfg.fps, "codec": sopts.codec},
                "model": {"name": cfg.name, "trained": bool(getattr(m.engine, "trained", True))}}
        return JSONResponse(body, status_code=201, headers={"Location": location, **ice_link_header(ice)})

    @app.post("/v1/sessions/{session_id}/offer", summary="Send the SDP offer (offer-later)",
              openapi_extra=spec.offer_body(Offer))
    async def offer(session_id: str, request: Request, authorization: str | None = Header(None)):
        """Body: `application/sdp` (answer comes back as `application/sdp`, 201, as WHIP) or
        JSON {"sdp", "type": "offer"} (answer as JSON {"answer": {...}})."""
        session = await manager(request).authorize(session_id, authorization)
        raw = await _read_body(request, 200_000, "offer")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/sdp":
            sdp = raw.decode("utf-8", errors="replace")
            _check_offer(sdp)
            answer = await _answer(session, sdp)
            return Response(answer, status_code=201, media_type="application/sdp",
                            headers={"Location": f"/v1/sessions/{session_id}",
                                     **ice_link_header(session.options.ice_servers)})
        try:
            sdp = Offer.model_validate_json(raw).sdp
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", f"offer must be JSON {{\"sdp\", \"type\": \"offer\"}}: "
                                                   f"{exc.errors()[0]['msg']}") from None
        _check_offer(sdp)
        return {"answer": {"type": "answer", "sdp": await _answer(session, sdp)}}

    @app.post("/v1/sessions/{session_id}/audio", status_code=202, summary="Push speech audio",
              openapi_extra=spec.AUDIO)
    async def push_audio(session_id: str, request: Request, rate: int = 16000,
                         segment: str | None = Query(None, min_length=1, max_length=128),
                         end: bool = True, authorization: str | None = Header(None)):
        """Body: a wav/ogg/mp3/flac file, or raw PCM16 little-endian mono (`Content-Type:
        audio/pcm`, `audio/L16` or `application/octet-stream`) at `rate` Hz. Audio of one
        `segment` id plays in order; `end=false` keeps the segment open for more chunks."""
        from model.media import MediaError, load_audio, pcm16_to_float

        m = manager(request)
        session = await m.authorize(session_id, authorization, remote_ok=True)
        m.check_rate(session_id)
        raw = await _read_body(request, settings.max_audio_bytes, "audio")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype in PCM_TYPES:
                samples = load_audio(pcm16_to_float(raw), src_rate=rate, sample_rate=session.sample_rate,
                                     max_seconds=settings.max_speech_seconds)
            else:
                samples = await asyncio.to_thread(load_audio, raw, sample_rate=session.sample_rate,
                                                  max_seconds=settings.max_speech_seconds)
        except MediaError as exc:
            raise errors.media_error(exc) from None
        try:
            seg = session.push_audio(samples, segment, end)
        except ValueError as exc:
            raise ApiError(409, getattr(exc, "code", "bad_audio"), str(exc)) from None
        return {"segment": seg.id, "seconds": round(len(samples) / session.sample_rate, 3)}

    @app.post("/v1/sessions/{session_id}/speak", status_code=202, summary="Speak text (offline TTS)")
    async def speak(session_id: str, body: SpeakRequest, request: Request,
                    authorization: str | None = Header(None)):
        from streaming.tts import TTSUnavailable

        m = manager(request)
        session = await m.authorize(session_id, authorization, remote_ok=True)
        m.check_rate(session_id)
        try:
            seg = await session.speak(body.text)
        except TTSUnavailable as exc:
            raise ApiError(501, "tts_unavailable", str(exc)) from None
        return {"segment": seg.id, "seconds": round((seg.end - seg.start) / session.sample_rate, 3)}

    @app.post("/v1/sessions/{session_id}/interrupt", summary="Barge-in: drop queued speech")
    async def interrupt(session_id: str, request: Request, authorization: str | None = Header(None)):
        session = await manager(request).authorize(session_id, authorization, remote_ok=True)
        return session.interrupt()

    @app.get("/v1/sessions/{session_id}", summary="Session state and live stats")
    async def get_session(session_id: str, request: Request, authorization: str | None = Header(None)):
        session = await manager(request).authorize(session_id, authorization)
        return session.status()

    @app.delete("/v1/sessions/{session_id}", status_code=204, summary="End the session")
    async def delete_session(session_id: str, request: Request, authorization: str | None = Header(None)):
        session = await manager(request).authorize(session_id, authorization)
        await session.close("deleted by client")
        return Response(status_code=204)

    @app.get("/v1/avatars", summary="Bundled avatars")
    async def list_avatars():
        return {"avatars": avatars.list_avatars()}

    @app.get("/v1/avatars/{name}.png", summary="A bundled avatar's portrait (PNG)")
    async def avatar_png(name: str):
        import io

        from PIL import Image

        try:
            image = await asyncio.to_thread(avatars.avatar_image, name)
        except KeyError:
            raise ApiError(404, "avatar_not_found", f"no bundled avatar {name!r}") from None
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    # ----- operations -----------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        m = getattr(request.app.state, "manager", None)
        if m is None or not request.app.state.worker.alive:
            raise ApiError(503, "not_ready", "model not loaded or generation worker not running")
        if m.draining:
            raise ApiError(503, "draining", "shutting down: running sessions are ending, no new ones here")
        live = len(m.sessions)
        body = {"status": "ready", "sessions": live, "max_sessions": settings.max_sessions,
                "model": m.engine.config.name, "worker": m.info.id}
        if live >= settings.max_sessions:
            body["status"] = "full"
        return body

    @app.get("/metrics")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # WebSocket audio push, server-sent events, trickle ICE (before the web mount at /).
    from server import realtime
    realtime.install(app, manager)

    if settings.web_dir.is_dir():
        app.mount("/", StaticFiles(directory=settings.web_dir, html=True), name="web")
    else:
        @app.get("/", include_in_schema=False)
        async def no_web():
            return {"service": "knotstream", "docs": "/docs",
                    "web": f"no web demo installed at {settings.web_dir}"}
    return app


# ----- request helpers ----------------------------------------------------------------

def ice_link_header(servers: list[dict]) -> dict:
    """ICE servers as WHIP hands them to clients (RFC 9725 section 4.6): one `Link` value per URL,
    `rel="ice-server"`, with `username`, `credential` and `credential-type` for TURN."""
    values = []
    for server in servers:
        for url in server.get("urls", []):
            v = f'<{url}>; rel="ice-server"'
            if server.get("username") is not None:
                v += f'; username="{_quoted(server["username"])}"'
            if server.get("credential") is not None:
                v += f'; credential="{_quoted(server["credential"])}"; credential-type="password"'
            values.append(v)
    return {"Link": ", ".join(values)} if values else {}


def _quoted(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')

async def _read_body(request: Request, limit: int, what: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what}_too_large", f"{what} is {declared} bytes, limit {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what}_too_large", f"{what} is more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_create(request: Request, settings: Settings) -> tuple[bytes | None, dict]:
    """(image bytes or None, text fields) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await _read_body(request, 1_000_000, "request")
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise ApiError(422, "invalid_request", f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_request", "body must be a JSON object")
        unknown = set(body) - {"avatar", "options", "offer"}
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown fields {sorted(unknown)}; expected avatar, options, offer")
        return None, body
    if ctype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       "POST /v1/sessions takes multipart/form-data (image upload) or application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 300_000:
        raise ApiError(413, "image_too_large", f"request is {declared} bytes, limit {settings.max_upload_bytes}")
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=300_000)
    except Exception as exc:  # starlette's MultiPartException and parser errors
        raise ApiError(400, "bad_form", f"cannot read the multipart form: {exc}") from None
    fields, image = {}, None
    for key, value in form.multi_items():
        if key not in ("image", "avatar", "options", "offer"):
            raise ApiError(422, "invalid_request", f"unknown form field {key!r}; expected image, avatar, options, offer")
        if key == "image":
            if isinstance(value, str):
                raise ApiError(422, "invalid_request", "image must be a file upload")
            image = await value.read(settings.max_upload_bytes + 1)
            if len(image) > settings.max_upload_bytes:
                raise ApiError(413, "image_too_large", f"image is more than {settings.max_upload_bytes} bytes")
        elif not isinstance(value, str):
            raise ApiError(422, "invalid_request", f"form field {key!r} must be text")
        else:
            fields[key] = value
    return image, fields


def _parse_options(raw) -> CreateOptions:
    try:
        if raw is None or raw == "":
            return CreateOptions()
        if isinstance(raw, str):
            return CreateOptions.model_validate_json(raw)
        return CreateOptions.model_validate(raw)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, "invalid_request", f"options: {msg}") from None


def _parse_offer_field(raw) -> str | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(400, "bad_offer", f"offer is neither SDP nor valid JSON: {exc}") from None
    if isinstance(raw, dict):
        try:
            return Offer.model_validate(raw).sdp
        except ValidationError as exc:
            raise ApiError(400, "bad_offer", f"offer must be {{\"sdp\", \"type\": \"offer\"}}: "
                                             f"{exc.errors()[0]['msg']}") from None
    if not isinstance(raw, str):
        raise ApiError(400, "bad_offer", "offer must be SDP text or {\"sdp\", \"type\"}")
    return raw


def _check_offer(sdp: str) -> None:
    try:
        check_offer(sdp)
    except OfferError as exc:
        raise ApiError(400, exc.code, str(exc)) from None


async def _answer(session, sdp: str, close_on_error: bool = False) -> str:
    try:
        return await session.answer(sdp)
    except OfferError as exc:
        if close_on_error:
            await session.close(f"offer refused: {exc.code}")
        status = {"offer_exists": 409, "session_closed": 410}.get(exc.code, 400)
        raise ApiError(status, exc.code, str(exc)) from None


async def _reference(image: bytes | None, avatar, max_pixels: int) -> tuple:
    from model.media import MediaError, load_image

    if image is not None and avatar:
        raise ApiError(422, "invalid_request", "give either an image upload or an avatar name, not both")
    if image is not None:
        try:  # decoding a large image is CPU work: off the event loop
            return await asyncio.to_thread(load_image, image, max_pixels=max_pixels, max_bytes=len(image) + 1), None
        except MediaError as exc:
            raise errors.media_error(exc) from None
    if avatar:
        if not isinstance(avatar, str):
            raise ApiError(422, "invalid_request", "avatar must be a name")
        try:
            return avatars.avatar_image(avatar), avatar
        except KeyError:
            raise ApiError(404, "avatar_not_found",
                           f"no bundled avatar {avatar!r}; available: {', '.join(avatars.list_avatars()) or 'none'}"
                           ) from None
    raise ApiError(422, "reference_required", "send a portrait as `image` (multipart upload) or an `avatar` name")


def _knob_value(v: float):
    return int(v) if float(v).is_integer() else v
