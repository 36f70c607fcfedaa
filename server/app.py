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

from server import bodies, errors, spec
from server.auth import ApiKeys
from server.bodies import PCM_TYPES, CreateOptions, Offer, SpeakRequest
from server.errors import ApiError, refusals
from server.manager import SessionManager
from server.metrics import Metrics
from server.records import SessionStore
from server.settings import Settings
from server.store import open_store
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
    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="knotstream", version="0.1.0", lifespan=_lifespan(settings, api_keys, engine, store),
                  description="Streaming real-time avatar animation: sessions API and WebRTC signalling.", **docs)
    app.state.settings = settings
    app.state.api_keys = api_keys
    errors.install(app)
    _add_middleware(app, settings, api_keys)

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
        Returns 201 {id, token, answer, ice_servers, video, model, notices} and `Location:
        /v1/sessions/{id}`; `notices` ([{code, message}], server/notices.py) says what to expect,
        e.g. from a photo on a model trained on cartoon heads. Needs an API key
        (`Authorization: Bearer <key>` or `X-API-Key`) unless auth is off."""
        key = api_keys.check(authorization, x_api_key)   # before the body is read
        m = manager(request)
        created = await m.open(await bodies.read_create_request(request, settings), owner=key)
        return JSONResponse(created, status_code=201, headers={"Location": created["location"],
                                                               **ice_link_header(created["ice_servers"])})

    @app.post("/v1/sessions/{session_id}/offer", summary="Send the SDP offer (offer-later)",
              openapi_extra=spec.offer_body(Offer))
    async def offer(session_id: str, request: Request, authorization: str | None = Header(None)):
        """Body: `application/sdp` (answer comes back as `application/sdp`, 201, as WHIP) or
        JSON {"sdp", "type": "offer"} (answer as JSON {"answer": {...}})."""
        m = manager(request)
        session = await m.authorize(session_id, authorization)
        raw = await bodies.read_body(request, 200_000, "offer")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/sdp":
            answer = await m.answer(session, bodies.checked_offer(raw.decode("utf-8", errors="replace")))
            return Response(answer, status_code=201, media_type="application/sdp",
                            headers={"Location": f"/v1/sessions/{session_id}",
                                     **ice_link_header(session.options.ice_for_client)})
        answer = await m.answer(session, bodies.checked_offer(bodies.offer_json(raw)))
        return {"answer": {"type": "answer", "sdp": answer}}

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
        return {"segment": seg.id, "seconds": round((seg.end - seg.start) / session.sample_rate, 3)}  # one push: no gaps

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

    # Bundled and personal avatars, their portraits, fit jobs (server/avatar_routes.py).
    from server import avatar_routes
    avatar_routes.install(app)

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


def _lifespan(settings: Settings, api_keys: ApiKeys, engine, store: SessionStore | None):
    """Startup and shutdown: the engine (loaded here unless given), the generation worker,
    metrics, the store and the session manager on `app.state`; shutdown closes every session,
    stops the worker and closes a store it opened."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from server.fitjobs import FitJobs
        from server.personal import PersonalAvatars, load_configured
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
        app.state.loop = asyncio.get_running_loop()
        app.state.engine = eng
        app.state.worker = worker
        app.state.metrics = metrics = Metrics(lambda: list(app.state.manager.sessions.values()))
        app.state.store = the_store = store or open_store(settings)
        app.state.personal = personal = PersonalAvatars(eng, settings.max_lead_frames, settings.device,
                                                        settings.torch_dtype())
        await asyncio.to_thread(load_configured, personal, settings.avatars, settings.avatar_dir.expanduser())
        app.state.fitjobs = fitjobs = FitJobs(settings, personal) if settings.fit_jobs else None
        manager = SessionManager(settings, eng, worker, the_store, metrics,
                                 tts=Synthesizer(settings.tts_concurrency) if available_engine() else None,
                                 personal=personal)
        try:
            await manager.start()
        except Exception:
            await asyncio.to_thread(worker.stop)
            raise
        app.state.manager = manager
        api_keys.log_mode()
        log.info("knotstream ready: model %s (%dx%d, %d fps, trained on %s) on %s in %s%s", eng.config.name,
                 eng.config.width, eng.config.height, eng.config.fps, eng.config.domain, eng.device,
                 eng.precision, "" if eng.trained else " UNTRAINED")
        try:
            yield
        finally:
            if fitjobs is not None:
                await fitjobs.close()
            await manager.shutdown()
            await asyncio.to_thread(worker.stop)
            if store is None:
                await the_store.close()

    return lifespan


def _add_middleware(app: FastAPI, settings: Settings, api_keys: ApiKeys) -> None:
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
