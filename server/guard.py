"""DNS-rebinding protection of a server that runs without API keys.

Without keys, anyone who can reach the port can create sessions; on loopback that is the
local user only, unless a web page makes their browser do it: a page of evil.example whose
name then resolves to 127.0.0.1 sends requests the browser considers same-origin. Those
requests still carry `Host: evil.example` (and an `Origin` of that page), so with auth off
every request (HTTP and WebSocket) must name an allowed host, and a browser's `Origin`,
when sent, must be one of those hosts or a listed CORS origin. Refusals are 403
`forbidden_host` / `forbidden_origin`. With API keys on, the keys are the protection.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _hostname(netloc: str) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


def allowed_hosts(settings) -> set[str]:
    hosts = set(LOOPBACK_NAMES) | {h.lower() for h in settings.allowed_hosts}
    if settings.host not in ("0.0.0.0", "::", ""):
        hosts.add(settings.host.strip("[]").lower())
    if settings.public_url:
        hosts.add((urlsplit(settings.public_url).hostname or "").lower())
    return hosts - {""}


class HostGuard:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app, hosts: set[str], origins: list[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        why = self.refusal(headers.get("host", ""), headers.get("origin"))
        if why is None:
            return await self.app(scope, receive, send)
        code, message = why
        if scope["type"] == "websocket":   # refuse the upgrade: the handshake ends with 403
            await receive()
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, host: str, origin: str | None) -> tuple[str, str] | None:
        if _hostname(host) not in self.hosts:
            return ("forbidden_host", f"Host {host[:100]!r} is not a name of this server; without API keys it "
                                      f"answers only to {', '.join(sorted(self.hosts))} (KNOTSTREAM_ALLOWED_HOSTS)")
        if origin is None:
            return None
        if origin.rstrip("/").lower() in self.origins or _hostname(urlsplit(origin).netloc) in self.hosts:
            return None
        return ("forbidden_origin", f"requests from pages of {origin[:100]!r} are refused without API keys "
                                    f"(KNOTSTREAM_CORS_ORIGINS lists the pages allowed)")
