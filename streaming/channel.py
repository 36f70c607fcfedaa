"""The `driving` data channel protocol: JSON text messages, one object each.

Client -> server:
  {"type": "motion", "fields": {"yaw": 0.2, "smile": null, ...}, "t": <client ms>}
      ("expression" is the same message; "t" optional; null clears a field)
  {"type": "audio", "pcm16": "<base64 little-endian int16 mono>", "rate": 16000,
   "segment": "<id>", "end": false}
  {"type": "end", "segment": "<id>"}            end of a pushed speech segment
  {"type": "speak", "text": "..."}              offline TTS, when installed (counts as a request
                                                of the session, as POST /speak)
  {"type": "interrupt"}                         drop queued speech, back to idle
  {"type": "ping", "id": <any>}                 -> {"type": "pong", "id": ..., "t": <server ms>}

Server -> client:
  {"type": "ack", "ref": "<type>", ...}          motion: the frame it lands on, and "ignored":
                                                [fields] when it set valid fields this model
                                                does not read (the session's model.motion_fields)
  {"type": "error", "code": "...", "message": "...", "ref": "<type or null>"}
  {"type": "playback_started" | "playback_finished", "segment": ..., "position_ms": ...,
   "interrupted": bool}
  {"type": "closed", "reason": "..."}

`parse()` turns text into a validated `Message` or raises `ChannelError` with a stable
code; the session answers an error message and carries on. Limits, checked before any
JSON is decoded: `MAX_MESSAGE_BYTES` per message (UTF-8 bytes, `message_too_large`) and,
when the caller passes its `RateLimit`, a per-session message rate (`rate_limited`; the
message is dropped, later ones pass again as the bucket refills).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

MAX_MESSAGE_BYTES = 256 * 1024
MESSAGES_PER_S = 50.0       # a session's sustained data-channel rate (motion at 25-30 Hz fits)
MESSAGE_BURST = 100
TYPES = ("motion", "expression", "audio", "end", "speak", "interrupt", "ping")


class ChannelError(ValueError):
    def __init__(self, code: str, message: str, ref: str | None = None):
        super().__init__(message)
        self.code = code
        self.ref = ref

    def reply(self) -> dict:
        return {"type": "error", "code": self.code, "message": str(self), "ref": self.ref}


class RateLimit:
    """Token bucket: `rate` tokens per second, holding at most `burst`. Also used by the
    server for per-session HTTP limits (audio push)."""

    def __init__(self, rate: float = MESSAGES_PER_S, burst: int = MESSAGE_BURST,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens, self.stamp = float(burst), clock()
        self.refused = 0

    def take(self, cost: float = 1.0) -> float:
        """Spend `cost` tokens: 0.0 when allowed, else the seconds until it would be (nothing spent)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost - 1e-9:   # float refill of exactly one token must count
            self.tokens = max(0.0, self.tokens - cost)
            return 0.0
        self.refused += 1
        return (cost - self.tokens) / self.rate

    def retry_after(self, wait_s: float) -> int:
        """A Retry-After header value (whole seconds, at least 1)."""
        return max(1, math.ceil(wait_s))


@dataclass
class SessionLimits:
    """A session's request budgets, spent by every path that reaches it (HTTP routes, data
    channel, WebSocket): `requests` for audio pushes and speak, `interrupts` for barge-ins."""

    requests: RateLimit
    interrupts: RateLimit


@dataclass
class Message:
    type: str
    body: dict[str, Any]


def parse(raw: str | bytes, limit: RateLimit | None = None) -> Message:
    """Validate one data-channel message (shape only; field values are checked where used).
    `limit`: the session's message rate limit, spent by every message, valid or not."""
    if limit is not None:
        wait = limit.take()
        if wait > 0:
            raise ChannelError("rate_limited", f"more than {limit.rate:g} messages/s (burst {limit.burst:g}); "
                                               f"this one was dropped, retry in {wait:.2f} s")
    size = len(raw)
    if isinstance(raw, str) and size <= MAX_MESSAGE_BYTES and not raw.isascii():
        size = len(raw.encode("utf-8", "surrogatepass"))   # the limit is in bytes, not characters
    if size > MAX_MESSAGE_BYTES:
        raise ChannelError("message_too_large", f"message is {size} bytes, limit {MAX_MESSAGE_BYTES}")
    if isinstance(raw, bytes):
        raise ChannelError("bad_message", "binary messages are not accepted; send JSON text")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ChannelError("bad_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ChannelError("bad_message", f"message must be a JSON object, got {type(body).__name__}")
    kind = body.get("type")
    if kind not in TYPES:
        raise ChannelError("unknown_type", f"unknown message type {kind!r}; expected one of {', '.join(TYPES)}",
                           ref=kind if isinstance(kind, str) else None)
    if kind in ("motion", "expression"):
        if not isinstance(body.get("fields"), dict):
            raise ChannelError("bad_message", "motion needs \"fields\": an object of field -> number", kind)
        t = body.get("t")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise ChannelError("bad_message", f"\"t\" must be a number of milliseconds, got {t!r}", kind)
    elif kind == "audio":
        data = body.get("pcm16")
        if not isinstance(data, str):
            raise ChannelError("bad_message", "audio needs \"pcm16\": base64 of int16 little-endian mono", kind)
        try:
            body["pcm16"] = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ChannelError("bad_message", "\"pcm16\" is not valid base64", kind) from None
        rate = body.get("rate", 16000)
        if isinstance(rate, bool) or not isinstance(rate, int):
            raise ChannelError("bad_message", f"\"rate\" must be an integer sample rate, got {rate!r}", kind)
        _segment_id(body, kind)
    elif kind == "end":
        if _segment_id(body, kind) is None:
            raise ChannelError("bad_message", "end needs \"segment\": the id of the segment it ends", kind)
    elif kind == "speak":
        if not isinstance(body.get("text"), str) or not body["text"].strip():
            raise ChannelError("bad_message", "speak needs \"text\": a non-empty string", kind)
    return Message(kind, body)


def _segment_id(body: dict, kind: str) -> str | None:
    seg = body.get("segment")
    if seg is not None and (not isinstance(seg, str) or not 0 < len(seg) <= 128):
        raise ChannelError("bad_message", "\"segment\" must be a string of 1-128 characters", kind)
    return seg
