"""FastAPI app: sessions API, WebRTC signalling (client offers, as WHIP), health, metrics,
and the web demo from `<repo>/web` at `/`. Routes validate and delegate to the session
manager; errors are JSON with stable codes (server/errors.py). Creating a session needs
an API key unless auth is off (server/auth.py); browsers of other origins are allowed
only when listed in `cors_origins`. With `redis_url` set, sessions are admitted through
the shared Redis registry (server/store_redis.py).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from server import avatars, bodies, errors, spec
from server.auth import ApiKeys
from server.bodies import PCM_TYPES, CreateOptions, Offer, SpeakRequest
from server.errors import ApiError, refusals
from server.manager import SessionManager
from server.metrics import Metrics
from server.settings import Settings
from server.store import SessionStore, open_store
from streaming.encode import EncoderError, choose_video_encoder
from streaming.session import OfferError, SessionOptions
from streaming.tts import check_text

log = logging.getLogger("knotstream.server")

def create_app(settings: Settings | None = None, engine=None, store: SessionStore | None = None) -> FastAPI:
    """The app. `engine` may be passed in (tests share one); otherwise `settings.model` loads at
    startup. `store` likewise (default: `open_store(settings)`: Redis when `redis_url` is set).
    Raises ValueError for an auth configuration that would leave a public server open."""
    settings = settings or Settings()
    api_keys = ApiKeys(settings)
    if settings.redis_url and not settings.cluster_secret:
        raise ValueError("several workers (redis_url) need KNOTSTREAM_CLUSTER_SECRET (16+ characters, the same on "
                         "every worker): it signs the requests they forward to each other")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from streaming.tts import Synthesizer, available_engine
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
                                 tts=Synthesizer(settings.tts_concurrency) if available_engine() else None)
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

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="knotstream", version="0.1.0", lifespan=lifespan, **docs,
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
    if not api_keys.required:   # no keys: only this machine's names, never a rebound one
        from server.guard import HostGuard, allowed_hosts
        app.add_middleware(HostGuard, hosts=allowed_hosts(settings), origins=settings.cors_origins)

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
        key = api_keys.check(authorization, x_api_key)   # before the body is read
        m = manager(request)
        image_bytes, fields = await bodies.read_create(request, settings)
        options = bodies.parse_options(fields.get("options"))
        knobs = m.knobs.stream_knobs(options.knobs)          # before anything is allocated for it
        lead_frames = m.knobs.lead_frames(options.lead_frames) or settings.lead_frames
        offer_sdp = bodies.parse_offer_field(fields.get("offer"))
        if offer_sdp is not None:
            bodies.checked_offer(offer_sdp)
        m.check_quota(key)
        reference, avatar = await bodies.reference(image_bytes, fields.get("avatar"), settings.max_image_pixels)
        sopts = await _session_options(settings, options, lead_frames, (m.engine.config.width,
                                                                         m.engine.config.height))
        session, token = await m.create(reference, knobs, options.seed, sopts, avatar, owner=key)
        answer = None
        if offer_sdp is not None:
            answer = await _answer(session, offer_sdp, close_on_error=True)
        cfg = m.engine.config
        location = f"/v1/sessions/{session.id}"
        ice = session.options.ice_for_client
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
        raw = await bodies.read_body(request, 200_000, "offer")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/sdp":
            sdp = bodies.checked_offer(raw.decode("utf-8", errors="replace"))
            answer = await _answer(session, sdp)
            return Response(answer, status_code=201, media_type="application/sdp",
                            headers={"Location": f"/v1/sessions/{session_id}",
                                     **ice_link_header(session.options.ice_for_client)})
        sdp = bodies.checked_offer(bodies.offer_json(raw))
        return {"answer": {"type": "answer", "sdp": await _answer(session, sdp)}}

    @app.post("/v1/sessions/{session_id}/audio", status_code=202, summary="Push speech audio",
              openapi_extra=spec.AUDIO)
    async def push_audio(session_id: str, request: Request, rate: int = 16000,
                         segment: str | None = Query(None, min_length=1, max_length=128),
                         end: bool = True, authorization: str | None = Header(None)):
        """Body: a wav/ogg/mp3/flac file, or raw PCM16 little-endian mono (`Content-Type:
        audio/pcm`, `audio/L16` or `application/octet-stream`) at `rate` Hz (8000, 11025, 12000,
        16000, 22050, 24000, 32000, 44100 or 48000). Audio of one `segment` id plays in order;
        `end=false` keeps the segment open for more chunks."""
        m = manager(request)
        session = await m.authorize(session_id, authorization, remote_ok=True)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in PCM_TYPES:
            bodies.check_pcm_rate(rate)
        m.check_rate(session_id)
        raw = await bodies.read_body(request, settings.max_audio_bytes, "audio")
        with refusals():
            if ctype in PCM_TYPES:
                samples = bodies.pcm_samples(raw, rate, settings.max_speech_seconds)
                seg = await session.push_pcm(samples, rate, segment, end)
            else:
                samples = await bodies.decode_audio(raw, session.sample_rate, settings.max_speech_seconds)
                rate = session.sample_rate
                seg = session.push_audio(samples, segment, end)
        return {"segment": seg.id, "seconds": round(len(samples) / rate, 3)}

    @app.post("/v1/sessions/{session_id}/speak", status_code=202, summary="Speak text (offline TTS)")
    async def speak(session_id: str, body: SpeakRequest, request: Request,
                    authorization: str | None = Header(None)):
        m = manager(request)
        session = await m.authorize(session_id, authorization, remote_ok=True)
        m.check_rate(session_id)
        with refusals():
            seg = await session.speak(check_text(body.text))
        return {"segment": seg.id, "seconds": round((seg.end - seg.start) / session.sample_rate, 3)}

    @app.post("/v1/sessions/{session_id}/interrupt", summary="Barge-in: drop queued speech")
    async def interrupt(session_id: str, request: Request, authorization: str | None = Header(None)):
        m = manager(request)
        session = await m.authorize(session_id, authorization, remote_ok=True)
        m.check_rate(session_id, "interrupts")
        with refusals():
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
    async def metrics(request: Request, authorization: str | None = Header(None)):
        from prometheus_client import CONTENT_TYPE_LATEST

        if settings.metrics_key is not None:
            api_keys.check_metrics(authorization, settings.metrics_key)
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

async def _answer(session, sdp: str, close_on_error: bool = False) -> str:
    try:
        return await session.answer(sdp)
    except OfferError as exc:
        if close_on_error:
            await session.close(f"offer refused: {exc.code}")
        status = {"offer_exists": 409, "session_closed": 410}.get(exc.code, 400)
        raise ApiError(status, exc.code, str(exc)) from None


async def _session_options(settings: Settings, options: CreateOptions, lead_frames: int | None,
                           size: tuple[int, int]) -> SessionOptions:
    """The gateway options of a new session. The server's peer connection only ever uses the
    server's own ICE servers; ICE servers a client names are handed back to that client only
    (the manager adds the session's TURN credentials to the server's list)."""
    encoder = options.encoder or settings.encoder
    codec = options.codec or ("h264" if encoder in ("nvenc", "x264") else settings.codec)
    try:  # probes an encoder once per size (off the loop); explicit choices that cannot work: 422
        await asyncio.to_thread(choose_video_encoder, codec, encoder, size)
    except EncoderError as exc:
        raise ApiError(422, exc.code, str(exc)) from None
    client_ice = ([x.model_dump(exclude_none=True) for x in options.ice_servers]
                  if options.ice_servers is not None else None)
    return SessionOptions(codec=codec, lead_frames=lead_frames,
                          prebuffer_timeout_s=settings.prebuffer_timeout_s,
                          max_speech_seconds=settings.max_speech_seconds,
                          disconnect_grace_s=settings.disconnect_grace_s,
                          ice_servers=settings.ice_dicts(), client_ice_servers=client_ice,
                          ice_connect_timeout_s=settings.ice_connect_timeout_s,
                          max_ice_candidates=settings.max_ice_candidates,
                          max_open_segments=settings.max_open_segments,
                          echo_mic=options.echo_mic, encoder=encoder,
                          bitrate=options.bitrate or settings.video_bitrate)
