"""Session store: the registry of sessions (records, not live objects).

Small and async so a Redis implementation (issue 6: several worker processes) can
replace the in-process one without touching the routes. Live objects (peer connections,
streams) stay in the process that owns them; the record says which process that is.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Protocol


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class SessionRecord:
    id: str
    token_hash: str           # sha256 hex of the bearer token; the token itself is never stored
    worker: str = field(default_factory=worker_name)
    created: float = field(default_factory=time.time)
    state: str = "new"
    avatar: str | None = None

    def with_state(self, state: str) -> "SessionRecord":
        return replace(self, state=state)


class SessionStore(Protocol):
    async def put(self, record: SessionRecord) -> None: ...
    async def get(self, session_id: str) -> SessionRecord | None: ...
    async def delete(self, session_id: str) -> None: ...
    async def list(self) -> list[SessionRecord]: ...
    async def count(self) -> int: ...


class MemoryStore:
    """In-process store (the default: one server process)."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._lock = asyncio.Lock()

    async def put(self, record: SessionRecord) -> None:
        async with self._lock:
            self._records[record.id] = record

    async def get(self, session_id: str) -> SessionRecord | None:
        return self._records.get(session_id)

    async def delete(self, session_id: str) -> None:
        async with self._lock:
            self._records.pop(session_id, None)

    async def list(self) -> list[SessionRecord]:
        return list(self._records.values())

    async def count(self) -> int:
        return len(self._records)
