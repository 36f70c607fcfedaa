"""The avatar service a LiveKit agent calls: it sends an avatar into the agent's room.

    knotstream-livekit-avatars --host 0.0.0.0 --port 8100 --model tiny   # on the GPU host
    # (python -m integrations.livekit_dispatch ... without the console script)

`POST /v1/livekit/avatars` with `{"livekit_url", "livekit_token", "agent_identity",
"avatar"}` (the token minted by the agent's `KnotstreamAvatarSession`, kind agent, with
`lk.publish_on_behalf`) answers 202 `{"id", "state"}` and starts a task that joins the room
and runs `serve_room` (integrations/livekit_avatar.py) until the room or the agent leaves;
`GET /v1/livekit/avatars/{id}` tells its state (`joining`, `serving`, `ended`, `failed` +
`error`), `DELETE` ends it. All engines' sessions share one generation worker. Requests
need `X-API-Key` / `Authorization: Bearer` when keys are set (`KNOTSTREAM_API_KEYS`);
bound beyond loopback without keys, the service refuses to start. Errors are JSON
`{"error": {"code", "message"}}`.

Only the room connection needs a LiveKit server; everything after it is covered by the
framework-level tests (tests/test_integration_livekit.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import sys
from typing import Awaitable, Callable

from pydantic import BaseModel, Field

log = logging.getLogger("knotstream.integrations.livekit")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class JoinRequest(BaseModel):
    livekit_url: str = Field(min_length=1, max_length=2000)
    livekit_token: str = Field(min_length=1, max_length=16000)
    agent_identity: str = Field(min_length=1, max_length=256)
    avatar: str = Field(default="ada", max_length=64)
    audio_rate: int = Field(default=24000, ge=8000, le=48000)


async def connect_room(url: str, token: str):
    """Join a LiveKit room (the one step that needs a LiveKit server)."""
    from livekit import rtc

    room = rtc.Room()
    await room.connect(url, token)
    return room


async def _serve(entry: dict, req: "JoinRequest", portrait, host,
                 connect: Callable[[str, str], Awaitable[object]]) -> None:
    """One avatar's life in its room; `entry` (what GET shows) follows its state."""
    from integrations.livekit_avatar import serve_room

    room = None
    try:
        room = await connect(req.livekit_url, req.livekit_token)
        entry["state"] = "serving"
        await serve_room(room, host, portrait, audio_rate=req.audio_rate, sender_identity=req.agent_identity)
        entry["state"] = "ended"
    except asyncio.CancelledError:
        entry["state"] = "ended"
    except Exception as exc:
        entry.update(state="failed", error=f"{type(exc).__name__}: {exc}")
        log.warning("avatar %s failed: %s", entry["id"], entry["error"])
    finally:
        if room is not None and hasattr(room, "disconnect"):
            await room.disconnect()


def create_app(host, *, api_keys: list[str] | None = None, max_rooms: int = 4,
               connect: Callable[[str, str], Awaitable[object]] = connect_room):
    """The dispatch app for an integrations.avatar.AvatarHost (see the module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from server.avatars import avatar_image

    avatars: dict[str, dict] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        for entry in avatars.values():  # shutdown: every avatar leaves its room
            entry["task"].cancel()
        await asyncio.gather(*(e["task"] for e in avatars.values()), return_exceptions=True)

    app = FastAPI(title="knotstream LiveKit avatars", lifespan=lifespan)
    keys = [k.encode() for k in api_keys or []]

    def error(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return error(422, "invalid_request", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                        for e in exc.errors())[:1000])

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if keys:
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not any(hmac.compare_digest(given.encode(), k) for k in keys):
                return error(401, "unauthorized", "a valid API key is required (X-API-Key or Authorization: Bearer)")
        return await call_next(request)

    @app.post("/v1/livekit/avatars", status_code=202)
    async def join(req: JoinRequest):
        try:
            portrait = avatar_image(req.avatar)
        except KeyError:
            return error(404, "avatar_not_found", f"no bundled avatar {req.avatar!r}")
        if sum(a["state"] in ("joining", "serving") for a in avatars.values()) >= max_rooms:
            return error(503, "too_many_rooms", f"this service serves at most {max_rooms} rooms")
        for old in [k for k, a in avatars.items() if a["state"] in ("ended", "failed")][:-100]:
            avatars.pop(old)  # keep the last 100 finished entries for GET
        entry = {"id": secrets.token_hex(8), "state": "joining", "error": None}
        entry["task"] = asyncio.create_task(_serve(entry, req, portrait, host, connect))
        avatars[entry["id"]] = entry
        return {"id": entry["id"], "state": entry["state"]}

    @app.get("/v1/livekit/avatars/{avatar_id}")
    async def status(avatar_id: str):
        entry = avatars.get(avatar_id)
        if entry is None:
            return error(404, "avatar_not_found", f"no avatar session {avatar_id!r}")
        return {k: v for k, v in entry.items() if k != "task"}

    @app.delete("/v1/livekit/avatars/{avatar_id}", status_code=204)
    async def leave(avatar_id: str):
        entry = avatars.get(avatar_id)
        if entry is None:
            return error(404, "avatar_not_found", f"no avatar session {avatar_id!r}")
        entry["task"].cancel()
        await asyncio.gather(entry["task"], return_exceptions=True)

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="knotstream avatars for LiveKit Agents rooms")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--model", default=os.environ.get("KNOTSTREAM_MODEL", "tiny"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-rooms", type=int, default=4)
    args = p.parse_args(argv)
    try:
        import livekit.agents  # noqa: F401
    except ImportError:
        print("error: the livekit extra is not installed (pip install 'knotstream[livekit]')", file=sys.stderr)
        return 2
    keys = [k.strip() for k in os.environ.get("KNOTSTREAM_API_KEYS", "").split(",") if k.strip()]
    if not keys and args.host not in LOOPBACK:
        print(f"error: bound to {args.host} without KNOTSTREAM_API_KEYS; set keys or bind to 127.0.0.1",
              file=sys.stderr)
        return 2
    import uvicorn

    from integrations.avatar import AvatarHost

    host = AvatarHost.load(args.model, device=args.device)
    try:
        uvicorn.run(create_app(host, api_keys=keys, max_rooms=args.max_rooms), host=args.host, port=args.port)
    finally:
        host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
