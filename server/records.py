"""What the session store keeps: session records and worker entries (not live objects),
the store interface both backends implement, and the error a store that cannot be
reached raises. Kept apart from the backends (server/store.py, server/store_redis.py) so
each backend imports only this.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Protocol


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (Redis down): the API answers 503 store_unavailable."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class SessionRecord:
    id: str
    token_hash: str           # sha256 hex of the bearer token; the token itself is never stored
    worker: str = field(default_factory=worker_name)
    created: float = field(default_factory=lambda: round(time.time(), 3))  # ms: survives Redis's cjson
    state: str = "new"        # starting, new, ...; "failed": its worker died (see `reason`)
    avatar: str | None = None
    reason: str | None = None

    def with_state(self, state: str) -> "SessionRecord":
        return replace(self, state=state)


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    address: str              # base URL where this worker's sessions are served
    capacity: int             # most sessions it runs at once
    load: int = 0             # sessions admitted and not released (filled in by the store on reads)
    started: float = field(default_factory=time.time)


class SessionStore(Protocol):
    ttl_s: float | None       # None: entries never expire (in-process store)

    # ----- workers
    async def register_worker(self, worker: WorkerInfo) -> None: ...
    async def heartbeat(self, worker: WorkerInfo, records: Iterable[SessionRecord] = ()) -> None:
        """Refresh the worker's entry and its sessions' records (re-created if they expired)."""
    async def unregister_worker(self, worker_id: str) -> None: ...
    async def workers(self) -> list[WorkerInfo]: ...
    async def sweep(self) -> list[tuple[str, int]]:
        """Claim every registered worker whose entry expired (atomically: one sweeper per dead
        worker), mark its sessions failed, drop it. [(worker id, sessions marked failed)]."""

    # ----- sessions
    async def admit(self, record: SessionRecord, worker: str | None = None) -> str | None:
        """Atomically reserve a slot and write `record` there: on `worker` when given, else on
        the live worker with the most free slots. The worker's id, or None when full."""
    async def put(self, record: SessionRecord) -> None:
        """Update an admitted record (its state); it stays on its worker."""
    async def get(self, session_id: str) -> SessionRecord | None: ...
    async def release(self, session_id: str, worker: str | None = None) -> None:
        """Delete the record and free its slot (`worker`: whose slot, if the record expired)."""
    async def list(self, worker: str | None = None) -> list[SessionRecord]: ...
    async def count(self, worker: str | None = None) -> int: ...
    async def close(self) -> None: ...
