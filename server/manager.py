"""Session manager: owns every live session of this process, keyed by id.

Creating a session starts an engine stream on the generation worker (reference
encoding is model work, so it never runs on the event loop), registers a record in the
store and hands back a bearer token (only its hash is kept). Shutdown closes every
session.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets

import numpy as np

from model.config import StreamKnobs
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from server.store import SessionRecord, SessionStore
from streaming.session import LiveSession, SessionOptions
from streaming.worker import GenerationWorker

log = logging.getLogger("knotstream.manager")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionManager:
    def __init__(self, settings: Settings, engine, worker: GenerationWorker, store: SessionStore,
                 metrics: Metrics, tts=None):
        self.settings = settings
        self.engine = engine
        self.worker = worker
        self.store = store
        self.metrics = metrics
        self.tts = tts
        self.sessions: dict[str, LiveSession] = {}
        self._creating = 0

    async def create(self, reference: np.ndarray, knobs: StreamKnobs, seed: int, options: SessionOptions,
                     avatar: str | None = None) -> tuple[LiveSession, str]:
        if len(self.sessions) + self._creating >= self.settings.max_sessions:
            raise ApiError(503, "too_many_sessions",
                           f"this server runs at most {self.settings.max_sessions} sessions; try again later",
                           headers={"Retry-After": "10"})
        self._creating += 1
        try:
            fut = self.worker.call(self.engine.start, reference, knobs, seed)
            stream = await asyncio.wrap_future(fut)
        finally:
            self._creating -= 1
        cfg = self.engine.config
        session_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        placeholder = getattr(stream, "reference_image", None)
        if placeholder is None:
            placeholder = np.zeros((cfg.height, cfg.width, 3), np.uint8)
        session = LiveSession(session_id, self.worker, stream, cfg.fps, cfg.driving.sample_rate, placeholder,
                              options, tts=self.tts, on_latency=self._latency, on_chunk=self.metrics.chunk)
        self.sessions[session_id] = session
        session.on_close(self._closed)
        await self.store.put(SessionRecord(session_id, _hash(token), avatar=avatar))
        asyncio.get_running_loop().call_later(self.settings.offer_timeout_s, self._offer_timeout, session)
        log.info("session %s created (%d live)", session_id, len(self.sessions))
        return session, token

    def _latency(self, seconds: float, kind: str) -> None:
        self.metrics.latency.labels(kind=kind).observe(seconds)

    def _offer_timeout(self, session: LiveSession) -> None:
        if session.pc is None and session.state != "closed":
            asyncio.ensure_future(session.close("no offer received"))

    def _closed(self, session: LiveSession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.metrics.session_closed(session.status())
            if session.error:
                self.metrics.errors.inc()
            asyncio.ensure_future(self.store.delete(session.id))
            log.info("session %s closed: %s (%d live)", session.id, session.close_reason, len(self.sessions))

    async def authorize(self, session_id: str, authorization: str | None) -> LiveSession:
        """The live session for a bearer token: 404 unknown, 401 no token, 403 wrong token."""
        record = await self.store.get(session_id)
        session = self.sessions.get(session_id)
        if record is None or session is None:
            raise ApiError(404, "session_not_found", f"no session {session_id!r}")
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "unauthorized", "this route needs 'Authorization: Bearer <session token>'",
                           headers={"WWW-Authenticate": "Bearer"})
        token = authorization[7:].strip()
        if not hmac.compare_digest(_hash(token), record.token_hash):
            raise ApiError(403, "forbidden", "the token does not belong to this session")
        return session

    async def close(self, session_id: str, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            await session.close(reason)

    async def shutdown(self) -> None:
        await asyncio.gather(*(s.close("server shutdown") for s in list(self.sessions.values())),
                             return_exceptions=True)
