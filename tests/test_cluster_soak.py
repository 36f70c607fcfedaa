"""Load and soak tests of several workers on one Redis (marked: deselected by default; run
on a quiet machine with `pytest -m load tests/test_cluster_soak.py` / `-m soak`).

Sizes come from the environment so the same tests scale to a bigger host:
KNOTSTREAM_LOAD_WORKERS (2), KNOTSTREAM_LOAD_CAPACITY (4 per worker), KNOTSTREAM_LOAD_CREATES
(60), KNOTSTREAM_LOAD_PUSHES (20 per session); KNOTSTREAM_SOAK_S (1800), KNOTSTREAM_SOAK_CLIENTS (2).
"""

import asyncio
import os
import random
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.testing import AvatarClient
from tests.test_cluster import bearer, cluster, owner  # noqa: F401  (cluster is a fixture)

pytestmark = pytest.mark.redis


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.load
def test_load_burst_of_creates_and_pushes_through_any_node(cluster):
    n_workers = env_int("KNOTSTREAM_LOAD_WORKERS", 2)
    capacity = env_int("KNOTSTREAM_LOAD_CAPACITY", 4)
    creates = env_int("KNOTSTREAM_LOAD_CREATES", 60)
    pushes = env_int("KNOTSTREAM_LOAD_PUSHES", 20)
    workers = cluster(n_workers, max_sessions=capacity, audio_rate_per_s=1000, audio_burst=1000)
    raw, prefix = cluster.raw, cluster.prefix
    urls = [w.url for w in workers]
    piece = np.zeros(1600, "<i2").tobytes()                 # 0.1 s of 16 kHz PCM16

    async def run():
        async with httpx.AsyncClient(timeout=300) as c:
            t0 = time.monotonic()
            replies = await asyncio.gather(*(c.post(f"{random.choice(urls)}/v1/sessions", json={"avatar": "ada"})
                                             for _ in range(creates)))
            create_s = time.monotonic() - t0
            made = [r.json() for r in replies if r.status_code == 201]
            refused = [r for r in replies if r.status_code != 201]
            # Exactly the cluster's capacity is admitted, never more; every refusal is a clean 503.
            assert len(made) == min(creates, n_workers * capacity), [r.text for r in refused[:3]]
            assert all(r.status_code == 503 and r.json()["error"]["code"] == "too_many_sessions"
                       and "retry-after" in r.headers for r in refused)
            per_worker = [owner(raw, prefix, s["id"]) for s in made]
            assert max(per_worker.count(w.id) for w in workers) <= capacity

            latencies = []

            async def push(session):
                for i in range(pushes):
                    t = time.monotonic()
                    r = await c.post(f"{random.choice(urls)}{session['location']}/audio", content=piece,
                                     params={"segment": "load", "end": str(i == pushes - 1).lower()},
                                     headers={**bearer(session), "Content-Type": "audio/pcm"})
                    latencies.append(time.monotonic() - t)
                    assert r.status_code == 202, r.text
            await asyncio.gather(*(push(s) for s in made))

            async def samples(session):
                r = await c.get(f"{urls[0]}{session['location']}", headers=bearer(session))
                return r.json()["driving"]["speech_samples"]
            want = pushes * len(piece) // 2
            end = time.monotonic() + 120
            while time.monotonic() < end and any([await samples(s) != want for s in made]):
                await asyncio.sleep(0.5)
            assert [await samples(s) for s in made] == [want] * len(made)
            p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))]
            print(f"\nload: {creates} creates in {create_s:.1f} s ({len(made)} admitted); {len(latencies)} pushes, "
                  f"median {1000 * statistics.median(latencies):.0f} ms, p95 {1000 * p95:.0f} ms")

    asyncio.run(run())


@pytest.mark.soak
def test_soak_sessions_stream_for_a_long_time_with_pushes_through_any_node(cluster):
    duration = env_int("KNOTSTREAM_SOAK_S", 1800)
    n_clients = env_int("KNOTSTREAM_SOAK_CLIENTS", 2)
    workers = cluster(2, max_sessions=max(2, n_clients), audio_rate_per_s=1000, audio_burst=1000)
    urls = [w.url for w in workers]
    pcm = (0.2 * 32767 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype("<i2").tobytes()

    async def run():
        clients = [AvatarClient(urls[i % 2]) for i in range(n_clients)]
        for client in clients:
            await client.connect("ada")
        rss0 = {w.id: rss_mb(w.proc.pid) for w in workers}
        pushed = {id(c): 0 for c in clients}
        errors = []
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                end = time.monotonic() + duration
                last_frames = [0] * n_clients
                while time.monotonic() < end:
                    for i, client in enumerate(clients):
                        r = await http.post(f"{random.choice(urls)}{client.session['location']}/audio", content=pcm,
                                            headers={**client.headers, "Content-Type": "audio/pcm"})
                        if r.status_code >= 500:
                            errors.append(r.text)
                        elif r.status_code == 202:
                            pushed[id(client)] += 16000
                    await asyncio.sleep(5)
                    frames = [len(c.got.video) for c in clients]
                    assert all(f > last for f, last in zip(frames, last_frames)), "a session stopped streaming"
                    last_frames = frames
                    for w in workers:
                        assert w.proc.poll() is None, f"worker {w.id} died"
                for client in clients:
                    st = (await http.get(f"{urls[0]}{client.session['location']}", headers=client.headers)).json()
                    assert st["state"] != "closed" and st["driving"]["speech_samples"] == pushed[id(client)]
        finally:
            for client in clients:
                await client.close()
        assert not errors, errors[:3]
        growth = {w.id: rss_mb(w.proc.pid) - rss0[w.id] for w in workers}
        print(f"\nsoak: {duration} s, {n_clients} sessions; RSS growth MB {growth}")
        assert all(g < 300 for g in growth.values()), growth   # no unbounded growth (generous)

    asyncio.run(asyncio.wait_for(run(), duration + 300))
