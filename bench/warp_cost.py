"""What a personal avatar's portrait warp (model/motion_warp.py) costs the chunk loop: the
same avatar file streamed with its warp and with the warp taken out (the still portrait in
the DiT's condition and the decoder's blend), in one process, interleaved round by round so
a machine whose load changes slows both alike.

    python bench/warp_cost.py --model me.safetensors [--rounds 5] [--chunks 30] [--threads 2]

Each stream is driven by a moving head and mouth (every field given), as a session with
motion is. Prints each round's ms/chunk of both and the ratio of the medians
(with / without: the warp's share of a chunk), and the real-time factor of the stream with
the warp (video seconds per wall second).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _driving(stream, rng: np.random.Generator):
    from model.config import MOTION_FIELDS
    from model.timeline import StepInput

    span, n = stream.next_span(), len(MOTION_FIELDS)
    t = (span.frame + np.arange(span.driving_frames))[:, None] / 25.0
    phase = rng.uniform(0, 2 * np.pi, n)
    motion = np.concatenate([0.5 * np.sin(2 * np.pi * 0.7 * t + phase), np.ones((span.driving_frames, n))], 1)
    audio = np.zeros(span.audio_to - span.audio_from, np.float32)
    return StepInput(span, audio, motion.astype(np.float32))


def run_stream(engine, portrait, chunks: int, seed: int) -> tuple[float, int]:
    """Seconds for `chunks` steps (after one warm-up step) and the frames they made."""
    rng = np.random.default_rng(seed)
    stream = engine.start(portrait)
    stream.step(_driving(stream, rng))
    frames, t0 = 0, time.perf_counter()
    for _ in range(chunks):
        frames += len(stream.step(_driving(stream, rng)))
    return time.perf_counter() - t0, frames


def main() -> int:
    import torch

    from model.engine import Engine
    from model.personal import avatar_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a personal avatar file with a motion warp")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunks", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args()
    if not (1 <= args.rounds <= 50 and 1 <= args.chunks <= 1000):
        p.error("--rounds must be in [1, 50] and --chunks in [1, 1000]")
    if not Path(args.model).is_file():
        p.error(f"no such file: {args.model}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warped = Engine.from_pretrained(args.model)
    if warped.model.warp is None:
        print(f"{args.model} has no motion warp: nothing to compare", file=sys.stderr)
        return 2
    model = copy.deepcopy(warped.model)
    model.config = copy.deepcopy(model.config)
    model.warp, model.config.motion_warp = None, 0
    still = Engine(model, warped.device, warped.dtype, autocast=warped.autocast)
    portrait = avatar_file.read(args.model).portrait
    print(f"{args.model}: {warped.precision}, {torch.get_num_threads()} threads, {args.chunks} chunks per run")
    print("| round | with warp ms/chunk | without ms/chunk |")
    print("|---|---|---|")
    ms = {"with": [], "without": []}
    fps = warped.config.fps
    speed = []
    for r in range(args.rounds):
        for name, engine in (("with", warped), ("without", still)) if r % 2 == 0 else (("without", still), ("with", warped)):
            seconds, frames = run_stream(engine, portrait, args.chunks, seed=r)
            ms[name].append(1000 * seconds / args.chunks)
            if name == "with":
                speed.append(frames / fps / seconds)
        print(f"| {r + 1} | {ms['with'][-1]:.1f} | {ms['without'][-1]:.1f} |", flush=True)
    a, b = statistics.median(ms["with"]), statistics.median(ms["without"])
    print(f"\nmedian ms/chunk: with the warp {a:.1f}, without {b:.1f}; with / without {a / b:.3f}")
    print(f"with the warp: {statistics.median(speed):.2f}x real time (median over rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
