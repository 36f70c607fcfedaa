"""`knotstream bench engine`: per-chunk cost vs stream length, ours next to a no-cache baseline.

Ours: the real `Stream` (reference cache, window ring buffer, knots, streaming decode).
Baseline, in the same run: a naive causal model that re-runs every past frame (clean)
together with the chunk at every denoising step, as a model without KV caches must. It
grows with the stream; ours stays flat. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["engine"], help="what to benchmark")
    p.add_argument("--model", default="tiny")
    p.add_argument("--lengths", default="10,100,1000", help="stream lengths in chunks")
    p.add_argument("--baseline-max-chunks", type=int, default=100,
                   help="longest history the quadratic baseline is run at (longer: not run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--dtype", choices=["auto", "float32"], default="auto",
                   help="auto: what the server runs (bfloat16 autocast on a CPU that has it natively); "
                        "float32: float32 throughout")
    p.add_argument("--size", type=int, default=0,
                   help="frame size N (N x N) to measure instead of the model's: the model's architecture "
                        "and stream knobs with seeded random weights (the cost does not depend on the weights)")


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ours(engine, lengths: list[int], repeats: int) -> dict[int, tuple[float, float, float]]:
    """One stream, timed at each requested length: length -> (ms per chunk, frames/s, CPU ms
    per chunk of this process: on a CPU other jobs share, the wall time says little alone)."""
    import numpy as np

    from model.timeline import StepInput

    cfg = engine.config
    rng = np.random.default_rng(0)
    stream = engine.start(np.full((cfg.height, cfg.width, 3), 128, dtype=np.uint8), cfg.stream, seed=0)

    def noise_driving() -> StepInput:
        span = stream.next_span()
        return StepInput(span, rng.standard_normal(span.samples).astype(np.float32) * 0.1)

    ours, done = {}, 0
    for n in lengths:
        while done < n - repeats:
            stream.step(noise_driving())
            done += 1
        per = []
        for _ in range(repeats):
            driving = noise_driving()
            t0, c0 = time.perf_counter(), time.process_time()
            frames = stream.step(driving)
            per.append((time.perf_counter() - t0, len(frames), time.process_time() - c0))
            done += 1
        ms = statistics.median(p[0] for p in per) * 1000
        ours[n] = (ms, per[-1][1] / (ms / 1000), statistics.median(p[2] for p in per) * 1000)
    return ours


def _baseline(engine, lengths: list[int], repeats: int, max_chunks: int) -> dict[int, tuple[float, float]]:
    """The same DiT re-running [reference | all past frames | chunk] per denoising step."""
    import torch

    from model.dit import FullSequence
    from model.sampler import get_sigmas

    cfg, knobs, dit = engine.config, engine.config.stream, engine.model.dit
    c, stride = knobs.chunk_frames, engine.timeline.temporal_stride
    (h, w), z, T = cfg.latent_hw, cfg.vae.z_channels, cfg.tokens_per_frame
    base = {}
    for n in lengths:
        if n > max_chunks:
            continue
        frames_total = 1 + n * c  # reference + history + chunk
        x = torch.randn(1, z, frames_total, h, w)
        t = torch.zeros(1, frames_total)
        pos = torch.arange(frames_total, dtype=torch.float64)
        ctx = FullSequence(prefix_len=T, chunk_len=c * T, window_len=None)
        drive = torch.zeros(1, frames_total - 1, stride * cfg.driving.tokens_per_frame, cfg.dit.drive_dim)

        def chunk():
            with torch.inference_mode(), engine.compute():  # the same precision as ours
                for _ in get_sigmas(knobs.denoise_steps, knobs.shift)[:-1]:
                    dit(x, t, pos, ctx, drive=drive)

        ms = _time(chunk, repeats) * 1000
        base[n] = (ms, stride * c / (ms / 1000))
    return base


def _resized(engine, size: int):
    """The engine's architecture at size x size, seeded random weights (`--size`)."""
    import dataclasses

    from model.avatar import AvatarModel
    from model.engine import Engine

    stride = engine.config.vae.spatial_stride * engine.config.dit.patch_size[1]
    if not 0 < size <= 1024 or size % stride:
        raise ValueError(f"--size must be a multiple of {stride} up to 1024, got {size}")
    config = dataclasses.replace(engine.config, height=size, width=size)
    return Engine(AvatarModel.random(config), trained=False, autocast=engine.autocast)


def run(args: argparse.Namespace) -> int:
    import torch

    from model.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = sorted({int(x) for x in args.lengths.split(",")})
    engine = Engine.from_pretrained(args.model, dtype=None if args.dtype == "auto" else torch.float32)
    if args.size:
        engine = _resized(engine, args.size)
    cfg, knobs = engine.config, engine.config.stream
    c, fps, stride = knobs.chunk_frames, cfg.fps, engine.timeline.temporal_stride
    ours = _ours(engine, lengths, args.repeats)
    base = _baseline(engine, lengths, args.repeats, args.baseline_max_chunks)

    print(f"engine benchmark: model {args.model} ({cfg.width}x{cfg.height}, {fps} fps), "
          f"chunk {c} latent frames = {stride * c} video frames, window {knobs.window_frames}, "
          f"knot {knobs.knot_frames}, {knobs.denoise_steps} steps, {engine.precision}, "
          f"torch threads {torch.get_num_threads()}"
          + ("" if engine.trained else ", seeded random weights"))
    print()
    print("| stream length (chunks) | ours ms/chunk | ours CPU ms/chunk | ours frames/s | real-time factor | "
          "no-cache baseline ms/chunk | baseline frames/s | ours / baseline speed |")
    print("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        ms, fs, cpu = ours[n]
        b = base.get(n)
        bcol = f"{b[0]:.1f} | {b[1]:.1f} | {b[0] / ms:.2f}x" if b else "not run (quadratic) | - | -"
        print(f"| {n} | {ms:.1f} | {cpu:.1f} | {fs:.1f} | {fs / fps:.2f}x | {bcol} |")
    return 0
