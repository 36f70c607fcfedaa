"""Gateway benchmark: fps stability and driving-to-frame latency for 1..N concurrent sessions.

    .venv/bin/python bench/gateway.py --sessions 1 2 --seconds 20

For each session count it starts a live in-process server with the tiny engine,
connects that many aiortc clients (over the local interface), sends a motion message
every 0.5 s and a 1 s speech burst every 4 s per session, and reports:
  - received fps per client (frames arrived / seconds) and its spread,
  - generated fps per session and the share of output slots that held the last frame
    (underrun; 0 % = the CPU keeps up in real time),
  - driving-to-frame latency (message or speech arrival -> first frame driven by it
    leaves the server; the server's own probe), median and p95,
  - engine step time (mean),
  - server-side A/V skew: |median(send time - video pts) - median(send time - audio pts)|.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


async def run_level(n_sessions: int, seconds: float, model: str, max_batch: int = 1) -> dict:
    import httpx

    from model.engine import Engine
    from server.settings import Settings
    from server.testing import AvatarClient, LiveServer
    from streaming.ice import allow_loopback, has_non_loopback_ipv4

    if not has_non_loopback_ipv4():
        allow_loopback()
    engine = Engine.from_pretrained(model)
    latencies: dict[str, list[float]] = {"motion": [], "speech": []}
    with LiveServer(Settings(max_sessions=n_sessions, model=model, max_batch=max_batch), engine) as srv:
        clients = [AvatarClient(srv.url) for _ in range(n_sessions)]
        for i, c in enumerate(clients):
            await c.connect(["ada", "ben", "cleo", "dev"][i % 4], options={"seed": i})
            live = srv.manager.sessions[c.session["id"]]
            orig = live.on_latency
            live.on_latency = lambda s, k, orig=orig: (latencies[k].append(s), orig and orig(s, k))
            live.video.sent, live.audio.sent = [], []
        await asyncio.sleep(3.0)  # warm up: prebuffer, first chunks
        lives = [srv.manager.sessions[c.session["id"]] for c in clients]
        start_stats = [lv.status() for lv in lives]
        start_frames = [len(c.got.video) for c in clients]
        for k in latencies:
            latencies[k].clear()
        t0 = time.monotonic()
        tone = (0.4 * 32767 * np.sin(np.arange(16000) * 2 * np.pi * 160 / 16000)).astype("<i2").tobytes()
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            tick = 0
            while time.monotonic() - t0 < seconds:
                for c in clients:
                    c.send({"type": "motion", "fields": {"yaw": 0.2 * np.sin(tick / 3)}, "t": tick * 500})
                    if tick % 8 == 0:
                        await http.post(f"/v1/sessions/{c.session['id']}/audio", content=tone,
                                        headers={**c.headers, "Content-Type": "audio/pcm"})
                tick += 1
                await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t0
        skews = []
        for lv in lives:  # server side: video and audio released at t0 + pts of one clock
            ov = [t - p / 90000 for p, t in lv.video.sent if t >= t0]
            oa = [t - p / 48000 for p, t in lv.audio.sent if t >= t0]
            skews.append(1000 * abs(statistics.median(ov) - statistics.median(oa)))
        end_stats = [lv.status() for lv in lives]
        fps = [(len(c.got.video) - f0) / elapsed for c, f0 in zip(clients, start_frames)]
        gen_fps, held = [], []
        for a, b in zip(start_stats, end_stats):
            gen_fps.append((b["frame_index"] - a["frame_index"]) / elapsed)
            slots = (b["released_frames"] - a["released_frames"]) + (b["held_frames"] - a["held_frames"])
            held.append((b["held_frames"] - a["held_frames"]) / max(1, slots))
        worker = srv.manager.worker.stats
        step_ms = 1000 * worker.busy_s / max(1, worker.steps)
        for c in clients:
            await c.close()
    return {"sessions": n_sessions, "seconds": round(elapsed, 1),
            "fps_min": min(fps), "fps_max": max(fps), "gen_fps_mean": statistics.mean(gen_fps),
            "held_pct_max": 100 * max(held), "step_ms_mean": step_ms, "av_skew_ms_max": max(skews),
            "motion_ms_p50": 1000 * pct(latencies["motion"], 50), "motion_ms_p95": 1000 * pct(latencies["motion"], 95),
            "speech_ms_p50": 1000 * pct(latencies["speech"], 50), "speech_ms_p95": 1000 * pct(latencies["speech"], 95),
            "n_motion": len(latencies["motion"]), "n_speech": len(latencies["speech"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-batch", type=int, default=1, help="sessions per batched engine step (KNOTSTREAM_MAX_BATCH)")
    args = p.parse_args(argv)
    print(f"# cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} model={args.model} max_batch={args.max_batch}")
    print("sessions  fps(min..max)  gen_fps  held%  step_ms  av_skew_ms  motion_ms p50/p95  speech_ms p50/p95")
    for n in args.sessions:
        r = asyncio.run(run_level(n, args.seconds, args.model, args.max_batch))
        print(f"{r['sessions']:8d}  {r['fps_min']:5.2f}..{r['fps_max']:5.2f}  {r['gen_fps_mean']:7.2f}  "
              f"{r['held_pct_max']:5.1f}  {r['step_ms_mean']:7.1f}  {r['av_skew_ms_max']:10.2f}  "
              f"{r['motion_ms_p50']:6.0f}/{r['motion_ms_p95']:<6.0f} (n={r['n_motion']})  "
              f"{r['speech_ms_p50']:6.0f}/{r['speech_ms_p95']:<6.0f} (n={r['n_speech']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
