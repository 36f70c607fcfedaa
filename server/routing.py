"""Routing between workers (Redis store): any node takes any request.

Live objects (peer connection, stream) live in the process that owns the session, so a
request for a session of another worker must end up there. Three paths:

- **Placement** (`POST /v1/sessions`): a node with a free slot admits the session itself;
  a full (or draining) node proxies the whole request to the registered worker with the
  most free slots, which admits it atomically in the store (a race lost there is its 503).
- **Per-session routes** of another worker's session (GET, DELETE, offer, trickle PATCH,
  events): proxied to the owner once the token has been checked against the stored record
  (a wrong token never leaves the node, so it answers the same 404 as anywhere).
- **Driving input** (`/audio`, `/speak`, `/interrupt`): decoded and validated by the node
  that received it and appended to the owner's Redis stream `drive:<worker id>` (ordered,
  bounded by MAXLEN, consumed by the owner through a consumer group and acknowledged);
  the owner pushes it into the LiveSession. The answer (202) means "queued for the owner".

Proxying rather than answering 307 keeps clients simple: browsers and httpx drop the
`Authorization` header on a redirect to another origin, which would turn every redirected
session route into a 401. A proxied request carries `X-Knotstream-Forwarded: <worker id>;
<unix time>;<HMAC-SHA256 of the cluster secret over worker, time, method and target>` and is
never forwarded again (no loops); a header that does not verify (no secret, forged, older
than FORWARD_MAX_AGE_S) is 403 `forwarded_refused`. The WebSocket route is not proxied; its
refusal does not say where the session runs.

The proxy speaks HTTP/1.1 with h11 (uvicorn's own dependency), one connection per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import ssl
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np

from server import auth
from server.errors import ApiError, error_body
from server.records import SessionRecord, StoreUnavailable
from server.store_redis import RedisStore

log = logging.getLogger("knotstream.routing")

FORWARDED = "x-knotstream-forwarded"
SESSION_PATH = re.compile(r"/v1/sessions/([^/]+)(/[a-z/]*)?")
DRIVING = {"/audio", "/speak", "/interrupt"}           # POST suffixes that go through the stream
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}
ANSWER_TIMEOUT_S = 300.0     # longest wait for a proxied answer to start (a create on a busy worker)
STREAM_MAXLEN = 1000          # entries per worker stream (approximate trim); consumed entries are deleted
GROUP = "owner"
FORWARD_MAX_AGE_S = 60.0      # a signed forwarded header older than this is refused (replays)


def forward_signature(secret: str, worker_id: str, stamp: str, method: str, target: str) -> str:
    msg = "\n".join((worker_id, stamp, method, target)).encode("utf-8", "surrogateescape")
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def forwarded_header(secret: str, worker_id: str, method: str, target: str, now: float | None = None) -> str:
    stamp = str(int(time.time() if now is None else now))
    return f"{worker_id};{stamp};{forward_signature(secret, worker_id, stamp, method, target)}"


def forwarded_ok(secret: str | None, value: str, method: str, target: str, now: float | None = None) -> bool:
    """True when `value` was signed with `secret` for this method and target, recently."""
    parts = value.rsplit(";", 2)
    if secret is None or len(parts) != 3 or not parts[1].isdigit():
        return False
    worker_id, stamp, signature = parts
    if abs((time.time() if now is None else now) - int(stamp)) > FORWARD_MAX_AGE_S:
        return False
    return hmac.compare_digest(signature, forward_signature(secret, worker_id, stamp, method, target))


def _target_of(scope) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    return scope["path"] + (f"?{query}" if query else "")


# ----- placement and per-session proxying (ASGI middleware) ---------------------------

class ClusterRouter:
    """ASGI middleware; finds the manager and store on `app.state` per request, so it is a
    no-op until the app has started and with one worker (nothing is ever elsewhere)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        manager = getattr(scope["app"].state, "manager", None) if "app" in scope else None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if FORWARDED in headers:
            secret = scope["app"].state.settings.cluster_secret if "app" in scope else None
            if not forwarded_ok(secret, headers[FORWARDED], scope["method"], _target_of(scope)):
                return await _error(send, 403, "forwarded_refused",
                                    "X-Knotstream-Forwarded is for requests between this cluster's workers")
            return await self.app(scope, receive, send)
        if manager is None:
            return await self.app(scope, receive, send)
        target = None
        try:
            target = await self._target(manager, scope, headers)
        except StoreUnavailable:
            pass   # the route itself answers (503 store_unavailable where it needs the store)
        if target is None:
            return await self.app(scope, receive, send)
        if not target:   # its worker's entry expired: soon swept (then 410), or back
            return await _unavailable(send, manager, "the worker of this session is not answering heartbeats")
        await proxy(scope, receive, send, target, manager)

    async def _target(self, manager, scope, headers) -> str | None:
        """The owner's address when this request must be proxied, else None (handled here);
        "" for a session whose worker is no longer registered."""
        path, method = scope["path"], scope["method"]
        if path == "/v1/sessions" and method == "POST":
            try:   # a request without a valid API key is refused here, never passed on
                scope["app"].state.api_keys.check(headers.get("authorization"), headers.get("x-api-key"))
            except ApiError:
                return None
            return await self._placement(manager)
        m = SESSION_PATH.fullmatch(path)
        if m is None or not auth.SESSION_ID.fullmatch(m.group(1)) or m.group(1) in manager.sessions:
            return None
        if method == "POST" and (m.group(2) or "") in DRIVING:
            return None   # the route forwards it through the owner's stream
        token = auth.bearer(headers.get("authorization"))
        if token is None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            token = (query.get("token") or [None])[0]
        if not token:
            return None
        record = await manager.store.get(m.group(1))
        if (record is None or record.worker == manager.info.id or record.state == "failed"
                or not auth.token_matches(token, record.token_hash)):
            return None   # the route answers (404, 410) exactly as for a session of this node
        return await manager.address_of(record.worker) or ""

    async def _placement(self, manager) -> str | None:
        workers = await manager.store.workers()
        me = next((w for w in workers if w.id == manager.info.id), None)
        if not manager.draining and (me is None or me.capacity - me.load > 0):
            return None   # room here (or our entry is being re-registered): admit locally
        others = [w for w in workers if w.id != manager.info.id and w.capacity - w.load > 0]
        if not others:
            return None   # the route answers 503 too_many_sessions / draining
        best = max(others, key=lambda w: (w.capacity - w.load, w.id))
        log.info("placing a new session on worker %s (%s)", best.id, best.address)
        return best.address


async def proxy(scope, receive, send, base_url: str, manager) -> None:
    """Send this request to `base_url` and stream its answer back (SSE included)."""
    import h11

    limit = manager.settings.max_upload_bytes + 1_000_000
    body = await _request_body(receive, limit)
    if body is None:   # the client went away
        return
    if len(body) > limit:
        return await _error(send, 413, "request_too_large", f"request is more than {limit} bytes")
    url = urlsplit(base_url)
    tls = url.scheme == "https"
    host, port = url.hostname or "127.0.0.1", url.port or (443 if tls else 80)
    target = url.path.rstrip("/") + _target_of(scope)
    headers = _forwarded_headers(scope, url.netloc, len(body), manager)
    conn = h11.Connection(our_role=h11.CLIENT)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context() if tls else None), 5.0)
    except (OSError, asyncio.TimeoutError) as exc:
        return await _unavailable(send, manager, f"worker at {base_url} is unreachable: {exc}")
    started = False
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        writer.write(conn.send(h11.Request(method=scope["method"], target=target, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                read = asyncio.ensure_future(reader.read(65536))
                done, _ = await asyncio.wait({read, watcher}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=None if started else ANSWER_TIMEOUT_S)
                if read not in done:      # our client went away (an SSE reader, say), or no answer
                    read.cancel()
                    if not started and watcher not in done:
                        return await _unavailable(send, manager, f"worker at {base_url} did not answer "
                                                                 f"within {ANSWER_TIMEOUT_S:.0f} s")
                    return
                conn.receive_data(read.result())
            elif isinstance(event, h11.Response):
                out = [(k, v) for k, v in event.headers   # uvicorn adds its own date and server
                       if k.decode("latin-1").lower() not in HOP_BY_HOP | {"date", "server"}]
                await send({"type": "http.response.start", "status": event.status_code, "headers": out})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
    except (OSError, h11.ProtocolError) as exc:
        if not started:
            return await _unavailable(send, manager, f"worker at {base_url} failed: {exc}")
        log.warning("proxied answer from %s cut short: %s", base_url, exc)
    finally:
        watcher.cancel()
        writer.close()


async def _request_body(receive, limit: int) -> bytes | None:
    """The request's body, read until it ends or passes `limit` bytes (then the caller refuses
    it); None when the client disconnected."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit or not message.get("more_body"):
            return bytes(body)


def _forwarded_headers(scope, netloc: str, length: int, manager) -> list[tuple[bytes, bytes]]:
    """The client's headers less the hop-by-hop ones, plus the owner's host, the signed
    forwarding header and the client's address."""
    headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]
    client = scope.get("client") or ("", 0)
    signed = forwarded_header(manager.settings.cluster_secret, manager.info.id, scope["method"], _target_of(scope))
    return headers + [(b"host", netloc.encode()), (b"content-length", str(length).encode()),
                      (b"connection", b"close"), (FORWARDED.encode(), signed.encode("latin-1")),
                      (b"x-forwarded-for", str(client[0]).encode())]


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _error(send, status: int, code: str, message: str, headers: list | None = None) -> None:
    import json

    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _unavailable(send, manager, message: str) -> None:
    # A dead worker is swept within a heartbeat TTL; then its sessions answer 410.
    await _error(send, 503, "worker_unavailable", message,
                 [(b"retry-after", str(manager.settings.retry_after_s).encode())])


# ----- driving input through Redis Streams --------------------------------------------

@dataclass
class ForwardedSegment:
    """What the routes read of a Segment (`id`, `start`, `end` in samples)."""
    id: str
    start: int
    end: int


class RemoteSession:
    """Another worker's session, as the driving routes see it: what they push is queued on
    the owner's stream. Only the methods those routes call."""

    def __init__(self, record: SessionRecord, sample_rate: int, forwarder: "Forwarder", tts=None):
        self.id = record.id
        self.record = record
        self.sample_rate = sample_rate
        self.forwarder = forwarder
        self.tts = tts

    def push_audio(self, samples: np.ndarray, segment_id: str | None = None, end: bool = False,
                   rate: int | None = None) -> ForwardedSegment:
        """Queue speech for the owner (at `rate`, default the driving rate: the owner resamples)."""
        seg = segment_id or f"fwd-{secrets.token_hex(4)}"
        pcm = np.ascontiguousarray(samples, dtype=np.float32)
        self.forwarder.send(self.record.worker, {b"sid": self.id, b"kind": b"audio", b"seg": seg,
                                                 b"end": b"1" if end else b"0",
                                                 b"rate": str(rate or self.sample_rate), b"pcm": pcm.tobytes()})
        return ForwardedSegment(seg, 0, len(pcm) * self.sample_rate // (rate or self.sample_rate))

    async def push_pcm(self, samples: np.ndarray, rate: int, segment_id: str | None, end: bool) -> ForwardedSegment:
        from streaming.resample import check_rate

        return self.push_audio(samples, segment_id, end, check_rate(rate))

    async def speak(self, text: str) -> ForwardedSegment:
        """Synthesized here (same TTS as the owner), sent as audio."""
        if self.tts is None:
            from streaming.tts import TTSUnavailable
            raise TTSUnavailable("text-to-speech is not configured")
        samples = await self.tts(text, self.sample_rate)
        seg = self.push_audio(samples, end=True)
        await self.forwarder.flush()
        return seg

    def interrupt(self) -> dict:
        self.forwarder.send(self.record.worker, {b"sid": self.id, b"kind": b"interrupt"})
        # Which worker owns the session stays internal; the cut segments are known there only.
        return {"interrupted_segments": [], "muted_frames": 0, "coalesced": False, "forwarded": True}


class ForwardQueueFull(ValueError):
    code = "forward_queue_full"


class Forwarder:
    """Appends driving entries to owners' streams, one at a time in arrival order (so a
    segment's pieces reach the owner in the order they were pushed here)."""

    def __init__(self, store: RedisStore, maxsize: int = 256) -> None:
        self.store = store
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)
        self._task: asyncio.Task | None = None

    def send(self, worker_id: str, fields: dict) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        try:
            self.queue.put_nowait((worker_id, fields))
        except asyncio.QueueFull:
            raise ForwardQueueFull(f"more than {self.queue.maxsize} driving messages wait for the store") from None

    async def flush(self) -> None:
        await self.queue.join()

    async def _run(self) -> None:
        while True:
            worker_id, fields = await self.queue.get()
            try:
                await self.store.binary.xadd(f"{self.store.prefix}drive:{worker_id}", fields,
                                             maxlen=STREAM_MAXLEN, approximate=True)
            except Exception as exc:   # Redis down: this piece is lost (the client got 202)
                log.warning("driving input for worker %s not forwarded: %s", worker_id, exc)
            finally:
                self.queue.task_done()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class DriveConsumer:
    """The owner's side: reads `drive:<own id>` through the consumer group, pushes each entry
    into its LiveSession, acknowledges and deletes it. Survives Redis restarts (the group is
    created again) and outages (retries)."""

    def __init__(self, store: RedisStore, worker_id: str, sessions: dict, block_ms: int = 1000) -> None:
        self.store = store
        self.key = f"{store.prefix}drive:{worker_id}"
        self.worker_id = worker_id
        self.sessions = sessions
        self.block_ms = min(block_ms, int(store.timeout_s * 1000 / 2))
        self.applied = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="knotstream-drive-consumer")

    async def _group(self) -> None:
        from redis.exceptions import ResponseError
        try:
            await self.store.binary.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _run(self) -> None:
        from redis.exceptions import ResponseError

        need_group = True
        backoff = 0.2
        while True:
            try:
                if need_group:
                    await self._group()
                    need_group = False
                replies = await self.store.binary.xreadgroup(GROUP, self.worker_id, {self.key: ">"}, count=32,
                                                             block=self.block_ms)
                backoff = 0.2
                for _, entries in replies or []:
                    for entry_id, fields in entries:
                        await self._apply(fields)
                        await self.store.binary.xack(self.key, GROUP, entry_id)
                        await self.store.binary.xdel(self.key, entry_id)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:   # NOGROUP: Redis restarted empty, or the stream was swept
                log.warning("driving stream %s: %s; creating its group again", self.key, exc)
                need_group = True
                await asyncio.sleep(0.2)
            except Exception as exc:   # Redis down: retry, less often the longer it lasts
                log.warning("driving stream %s unreadable (retry in %.1f s): %s", self.key, backoff, exc)
                need_group = True
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def _apply(self, fields: dict) -> None:
        sid = fields.get(b"sid", b"").decode()
        session = self.sessions.get(sid)
        if session is None:
            return   # closed since: nothing to drive
        kind = fields.get(b"kind")
        try:
            if kind == b"audio":
                samples = np.frombuffer(fields[b"pcm"], dtype=np.float32)
                await session.push_pcm(samples, int(fields[b"rate"]), fields[b"seg"].decode(), fields[b"end"] == b"1")
            elif kind == b"interrupt":
                session.interrupt()
            self.applied += 1
        except (ValueError, KeyError) as exc:   # a full speech buffer, say: the owner cannot take it
            log.warning("session %s: forwarded %s refused: %s", sid, kind, exc)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
