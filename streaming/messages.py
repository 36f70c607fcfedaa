"""The `driving` protocol (streaming/channel.py) applied to one live session: each message
from the data channel or the WebSocket becomes a call on the LiveSession, and its reply
(ack, pong or error) goes back. A message never raises here: a bad value is an error reply
with its code, and a failure of the server is an error reply with an id that the log has.
Budgets are spent as over HTTP: `speak` from the session's requests, `interrupt` from its
interrupts.
"""

from __future__ import annotations

import logging
import secrets
import time

from model.config import motion_fields_read
from streaming import channel as proto

log = logging.getLogger("knotstream.session")


async def handle(session, raw) -> dict | None:
    session.messages["received"] += 1
    try:
        msg = proto.parse(raw, session.channel_limit)
        return await dispatch(session, msg)
    except proto.ChannelError as exc:
        session.messages["errors"] += 1
        return exc.reply()
    except Exception as exc:  # a bad value (ValueError/MediaError): tell the client, carry on
        session.messages["errors"] += 1
        code = getattr(exc, "code", None)
        if code is None and not isinstance(exc, ValueError):
            error_id = secrets.token_hex(6)
            log.exception("session %s: message failed (error %s)", session.id, error_id)
            return {"type": "error", "code": "internal_error", "ref": None,
                    "message": f"internal error {error_id}; the server log has the details"}
        return {"type": "error", "code": code or "bad_value", "message": str(exc), "ref": None}


async def dispatch(session, msg: proto.Message) -> dict | None:
    b = msg.body
    if msg.type in ("motion", "expression"):
        try:
            frame = session.set_motion(b["fields"], b.get("t"))
        except ValueError as exc:
            raise proto.ChannelError("bad_motion", str(exc), msg.type) from None
        ack = {"type": "ack", "ref": msg.type, "frame": frame}
        read = motion_fields_read(session.stream.cfg)
        ignored = [name for name in b["fields"] if name not in read]
        if ignored:  # valid fields this model does not read: say so rather than drop them silently
            ack["ignored"] = ignored
        return ack
    if msg.type == "audio":
        from model.media import pcm16_to_float
        seg = await session.push_pcm(pcm16_to_float(b["pcm16"]), b.get("rate", session.sample_rate),
                                     b.get("segment"), bool(b.get("end", False)))
        return {"type": "ack", "ref": "audio", "segment": seg.id}
    if msg.type == "end":
        try:
            seg = await session.end_segment(b["segment"])
        except KeyError:
            raise proto.ChannelError("unknown_segment", f"no segment {b['segment']!r}", "end") from None
        return {"type": "ack", "ref": "end", "segment": seg.id}
    if msg.type == "speak":
        session.spend("requests")   # the same budget as POST /speak and /audio
        seg = await session.speak(b["text"])
        return {"type": "ack", "ref": "speak", "segment": seg.id}
    if msg.type == "interrupt":
        session.spend("interrupts")
        return {"type": "ack", "ref": "interrupt", **session.interrupt()}
    if msg.type == "ping":
        return {"type": "pong", "id": b.get("id"), "t": round(time.time() * 1000, 3)}
    return None
