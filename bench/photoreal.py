"""GPU benchmark of the photoreal recipes at their released geometry, next to each family's own cache policy.

    python bench/photoreal.py --out photoreal.md     # a GPU host (bench/gpu.sh runs it after its engine rows)
    python bench/photoreal.py --cpu-smoke           # the random presets on CPU: proves it runs

Models: `livetalk-1.3b` (512x512, 16 fps, blocks of 3 latents, 9 sink + 3 window frames)
and `flashhead-1.3b` (512x512, 25 fps, chunks of 9 latents, 2 of them motion latents), with
seeded random weights (numbers do not depend on the weights); smoke: `livetalk-random`,
`flashhead-random`. Rows per family, each a stream driven by noise audio, warmed up until
its cache is full, then `--chunks` timed `Engine.step_many` calls:
- ours, 1..N sessions: our recipe (LiveTalk: pinned sink + ring window read in place by the
  fused window kernel; FlashHead: its chunk through our attention dispatch);
- the family's own policy, 1 session: LiveTalk's shifting KV buffer with SDPA
  (model/wan/baselines.py), the same recipe otherwise; FlashHead's has no cache (every
  chunk one bidirectional pass), so its row is the same chunk with PyTorch SDPA attention.
Columns: first-frame latency (stream start, portrait encoded, to the first frames
decoded), ms per chunk (median), frames/s over all sessions, real-time factor per session,
speed against the family's own policy, peak GPU memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from timing import Timed, cell, failure_note  # noqa: E402  (bench/ is a folder of scripts)

COLUMNS = ("family", "run", "sessions", "first-frame latency ms", "ms per chunk", "frames/s (all sessions)",
           "real-time x per session", "vs own policy", "peak mem GiB", "note")
OURS, OWN = "ours (knotstream)", "family's own policy"


@dataclass
class Row(Timed):
    family: str = ""
    vs_own: float | None = None

    def cells(self) -> list[str]:
        return [self.family, self.run, str(self.sessions), cell(self.first_ms, ".1f"), cell(self.chunk_ms, ".1f"),
                cell(self.fps, ".1f"), cell(self.realtime, ".2f"), cell(self.vs_own, ".2f"), cell(self.mem_gib, ".1f"),
                self.note]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|"]
    return "\n".join(lines + ["| " + " | ".join(r.cells()) + " |" for r in rows])


def build_engine(preset: str, device, dtype, seed: int):
    """A family preset with seeded random weights, made on `device` (1.3B: seconds, not minutes)."""
    import torch

    from model.engine import Engine
    from model.wan.families import random_family
    from model.wan.photoreal import PhotorealModel

    with torch.device(device):
        model = PhotorealModel(random_family(preset, seed=seed, device=device, dtype=dtype))
    return Engine(model, device, dtype, trained=False)


def own_policy(engine):
    """(engine, attention backend) of the family's own policy: LiveTalk's shifting buffer
    (same model, same recipe otherwise); FlashHead's chunk with SDPA attention."""
    from model.engine import Engine
    from model.wan.baselines import LiveTalkShifting

    if engine.config.recipe == "livetalk":
        own = Engine(engine.model, engine.device, engine.dtype, trained=False)
        own.recipe = LiveTalkShifting(own.model, own.device, own.dtype)
        return own, None
    return engine, "sdpa"


@dataclass
class Plan:
    """What to run: families, sessions of our rows, timed chunks, warm-up (None: until the
    cache is full), dtype name, CPU smoke run, seed."""

    families: list[str]
    sessions: list[int]
    chunks: int
    warmup_chunks: int | None
    dtype: str
    cpu_smoke: bool
    seed: int = 0


class Runner:
    def __init__(self, engine, args: Plan):
        import numpy as np
        import torch

        self.engine, self.args, self.torch = engine, args, torch
        self.cfg = engine.config
        self.rng = np.random.default_rng(args.seed)
        self.reference = self.rng.integers(0, 256, (self.cfg.height, self.cfg.width, 3), dtype=np.uint8)
        fam = engine.model.family
        # Until LiveTalk's sink and window are full (its steady state); FlashHead has no cache.
        full = -(-(fam.sink_frames + fam.window_frames) // fam.chunk_frames) + 1
        self.warmup = args.warmup_chunks or (full if self.cfg.recipe == "livetalk" else 1)

    def sync(self) -> None:
        if self.engine.device.type == "cuda":
            self.torch.cuda.synchronize()

    def driving(self, stream):
        from model.timeline import StepInput

        span = stream.next_span()
        return StepInput(span, (self.rng.standard_normal(span.samples) * 0.1).astype("float32"))

    def run(self, engine, label: str, n: int) -> Row:
        torch, a = self.torch, self.args
        gc.collect()
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.perf_counter()
        streams = [engine.start(self.reference, seed=a.seed + i) for i in range(n)]
        engine.step_many(streams, [self.driving(s) for s in streams])
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(self.warmup - 1):
            engine.step_many(streams, [self.driving(s) for s in streams])
        times, frames = [], 0
        for _ in range(a.chunks):
            inputs = [self.driving(s) for s in streams]
            self.sync()
            t = time.perf_counter()
            out = engine.step_many(streams, inputs)
            self.sync()
            times.append(time.perf_counter() - t)
            frames = sum(len(f) for f in out)
        for s in streams:
            s.close()
        sec = statistics.median(times)
        mem = torch.cuda.max_memory_allocated() / 2**30 if engine.device.type == "cuda" else None
        return Row(label, n, first_ms=first * 1e3, chunk_ms=sec * 1e3, fps=frames / sec,
                   realtime=frames / sec / n / self.cfg.fps, mem_gib=mem, family=self.cfg.name)


def family_rows(preset: str, args, device, dtype) -> list[Row]:
    """Our rows (1..N sessions) and the family's own policy (1 session) for one preset."""
    import torch

    try:
        engine = build_engine(preset, device, dtype, args.seed)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        return [_failed(preset, OURS, n, exc) for n in args.sessions] + [_failed(preset, OWN, 1, exc)]
    runner = Runner(engine, args)
    rows = []
    for n in args.sessions:
        rows.append(_guarded(lambda: runner.run(engine, OURS, n), preset, OURS, n))
    own, backend = own_policy(engine)
    saved = os.environ.get("KNOTSTREAM_ATTENTION")
    if backend:
        os.environ["KNOTSTREAM_ATTENTION"] = backend
    try:
        rows.append(_guarded(lambda: runner.run(own, OWN, 1), preset, OWN, 1))
    finally:
        if backend:
            os.environ["KNOTSTREAM_ATTENTION"] = saved or "auto"
    base = rows[-1].fps
    for r in rows:
        r.vs_own = r.fps / base if base and r.fps else None
        if r.run == OWN:
            r.note = ("shifting KV buffer + SDPA" if backend is None else "no cache; SDPA attention")
    del engine, own, runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _guarded(fn, preset: str, label: str, n: int) -> Row:
    import torch

    try:
        return fn()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        return _failed(preset, label, n, exc)


def _failed(preset: str, label: str, n: int, exc: BaseException) -> Row:
    return Row(label, n, note=failure_note(exc), family=preset)


def photoreal_table(args: Plan) -> tuple[str, list[Row]]:
    """The markdown table (with its header line) and its rows."""
    import torch

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    rows: list[Row] = []
    for family in args.families:
        preset = f"{family}-random" if args.cpu_smoke else f"{family}-1.3b"
        rows += family_rows(preset, args, device, dtype)
        print(markdown(rows).splitlines()[-1], flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    head = (f"Photoreal recipes on {where}, torch {torch.__version__}, {args.dtype}, seeded random weights: "
            f"livetalk 512x512 at 16 fps (blocks of 3 latents, 9 sink + 3 window frames), flashhead 512x512 at "
            f"25 fps (9-latent chunks, 2 motion latents), 4 steps; warm-up until the cache is full, then "
            f"{args.chunks} timed chunks; attention {os.environ.get('KNOTSTREAM_ATTENTION', 'auto')} for ours; "
            f"{time.perf_counter() - t0:.0f} s.\n\n")
    if args.cpu_smoke:
        head = head.replace("512x512", "64x64")
    return head + markdown(rows) + "\n", rows


def parse_args(argv) -> tuple[Plan, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the random presets on CPU, a few chunks")
    p.add_argument("--out", help="write the markdown table to this file")
    p.add_argument("--families", default="livetalk,flashhead", help="comma list of families")
    p.add_argument("--sessions", default=None, help="sessions of our rows, comma list (default 1,4; smoke 1)")
    p.add_argument("--chunks", type=int, default=None, help="timed chunks per run (default 4; smoke 2)")
    p.add_argument("--warmup-chunks", type=int, default=None, help="default: until the cache is full")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 (smoke fp32)")
    p.add_argument("--attention", choices=["auto", "triton", "sdpa"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        plan = make_plan(a.families, a.sessions, a.chunks, a.warmup_chunks, a.dtype, a.cpu_smoke, a.seed)
    except ValueError as exc:
        p.error(str(exc))
    return plan, a


def make_plan(families: str, sessions: str | None, chunks: int | None, warmup: int | None, dtype: str | None,
              smoke: bool, seed: int = 0) -> Plan:
    """A Plan from command-line values (None: the defaults of a GPU or a smoke run)."""
    fams = [f for f in families.split(",") if f]
    unknown = set(fams) - {"livetalk", "flashhead"}
    if unknown:
        raise ValueError(f"families are livetalk and flashhead, got {sorted(unknown)}")
    n = [int(x) for x in (sessions or ("1" if smoke else "1,4")).split(",")]
    plan = Plan(fams, n, chunks or (2 if smoke else 4), warmup, dtype or ("fp32" if smoke else "bf16"), smoke, seed)
    if min(plan.sessions) < 1 or plan.chunks < 1 or (warmup is not None and warmup < 1):
        raise ValueError("sessions, chunks and warm-up chunks must be >= 1")
    return plan


def main(argv: list[str] | None = None) -> int:
    plan, args = parse_args(argv)
    os.environ["KNOTSTREAM_ATTENTION"] = args.attention
    if plan.cpu_smoke and args.attention == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path[:0] = [str(REPO), str(BENCH)]
    import torch

    if not plan.cpu_smoke and not torch.cuda.is_available():
        print("bench/photoreal.py: no CUDA device: run on a GPU host, or --cpu-smoke", file=sys.stderr)
        return 2
    text, rows = photoreal_table(plan)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(r.fps is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
