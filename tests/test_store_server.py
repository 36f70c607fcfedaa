"""The server on the Redis store (`redis_url` set): it registers itself as a worker with its
capacity and address, heartbeats, admits sessions through Redis (so slots taken by other
workers' admissions count), answers 503 + Retry-After when full, frees slots on close,
proxies requests for a session of another worker, 503 store_unavailable when Redis is down,
and unregisters on shutdown. Real redis-server, real tiny engine."""

import asyncio
import time

import httpx
import pytest
import redis as redis_sync

from model.engine import Engine
from server import auth
from server.settings import Settings
from server.records import SessionRecord, WorkerInfo
from server.store_redis import RedisStore
from server.testing import LiveServer, RedisServer

pytestmark = pytest.mark.redis

PREFIX = "srv:"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny")


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as r:
        yield r


@pytest.fixture()
def raw(redis_server):
    client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def settings(url, **kw):
    return Settings(max_sessions=2, redis_url=url, redis_prefix=PREFIX, store_ttl_s=1.5, heartbeat_s=0.25,
                    retry_after_s=7, worker_id="test-worker", public_url="http://worker-a.internal:8000",
                    cluster_secret="test-cluster-secret-0123", **kw)


def create(c, avatar="ada"):
    return c.post("/v1/sessions", json={"avatar": avatar})


def other_store_call(url, fn):
    """Run `fn(store)` with a separate RedisStore client (as another worker process would)."""
    async def go():
        s = RedisStore(url, prefix=PREFIX, ttl_s=30)
        try:
            return await fn(s)
        finally:
            await s.close()
    return asyncio.run(go())


def test_server_admits_through_redis_and_unregisters_on_shutdown(engine, redis_server, raw):
    url = redis_server.url
    with LiveServer(settings(url), engine) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        wkey = f"{PREFIX}worker:test-worker"
        assert raw.hgetall(wkey) | {"started": "x"} == {"id": "test-worker", "capacity": "2", "started": "x",
                                                        "address": "http://worker-a.internal:8000"}
        r = create(c)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        record = other_store_call(url, lambda s: s.get(sid))
        assert record.worker == "test-worker" and record.state == "new"
        assert record.token_hash == auth.digest(r.json()["token"])   # only the hash is stored
        assert raw.smembers(f"{wkey}:sessions") == {sid}

        # Another worker's admission onto this worker's id (a router, say) takes the second
        # slot: the server is now full although it runs one session itself.
        foreign = SessionRecord("f" * 16, "00" * 32, worker="test-worker")
        assert other_store_call(url, lambda s: s.admit(foreign, worker="test-worker")) == "test-worker"
        full = create(c)
        assert full.status_code == 503, full.text
        assert full.json()["error"]["code"] == "too_many_sessions"
        assert full.headers["retry-after"] == "7"
        assert len(srv.manager.sessions) == 1
        other_store_call(url, lambda s: s.release(foreign.id))

        # Heartbeats keep the worker and its session alive well past the TTL.
        time.sleep(2.5)
        assert raw.exists(wkey) and raw.exists(f"{PREFIX}session:{sid}")
        assert 0 < raw.pttl(f"{PREFIX}session:{sid}") <= 3000   # TTL + the grace for sweepers

        r2 = create(c, "ben")
        assert r2.status_code == 201, r2.text
        assert create(c).status_code == 503
        # Closing frees the slot in Redis at once.
        auth_hdr = {"Authorization": f"Bearer {r.json()['token']}"}
        assert c.delete(f"/v1/sessions/{sid}", headers=auth_hdr).status_code == 204
        deadline = time.monotonic() + 5
        while raw.exists(f"{PREFIX}session:{sid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not raw.exists(f"{PREFIX}session:{sid}")
        assert raw.smembers(f"{wkey}:sessions") == {r2.json()["id"]}
        assert create(c, "cleo").status_code == 201
    # Shutdown unregisters: no worker entry, no slots, no records left.
    assert raw.keys(f"{PREFIX}worker:*") == [] and raw.keys(f"{PREFIX}session:*") == []


def test_session_on_an_unreachable_worker_is_503_only_with_its_token(engine, redis_server):
    """Another worker's session is proxied there (server/routing.py); that worker does not
    answer here (a made-up address), so 503 worker_unavailable naming it; without the right
    token nothing is proxied: the same 404 as for an unknown id."""
    url = redis_server.url
    token = "t" * 43
    rec = SessionRecord("abcdef0123456789", auth.digest(token), worker="worker-b")

    async def seed(s):
        await s.register_worker(WorkerInfo("worker-b", "http://worker-b.internal:8000", 4))
        return await s.admit(rec, worker="worker-b")

    assert other_store_call(url, seed) == "worker-b"
    try:
        with LiveServer(settings(url), engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.get(f"/v1/sessions/{rec.id}", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "worker_unavailable"
            assert "http://worker-b.internal:8000" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "7"
            wrong = c.get(f"/v1/sessions/{rec.id}", headers={"Authorization": "Bearer nope"})
            unknown = c.get("/v1/sessions/0000000000000000", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == unknown.status_code == 404
            assert wrong.json()["error"]["code"] == unknown.json()["error"]["code"] == "session_not_found"
    finally:
        other_store_call(url, lambda s: s.unregister_worker("worker-b"))


def test_redis_down_is_503_store_unavailable(engine):
    with RedisServer() as r:
        with LiveServer(settings(r.url), engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            live = create(c)
            assert live.status_code == 201, live.text
            r.__exit__()                       # Redis goes away under a running server
            resp = create(c)
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "store_unavailable"
            assert resp.headers["retry-after"] == "7"
            assert list(srv.manager.sessions) == [live.json()["id"]]
            assert c.get("/healthz").status_code == 200
            # The session this worker runs keeps working; a wrong token is still a 404.
            loc = live.json()["location"]
            st = c.get(loc, headers={"Authorization": f"Bearer {live.json()['token']}"})
            assert st.status_code == 200 and st.json()["state"] == "new"
            assert c.get(loc, headers={"Authorization": "Bearer nope"}).status_code == 404
            assert c.delete(loc, headers={"Authorization": f"Bearer {live.json()['token']}"}).status_code == 204


def test_a_stalled_worker_expires_and_comes_back_with_its_sessions(engine, redis_server, raw):
    with LiveServer(settings(redis_server.url), engine) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        r = create(c)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        wkey = f"{PREFIX}worker:test-worker"
        srv.call(_stop_heartbeats(srv.manager))            # the worker stalls: no more heartbeats
        time.sleep(2.0)                                     # > store_ttl_s = 1.5
        # The worker entry is gone; the record lives one more TTL (the grace for sweepers).
        assert not raw.exists(wkey) and raw.exists(f"{PREFIX}session:{sid}")
        # The next create finds its own entry gone, registers again with the session it still
        # runs (so that session keeps its slot), and is admitted: capacity 2 = old + new.
        r2 = create(c, "ben")
        assert r2.status_code == 201, r2.text
        assert raw.smembers(f"{wkey}:sessions") == {sid, r2.json()["id"]}
        assert raw.exists(f"{PREFIX}session:{sid}")
        assert create(c).status_code == 503


async def _stop_heartbeats(manager):
    manager._heartbeat_task.cancel()


def test_redis_not_up_yet_at_start_then_registers_by_heartbeat(engine):
    r = RedisServer()
    s = settings(r.url)                      # nothing listens on r.port yet
    with LiveServer(s, engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert create(c).json()["error"]["code"] == "store_unavailable"
        with r:                              # Redis comes up on the configured port
            raw = redis_sync.Redis.from_url(r.url, decode_responses=True)
            deadline = time.monotonic() + 5
            while not raw.exists(f"{PREFIX}worker:test-worker") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert raw.hget(f"{PREFIX}worker:test-worker", "capacity") == "2"
            assert create(c).status_code == 201
            raw.close()


def test_concurrent_creates_never_overcommit(engine, redis_server, raw):
    """30 creates at once against capacity 2: exactly 2 sessions, the rest 503 + Retry-After."""
    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/sessions", json={"avatar": "ada"}) for _ in range(30)))

    with LiveServer(settings(redis_server.url), engine) as srv:
        replies = asyncio.run(burst(srv.url))
        codes = sorted(r.status_code for r in replies)
        assert codes == [201] * 2 + [503] * 28
        assert all(r.headers["retry-after"] == "7" and r.json()["error"]["code"] == "too_many_sessions"
                   for r in replies if r.status_code == 503)
        assert len(srv.manager.sessions) == 2
        assert raw.scard(f"{PREFIX}worker:test-worker:sessions") == 2
