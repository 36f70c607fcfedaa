"""Conversation routes beside the data channel: audio push over a WebSocket, session events
as server-sent events, and trickle ICE (PATCH on the session resource, as WHIP).

- `WS /v1/sessions/{id}/audio/ws` — for apps that stream TTS audio as fast as they make
  it. Binary messages are PCM16 little-endian mono at the `rate` given in the URL (one of
  streaming/resample.py's RATES; resampled off the event loop) appended to the current
  segment, and count against the session's message rate as text messages do; text messages are the data
  channel's JSON protocol (streaming/channel.py: audio, end, speak, interrupt, motion,
  ping), plus `{"type": "segment", "segment": "<id>", "rate": <hz>}` which starts a new
  segment for the binary messages that follow (ids are the server's otherwise). Replies
  (acks, errors) and every session event (playback_started/finished, error, closed) come
  back on the socket as JSON text.
- `GET /v1/sessions/{id}/events` — the same events as `text/event-stream`.
- `PATCH /v1/sessions/{id}` — `application/trickle-ice-sdpfrag` body: the client's late ICE
  candidates (RFC 8840 fragment; `a=end-of-candidates` is accepted); 204.

Browsers cannot set headers on WebSocket/EventSource requests, so these routes also take
the session token as `?token=`; apps should prefer `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from fastapi import FastAPI, Header, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from server.bodies import read_body
from server.errors import ApiError
from streaming.resample import RateError, check_rate

log = logging.getLogger("knotstream.realtime")

EVENT_QUEUE = 256        # events buffered per subscriber before it counts as stuck
WS_MAX_MESSAGE = 1 << 20  # bytes per WebSocket message (1 MiB: ~30 s of 16 kHz PCM16)
SDPFRAG_MAX_BYTES = 64_000  # one trickle PATCH body (refused before it is read when declared larger)


def _bearer(authorization: str | None, token: str | None) -> str | None:
    if authorization:
        return authorization
    return f"Bearer {token}" if token else None


class EventFeed:
    """A bounded queue of one session's events for one subscriber. A subscriber that stops
    reading is cut off (its feed ends with an `overflow` error), never allowed to grow."""

    def __init__(self, session):
        self.session = session
        self.queue: asyncio.Queue = asyncio.Queue(EVENT_QUEUE + 1)
        self.done = False
        session.on_event(self._put)

    def _put(self, event: dict) -> None:
        if self.done:
            return
        if self.queue.qsize() >= EVENT_QUEUE:
            self.done = True
            self.queue.put_nowait({"type": "error", "code": "events_overflow", "ref": None,
                                   "message": f"more than {EVENT_QUEUE} events unread; feed closed"})
            return
        self.queue.put_nowait(event)
        if event.get("type") == "closed":
            self.done = True

    async def next(self) -> dict:
        return await self.queue.get()

    def close(self) -> None:
        self.done = True
        self.session.off_event(self._put)


def install(app: FastAPI, manager) -> None:
    """Add the routes; `manager(request_or_websocket)` returns the SessionManager."""

    @app.get("/v1/sessions/{session_id}/events", summary="Session events (server-sent events)")
    async def events(session_id: str, request: Request, authorization: str | None = Header(None),
                     token: str | None = Query(None, max_length=256)):
        """`text/event-stream`: one `data: {json}` per event (playback_started / playback_finished
        with `segment`, `position_ms`, `interrupted`; error; closed). Ends when the session closes."""
        session = await manager(request).authorize(session_id, _bearer(authorization, token))
        feed = EventFeed(session)

        async def stream():
            try:
                yield ": knotstream events\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(feed.next(), 15.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"  # proxies close idle streams
                        continue
                    yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n"
                    if event.get("type") == "closed" or event.get("code") == "events_overflow":
                        return
            finally:
                feed.close()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.patch("/v1/sessions/{session_id}", status_code=204, summary="Trickle ICE candidates (as WHIP)")
    async def trickle(session_id: str, request: Request, authorization: str | None = Header(None)):
        session = await manager(request).authorize(session_id, authorization)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/trickle-ice-sdpfrag":
            raise ApiError(415, "unsupported_media_type", "PATCH takes application/trickle-ice-sdpfrag")
        body = await read_body(request, SDPFRAG_MAX_BYTES, "sdpfrag")
        try:
            added = await session.add_ice_candidates(body.decode("utf-8", errors="replace"))
        except ValueError as exc:
            code = getattr(exc, "code", "bad_sdpfrag")
            raise ApiError(409 if code == "too_many_candidates" else 400, code, str(exc)) from None
        return Response(status_code=204, headers={"X-Candidates-Added": str(added)})

    @app.websocket("/v1/sessions/{session_id}/audio/ws")
    async def audio_ws(websocket: WebSocket, session_id: str, rate: int = 16000, token: str | None = None):
        try:
            session = await manager(websocket).authorize(
                session_id, _bearer(websocket.headers.get("authorization"), token))
        except ApiError as exc:
            # Browsers cannot read an HTTP refusal of an upgrade: accept, say why, close (policy).
            await websocket.accept()
            await websocket.send_text(json.dumps({"type": "error", "code": exc.code, "message": exc.message,
                                                  "status": exc.status, "ref": None}))
            await websocket.close(code=1008)
            return
        await websocket.accept()
        await AudioSocket(websocket, session, rate).run()


class AudioSocket:
    """One WebSocket of `/audio/ws` (see the module docstring)."""

    def __init__(self, websocket: WebSocket, session, rate: int):
        self.ws = websocket
        self.session = session
        self.rate = rate
        self.segment: str | None = None   # where binary audio goes (None: a new server-named one)
        self.feed = EventFeed(session)

    async def send(self, message: dict) -> None:
        await self.ws.send_text(json.dumps(message))

    async def run(self) -> None:
        pump = asyncio.create_task(self._pump_events())
        try:
            try:
                check_rate(self.rate)
            except RateError as exc:
                await self.send({"type": "error", "code": "bad_rate", "ref": None, "message": str(exc)})
                await self.ws.close(code=1008)
                return
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data, text = msg.get("bytes"), msg.get("text")
                if len(data or b"") > WS_MAX_MESSAGE or len(text or "") > WS_MAX_MESSAGE:
                    await self.send({"type": "error", "code": "message_too_large", "ref": None,
                                     "message": f"WebSocket messages are limited to {WS_MAX_MESSAGE} bytes"})
                    continue
                reply = await (self._binary(data) if data is not None else self._text(text or ""))
                if reply is not None:
                    await self.send(reply)
        except WebSocketDisconnect:
            return
        finally:
            pump.cancel()
            self.feed.close()

    async def _pump_events(self) -> None:
        while True:
            event = await self.feed.next()
            try:
                await self.send(event)
            except Exception:
                return
            if event.get("type") == "closed":
                await self.ws.close(code=1000)
                return

    async def _binary(self, data: bytes) -> dict | None:
        from model.media import MediaError, pcm16_to_float

        wait = self.session.channel_limit.take()   # binary messages count as messages of the session
        if wait > 0:
            return {"type": "error", "code": "rate_limited", "ref": "audio",
                    "message": f"more than {self.session.channel_limit.rate:g} messages/s; this audio was "
                               f"dropped, retry in {wait:.2f} s"}
        if len(data) % 2:
            return {"type": "error", "code": "bad_pcm", "ref": "audio",
                    "message": f"binary messages are PCM16: an even number of bytes, got {len(data)}"}
        if self.segment is None:
            self.segment = f"ws-{secrets.token_hex(4)}"
        try:
            await self.session.push_pcm(pcm16_to_float(data), self.rate, self.segment, end=False)
        except (MediaError, ValueError) as exc:
            return {"type": "error", "code": getattr(exc, "code", "bad_audio"), "message": str(exc), "ref": "audio"}
        return None  # binary audio is acknowledged by playback events, not per message

    async def _finish_segment(self) -> None:
        """The resampler's tail belongs to the segment it came from (nothing is dropped)."""
        if self.segment is not None:
            await self.session.end_segment(self.segment, end=False)

    async def _text(self, text: str) -> dict | None:
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = None
        if isinstance(body, dict) and body.get("type") == "segment":
            seg, rate = body.get("segment"), body.get("rate", self.rate)
            if not isinstance(seg, str) or not 1 <= len(seg) <= 128:
                return {"type": "error", "code": "bad_segment", "ref": "segment",
                        "message": "segment must be a string id of 1..128 characters"}
            try:
                check_rate(rate)
            except RateError as exc:
                return {"type": "error", "code": "bad_rate", "ref": "segment", "message": str(exc)}
            await self._finish_segment()
            self.segment, self.rate = seg, rate
            return {"type": "ack", "ref": "segment", "segment": seg}
        ends_current = isinstance(body, dict) and body.get("type") == "end" and body.get("segment") == self.segment
        if ends_current:
            await self._finish_segment()
        reply = await self.session.handle_message(text)
        if ends_current:
            self.segment = None  # the next binary audio starts a new segment
        return reply
