"""Session manager: owns every live session of this process, keyed by id.

`open` turns a create request the route has read and checked into a session: the
client's knobs under the server's policy, the owner's quota, the portrait, the gateway
options (codec, encoder probed, ICE), the notices for the client (server/notices.py) and
the answer to its offer. Creating a session starts an engine stream on the generation worker (reference
encoding is model work, so it never runs on the event loop) once the store has admitted
it to this worker (a slot reserved atomically: never more than `max_sessions`), and hands
back a bearer token (only its hash is kept). A background task registers this process as
a worker and heartbeats it with the records of its sessions, so with Redis a dead
worker's entries expire; each heartbeat also sweeps the store for dead workers (their
sessions become `failed`: 410 session_failed). With Redis, another worker's session is
reached through server/routing.py (proxy, or its driving stream for pushed input).

`drain` (SIGTERM, server/serve.py) stops new sessions here (503 draining, capacity 0 in the
registry so no node places sessions here), gives running sessions up to the drain timeout
to end, then closes the rest ("server shutting down"); shutdown unregisters the worker.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from dataclasses import replace

import numpy as np

from model.config import StreamKnobs, motion_fields_read
from server import auth, bodies
from server.bodies import CreateOptions, CreateRequest
from server.errors import ApiError
from server.knobs import KnobPolicy
from server.metrics import Metrics
from server.notices import session_notices
from server.records import SessionRecord, SessionStore, StoreUnavailable, WorkerInfo, worker_name
from server.settings import Settings
from server.store_redis import RedisStore
from streaming.channel import RateLimit, SessionLimits
from streaming.codecs import default_codec
from streaming.encode import EncoderError, choose_video_encoder, default_bitrate
from streaming.session import LiveSession, OfferError, SessionOptions
from streaming.worker import GenerationWorker

log = logging.getLogger("knotstream.manager")

# Each shutdown step (closing the sessions, finishing background store writes) gets this
# long; one that hangs (a peer connection that never closes, say) is logged and left
# behind so the server still unregisters and exits.
SHUTDOWN_STEP_S = 10.0


async def _within(what: str, coros: list, timeout_s: float | None = None) -> None:
    """Run `coros` (coroutines or tasks) concurrently for up to `timeout_s` (default
    SHUTDOWN_STEP_S); cancel and log what is still running then."""
    timeout_s = SHUTDOWN_STEP_S if timeout_s is None else timeout_s
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            log.warning("shutdown: %s failed: %r", what, t.exception())
    if pending:
        log.error("shutdown: %d of %d %s still running after %.0f s; cancelled",
                  len(pending), len(tasks), what, timeout_s)
        for t in pending:
            t.cancel()


class SessionManager:
    def __init__(self, settings: Settings, engine, worker: GenerationWorker, store: SessionStore,
                 metrics: Metrics, tts=None, personal=None):
        self.settings = settings
        self.engine = engine
        self.personal = personal   # server/personal.py PersonalAvatars: avatars with their own models
        self.knobs = KnobPolicy(engine.config, settings.max_lead_frames)   # what clients may set on it
        self.worker = worker
        self.store = store
        self.metrics = metrics
        self.tts = tts
        self.sessions: dict[str, LiveSession] = {}
        self.records: dict[str, SessionRecord] = {}   # this worker's sessions, starting ones included
        self.limits: dict[str, SessionLimits] = {}     # per-session request and interrupt rates
        self.owners: dict[str, str | None] = {}        # session id -> API key digest that created it
        s = settings
        host = socket.gethostname() if s.host in ("0.0.0.0", "::", "") else s.host   # a wildcard bind
        self.info = WorkerInfo(id=s.worker_id or worker_name(), capacity=s.max_sessions,
                               address=s.public_url or f"http://{host}:{s.port}")
        self._heartbeat_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.draining = False
        self._remote_limits: dict[str, SessionLimits] = {}   # of sessions forwarded from here
        self.forwarder = self.consumer = None
        if isinstance(store, RedisStore):   # several workers: driving input crosses them on Redis Streams
            from server.routing import DriveConsumer, Forwarder
            self.forwarder = Forwarder(store)
            self.consumer = DriveConsumer(store, self.info.id, self.sessions)

    # ----- worker registration ------------------------------------------------------------

    async def start(self) -> None:
        """Register this worker in the store and start heartbeating it. A store that cannot be
        reached yet (Redis still starting) is not fatal: the heartbeats register the worker
        once it answers, and creates answer 503 store_unavailable until then."""
        try:
            await self.store.register_worker(self.info)
        except StoreUnavailable as exc:
            log.warning("worker %s not registered yet, will retry with each heartbeat: %s", self.info.id, exc)
        period = self.settings.heartbeat_s or self.settings.store_ttl_s / 3
        self._heartbeat_task = asyncio.create_task(self._heartbeats(period), name="knotstream-heartbeat")
        if self.consumer is not None:
            self.consumer.start()
        log.info("worker %s registered (%s, capacity %d, %s store)", self.info.id, self.info.address,
                 self.info.capacity, type(self.store).__name__)

    async def _heartbeats(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await self.store.heartbeat(self.info, list(self.records.values()))
                for wid, n in await self.store.sweep():
                    log.warning("worker %s stopped heartbeating: %d of its sessions marked failed", wid, n)
            except Exception as exc:  # the store is down: keep serving, try again next period
                log.warning("heartbeat of worker %s failed: %s", self.info.id, exc)

    async def address_of(self, worker_id: str) -> str | None:
        return next((w.address for w in await self.store.workers() if w.id == worker_id), None)

    # ----- sessions -----------------------------------------------------------------------

    def _new_limits(self) -> SessionLimits:
        s = self.settings
        return SessionLimits(RateLimit(s.audio_rate_per_s, s.audio_burst),
                             RateLimit(s.interrupt_rate_per_s, s.interrupt_burst))

    def check_quota(self, owner: str | None) -> None:
        """429 quota_exceeded when `owner` (an API key's digest; None: no key) already holds
        `max_sessions_per_key` sessions on this worker (starting ones included)."""
        quota = self.settings.max_sessions_per_key
        if quota is None:
            return
        held = sum(1 for sid in self.records if self.owners.get(sid, "") == owner)
        if held >= quota:
            raise ApiError(429, "quota_exceeded", f"this API key already holds {held} sessions here, its quota "
                                                  f"is {quota}; end one first",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    async def open(self, request: CreateRequest, owner: str | None) -> dict:
        """A session for a checked create request, and the body of its 201: the client's knobs
        under this server's policy (before anything is allocated for it), the owner's quota,
        the portrait, the gateway options (video encoder probed), the engine stream, and the
        answer when the request carried an offer."""
        personal = self._personal_avatar(request)
        engine, policy = (personal.engine, personal.knobs) if personal else (self.engine, self.knobs)
        knobs = policy.stream_knobs(request.options.knobs)
        lead_frames = policy.lead_frames(request.options.lead_frames) or self.settings.lead_frames
        self.check_quota(owner)
        if personal:
            reference, avatar = personal.portrait, personal.name
        else:
            reference, avatar = await bodies.reference(request.image, request.avatar, self.settings.max_image_pixels)
        options = await self._gateway_options(request.options, lead_frames)
        session, token = await self.create(reference, knobs, request.options.seed, options, avatar, owner=owner,
                                           engine=engine)
        answer = None
        if request.offer is not None:
            answer = await self.answer(session, request.offer, close_on_error=True)
        cfg = engine.config
        return {"id": session.id, "token": token, "location": f"/v1/sessions/{session.id}",
                "answer": {"type": "answer", "sdp": answer} if answer else None,
                "ice_servers": session.options.ice_for_client,
                "video": {"width": cfg.width, "height": cfg.height, "fps": cfg.fps, "codec": options.codec},
                "model": {"name": cfg.name, "trained": engine.trained, "domain": cfg.domain,
                          "motion_fields": list(motion_fields_read(cfg))},
                "notices": session_notices(cfg, uploaded=avatar is None)}

    def _personal_avatar(self, request: CreateRequest):
        """The personal avatar a request names (no upload with it), or None."""
        if self.personal is None or request.image is not None or not isinstance(request.avatar, str):
            return None
        return self.personal.get(request.avatar)

    async def _gateway_options(self, options: CreateOptions, lead_frames: int | None) -> SessionOptions:
        """The gateway options of a new session. The video encoder is probed once per frame size
        (off the loop); an explicit choice that cannot work here is a 422. The server's peer
        connection only ever uses the server's own ICE servers; ICE servers a client names are
        handed back to that client only (`create` adds the session's TURN credentials)."""
        s, cfg = self.settings, self.engine.config
        encoder = options.encoder or s.encoder
        codec = options.codec or default_codec(encoder, s.codec)
        try:
            await asyncio.to_thread(choose_video_encoder, codec, encoder, (cfg.width, cfg.height))
        except EncoderError as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        client_ice = ([x.model_dump(exclude_none=True) for x in options.ice_servers]
                      if options.ice_servers is not None else None)
        return SessionOptions(codec=codec, lead_frames=lead_frames, prebuffer_timeout_s=s.prebuffer_timeout_s,
                              max_speech_seconds=s.max_speech_seconds, disconnect_grace_s=s.disconnect_grace_s,
                              ice_servers=s.ice_dicts(), client_ice_servers=client_ice,
                              ice_connect_timeout_s=s.ice_connect_timeout_s, max_ice_candidates=s.max_ice_candidates,
                              max_open_segments=s.max_open_segments, echo_mic=options.echo_mic, encoder=encoder,
                              bitrate=options.bitrate or s.video_bitrate
                              or default_bitrate(cfg.width, cfg.height, cfg.fps))

    async def answer(self, session: LiveSession, sdp: str, close_on_error: bool = False) -> str:
        """The session's SDP answer to the client's offer. A refusal is 400 with the offer's code
        (409 offer_exists, 410 session_closed); `close_on_error`: the session was made for this
        offer, and is closed with it."""
        try:
            return await session.answer(sdp)
        except OfferError as exc:
            if close_on_error:
                await session.close(f"offer refused: {exc.code}")
            status = {"offer_exists": 409, "session_closed": 410}.get(exc.code, 400)
            raise ApiError(status, exc.code, str(exc)) from None

    async def create(self, reference: np.ndarray, knobs: StreamKnobs, seed: int, options: SessionOptions,
                     avatar: str | None = None, owner: str | None = None, engine=None) -> tuple[LiveSession, str]:
        """engine: the model the session streams (a personal avatar's; default the server's)."""
        engine = engine or self.engine
        if self.draining:
            raise ApiError(503, "draining", "this server is shutting down; try another or again later",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.check_quota(owner)   # and the slot taken below before any await: no race past the quota
        session_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        record = SessionRecord(session_id, auth.digest(token), worker=self.info.id, state="starting", avatar=avatar)
        self.records[session_id] = record    # before admit: a heartbeat meanwhile keeps the slot
        self.owners[session_id] = owner
        try:
            admitted = await self.store.admit(record, worker=self.info.id)
            if admitted is None and not any(w.id == self.info.id for w in await self.store.workers()):
                # Our entry lapsed (a stall longer than the TTL, a restarted Redis): register
                # again with the sessions we hold, then ask once more.
                log.warning("worker %s was missing from the store; registering it again", self.info.id)
                await self.store.heartbeat(self.info, [r for r in self.records.values() if r.id != session_id])
                admitted = await self.store.admit(record, worker=self.info.id)
        except StoreUnavailable as exc:
            self._forget(session_id)
            raise ApiError(503, "store_unavailable", str(exc),
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except BaseException:
            self._forget(session_id)
            raise
        if admitted is None:
            self._forget(session_id)
            raise ApiError(503, "too_many_sessions",
                           f"this server runs at most {self.settings.max_sessions} sessions; try again later",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        try:
            fut = self.worker.call(engine.start, reference, knobs, seed)
            stream = await asyncio.wrap_future(fut)
        except BaseException:
            self._forget(session_id)
            self._spawn(self._release(session_id))
            raise
        cfg = engine.config
        placeholder = stream.reference_image
        options = replace(options, ice_servers=self._ice_servers(options.ice_servers, session_id))
        limits = self._new_limits()
        session = LiveSession(session_id, self.worker, stream, cfg.fps, cfg.driving.sample_rate, placeholder,
                              options, tts=self.tts, on_latency=self._latency, on_chunk=self.metrics.chunk,
                              limits=limits)
        self.sessions[session_id] = session
        self.limits[session_id] = limits
        self.records[session_id] = record = record.with_state("new")
        session.on_close(self._closed)
        self._spawn(self._put(record))
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.offer_timeout_s, self._offer_timeout, session)
        if self.settings.max_session_s is not None:
            loop.call_later(self.settings.max_session_s, self._end_session, session,
                            f"maximum session duration ({self.settings.max_session_s:g} s) reached")
        log.info("session %s created (%d live)", session_id, len(self.sessions))
        return session, token

    def _forget(self, session_id: str) -> None:
        self.records.pop(session_id, None)
        self.owners.pop(session_id, None)

    def _ice_servers(self, servers: list[dict], session_id: str) -> list[dict]:
        """The server's ICE servers for one session: its configured ones plus, with a TURN
        secret, the TURN URLs with credentials minted for this session alone."""
        s = self.settings
        if not (s.turn_secret and s.turn_urls):
            return servers
        from server.turn import mint
        return [*servers, mint(s.turn_secret, s.turn_urls, session_id, s.turn_ttl_s)]

    def _end_session(self, session: LiveSession, reason: str) -> None:
        if session.state != "closed":
            asyncio.ensure_future(session.close(reason))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put(self, record: SessionRecord) -> None:
        try:
            await self.store.put(record)
        except StoreUnavailable as exc:  # the next heartbeat writes it
            log.warning("session %s: store update failed: %s", record.id, exc)

    async def _release(self, session_id: str) -> None:
        try:
            await self.store.release(session_id, worker=self.info.id)
        except StoreUnavailable as exc:  # its slot frees when the record expires
            log.warning("session %s: store release failed: %s", session_id, exc)

    def _latency(self, seconds: float, kind: str) -> None:
        self.metrics.latency.labels(kind=kind).observe(seconds)

    def _offer_timeout(self, session: LiveSession) -> None:
        if session.pc is None:
            self._end_session(session, "no offer received")

    def _closed(self, session: LiveSession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self._forget(session.id)
            self.limits.pop(session.id, None)
            self.metrics.session_closed(session.status())
            if session.error:
                self.metrics.errors.inc()
            self._spawn(self._release(session.id))
            log.info("session %s closed: %s (%d live)", session.id, session.close_reason, len(self.sessions))

    async def authorize(self, session_id: str, authorization: str | None, remote_ok: bool = False):
        """The live session for a bearer token. 401 without a token (before any lookup); the
        same 404 for an unknown id, a malformed id and a token of another session; 410
        session_failed when its worker died. A session on another worker: with `remote_ok`
        (driving routes, Redis store) a RemoteSession that forwards through the owner's stream;
        else 421 naming the owner (routes the router did not proxy: the WebSocket)."""
        token = auth.session_token(authorization)
        if not auth.SESSION_ID.fullmatch(session_id):
            auth.token_matches(token, None)
            raise auth.not_found(session_id)
        session = self.sessions.get(session_id)
        # The store is asked even for a session of ours, so a local session, an unknown id and
        # another worker's session take the same path (no timing difference to measure).
        try:
            stored = await self.store.get(session_id)
        except StoreUnavailable as exc:
            if session is None:
                raise ApiError(503, "store_unavailable", str(exc),
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None
            stored = None
        record = self.records.get(session_id) if session is not None else stored
        if not auth.token_matches(token, record.token_hash if record else None):
            raise auth.not_found(session_id)
        if session is None:
            if record.state == "failed":
                raise ApiError(410, "session_failed", f"session {session_id} failed: {record.reason or 'unknown'}")
            if record.worker == self.info.id:   # admitted here, still starting or just closed
                raise auth.not_found(session_id)
            if remote_ok and self.forwarder is not None:
                from server.routing import RemoteSession
                return RemoteSession(record, self.engine.config.driving.sample_rate, self.forwarder, self.tts)
            # Where it runs stays internal (worker ids and addresses are the cluster's business).
            raise ApiError(421, "session_on_other_worker",
                           f"session {session_id} runs on another worker; this route is not forwarded: send it "
                           f"through a load balancer that keeps a session on one worker, or over the data channel")
        return session

    def check_rate(self, session_id: str, kind: str = "requests") -> None:
        """Spend one of the session's `requests` (audio/speak) or `interrupts`: 429 rate_limited
        with Retry-After when none is left. The same budget the data channel and the WebSocket
        spend (LiveSession.spend); a session of another worker has one kept here."""
        limits = self.limits.get(session_id)
        if limits is None and session_id not in self.sessions:   # a session forwarded from here
            if len(self._remote_limits) > 10_000:
                self._remote_limits.clear()
            limits = self._remote_limits.setdefault(session_id, self._new_limits())
        limit = getattr(limits, kind) if limits is not None else None
        wait = limit.take() if limit is not None else 0.0
        if wait > 0:
            what = "interrupts" if kind == "interrupts" else "audio/speak requests"
            raise ApiError(429, "rate_limited",
                           f"more than {limit.rate:g} {what} per second on this session "
                           f"(burst {limit.burst:g}); retry in {wait:.2f} s",
                           headers={"Retry-After": str(limit.retry_after(wait))})

    async def close(self, session_id: str, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            await session.close(reason)

    async def drain(self, timeout_s: float) -> None:
        """Stop taking sessions, wait up to `timeout_s` for running ones to end, close the rest."""
        if self.draining:
            return
        self.draining = True
        self.info = replace(self.info, capacity=0)     # no node places sessions here any more
        log.info("worker %s draining: %d session(s), up to %.0f s", self.info.id, len(self.sessions), timeout_s)
        try:
            await self.store.heartbeat(self.info, list(self.records.values()))
        except StoreUnavailable as exc:
            log.warning("worker %s: could not mark itself draining in the store: %s", self.info.id, exc)
        deadline = time.monotonic() + timeout_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        await self._close_all()

    async def _close_all(self) -> None:
        await _within("session closes", [s.close("server shutting down") for s in list(self.sessions.values())])

    async def shutdown(self) -> None:
        self.draining = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        await self._close_all()
        for part in (self.consumer, self.forwarder):
            if part is not None:
                await part.aclose()
        await _within("background store writes", list(self._background))
        try:
            await self.store.unregister_worker(self.info.id)
        except StoreUnavailable as exc:
            log.warning("worker %s: unregister failed (its entry expires): %s", self.info.id, exc)
