"""Auth: API keys create sessions; a session's own bearer token covers everything about it.

- `POST /v1/sessions` needs an API key (`Authorization: Bearer <key>` or `X-API-Key: <key>`)
  unless auth is off. Wrong or missing key -> 401 `unauthorized`.
- Every `/v1/sessions/{id}...` route needs that session's token (`Authorization: Bearer`).
  No token -> 401 `unauthorized`, decided before the session is looked up. A token that is
  not this session's, an unknown id and a malformed id all answer the same 404
  `session_not_found`: a caller without the token cannot tell whether a session exists.
- Keys and tokens are compared as SHA-256 digests with `hmac.compare_digest`, every
  configured key each time (no early exit that tells which key nearly matched).

When auth is off (`resolve_mode`): no keys configured and either `auth_disabled=true` or,
with `auth_disabled` unset, a loopback bind (127.0.0.1, ::1, localhost: the local demo of
`knotstream serve`). A server bound to any other address with no keys refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re

from server.errors import ApiError

log = logging.getLogger("knotstream.auth")

MIN_KEY_CHARS = 16
SESSION_ID = re.compile(r"[0-9a-f]{16}")
_DUMMY_HASH = hashlib.sha256(b"no such session").hexdigest()


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_mode(settings) -> tuple[bool, str]:
    """(required, why) for the API-key check; ValueError for a configuration that would
    leave a non-loopback server open or closed to everyone."""
    keys = settings.api_keys
    short = [k for k in keys if len(k) < MIN_KEY_CHARS]
    if short:
        raise ValueError(f"API keys must be at least {MIN_KEY_CHARS} characters ({len(short)} shorter)")
    if settings.auth_disabled:
        return False, "auth_disabled is set" + (" (the configured API keys are ignored)" if keys else "")
    if keys:
        return True, f"{len(keys)} API key(s) configured"
    if settings.auth_disabled is False:
        raise ValueError("auth_disabled=false but no API keys: set KNOTSTREAM_API_KEYS")
    if is_loopback(settings.host):
        return False, f"bound to loopback {settings.host} and no KNOTSTREAM_API_KEYS (local use)"
    raise ValueError(f"refusing to serve {settings.host} without API keys: set KNOTSTREAM_API_KEYS=<key>[,<key>...] "
                     "or KNOTSTREAM_AUTH_DISABLED=true to run open on purpose")


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


class ApiKeys:
    """The API-key check of session creation."""

    def __init__(self, settings) -> None:
        self.required, self.why = resolve_mode(settings)
        self._digests = [digest(k) for k in settings.api_keys] if self.required else []

    def log_mode(self) -> None:
        if self.required:
            log.info("API keys required to create sessions: %s", self.why)
        else:
            log.warning("API keys OFF: anyone who reaches this server can create sessions (%s)", self.why)

    def check(self, authorization: str | None, x_api_key: str | None) -> str | None:
        """The key's digest (who creates the session: per-key quotas), None when auth is off;
        401 for a missing or wrong key."""
        if not self.required:
            return None
        key = x_api_key.strip() if x_api_key else bearer(authorization)
        if not key:
            raise ApiError(401, "unauthorized",
                           "creating a session needs an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        given = digest(key)
        ok = False
        for d in self._digests:  # no early exit
            ok |= hmac.compare_digest(given, d)
        if not ok:
            raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return given


    @staticmethod
    def check_metrics(authorization: str | None, metrics_key: str) -> None:
        """/metrics with a metrics key configured: 401 unless it is the bearer token."""
        token = bearer(authorization) or ""
        if not hmac.compare_digest(digest(token), digest(metrics_key)):
            raise ApiError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <metrics key>'",
                           headers={"WWW-Authenticate": "Bearer"})


def session_token(authorization: str | None) -> str:
    """The bearer token of a session route, or 401 (checked before any lookup)."""
    token = bearer(authorization)
    if token is None:
        raise ApiError(401, "unauthorized", "this route needs 'Authorization: Bearer <session token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    return token


def not_found(session_id: str) -> ApiError:
    # One answer for unknown ids, malformed ids and other sessions' tokens.
    shown = session_id if SESSION_ID.fullmatch(session_id) else "(malformed id)"
    return ApiError(404, "session_not_found", f"no session {shown} for this token")


def token_matches(token: str, token_hash: str | None) -> bool:
    """Constant-time check; an absent record still costs one comparison."""
    return hmac.compare_digest(digest(token), token_hash or _DUMMY_HASH) and token_hash is not None
