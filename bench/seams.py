"""Calibrate the seam blend (StreamKnobs.seam_blend, model/seams.py) on held-out clips.

    .venv/bin/python bench/seams.py --clips 4 --first-seed 50 --seconds 60

Streams each clip through the engine once with the blend off (the model's own stream
defaults otherwise), then applies the blend to the decoded frames for each amount (the
engine applies the same filter before rounding to 8 bits; tests/test_engine.py checks
they agree) and prints, per clip and amount: chunk-border jitter relative to the ground
truth's, PSNR and lip-sync r. It also splits the frame steps into chunk borders /
latent-frame borders inside chunks / steps inside a latent frame (mean squared 8-bit
difference), the measurement behind the blend.

Clip seeds start at --first-seed (a seed fixes the held-out identity, seed % 100, its
sentences, motion and noise); `knotstream eval` uses seeds 0-8 by default (8 clips and
the drift run), so a calibration from seed 50 on does not tune on the eval's clips.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

AMOUNTS = (0.0, 0.5, 0.6, 0.7, 0.8, 1.0)


def step_split(frames: np.ndarray, starts: list[int]) -> tuple[float, float, float]:
    """Mean squared 8-bit frame step at chunk borders, at latent borders inside chunks
    (steps into frames 1, 5, 9, ...) and inside latent frames."""
    from model.train.metrics import step_energy

    energy = step_energy(frames)  # energy[t - 1]: step t-1 -> t
    chunk = np.zeros(len(energy), bool)
    chunk[[t - 1 for t in starts if 1 <= t < len(frames)]] = True
    latent = np.array([(t - 1) % 4 == 0 for t in range(1, len(frames))]) & ~chunk
    return float(energy[chunk].mean()), float(energy[latent].mean()), float(energy[~chunk & ~latent].mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--data", default="runs/data", help="folder of the speech bank (made on first use)")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--first-seed", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    if args.clips < 1 or args.seconds < 2:
        p.error("--clips must be >= 1 and --seconds >= 2")

    import torch

    from model.engine import Engine
    from model.seams import spread_latent_steps
    from model.train import evaluate as E
    from model.train import metrics as M
    from model.train.data import speech_bank

    engine = Engine.from_pretrained(args.model)
    cfg = engine.config
    fps, size = cfg.fps, cfg.height
    bank = speech_bank(args.data)
    knobs = cfg.stream.replace(seam_blend=0.0)
    print(f"model {args.model}, stream default seam_blend={cfg.stream.seam_blend}; "
          f"{args.clips} held-out clips x {args.seconds:g} s, seeds {args.first_seed}..{args.first_seed + args.clips - 1}\n")
    print("| clip seed | frames | chunk borders | latent borders | inside a latent | truth jitter | "
          + " | ".join(f"blend {a:g}: jitter/truth, PSNR, lip r" for a in AMOUNTS) + " |")
    print("|---" * (5 + len(AMOUNTS)) + "|---|")
    ratios = {a: [] for a in AMOUNTS}
    for seed in range(args.first_seed, args.first_seed + args.clips):
        clip = E.held_out_clip(bank, round(args.seconds * fps), fps, size, seed, cfg.driving.sample_rate)
        truth, boxes = clip.truth(size), clip.mouth_boxes(size)
        chunks = list(E.iter_stream(engine, clip, E.System(knobs)))
        gen, starts = np.concatenate([f for _, f in chunks]), [f0 for f0, _ in chunks]
        truth_jitter = M.boundary_jitter(truth, starts)
        video = torch.from_numpy(gen).permute(3, 0, 1, 2)[None].float()
        cells = []
        for a in AMOUNTS:
            g = spread_latent_steps(video, 0, None, a).round().clamp(0, 255)[0].permute(1, 2, 3, 0)
            g = g.numpy().astype(np.uint8)
            ratios[a].append(M.boundary_jitter(g, starts) / truth_jitter)
            cells.append(f"{ratios[a][-1]:.2f}, {M.psnr(g, truth):.2f}, {M.lip_sync(g, truth, boxes):.3f}")
        for name, frames, rest in (("truth", truth, [""] * (1 + len(AMOUNTS))),
                                   ("generated", gen, [f"{truth_jitter:.3f}", *cells])):
            split = [f"{e:.1f}" for e in step_split(frames, starts)]
            print("| " + " | ".join([str(seed), name, *split, *rest]) + " |")
        sys.stdout.flush()
    print("\nmean jitter / truth jitter per amount: "
          + ", ".join(f"{a:g}: {np.mean(r):.2f}" for a, r in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
