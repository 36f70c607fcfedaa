"""Several worker processes on one Redis (real `knotstream serve` processes, real
redis-server, tiny model): placement across workers, per-session routes and pushed audio
through any node, admission at capacity, a worker killed (SIGKILL), Redis restarted under
running sessions, and the SIGTERM drain."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis as redis_sync

from server.testing import AvatarClient, RedisServer, free_port

pytestmark = pytest.mark.redis

KNOTSTREAM = str(Path(sys.executable).parent / "knotstream")
TTL = 1.5
CLUSTER_SECRET = "test-cluster-secret-0123"   # signs requests the workers forward to each other


class Worker:
    """One `knotstream serve` process (stopped in teardown; SIGKILL if it does not stop)."""

    def __init__(self, redis_url: str, wid: str, prefix: str, log_dir: Path, capacity: int = 2,
                 torch_threads: int = 1, **env):
        self.id = wid
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads), "KNOTSTREAM_REDIS_URL": redis_url,
                    "KNOTSTREAM_REDIS_PREFIX": prefix, "KNOTSTREAM_WORKER_ID": wid,
                    "KNOTSTREAM_MAX_SESSIONS": str(capacity), "KNOTSTREAM_STORE_TTL_S": str(TTL),
                    "KNOTSTREAM_HEARTBEAT_S": "0.25", "KNOTSTREAM_AUTH_DISABLED": "true",
                    "KNOTSTREAM_CLUSTER_SECRET": CLUSTER_SECRET,
                    "KNOTSTREAM_OFFER_TIMEOUT_S": "300", "KNOTSTREAM_RETRY_AFTER_S": "3",
                    **{f"KNOTSTREAM_{k.upper()}": str(v) for k, v in env.items()}}
        self.log = log_dir / f"worker-{wid}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Worker":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([KNOTSTREAM, "serve", "--port", str(self.port)], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> "Worker":
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.id} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.id} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGTERM)     # the second signal skips the drain
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def cluster(tmp_path, request):
    """cluster(n, **env) -> started workers "a", "b", ... on a fresh Redis (stopped after)."""
    redis_srv = RedisServer().__enter__()
    workers: list[Worker] = []
    prefix = f"c{os.getpid()}:{request.node.name[:20]}:"

    def make(n: int = 2, **env) -> list[Worker]:
        new = [Worker(redis_srv.url, chr(ord("a") + len(workers) + i), prefix, tmp_path, **env) for i in range(n)]
        workers.extend(new)
        for w in new:
            w.start()
        return [w.wait_ready() for w in new]

    make.redis = redis_srv
    make.prefix = prefix
    make.raw = redis_sync.Redis.from_url(redis_srv.url, decode_responses=True)
    yield make
    for w in workers:
        w.stop()
    make.raw.close()
    redis_srv.__exit__()


def owner(raw, prefix: str, sid: str) -> str:
    import json
    return json.loads(raw.get(f"{prefix}session:{sid}"))["worker"]


def wait_for(pred, timeout_s: float, what: str, period: float = 0.1):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def bearer(body: dict) -> dict:
    return {"Authorization": f"Bearer {body['token']}"}


def test_sessions_spread_over_workers_and_any_node_reaches_them(cluster):
    a, b = cluster(2, max_sessions=2)
    raw, prefix = cluster.raw, cluster.prefix
    with httpx.Client(base_url=a.url, timeout=120) as ca, httpx.Client(base_url=b.url, timeout=120) as cb:
        # Every create goes to node a: two are admitted there, the next two are placed on b.
        made = []
        for _ in range(4):
            r = ca.post("/v1/sessions", json={"avatar": "ada"})
            assert r.status_code == 201, r.text
            made.append(r.json())
        owners = [owner(raw, prefix, s["id"]) for s in made]
        assert sorted(owners) == ["a", "a", "b", "b"]
        assert ca.get("/readyz").json()["sessions"] == 2 and cb.get("/readyz").json()["sessions"] == 2
        # The cluster is full: 503 too_many_sessions with Retry-After, from either node.
        for c in (ca, cb):
            full = c.post("/v1/sessions", json={"avatar": "ben"})
            assert full.status_code == 503, full.text
            assert full.json()["error"]["code"] == "too_many_sessions" and full.headers["retry-after"] == "3"

        on_b = next(s for s, o in zip(made, owners) if o == "b")
        # Per-session routes through the other node are proxied (token kept, answer intact).
        st = ca.get(on_b["location"], headers=bearer(on_b))
        assert st.status_code == 200, st.text
        assert st.json()["id"] == on_b["id"] and st.json()["driving"]["speech_samples"] == 0
        assert len(st.headers.get_list("date")) == 1 and len(st.headers.get_list("server")) == 1
        assert ca.get(on_b["location"], headers={"Authorization": "Bearer nope"}).status_code == 404
        # A client cannot pose as a worker: a forwarded header that does not verify is refused.
        for forged in ("a", f"a;{int(time.time())};{'0' * 64}"):
            r = ca.get(on_b["location"], headers={**bearer(on_b), "X-Knotstream-Forwarded": forged})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forwarded_refused", r.text
        # The audio WebSocket is not proxied: on the other node it says so, without naming
        # the owner's address or id (internal to the cluster).
        ws_error = asyncio.run(ws_first_message(f"ws://127.0.0.1:{a.port}{on_b['location']}/audio/ws"
                                                f"?token={on_b['token']}"))
        assert ws_error["code"] == "session_on_other_worker", ws_error
        assert str(b.port) not in ws_error["message"] and "127.0.0.1" not in ws_error["message"]
        assert " b " not in f" {ws_error['message']} ", ws_error["message"]
        # uvicorn logs the WebSocket's path with its query: the token shows up redacted.
        wait_for(lambda: "[redacted]" in a.log.read_text(), 10, "a's log line of the WebSocket")
        assert on_b["token"] not in a.log.read_text()

        # Audio pushed to node a reaches the session on b through b's Redis stream.
        n = 16000
        pcm = (0.2 * 32767 * np.sin(np.arange(n) * 2 * np.pi * 220 / 16000)).astype("<i2").tobytes()
        r = ca.post(f"{on_b['location']}/audio", content=pcm, params={"segment": "s1", "end": "false"},
                    headers={**bearer(on_b), "Content-Type": "audio/pcm"})
        assert r.status_code == 202, r.text
        assert r.json() == {"segment": "s1", "seconds": 1.0}
        r = ca.post(f"{on_b['location']}/audio", content=pcm[: n], params={"segment": "s1"},
                    headers={**bearer(on_b), "Content-Type": "audio/pcm"})
        assert r.status_code == 202, r.text
        stats = lambda: cb.get(on_b["location"], headers=bearer(on_b)).json()["driving"]  # noqa: E731
        wait_for(lambda: stats()["speech_samples"] == n + n // 2, 30, "the forwarded audio on the owner")
        # The node that forwarded holds nothing of it; interrupt goes the same way.
        assert ca.get("/readyz").json()["sessions"] == 2
        r = ca.post(f"{on_b['location']}/interrupt", headers=bearer(on_b))
        assert r.status_code == 200 and r.json()["forwarded"] is True and "b" not in r.json().values()
        wait_for(lambda: stats()["interrupts"] == 1, 30, "the forwarded interrupt on the owner")

        # Events through node a (proxied stream), then DELETE through node a closes it on b.
        async def events_then_delete():
            async with httpx.AsyncClient(base_url=a.url, timeout=60) as c:
                async with c.stream("GET", f"{on_b['location']}/events", headers=bearer(on_b)) as resp:
                    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
                    lines = resp.aiter_lines()
                    assert (await anext(lines)).startswith(":")
                    d = await c.delete(on_b["location"], headers=bearer(on_b))
                    assert d.status_code == 204
                    async for line in lines:
                        if line.startswith("data:"):
                            return line
        closed = asyncio.run(asyncio.wait_for(events_then_delete(), 60))
        assert '"closed"' in closed and "deleted by client" in closed
        wait_for(lambda: cb.get("/readyz").json()["sessions"] == 1, 10, "b to drop the session")
        assert ca.get(on_b["location"], headers=bearer(on_b)).status_code == 404
        # Its slot is free again: the next create through a lands on b.
        r = ca.post("/v1/sessions", json={"avatar": "cleo"})
        assert r.status_code == 201 and owner(raw, prefix, r.json()["id"]) == "b"


async def ws_first_message(url: str) -> dict:
    import json

    import websockets

    async with websockets.connect(url) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 30))


def test_api_keys_travel_with_proxied_requests(cluster):
    key = "k" * 24
    a, b = cluster(2, max_sessions=1, api_keys=key, auth_disabled="false")
    raw, prefix = cluster.raw, cluster.prefix
    with httpx.Client(base_url=a.url, timeout=120) as ca:
        assert ca.post("/v1/sessions", json={"avatar": "ada"}).status_code == 401
        first = ca.post("/v1/sessions", json={"avatar": "ada"}, headers={"Authorization": f"Bearer {key}"})
        assert first.status_code == 201 and owner(raw, prefix, first.json()["id"]) == "a"
        # a is full now: without a key nothing is passed on; with one, b admits it (b checked the key).
        assert ca.post("/v1/sessions", json={"avatar": "ben"}).status_code == 401
        assert ca.post("/v1/sessions", json={"avatar": "ben"},
                       headers={"Authorization": "Bearer " + "x" * 24}).status_code == 401
        second = ca.post("/v1/sessions", json={"avatar": "ben"}, headers={"X-API-Key": key})
        assert second.status_code == 201, second.text
        assert owner(raw, prefix, second.json()["id"]) == "b"
        st = ca.get(second.json()["location"], headers=bearer(second.json()))
        assert st.status_code == 200 and st.json()["id"] == second.json()["id"]


def test_a_killed_worker_fails_its_sessions_and_new_ones_go_elsewhere(cluster):
    a, b = cluster(2, max_sessions=2)
    raw, prefix = cluster.raw, cluster.prefix
    with httpx.Client(base_url=a.url, timeout=120) as ca:
        on_b = httpx.post(f"{b.url}/v1/sessions", json={"avatar": "ada"}, timeout=120).json()
        assert owner(raw, prefix, on_b["id"]) == "b"
        b.proc.kill()                                    # SIGKILL: no shutdown, no unregister
        b.proc.wait()
        t0 = time.monotonic()
        seen = []

        def failed():
            r = ca.get(on_b["location"], headers=bearer(on_b))
            seen.append((r.status_code, r.json()["error"]["code"]))
            return r if r.status_code == 410 else None
        r = wait_for(failed, 4 * TTL + 5, "410 session_failed")
        took = time.monotonic() - t0
        # Until it is swept: 503 worker_unavailable (refused connection, then no registered worker).
        assert set(seen[:-1]) <= {(503, "worker_unavailable")} and seen[-1] == (410, "session_failed")
        assert r.json()["error"]["code"] == "session_failed" and "worker b" in r.json()["error"]["message"]
        assert took < 2 * TTL + 2        # entry TTL + one sweep period, with slack for a busy machine
        # Other routes say the same; a wrong token still learns nothing.
        assert ca.post(f"{on_b['location']}/audio", content=b"\0\0" * 160,
                       headers={**bearer(on_b), "Content-Type": "audio/pcm"}).status_code == 410
        assert ca.get(on_b["location"], headers={"Authorization": "Bearer nope"}).status_code == 404
        assert [w for w in raw.smembers(f"{prefix}workers")] == ["a"]
        # New sessions go to a (b is gone from the registry), up to a's capacity.
        for _ in range(2):
            r = ca.post("/v1/sessions", json={"avatar": "ben"})
            assert r.status_code == 201, r.text
            assert owner(raw, prefix, r.json()["id"]) == "a"
        assert ca.post("/v1/sessions", json={"avatar": "ben"}).status_code == 503


def test_redis_restart_under_running_sessions(cluster):
    a, b = cluster(2, max_sessions=2)
    prefix, redis_srv = cluster.prefix, cluster.redis
    raw = redis_sync.Redis.from_url(redis_srv.url, decode_responses=True, retry_on_error=[redis_sync.ConnectionError])

    async def scenario():
        client = AvatarClient(b.url)
        await client.connect("ada")
        sid = client.session["id"]
        try:
            await asyncio.sleep(1.0)
            before = len(client.got.video)
            assert before > 0
            redis_srv.__exit__()                          # Redis goes away (no persistence: comes back empty)
            await asyncio.sleep(1.5)
            during = len(client.got.video)
            assert during > before                        # the session keeps streaming without Redis
            redis_srv.__enter__()                         # same port, empty
            # The registry recovers from heartbeats: both workers and b's session are back.
            await asyncio.to_thread(wait_for, lambda: raw.exists(f"{prefix}worker:a", f"{prefix}worker:b") == 2
                                    and raw.exists(f"{prefix}session:{sid}"), 15, "the registry to recover")
            assert len(client.got.video) > during
            # Routing works again: audio pushed to a reaches b (its stream group is made again).
            pcm = np.zeros(8000, "<i2").tobytes()
            async with httpx.AsyncClient(base_url=a.url, timeout=60) as c:
                hdr = {**client.headers, "Content-Type": "audio/pcm"}
                r = await c.post(f"/v1/sessions/{sid}/audio", content=pcm, headers=hdr)
                assert r.status_code == 202, r.text

                async def samples():
                    st = await c.get(f"/v1/sessions/{sid}", headers=client.headers)
                    return st.json()["driving"]["speech_samples"] if st.status_code == 200 else -1
                end = time.monotonic() + 20
                while await samples() != 8000 and time.monotonic() < end:
                    await asyncio.sleep(0.2)
                assert await samples() == 8000
                r = await c.post("/v1/sessions", json={"avatar": "ben"})
                assert r.status_code == 201, r.text
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_sigterm_drains(cluster):
    (a,) = cluster(1, max_sessions=2, drain_timeout_s=8)   # sessions get 8 s less a 4 s shutdown reserve
    raw, prefix = cluster.raw, cluster.prefix

    async def scenario():
        client = AvatarClient(a.url)
        await client.connect("ada")
        try:
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            a.proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=a.url, timeout=30) as c:
                end = time.monotonic() + 5
                while (await c.get("/readyz")).status_code == 200 and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                r = await c.get("/readyz")
                assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
                r = await c.post("/v1/sessions", json={"avatar": "ben"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
                assert r.headers["retry-after"] == "3"
                # The running session still works while draining.
                st = await c.get(client.session["location"], headers=client.headers)
                assert st.status_code == 200 and st.json()["state"] != "closed"
                assert raw.hget(f"{prefix}worker:a", "capacity") == "0"   # nobody places sessions here
            closed = await client.wait_message(lambda m: m.get("type") == "closed", timeout_s=30)
            assert closed["reason"] == "server shutting down"
            assert 3.0 <= time.monotonic() - t0                # it had its drain time (4 s)
            code = await asyncio.to_thread(a.proc.wait, 30)
            assert code in (0, -signal.SIGTERM)
            assert time.monotonic() - t0 <= 8.0 + 1.0         # gone within the drain timeout
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert raw.keys(f"{prefix}worker:*") == [] and raw.keys(f"{prefix}session:*") == []


def test_a_draining_worker_places_new_sessions_on_the_others(cluster):
    a, b = cluster(2, max_sessions=2, drain_timeout_s=30)
    raw, prefix = cluster.raw, cluster.prefix
    with httpx.Client(base_url=a.url, timeout=120) as ca:
        mine = ca.post("/v1/sessions", json={"avatar": "ada"}).json()   # keeps a draining for a while
        assert owner(raw, prefix, mine["id"]) == "a"
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: ca.get("/readyz").status_code == 503, 10, "a to start draining")
        r = ca.post("/v1/sessions", json={"avatar": "ben"})
        assert r.status_code == 201, r.text
        assert owner(raw, prefix, r.json()["id"]) == "b"
        # Ending its last session lets the drain finish early: a exits long before 30 s.
        t0 = time.monotonic()
        assert ca.delete(mine["location"], headers=bearer(mine)).status_code == 204
        assert a.proc.wait(20) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 20
    assert not raw.exists(f"{prefix}worker:a") and raw.exists(f"{prefix}worker:b")
