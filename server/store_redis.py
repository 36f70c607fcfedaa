"""Redis session store (`KNOTSTREAM_REDIS_URL`): one registry shared by several workers.

Keys (all under `prefix`, default `knotstream:`):

    workers                   set of worker ids that registered (pruned when their entry expired)
    worker:<id>               hash {id, address, capacity, started}; expires after ttl_s
    worker:<id>:sessions      set of session ids holding the worker's slots (load = SCARD);
                              expires after ttl_s + grace_s
    session:<sid>             the SessionRecord as JSON; expires after ttl_s + grace_s (a failed
                              one after failed_ttl_s)
    drive:<id>                stream of driving input for the worker's sessions (server/routing.py)

Every step that reads and then writes runs as one Lua script, so it is atomic on the
Redis server: `admit` checks capacity and takes the slot in one step (a worker is never
overcommitted however many admits race), `release` frees the slot of the worker named in
the record. A worker's `heartbeat` (every ttl_s / 3) refreshes its entry and the records
of the sessions it holds; when heartbeats stop, its entry expires, and its slots and
records `grace_s` later. Within that grace any live worker's `sweep` (SWEEP: atomic, so
exactly one sweeper claims a dead worker) marks the dead worker's sessions `failed` with a
reason, drops its slots and driving stream and removes it from the id set.

The scripts build key names from the prefix, so the store needs one Redis server (or,
in Redis Cluster, a prefix with a hash tag such as `{knotstream}:` to keep every key in
one slot).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable

from server.records import SessionRecord, StoreUnavailable, WorkerInfo

# KEYS: workers set, session key. ARGV: prefix, record ttl ms, worker id ('' = any live worker),
# session id, record JSON. Returns the worker id, or nil when no candidate has a free slot.
ADMIT = """
local prefix, ttl, only, sid = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.error_reply('ERR session exists') end
local candidates = {only}
if only == '' then candidates = redis.call('SMEMBERS', KEYS[1]) end
local best, best_free = false, 0
for _, w in ipairs(candidates) do
  local cap = redis.call('HGET', prefix .. 'worker:' .. w, 'capacity')
  if cap then
    local free = tonumber(cap) - redis.call('SCARD', prefix .. 'worker:' .. w .. ':sessions')
    if free > best_free then best, best_free = w, free end
  end
end
if not best then return false end
local slots = prefix .. 'worker:' .. best .. ':sessions'
redis.call('SADD', slots, sid)
if redis.call('PTTL', slots) < ttl then redis.call('PEXPIRE', slots, ttl) end
local record = cjson.decode(ARGV[5])
record['worker'] = best
redis.call('SET', KEYS[2], cjson.encode(record), 'PX', ttl)
return best
"""

# KEYS: session key. ARGV: prefix, session id, worker id hint ('' = none).
RELEASE = """
local raw = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
if raw then
  local owner = cjson.decode(raw)['worker']
  if type(owner) == 'string' then redis.call('SREM', ARGV[1] .. 'worker:' .. owner .. ':sessions', ARGV[2]) end
end
if ARGV[3] ~= '' then redis.call('SREM', ARGV[1] .. 'worker:' .. ARGV[3] .. ':sessions', ARGV[2]) end
return 1
"""

# KEYS: workers set, worker key, slots key. ARGV: prefix, ttl ms, fresh ('1': a new
# registration, the slots of an earlier process with this id are dropped), worker id,
# address, capacity, started, record ttl ms, then (session id, record JSON) pairs of the sessions held.
# A held session is refreshed only while it still holds a slot (a release that raced this
# heartbeat is not undone), or re-created with its slot when the worker entry had expired.
# Slots that no held session and no live record explain are freed.
HEARTBEAT = """
local prefix, ttl, fresh = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
if fresh then
  for _, sid in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('DEL', prefix .. 'session:' .. sid) end
  redis.call('DEL', KEYS[3])
end
local was_live = redis.call('EXISTS', KEYS[2]) == 1
redis.call('HSET', KEYS[2], 'id', ARGV[4], 'address', ARGV[5], 'capacity', ARGV[6], 'started', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('SADD', KEYS[1], ARGV[4])
local rttl = tonumber(ARGV[8])
local held = {}
for i = 9, #ARGV, 2 do
  local sid = ARGV[i]
  held[sid] = true
  if not was_live or redis.call('SISMEMBER', KEYS[3], sid) == 1 then
    redis.call('SADD', KEYS[3], sid)
    redis.call('SET', prefix .. 'session:' .. sid, ARGV[i + 1], 'PX', rttl)
  end
end
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if not held[sid] and redis.call('EXISTS', prefix .. 'session:' .. sid) == 0 then
    redis.call('SREM', KEYS[3], sid)
  end
end
redis.call('PEXPIRE', KEYS[3], rttl)
return 1
"""

# KEYS: workers set. ARGV: prefix, failed ttl ms. Every registered worker whose entry has
# expired is claimed here (removed from the set in this same step, so two sweepers never
# both claim it): its sessions' records become state 'failed' with a reason and live on for
# the failed ttl, its slots and driving stream are dropped. Returns {worker id, sessions
# marked} pairs, flattened.
SWEEP = """
local prefix, fttl = ARGV[1], tonumber(ARGV[2])
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', prefix .. 'worker:' .. w) == 0 then
    local slots = prefix .. 'worker:' .. w .. ':sessions'
    local n = 0
    for _, sid in ipairs(redis.call('SMEMBERS', slots)) do
      local key = prefix .. 'session:' .. sid
      local raw = redis.call('GET', key)
      if raw then
        local record = cjson.decode(raw)
        if record['worker'] == w and record['state'] ~= 'failed' then
          record['state'] = 'failed'
          record['reason'] = 'worker ' .. w .. ' stopped (no heartbeat)'
          redis.call('SET', key, cjson.encode(record), 'PX', fttl)
          n = n + 1
        end
      end
    end
    redis.call('DEL', slots, prefix .. 'drive:' .. w)
    redis.call('SREM', KEYS[1], w)
    table.insert(out, w)
    table.insert(out, n)
  end
end
return out
"""

# KEYS: workers set, worker key, slots key. ARGV: prefix, worker id.
UNREGISTER = """
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('DEL', ARGV[1] .. 'session:' .. sid) end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[1], ARGV[2])
return 1
"""


def _unavailable(method):
    """Redis connection failures -> StoreUnavailable (the API answers 503, not 500)."""
    import functools

    from redis.exceptions import ConnectionError, TimeoutError

    @functools.wraps(method)
    async def wrapped(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"session store unreachable: {exc}") from exc
    return wrapped


def _dump(record: SessionRecord) -> str:
    return json.dumps(dataclasses.asdict(record), separators=(",", ":"))


def _load(raw: str | None) -> SessionRecord | None:
    if raw is None:
        return None
    data = json.loads(raw)
    fields = {f.name for f in dataclasses.fields(SessionRecord)}
    # cjson writes a missing avatar as null and may print floats with fewer digits: fine.
    return SessionRecord(**{k: v for k, v in data.items() if k in fields})


class RedisStore:
    def __init__(self, url: str, prefix: str = "knotstream:", ttl_s: float = 15.0, timeout_s: float = 5.0,
                 grace_s: float = 0.0, failed_ttl_s: float = 300.0) -> None:
        """`grace_s`: how much longer than the worker entry its slots and records live (the time
        other workers have to `sweep` a dead worker); `failed_ttl_s`: how long a failed record is
        kept to tell its client."""
        import redis.asyncio as aioredis

        if ttl_s <= 0 or grace_s < 0 or failed_ttl_s <= 0:
            raise ValueError(f"ttl_s and failed_ttl_s must be positive, grace_s >= 0; got {ttl_s}, {failed_ttl_s}, "
                             f"{grace_s}")
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.failed_ttl_s = failed_ttl_s
        self.timeout_s = timeout_s
        self.redis = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                             socket_connect_timeout=timeout_s)
        self._binary = None
        self._admit = self.redis.register_script(ADMIT)
        self._release = self.redis.register_script(RELEASE)
        self._heartbeat = self.redis.register_script(HEARTBEAT)
        self._unregister = self.redis.register_script(UNREGISTER)
        self._sweep = self.redis.register_script(SWEEP)
        self._registered: set[str] = set()

    # ----- keys

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    @property
    def _record_ttl_ms(self) -> int:
        return max(1, round((self.ttl_s + self.grace_s) * 1000))

    @property
    def binary(self):
        """A second client that returns bytes (driving audio in streams), made on first use."""
        if self._binary is None:
            import redis.asyncio as aioredis
            self._binary = aioredis.Redis.from_url(self.url, decode_responses=False, socket_timeout=self.timeout_s,
                                                   socket_connect_timeout=self.timeout_s)
        return self._binary

    def _session(self, sid: str) -> str:
        return f"{self.prefix}session:{sid}"

    def _worker(self, wid: str) -> str:
        return f"{self.prefix}worker:{wid}"

    def _slots(self, wid: str) -> str:
        return f"{self.prefix}worker:{wid}:sessions"

    @property
    def _workers(self) -> str:
        return f"{self.prefix}workers"

    # ----- workers

    @_unavailable
    async def register_worker(self, worker: WorkerInfo) -> None:
        await self._beat(worker, (), fresh=True)
        self._registered.add(worker.id)

    @_unavailable
    async def heartbeat(self, worker: WorkerInfo, records: Iterable[SessionRecord] = ()) -> None:
        await self._beat(worker, records, fresh=False)

    async def _beat(self, worker: WorkerInfo, records: Iterable[SessionRecord], fresh: bool) -> None:
        args = [self.prefix, self._ttl_ms, "1" if fresh else "0", worker.id, worker.address, worker.capacity,
                repr(worker.started), self._record_ttl_ms]
        for record in records:
            args += [record.id, _dump(record)]
        await self._heartbeat(keys=[self._workers, self._worker(worker.id), self._slots(worker.id)], args=args)

    @_unavailable
    async def unregister_worker(self, worker_id: str) -> None:
        await self._unregister(keys=[self._workers, self._worker(worker_id), self._slots(worker_id)],
                               args=[self.prefix, worker_id])
        self._registered.discard(worker_id)

    @_unavailable
    async def sweep(self) -> list[tuple[str, int]]:
        reply = await self._sweep(keys=[self._workers], args=[self.prefix, max(1, round(self.failed_ttl_s * 1000))])
        return [(reply[i], int(reply[i + 1])) for i in range(0, len(reply), 2)]

    @_unavailable
    async def workers(self) -> list[WorkerInfo]:
        ids = sorted(await self.redis.smembers(self._workers))
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self._worker(wid))
                pipe.scard(self._slots(wid))
            replies = await pipe.execute()
        out = []
        for wid, info, load in zip(ids, replies[0::2], replies[1::2]):
            if info:
                out.append(WorkerInfo(id=wid, address=info.get("address", ""), capacity=int(info["capacity"]),
                                      load=int(load), started=float(info.get("started", 0))))
        return out

    # ----- sessions

    @_unavailable
    async def admit(self, record: SessionRecord, worker: str | None = None) -> str | None:
        from redis.exceptions import ResponseError

        try:
            return await self._admit(keys=[self._workers, self._session(record.id)],
                                     args=[self.prefix, self._record_ttl_ms, worker or "", record.id,
                                           _dump(record)])
        except ResponseError as exc:
            if "session exists" in str(exc):
                raise ValueError(f"session {record.id!r} already exists") from None
            raise

    @_unavailable
    async def put(self, record: SessionRecord) -> None:
        # xx: only while admitted (a released record is not brought back).
        await self.redis.set(self._session(record.id), _dump(record), px=self._record_ttl_ms, xx=True)

    @_unavailable
    async def get(self, session_id: str) -> SessionRecord | None:
        return _load(await self.redis.get(self._session(session_id)))

    @_unavailable
    async def release(self, session_id: str, worker: str | None = None) -> None:
        await self._release(keys=[self._session(session_id)], args=[self.prefix, session_id, worker or ""])

    @_unavailable
    async def list(self, worker: str | None = None) -> list[SessionRecord]:
        ids = [worker] if worker is not None else [w.id for w in await self.workers()]
        sids: set[str] = set()
        for wid in ids:
            sids |= await self.redis.smembers(self._slots(wid))
        if not sids:
            return []
        raws = await self.redis.mget([self._session(s) for s in sorted(sids)])
        records = [r for r in map(_load, raws) if r is not None]
        return [r for r in records if worker is None or r.worker == worker]

    @_unavailable
    async def count(self, worker: str | None = None) -> int:
        return len(await self.list(worker))

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
        if self._binary is not None:
            await self._binary.aclose()
