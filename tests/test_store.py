"""server/store.py and server/store_redis.py: the same contract for the in-process and the
Redis store (records, worker registry, atomic admission, release), plus TTL expiry and
concurrent admission against a real redis-server (started by the test, never on 6379)."""

import asyncio
import time

import pytest

from server.records import SessionRecord, StoreUnavailable, WorkerInfo
from server.store import MemoryStore
from server.testing import RedisServer, free_port

TTL = 0.6  # seconds; short so expiry tests are quick


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as r:
        yield r


_prefix = iter(range(10**6))


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request):
    """A fresh store; each Redis store gets its own key prefix on the shared server."""
    if request.param == "memory":
        s = MemoryStore(ttl_s=TTL)
    else:
        from server.store_redis import RedisStore
        s = RedisStore(request.getfixturevalue("redis_server").url, prefix=f"t{next(_prefix)}:", ttl_s=TTL)
    yield s
    await s.close()


def worker(wid="w1", capacity=3, address="http://10.0.0.1:8000"):
    return WorkerInfo(id=wid, address=address, capacity=capacity)


def record(sid, wid="w1", state="new"):
    return SessionRecord(sid, "ab" * 32, worker=wid, state=state, avatar=None if sid.endswith("x") else "ada")


# ----- the shared contract ----------------------------------------------------------------

async def test_records_round_trip_update_and_release(store):
    await store.register_worker(worker())
    rec = record("s1", state="starting")
    assert await store.admit(rec) == "w1"
    got = await store.get("s1")
    assert got == rec
    await store.put(got.with_state("new"))
    assert (await store.get("s1")).state == "new"
    await store.release("s1")
    assert await store.get("s1") is None
    # put after release does not bring the record back (a late state update from a closed session)
    await store.put(got)
    assert await store.get("s1") is None
    assert await store.get("never-admitted") is None


async def test_worker_registry_load_and_listing(store):
    await store.register_worker(worker("w1", 2))
    await store.register_worker(worker("w2", 5, address="http://10.0.0.2:8000"))
    assert await store.admit(record("a"), worker="w1") == "w1"
    assert await store.admit(record("b", "w2"), worker="w2") == "w2"
    assert await store.admit(record("c", "w2"), worker="w2") == "w2"
    ws = {w.id: w for w in await store.workers()}
    assert set(ws) == {"w1", "w2"}
    assert (ws["w1"].capacity, ws["w1"].load, ws["w1"].address) == (2, 1, "http://10.0.0.1:8000")
    assert (ws["w2"].capacity, ws["w2"].load) == (5, 2)
    assert sorted(r.id for r in await store.list()) == ["a", "b", "c"]
    assert sorted(r.id for r in await store.list("w2")) == ["b", "c"]
    assert await store.count("w1") == 1 and await store.count() == 3
    await store.unregister_worker("w2")
    assert [w.id for w in await store.workers()] == ["w1"]
    assert await store.get("b") is None and await store.count() == 1


async def test_admission_never_overcommits_and_release_frees_the_slot(store):
    await store.register_worker(worker("w1", 2))
    assert await store.admit(record("a")) == "w1"
    assert await store.admit(record("b")) == "w1"
    assert await store.admit(record("c")) is None          # full
    assert await store.get("c") is None                     # a refused admission writes nothing
    await store.release("a")
    assert await store.admit(record("c")) == "w1"
    assert await store.admit(record("d"), worker="nobody") is None   # unknown worker: refused
    with pytest.raises(ValueError):
        await store.admit(record("b"))                      # ids are unique


async def test_any_worker_admission_picks_the_one_with_most_free_slots(store):
    await store.register_worker(worker("w1", 2))
    await store.register_worker(worker("w2", 4))
    placed = [await store.admit(record(f"s{i}")) for i in range(6)]
    assert placed.count("w1") == 2 and placed.count("w2") == 4
    assert placed[0] == "w2"                                 # 4 free beats 2 free
    assert (await store.get("s0")).worker == "w2"            # the record names the chosen worker
    assert await store.admit(record("s6")) is None           # the whole cluster is full


async def test_concurrent_admits_take_exactly_capacity(store):
    await store.register_worker(worker("w1", 3))
    results = await asyncio.gather(*(store.admit(record(f"c{i}")) for i in range(50)))
    assert sum(r == "w1" for r in results) == 3
    assert results.count(None) == 47
    assert (await store.workers())[0].load == 3


async def test_release_with_an_expired_record_still_frees_the_slot(store):
    await store.register_worker(worker("w1", 1))
    assert await store.admit(record("a")) == "w1"
    await asyncio.sleep(TTL * 0.6)
    await store.heartbeat(worker("w1", 1))                  # the worker lives; "a" is not refreshed
    await asyncio.sleep(TTL * 0.6)
    assert await store.get("a") is None                     # its record expired ...
    assert await store.admit(record("b")) is None           # ... but its slot is still held (safe side)
    await store.release("a", worker="w1")
    assert await store.admit(record("b")) == "w1"


async def test_heartbeat_keeps_worker_and_sessions_alive_and_expiry_drops_them(store):
    w = worker("w1", 3)
    await store.register_worker(w)
    await store.admit(record("a"))
    for _ in range(4):                                      # 4 x 0.4 TTL > TTL: kept alive by heartbeats
        await asyncio.sleep(TTL * 0.4)
        await store.heartbeat(w, [record("a")])
    assert await store.get("a") is not None and [x.id for x in await store.workers()] == ["w1"]
    await asyncio.sleep(TTL * 1.3)                          # heartbeats stop: everything expires
    assert await store.get("a") is None
    assert await store.workers() == []
    assert await store.admit(record("b")) is None           # a dead worker takes no sessions
    assert await store.list() == []


async def test_heartbeat_after_expiry_restores_the_sessions_the_worker_still_holds(store):
    w = worker("w1", 2)
    await store.register_worker(w)
    await store.admit(record("a"))
    await asyncio.sleep(TTL * 1.3)                          # a long pause (partition, stalled loop)
    assert await store.workers() == [] and await store.get("a") is None
    await store.heartbeat(w, [record("a")])                 # the worker is back, still running "a"
    assert (await store.get("a")).worker == "w1"
    assert (await store.workers())[0].load == 1
    assert await store.admit(record("b")) == "w1"
    assert await store.admit(record("c")) is None           # "a" counts: capacity 2 is respected


async def test_a_release_racing_a_heartbeat_is_not_undone(store):
    w = worker("w1", 1)
    await store.register_worker(w)
    await store.admit(record("a"))
    held = [record("a")]                                    # the heartbeat's snapshot, taken before ...
    await store.release("a")                                # ... the session closed
    await store.heartbeat(w, held)
    assert await store.get("a") is None
    assert await store.admit(record("b")) == "w1"


# ----- Redis only -----------------------------------------------------------------------

@pytest.mark.redis
async def test_redis_admission_is_atomic_across_clients(redis_server):
    """50 admits from 10 separate clients (as from 10 processes) against capacity 3."""
    from server.store_redis import RedisStore

    stores = [RedisStore(redis_server.url, prefix="race:", ttl_s=30) for _ in range(10)]
    try:
        await stores[0].register_worker(worker("w1", 3))
        results = await asyncio.gather(*(stores[i % 10].admit(record(f"r{i}")) for i in range(50)))
        assert sorted(r for r in results if r) == ["w1"] * 3
        admitted = {f"r{i}" for i, r in enumerate(results) if r}
        assert {r.id for r in await stores[5].list("w1")} == admitted
        await asyncio.gather(*(stores[i % 10].release(sid) for i, sid in enumerate(admitted)))
        assert (await stores[1].workers())[0].load == 0
    finally:
        for s in stores:
            await s.unregister_worker("w1") if s is stores[0] else None
            await s.close()


@pytest.mark.redis
async def test_redis_keys_expire_on_the_server(redis_server):
    """TTLs are Redis's own (PX), not computed by the client: keys vanish with no client."""
    import redis.asyncio as aioredis

    from server.store_redis import RedisStore

    s = RedisStore(redis_server.url, prefix="ttl:", ttl_s=TTL)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await s.register_worker(worker("w1", 2))
        await s.admit(record("a"))
        keys = set(await raw.keys("ttl:*"))
        assert keys == {"ttl:workers", "ttl:worker:w1", "ttl:worker:w1:sessions", "ttl:session:a"}
        for k in keys - {"ttl:workers"}:
            assert 0 < await raw.pttl(k) <= TTL * 1000
        await asyncio.sleep(TTL * 1.5)
        assert set(await raw.keys("ttl:*")) <= {"ttl:workers"}   # the id set is pruned on the next read
        assert await s.workers() == []
    finally:
        await raw.aclose()
        await s.close()


@pytest.mark.redis
async def test_redis_down_raises_store_unavailable():
    from server.store_redis import RedisStore

    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0", ttl_s=5, timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await s.admit(record("a"))
    assert time.monotonic() - t0 < 5
    await s.close()


# ----- dead workers: sweep --------------------------------------------------------------

@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def graced(request):
    """Stores whose records outlive a dead worker's entry by one TTL (as the server opens them)."""
    if request.param == "memory":
        s = MemoryStore(ttl_s=TTL, grace_s=TTL, failed_ttl_s=30)
    else:
        from server.store_redis import RedisStore
        s = RedisStore(request.getfixturevalue("redis_server").url, prefix=f"g{next(_prefix)}:", ttl_s=TTL,
                       grace_s=TTL, failed_ttl_s=30)
    yield s
    await s.close()


async def test_sweep_marks_a_dead_workers_sessions_failed_once(graced):
    store = graced
    w1, w2 = worker("w1", 2), worker("w2", 2, address="http://10.0.0.2:8000")
    await store.register_worker(w1)
    await store.register_worker(w2)
    assert await store.admit(record("a", "w1"), worker="w1") == "w1"
    assert await store.admit(record("b", "w2"), worker="w2") == "w2"
    assert await store.sweep() == []                        # everyone alive: nothing to claim
    for _ in range(4):                                      # w1 dies; w2 keeps beating
        await asyncio.sleep(TTL * 0.35)
        await store.heartbeat(w2, [await store.get("b")])
    assert [w.id for w in await store.workers()] == ["w2"]
    assert (await store.get("a")).state == "new"            # within the grace: not yet swept
    assert await store.sweep() == [("w1", 1)]
    assert await store.sweep() == []                        # claimed exactly once
    failed = await store.get("a")
    assert failed.state == "failed" and "w1" in failed.reason and failed.token_hash == "ab" * 32
    assert (await store.get("b")).state == "new"
    await asyncio.sleep(TTL * 1.2)                          # past the grace: the failed record is kept
    assert (await store.get("a")).state == "failed"
    await store.heartbeat(w2, [await store.get("b")])
    placed = [await store.admit(record(f"n{i}")) for i in range(2)]
    assert placed == ["w2", None]                           # new sessions go to the live worker only


async def test_a_swept_worker_that_comes_back_restores_its_sessions(graced):
    store = graced
    w1 = worker("w1", 2)
    await store.register_worker(w1)
    await store.admit(record("a"))
    await asyncio.sleep(TTL * 1.2)
    assert await store.sweep() == [("w1", 1)]
    await store.heartbeat(w1, [record("a")])                # it was only stalled
    assert (await store.get("a")).state == "new"
    assert (await store.workers())[0].load == 1


@pytest.mark.redis
async def test_concurrent_sweepers_claim_a_dead_worker_once(redis_server):
    from server.store_redis import RedisStore

    stores = [RedisStore(redis_server.url, prefix="sweep:", ttl_s=TTL, grace_s=TTL) for _ in range(6)]
    try:
        await stores[0].register_worker(worker("w1", 4))
        for i in range(3):
            await stores[0].admit(record(f"s{i}"))
        await asyncio.sleep(TTL * 1.2)
        results = await asyncio.gather(*(s.sweep() for s in stores))
        assert sorted(r for r in results if r) == [[("w1", 3)]]
        assert {(await stores[3].get(f"s{i}")).state for i in range(3)} == {"failed"}
    finally:
        for s in stores:
            await s.close()
