"""Per-session TURN credentials (the TURN REST API scheme coturn checks with `use-auth-secret`).

The username is `<unix expiry>:<session id>`, the password base64(HMAC-SHA1(secret, username)).
coturn recomputes the password from its `static-auth-secret` and refuses an allocation once
the expiry has passed, so a leaked credential is worth one short window and no static TURN
password exists for anyone to reuse. An allocation made in time lives as long as it is used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


def mint(secret: str, urls: list[str], session_id: str, ttl_s: int, now: float | None = None) -> dict:
    """One RTCIceServer dict for `urls` with credentials valid `ttl_s` seconds from `now`."""
    expiry = int(time.time() if now is None else now) + int(ttl_s)
    username = f"{expiry}:{session_id}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return {"urls": list(urls), "username": username, "credential": password}
