"""Barge-in benchmark: interrupt-to-silence and interrupt-to-closed-mouth, end to end.

    .venv/bin/python bench/interrupt.py --trials 50

Starts a live in-process server with the bundled tiny engine and connects one aiortc
client over the local interface. Each trial pushes a TTS sentence (espeak-ng/flite) as
a speech segment, waits for `playback_started`, waits a random 0.3-2.0 s into the speech,
sends `interrupt` on the data channel and records what the client receives:

- interrupt-to-silence: from sending the interrupt to the arrival of the first audio
  frame after which nothing but silence arrives (the last speech frame + 20 ms);
- interrupt-to-closed-mouth: from sending the interrupt to the arrival of the first video
  frame after which the mouth stays closed (openness measured in the renderer's mouth box,
  closed = at most the idle avatar's 99th percentile + 0.02).

Both are measured at the server's output (the moment each track takes a slot's frame or
audio from the playout to send it) and at the client (decoded frames on arrival, which adds
encoding, loopback transport, aiortc's jitter buffer and decoding). The server side also
reports when the first regenerated frame went out.
Also reports how many trials had the mouth open when the interrupt was sent, and the
server's regeneration results (frames regenerated, fallbacks).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SENTENCE = ("Well, let me tell you about the weather today: it will be sunny in the morning, "
            "cloudy after lunch, and a little rainy in the evening.")


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def last_change(records, t_from, t_to, is_active):
    """Arrival time after which no record in [t_from, t_to] is active; t_from when none is.
    records: (pts, arrival, payload). The end of the last active record counts (next arrival)."""
    window = [(t, x) for _, t, x in records if t_from <= t <= t_to]
    last = None
    for i, (t, x) in enumerate(window):
        if is_active(x):
            last = i
    if last is None:
        return t_from
    return window[last + 1][0] if last + 1 < len(window) else window[last][0]


async def run(trials: int, model: str, seed: int) -> dict:
    import httpx

    from model.engine import Engine
    from model.train.world import identity_from_seed, measure_mouth_open, mouth_box, neutral_motion
    from server.avatars import AVATARS
    from server.settings import Settings
    from server.testing import AvatarClient, LiveServer
    from streaming.ice import allow_loopback, has_non_loopback_ipv4
    from streaming.tts import available_engine, synthesize

    if available_engine() is None:
        raise SystemExit("no espeak-ng/flite: install them (scripts/setup.sh) to run this benchmark")
    if not has_non_loopback_ipv4():
        allow_loopback()
    rng = random.Random(seed)
    box = mouth_box(identity_from_seed(AVATARS["ada"]), neutral_motion(), 128)
    pcm = await synthesize(SENTENCE, 16000)
    pcm16 = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()
    engine = Engine.from_pretrained(model)
    silence_ms, closed_ms, open_at_interrupt, rewinds = [], [], 0, []
    server = {"silence_ms": [], "closed_ms": [], "first_new_frame_ms": []}
    with LiveServer(Settings(max_sessions=1, model=model), engine) as srv:
        client = AvatarClient(srv.url, keep_images=True, keep_audio=True)
        session = await client.connect("ada", options={"seed": seed})
        live = srv.manager.sessions[session["id"]]
        # Server side: what the tracks take from the playout, when (send time of each slot).
        sent_video, sent_audio = [], []  # (time, image, generated index) / (time, peak)
        video_of, audio_of = live.playout.video, live.playout.audio

        def video(slot):
            image, gen = video_of(slot)
            sent_video.append((time.monotonic(), image, gen))
            return image, gen

        def audio(start, n):
            out = audio_of(start, n)
            sent_audio.append((time.monotonic(), float(np.abs(out).max()) if len(out) else 0.0))
            return out

        live.playout.video, live.playout.audio = video, audio
        await asyncio.sleep(4.0)  # warm up, then measure the idle mouth
        t = time.monotonic()
        await asyncio.sleep(3.0)
        idle = np.array([measure_mouth_open(img[None], box)[0] for _, ta, img in client.got.video if ta >= t])
        threshold = float(np.percentile(idle, 99)) + 0.02
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            for i in range(trials):
                seg = f"trial-{i}"
                r = await http.post(f"/v1/sessions/{session['id']}/audio?segment={seg}&end=true", content=pcm16,
                                    headers={**client.headers, "Content-Type": "audio/pcm"})
                r.raise_for_status()
                await client.wait_message(lambda m: m["type"] == "playback_started" and m["segment"] == seg, 30)
                await asyncio.sleep(rng.uniform(0.3, 2.0))
                client.got.video = client.got.video[-10:]  # keep memory bounded
                client.got.audio = client.got.audio[-50:]
                t_send = time.monotonic()
                client.send({"type": "interrupt"})
                await asyncio.sleep(1.5)
                t_end = t_send + 1.4
                before = [img for _, ta, img in client.got.video if ta < t_send][-1:]
                if before and measure_mouth_open(before[0][None], box)[0] > threshold:
                    open_at_interrupt += 1
                t_quiet = last_change(client.got.audio, t_send, t_end, lambda x: np.abs(x).max() > 300)
                t_closed = last_change(client.got.video, t_send, t_end,
                                       lambda img: measure_mouth_open(img[None], box)[0] > threshold)
                silence_ms.append(1000 * (t_quiet - t_send))
                closed_ms.append(1000 * (t_closed - t_send))
                sv = [(0, t, (img, gen)) for t, img, gen in sent_video if t_send <= t <= t_end]
                sa = [(0, t, peak) for t, peak in sent_audio if t_send <= t <= t_end]
                server["silence_ms"].append(1000 * (last_change(sa, t_send, t_end, lambda p: p > 0.01) - t_send))
                server["closed_ms"].append(1000 * (last_change(
                    sv, t_send, t_end, lambda x: measure_mouth_open(x[0][None], box)[0] > threshold) - t_send))
                held = [t for _, t, (_, gen) in sv if gen is None]
                fresh = [t for _, t, (_, gen) in sv if gen is not None and held and t > held[0]]
                server["first_new_frame_ms"].append(1000 * ((fresh[0] if fresh else t_end) - t_send))
                sent_video.clear()
                sent_audio.clear()
                await asyncio.sleep(0.5)
                print(f"trial {i + 1}/{trials}: silence {silence_ms[-1]:.0f} ms, closed mouth {closed_ms[-1]:.0f} ms",
                      file=sys.stderr)
        rewinds = list(live.rewinds)
        status = live.status()
        await client.close()
    return {"trials": trials, "silence_ms": silence_ms, "closed_ms": closed_ms, "threshold": threshold, "server": server,
            "open_at_interrupt": open_at_interrupt, "rewinds": rewinds, "status": status}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error("--trials must be >= 1")
    r = asyncio.run(run(args.trials, args.model, args.seed))
    fallbacks = sum(1 for x in r["rewinds"] if "fallback" in x)
    regenerated = [x["flushed_frames"] for x in r["rewinds"] if "flushed_frames" in x]
    print(f"# cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} model={args.model} trials={r['trials']}")
    print("| measure | median ms | p95 ms | max ms |")
    print("|---|---|---|---|")
    rows = (("server output: interrupt -> silence", r["server"]["silence_ms"]),
            ("server output: interrupt -> first regenerated frame", r["server"]["first_new_frame_ms"]),
            ("server output: interrupt -> closed mouth", r["server"]["closed_ms"]),
            ("client arrival: interrupt -> silence", r["silence_ms"]),
            ("client arrival: interrupt -> closed mouth", r["closed_ms"]))
    for name, v in rows:
        print(f"| {name} | {pct(v, 50):.0f} | {pct(v, 95):.0f} | {max(v):.0f} |")
    print(f"\nmouth open when interrupted: {r['open_at_interrupt']}/{r['trials']} trials; "
          f"closed threshold {r['threshold']:.3f}; regenerated frames per interrupt: "
          f"median {pct(regenerated, 50):.0f}; fallbacks: {fallbacks}; "
          f"held frames: {r['status']['held_frames']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
