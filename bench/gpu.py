"""GPU benchmark: the engine at Wan2.1-1.3B geometry, 1-8 sessions, next to a Self-Forcing-style baseline.

    python bench/gpu.py --out gpu-bench.md      # one H200: wan-1.3b at 832x480, bf16, < 8 min
    python bench/gpu.py --cpu-smoke             # shrunk wan geometry on CPU: proves it runs (< 1 min)

Model: the `wan-1.3b` preset (832x480, 16 fps, chunk 3 + knot 1 latent frames, window 12,
4 denoising steps) with seeded random weights; numbers do not depend on the weights.
Rows, each measured in the same run:
- ours, 1/2/4/8 sessions: `Engine.step_many` over N streams (one batched forward per
  model pass). Each run starts N streams, steps them until the window is full
  (warm-up), then times `--chunks` more calls;
- baseline, 1 session: `bench/self_forcing_baseline.py` (dense block-causal attention
  over a growing cache, no window, no knots, same DiT/VAE modules), timed at the same
  stream length;
- then the photoreal recipes (bench/photoreal.py: LiveTalk and FlashHead at 512x512, random
  weights, next to each family's own cache policy) as a second table, `--families ''` skips it;
- then the attention benchmark (bench/attention.py) as the last table.
Columns: first-frame latency (starting the N streams until the first step_many returns,
reference encoding included), ms per chunk (one step_many call, median), frames/s over
all sessions, real-time factor per session (frames/s / fps), DiT TFLOP/s and MFU: DiT
FLOPs counted analytically (`dit_flops`) divided by the whole chunk wall time (VAE decode
and driving encoders included in the time, not in the FLOPs) and by `--peak-tflops`.
Exit code: 0, 1 when a row failed (out of memory, ...), 2 without CUDA (unless --cpu-smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import photoreal  # noqa: E402  (bench/ is a folder of scripts: the photoreal recipes' rows)
from timing import Timed, cell, failure_note  # noqa: E402

COLUMNS = ("run", "sessions", "first-frame latency ms", "ms per chunk", "frames/s (all sessions)",
           "real-time x per session", "DiT TFLOP/s", "MFU", "vs baseline", "peak mem GiB", "note")


# ----- FLOPs -------------------------------------------------------------------------------


def dit_flops(cfg, frames: int, key_frames: int, drive_frames: int | None = None) -> float:
    """FLOPs of one DiT forward over `frames` latent frames of one stream (batch 1).

    key_frames: frames each query attends to in self-attention, its own chunk included
    (reference + cached window + chunk). drive_frames: frames given driving tokens
    (default all). Matmuls count 2 FLOPs per multiply-add; attention 4 * d per
    (query, key) pair (QK^T and PV). Text cross-attention is not run by the engine (no
    text), so it is not counted; elementwise work (norms, RoPE, modulation) is ignored.
    """
    d, ffn, dc = cfg.dit.dim, cfg.dit.ffn_dim, cfg.dit
    T = cfg.tokens_per_frame
    N = frames * T
    K = key_frames * T
    patch = math.prod(dc.patch_size)
    flops = 2.0 * N * dc.in_channels * patch * d                        # patch embedding
    flops += 2.0 * frames * (dc.freq_dim * d + d * d + 6 * d * d)       # time embedding + projection
    per_block = 4 * 2.0 * N * d * d + 4.0 * N * K * d                  # self-attn q/k/v/o + attention
    if dc.drive_dim:
        fd = frames if drive_frames is None else drive_frames
        nd, M = fd * T, 4 * cfg.driving.tokens_per_frame
        per_block += 2 * 2.0 * nd * d * d                               # drive q, o
        per_block += 2 * 2.0 * fd * M * dc.drive_dim * d                # drive k, v
        per_block += 4.0 * nd * M * d                                   # drive attention
    per_block += 2 * 2.0 * N * d * ffn                                  # FFN
    flops += dc.num_layers * per_block
    flops += 2.0 * N * d * dc.latent_channels * patch                   # head
    return flops


def ours_chunk_flops(cfg, knobs, window_frames: int) -> float:
    """DiT FLOPs of one engine step: denoising passes over chunk + knot, then the cache pass."""
    c, kn = knobs.chunk_frames, knobs.knot_frames
    denoise_pass = dit_flops(cfg, c + kn, 1 + window_frames + c + kn)
    cache_pass = dit_flops(cfg, c, 1 + window_frames + c)
    return knobs.denoise_steps * denoise_pass + cache_pass


def baseline_chunk_flops(cfg, knobs, cached_frames: int) -> float:
    """DiT FLOPs of one baseline step: every pass attends to all `cached_frames` (reference included)."""
    c = knobs.chunk_frames
    return (knobs.denoise_steps + 1) * dit_flops(cfg, c, cached_frames + c)


# ----- runs --------------------------------------------------------------------------------


@dataclass
class Row(Timed):
    tflops: float | None = None
    mfu: float | None = None
    vs_baseline: float | None = None

    def cells(self) -> list[str]:
        def g(v):  # 3 significant digits without exponent for the GPU's range, exponent for the smoke run
            return "-" if v is None else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return [self.run, str(self.sessions), cell(self.first_ms, ".1f"), cell(self.chunk_ms, ".1f"),
                cell(self.fps, ".1f"), cell(self.realtime, ".2f"), g(self.tflops), g(self.mfu),
                cell(self.vs_baseline, ".2f"), cell(self.mem_gib, ".1f"), self.note]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 2) + "---|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


class Bench:
    def __init__(self, engine, args):
        import numpy as np
        import torch

        self.engine, self.args, self.torch = engine, args, torch
        self.cfg = engine.config
        self.knobs = self.cfg.stream
        self.device = engine.device
        rng = np.random.default_rng(args.seed)
        self.rng = rng
        self.reference = rng.integers(0, 256, (self.cfg.height, self.cfg.width, 3), dtype=np.uint8)
        self.peak = args.peak_tflops * 1e12

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def reset_memory(self) -> None:
        gc.collect()  # a failed run's streams
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def memory(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def audio(self, stream):
        """Noise driving of the stream's next step."""
        from model.timeline import StepInput

        span = stream.next_span()
        return StepInput(span, (self.rng.standard_normal(span.samples) * 0.1).astype("float32"))

    def ours(self, n: int) -> Row:
        """N streams stepped together through `Engine.step_many`."""
        self.reset_memory()
        a = self.args
        t0 = time.perf_counter()
        streams = [self.engine.start(self.reference, self.knobs, seed=a.seed + i) for i in range(n)]
        self.engine.step_many(streams, [self.audio(s) for s in streams])
        first = time.perf_counter() - t0
        for _ in range(a.warmup_chunks - 1):
            self.engine.step_many(streams, [self.audio(s) for s in streams])
        times, flops, frames = [], [], 0
        for _ in range(a.chunks):
            audios = [self.audio(s) for s in streams]
            flops.append(sum(ours_chunk_flops(self.cfg, self.knobs, s.state.window.length) for s in streams))
            self.sync()
            t = time.perf_counter()
            out = self.engine.step_many(streams, audios)
            times.append(time.perf_counter() - t)
            frames = sum(len(f) for f in out)
        for s in streams:
            s.close()
        return self.row("ours (knotstream)", n, first, times, frames, statistics.mean(flops))

    def baseline(self) -> Row:
        from self_forcing_baseline import BaselineStream

        self.reset_memory()
        a = self.args
        total = a.warmup_chunks + a.chunks
        t0 = time.perf_counter()
        s = BaselineStream(self.engine.model, self.reference, self.knobs, total, a.seed, self.device,
                           self.engine.dtype)
        s.step()
        first = time.perf_counter() - t0
        for _ in range(a.warmup_chunks - 1):
            s.step()
        times, flops, frames = [], [], 0
        for _ in range(a.chunks):
            flops.append(baseline_chunk_flops(self.cfg, self.knobs, s.cache.frames))
            self.sync()
            t = time.perf_counter()
            frames = len(s.step())
            times.append(time.perf_counter() - t)
        note = f"cache {s.cache.frames} frames at the end"
        return self.row("self-forcing-style baseline", 1, first, times, frames, statistics.mean(flops), note)

    def row(self, name: str, n: int, first: float, times: list[float], frames: int, flops: float,
            note: str = "") -> Row:
        sec = statistics.median(times)
        rate = flops / sec
        return Row(name, n, first_ms=first * 1e3, chunk_ms=sec * 1e3, fps=frames / sec,
                   realtime=frames / sec / n / self.cfg.fps, tflops=rate / 1e12, mfu=rate / self.peak,
                   mem_gib=self.memory(), note=note)


def failed_row(name: str, n: int, exc: BaseException) -> Row:
    return Row(name, n, note=failure_note(exc))


# ----- set-up ------------------------------------------------------------------------------


def smoke_config(cfg):
    """The wan-1.3b preset shrunk for a CPU run: same knobs, fps and layout, tiny widths and frames."""
    from model.config import DiTConfig, DrivingConfig, VAEConfig

    return dataclasses.replace(
        cfg, name=cfg.name + "-smoke",
        dit=DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64, drive_dim=64),
        vae=VAEConfig(z_channels=16, base_channels=8, channel_mults=(1, 1, 2, 2)),
        driving=DrivingConfig(hidden=32), height=48, width=80)


def model_config(args):
    """The preset at the requested resolution (wan-1.3b is 832x480 already), or its smoke shrink."""
    from model.config import from_name

    cfg = from_name(args.model)
    if args.cpu_smoke:
        return smoke_config(cfg)
    if (args.height, args.width) != (cfg.height, cfg.width):
        cfg = dataclasses.replace(cfg, height=args.height, width=args.width)
    return cfg


def build_engine(args):
    import torch

    from model.avatar import AvatarModel
    from model.engine import Engine

    cfg = model_config(args)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    with torch.device(device):  # random init straight on the GPU: seconds, not minutes, for 1.3B
        model = AvatarModel.random(cfg, seed=args.seed)
    return Engine(model, device, dtype, trained=False)


def attention_table(args, budget_s: float) -> str:
    """bench/attention.py in a subprocess (it sets TRITON_INTERPRET itself for the smoke run)."""
    out = Path(tempfile.mkdtemp(prefix="knotstream-gpu-bench-")) / "attention.md"
    cmd = [sys.executable, str(BENCH / "attention.py"), "--out", str(out)]
    if args.cpu_smoke:
        cmd += ["--cpu-smoke", "--skip-training"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30.0, budget_s))
    except subprocess.TimeoutExpired:
        return f"attention benchmark: stopped after {budget_s:.0f} s (time budget)\n"
    if out.exists() and r.returncode in (0, 1):
        text = out.read_text()
        return text if r.returncode == 0 else text + "\n" + r.stderr[-2000:]
    return f"attention benchmark failed (exit {r.returncode}):\n\n```\n{(r.stdout + r.stderr)[-2000:]}\n```\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="shrunk wan geometry on CPU, a few chunks")
    p.add_argument("--out", help="write the markdown tables to this file")
    p.add_argument("--model", default="wan-1.3b", help="preset (seeded random weights)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--sessions", default=None, help="comma list (default 1,2,4,8; smoke 1,2)")
    p.add_argument("--chunks", type=int, default=None, help="timed chunks per run (default 4; smoke 2)")
    p.add_argument("--warmup-chunks", type=int, default=None,
                   help="chunks before timing (default: until the window is full; smoke 1)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 (smoke fp32)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H200 bf16: ~989)")
    p.add_argument("--attention", choices=["auto", "triton", "sdpa"], default="auto",
                   help="engine attention backend (KNOTSTREAM_ATTENTION; auto = triton on CUDA)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--families", default="livetalk,flashhead",
                   help="photoreal recipes benchmarked after the engine rows (bench/photoreal.py); '' for none")
    p.add_argument("--family-sessions", default=None, help="sessions of their rows (default 1,4; smoke 1)")
    p.add_argument("--no-attention", action="store_true", help="skip bench/attention.py")
    p.add_argument("--budget-s", type=float, default=450.0, help="whole-run time budget (attention gets the rest)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.sessions = [int(x) for x in (args.sessions or ("1,2" if smoke else "1,2,4,8")).split(",")]
    args.chunks = args.chunks or (2 if smoke else 4)
    args.dtype = args.dtype or ("fp32" if smoke else "bf16")
    try:
        args.photoreal = photoreal.make_plan(args.families, args.family_sessions, args.chunks, None, args.dtype,
                                             smoke, args.seed) if args.families else None
    except ValueError as exc:
        p.error(str(exc))
    if min(args.sessions) < 1 or args.chunks < 1 or (args.warmup_chunks is not None and args.warmup_chunks < 1):
        p.error("sessions, chunks and warm-up chunks must be >= 1")
    return args


def engine_section(args) -> tuple[str, list[Row]] | int:
    """The engine rows (ours at 1..N sessions, the baseline) as markdown with their header
    line, or an exit code when the engine cannot start."""
    import torch

    import kernels

    t0 = time.perf_counter()
    try:
        engine = build_engine(args)
    except torch.cuda.OutOfMemoryError:
        print("bench/gpu.py: out of GPU memory while loading the model: is another process using the GPU?",
              file=sys.stderr)
        return 1
    cfg = engine.config
    k = cfg.stream
    if args.warmup_chunks is None:
        args.warmup_chunks = 1 if args.cpu_smoke else math.ceil(k.window_frames / k.chunk_frames) + 1
    bench = Bench(engine, args)
    # Global warm-up (kernel compilation, autotuning, allocator), not timed.
    try:
        warm = engine.start(bench.reference, k, seed=args.seed)
        for _ in range(2):
            warm.step(bench.audio(warm))
        warm.close()
    except Exception as exc:  # noqa: BLE001  (say what to try instead of a bare traceback)
        print(f"bench/gpu.py: the first engine steps failed ({type(exc).__name__}: {exc}).\n"
              f"With attention backend {args.attention!r}; `--attention sdpa` avoids the fused kernels, "
              "fewer `--sessions` or a smaller `--height/--width` need less memory.", file=sys.stderr)
        return 1
    rows = engine_rows(bench, args)
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "CPU (smoke run)"
    backend = kernels.choose_backend(torch.empty(1, device=engine.device, dtype=engine.dtype))
    stream_len = args.warmup_chunks + args.chunks
    return (f"GPU benchmark on {device}, torch {torch.__version__}, {args.dtype}: model {cfg.name} "
            f"({cfg.width}x{cfg.height}, {cfg.fps} fps, seeded random weights), chunk {k.chunk_frames} + knot "
            f"{k.knot_frames} latent frames, window {k.window_frames}, {k.denoise_steps} steps, attention {backend}; "
            f"{args.warmup_chunks} warm-up + {args.chunks} timed chunks per run (stream length {stream_len} "
            f"chunks); MFU against {args.peak_tflops:g} TFLOP/s; {time.perf_counter() - t0:.0f} s.\n\n"
            + markdown(rows) + "\n"), rows


def engine_rows(bench: Bench, args) -> list[Row]:
    import torch

    rows: list[Row] = []
    for n in args.sessions:
        try:
            rows.append(bench.ours(n))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            rows.append(failed_row("ours (knotstream)", n, exc))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    if not args.no_baseline:
        try:
            rows.append(bench.baseline())
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            rows.append(failed_row("self-forcing-style baseline", 1, exc))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        base = rows[-1].fps
        for r in rows:
            if base and r.fps:
                r.vs_baseline = r.fps / base
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["KNOTSTREAM_ATTENTION"] = args.attention
    if args.cpu_smoke and args.attention == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    sys.path[:0] = [str(REPO), str(BENCH)]  # run from a checkout
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA device (torch {torch.__version__} sees none): run on a GPU host, "
              "or --cpu-smoke for the CPU check", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    section = engine_section(args)
    if isinstance(section, int):
        return section
    text, rows = section  # the engine is gone: the photoreal models get the GPU to themselves
    if args.photoreal is not None:
        family_text, family_rows = photoreal.photoreal_table(args.photoreal)
        text += "\n" + family_text
        rows += family_rows
    if not args.no_attention:
        text += "\n" + attention_table(args, args.budget_s - (time.perf_counter() - t0))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    failed = [r for r in rows if r.fps is None]
    for r in failed:
        print(f"ROW FAILED: {r.run} x{r.sessions}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
