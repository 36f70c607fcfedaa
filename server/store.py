"""Session store: the registry of workers and sessions (records, not live objects).

Two implementations of one async interface (`SessionStore`, server/records.py), so the
routes never know which is in use: `MemoryStore` here (the default: one server process)
and `RedisStore` (server/store_redis.py, `KNOTSTREAM_REDIS_URL`: several worker processes
or hosts share one registry); `open_store` picks one from the settings. Live
objects (peer connections, streams) stay in the process that owns them; the record says
which worker that is.

Admission is the store's job: `admit(record)` reserves a slot on a worker and writes the
record in one atomic step, so a worker is never given more sessions than its capacity
however many requests race. A worker's load is the number of sessions admitted to it
and not yet released. With a TTL, worker entries and session records expire unless the
owning worker's `heartbeat` refreshes them: a worker that stops (crash, partition) drops
out of the registry after `ttl_s`, and its slots and records `grace_s` later. Within that
grace, live workers' `sweep` marks the dead worker's sessions `failed` (with a reason, kept
for `failed_ttl_s`), so their clients learn what happened instead of a plain 404.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterable

from server.records import SessionRecord, SessionStore, WorkerInfo
from server.store_redis import RedisStore


class MemoryStore:
    """In-process store (the default: one server process). No method ever suspends, so on
    one event loop each is atomic; `clock` is injectable for tests."""

    def __init__(self, ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 grace_s: float = 0.0, failed_ttl_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.failed_ttl_s = failed_ttl_s
        self._clock = clock
        self._records: dict[str, tuple[SessionRecord, float]] = {}
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._admitted: dict[str, set[str]] = {}   # worker id -> session ids holding its slots

    def _deadline(self, grace: bool = False) -> float:
        if self.ttl_s is None:
            return float("inf")
        return self._clock() + self.ttl_s + (self.grace_s if grace else 0.0)

    def _live_worker(self, worker_id: str) -> WorkerInfo | None:
        entry = self._workers.get(worker_id)
        if entry is None or entry[1] <= self._clock():   # expired: left for `sweep`
            return None
        return replace(entry[0], load=len(self._admitted.get(worker_id, ())))

    # ----- workers

    async def register_worker(self, worker: WorkerInfo) -> None:
        # A new registration: sessions of an earlier process with this id are gone.
        for sid in self._admitted.pop(worker.id, set()):
            self._records.pop(sid, None)
        self._workers[worker.id] = (replace(worker, load=0), self._deadline())

    async def heartbeat(self, worker: WorkerInfo, records: Iterable[SessionRecord] = ()) -> None:
        # Same rules as the Redis script: refresh held sessions that still hold a slot (a
        # release that raced this heartbeat is not undone); re-create them all when the
        # worker entry had expired; free slots that neither a held session nor a live
        # record explains.
        was_live = self._live_worker(worker.id) is not None
        self._workers[worker.id] = (replace(worker, load=0), self._deadline())
        slots = self._admitted.setdefault(worker.id, set())
        held = set()
        for record in records:
            held.add(record.id)
            if not was_live or record.id in slots:
                slots.add(record.id)
                self._records[record.id] = (record, self._deadline(grace=True))
        for sid in list(slots):
            if sid not in held and await self.get(sid) is None:
                slots.discard(sid)

    async def unregister_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        for sid in self._admitted.pop(worker_id, set()):
            self._records.pop(sid, None)

    async def workers(self) -> list[WorkerInfo]:
        return [w for w in map(self._live_worker, list(self._workers)) if w is not None]

    async def sweep(self) -> list[tuple[str, int]]:
        out = []
        for wid in [w for w in list(self._workers) if self._live_worker(w) is None]:
            self._workers.pop(wid)
            marked = 0
            for sid in self._admitted.pop(wid, set()):
                record = await self.get(sid)
                if record is not None and record.worker == wid and record.state != "failed":
                    failed = replace(record, state="failed", reason=f"worker {wid} stopped (no heartbeat)")
                    self._records[sid] = (failed, self._clock() + self.failed_ttl_s)
                    marked += 1
            out.append((wid, marked))
        return out

    # ----- sessions

    async def admit(self, record: SessionRecord, worker: str | None = None) -> str | None:
        if await self.get(record.id) is not None:
            raise ValueError(f"session {record.id!r} already exists")
        candidates = [worker] if worker is not None else list(self._workers)
        best, best_free = None, 0
        for wid in candidates:
            info = self._live_worker(wid)
            if info is not None and info.capacity - info.load > best_free:
                best, best_free = wid, info.capacity - info.load
        if best is None:
            return None
        self._admitted.setdefault(best, set()).add(record.id)
        self._records[record.id] = (replace(record, worker=best), self._deadline(grace=True))
        return best

    async def put(self, record: SessionRecord) -> None:
        if await self.get(record.id) is not None:   # only while admitted
            self._records[record.id] = (record, self._deadline(grace=True))

    async def get(self, session_id: str) -> SessionRecord | None:
        entry = self._records.get(session_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._records.pop(session_id, None)
            return None
        return entry[0]

    async def release(self, session_id: str, worker: str | None = None) -> None:
        entry = self._records.pop(session_id, None)
        owner = entry[0].worker if entry is not None else worker
        if owner is not None:
            self._admitted.get(owner, set()).discard(session_id)

    async def list(self, worker: str | None = None) -> list[SessionRecord]:
        out = []
        for sid in list(self._records):
            record = await self.get(sid)
            if record is not None and (worker is None or record.worker == worker):
                out.append(record)
        return out

    async def count(self, worker: str | None = None) -> int:
        return len(await self.list(worker))

    async def close(self) -> None:
        pass


def open_store(settings) -> SessionStore:
    """The store the settings ask for: Redis when `redis_url` is set, else in-process."""
    if settings.redis_url:
        # Records outlive a dead worker's entry by one TTL: the time live workers have to sweep it.
        return RedisStore(settings.redis_url, prefix=settings.redis_prefix, ttl_s=settings.store_ttl_s,
                          grace_s=settings.store_ttl_s)
    return MemoryStore()
