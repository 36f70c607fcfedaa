"""Logging for `knotstream serve`: keep session tokens out of the access log.

Browsers cannot set headers on an EventSource or a WebSocket, so those routes also take
the session token as `?token=` (server/realtime.py); uvicorn's access log writes the full
path with its query string, which would put a live credential into every log line.
"""

from __future__ import annotations

import logging
import re

# `token=` / `access_token=` query values (up to the next & or whitespace or quote).
_TOKEN_QUERY = re.compile(r"([?&](?:access_)?token=)[^&\s\"']+", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """The text with every token query value replaced by [redacted]."""
    return _TOKEN_QUERY.sub(r"\1" + REDACTED, text)


class RedactTokens(logging.Filter):
    """Rewrites token query values in a record's message and string arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


# uvicorn logs each HTTP response to "uvicorn.access" and each accepted WebSocket (with
# its query string) to "uvicorn.error".
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact_access_log(logger_names: tuple[str, ...] = UVICORN_LOGGERS) -> None:
    """Install the filter on uvicorn's loggers (after uvicorn configured logging); idempotent."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
