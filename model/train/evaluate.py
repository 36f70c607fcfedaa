"""`knotstream eval`: held-out avatars and sentences streamed through the real engine.

Each clip: a held-out identity speaks held-out sentences (with pauses) under natural
idle motion. The engine is given the speech audio and the pose/blink/gaze/smile/brow
fields (never the mouth: it must come from the audio), chunk by chunk with caches and
knots, exactly as a live session. Ground truth is the renderer's output for the same
identity and motion. Baselines in the same run: "repeat the reference frame" and the
model with the driving audio zeroed; ablations: knots off, running ahead off, window
lengths. Writes `report.md` and `strip.png` into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name or .safetensors path")
    p.add_argument("--data", default="runs/data", help="speech bank folder (generated when missing)")
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each clip")
    p.add_argument("--long-seconds", type=float, default=300.0, help="one long run of the model (0 = skip)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1 short clip, two ablations, no long run (CI)")


def held_out_clip(bank, seconds: float, fps: int, rng, sample_rate: int = 16000):
    """A held-out identity speaking held-out sentences separated by pauses."""
    from model.train import speech as sp
    from model.train import world
    from model.train.data import HELD_OUT_IDENTITY_SEED

    n = int(round(seconds * fps))
    n_samples = int(round(n * sample_rate / fps))
    audio = np.zeros(n_samples + sample_rate, np.float32)
    pos = int(rng.uniform(0.3, 1.0) * sample_rate)
    sentences = bank.split(held_out=True)
    while pos < n_samples:
        s = bank.sentence(int(rng.choice(sentences)))
        audio[pos:pos + len(s)] = s[: len(audio) - pos]
        pos += len(s) + int(rng.uniform(0.4, 1.5) * sample_rate)
    ident = world.identity_from_seed(HELD_OUT_IDENTITY_SEED + int(rng.integers(100)))
    motion = sp.speaking_motion(audio[:n_samples], fps, rng, sample_rate, n_frames=n)
    from model.config import MOTION_FIELDS

    ref = motion[0].copy()
    for name in ("mouth_open", "mouth_wide"):  # mouth closed in the reference portrait
        ref[MOTION_FIELDS.index(name)] = 0.0
    return ident, motion, audio, ref


def stream_clip(engine, reference, audio, motion_in, knobs, seed, progress=None):
    """Run the engine over the whole clip; returns frames (T, H, W, 3) and chunk start indices."""
    cfg = engine.config
    sr, fps = cfg.driving.sample_rate, cfg.fps
    n = len(motion_in)
    stream = engine.start(reference, knobs, seed=seed)
    out, borders = [], []
    produced = 0
    while produced < n:
        f0, k = stream.frame_index, stream.driving_frames
        a = audio[round(f0 * sr / fps): round((f0 + k) * sr / fps)]
        m = motion_in[f0:f0 + k]
        frames = stream.step(a, m if len(m) else None)
        borders.append(produced)
        out.append(frames[: n - produced])
        produced += len(out[-1])
        if progress is not None:
            progress.update(len(out[-1]))
    stream.close()
    return np.concatenate(out), borders


def score(gen, truth, ident, motion, borders) -> dict:
    from model.train import metrics as M
    from model.train import world

    boxes = [world.mouth_box(ident, m, truth.shape[1]) for m in motion]
    return {
        "PSNR": M.psnr(gen, truth),
        "SSIM": M.ssim(gen, truth),
        "mouth PSNR": M.psnr_boxes(gen, truth, boxes),
        "lip-sync r": M.correlation(world.measure_mouth_open(gen, boxes), world.measure_mouth_open(truth, boxes)),
        "jitter": M.boundary_jitter(gen, borders[1:]),
    }


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.engine import Engine
    from model.train import world
    from model.train.data import model_motion, speech_bank
    from model.train.metrics import psnr

    if args.quick:
        args.clips, args.seconds, args.long_seconds = 1, 4.0, 0.0
    engine = Engine.from_pretrained(args.model)
    cfg = engine.config
    fps, size = cfg.fps, cfg.height
    base = cfg.stream
    systems = {"model": base, "model, driving audio zeroed": base,
               "knots off": base.replace(knot_frames=0), "running ahead off": base.replace(ahead_frames=0)}
    if not args.quick:
        systems.update({f"window {w}": base.replace(window_frames=w) for w in (2, 12) if w != base.window_frames})
    bank = speech_bank(args.data)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {name: [] for name in ["repeat the reference frame", *systems]}
    strip = None
    total = int(args.clips * args.seconds * fps) * (len(systems)) + int(args.long_seconds * fps)
    t0 = time.time()
    with tqdm(total=total, unit="frame", desc="eval", file=sys.stderr) as bar:
        for c in range(args.clips):
            ident, motion, audio, ref_motion = held_out_clip(bank, args.seconds, fps, rng)
            truth = world.render_clip(ident, motion, size)
            reference = world.render_frame(ident, ref_motion, size)
            given = model_motion(motion)
            rows["repeat the reference frame"].append(
                score(np.repeat(reference[None], len(truth), 0), truth, ident, motion, [0]))
            for name, knobs in systems.items():
                a = np.zeros_like(audio) if "zeroed" in name else audio
                gen, borders = stream_clip(engine, reference, a, given, knobs, args.seed + c, bar)
                rows[name].append(score(gen, truth, ident, motion, borders))
                if name == "model" and c == 0:
                    idx = np.linspace(0, len(gen) - 1, 8).astype(int)
                    strip = np.concatenate([np.concatenate(list(gen[idx]), 1), np.concatenate(list(truth[idx]), 1)], 0)
        drift = None
        if args.long_seconds:
            ident, motion, audio, ref_motion = held_out_clip(bank, args.long_seconds, fps, rng)
            truth = world.render_clip(ident, motion, size)
            gen, _ = stream_clip(engine, world.render_frame(ident, ref_motion, size), audio, model_motion(motion),
                                 base, args.seed, bar)
            w = 30 * fps
            first, last = psnr(gen[:w], truth[:w]), psnr(gen[-w:], truth[-w:])
            drift = (first, last)

    metric_names = ["PSNR", "SSIM", "mouth PSNR", "lip-sync r", "jitter"]
    lines = [f"# knotstream eval: {args.model}" + ("" if engine.trained else " (untrained: seeded random weights)"),
             "", f"Command: `knotstream eval {' '.join(sys.argv[2:])}`  ", f"{args.clips} held-out clip(s) x "
             f"{args.seconds:g} s at {cfg.width}x{cfg.height}, {fps} fps; knobs {dataclasses.asdict(base)}; "
             f"wall time {time.time() - t0:.0f} s.", "",
             "| system | " + " | ".join(metric_names) + " |", "|---" * (len(metric_names) + 1) + "|"]
    for name, vals in rows.items():
        cells = [f"{np.nanmean([v[m] for v in vals]):.3f}" for m in metric_names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "PSNR/SSIM/mouth PSNR against the ground-truth render (higher is better); lip-sync r: correlation "
              "of mouth opening measured in generated vs ground-truth frames; jitter: frame-difference energy at "
              "chunk borders / inside chunks (1 = seamless; the reference baseline has no motion)."]
    if drift is not None:
        lines += ["", f"Identity drift over {args.long_seconds:g} s: PSNR first 30 s {drift[0]:.2f} dB, "
                      f"last 30 s {drift[1]:.2f} dB (difference {drift[1] - drift[0]:+.2f} dB)."]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    if strip is not None:
        import cv2

        cv2.imwrite(str(out / "strip.png"), strip[..., ::-1])
    print(report)
    return 0
