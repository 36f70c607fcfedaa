"""bench/gpu.py on CPU: the smoke run's table, the analytic FLOP counts, the GPU geometry, exit codes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import gpu  # bench/ is a folder of scripts, not a package
import photoreal
from self_forcing_baseline import BaselineStream

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
NUMERIC = ("first-frame latency ms", "ms per chunk", "frames/s (all sessions)", "real-time x per session",
           "DiT TFLOP/s", "MFU", "vs baseline")


def tables(text: str) -> list[list[dict]]:
    """Every markdown table in `text` as a list of {column: cell} rows."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def test_cpu_smoke_table(tmp_path):
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--cpu-smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    assert text.strip() in r.stdout
    engine_table, families, attention = tables(text)[:3]
    assert list(engine_table[0]) == list(gpu.COLUMNS)
    assert [(row["run"], row["sessions"]) for row in engine_table] == [
        ("ours (knotstream)", "1"), ("ours (knotstream)", "2"), ("self-forcing-style baseline", "1")]
    for row in engine_table:
        for col in NUMERIC:
            v = float(row[col])
            assert math.isfinite(v) and v > 0, (row["run"], col, row[col])
        assert float(row["ms per chunk"]) <= float(row["first-frame latency ms"]) * 5
    assert float(engine_table[-1]["vs baseline"]) == 1.0
    # 2 sessions produce twice the frames of one per call: throughput is per all sessions.
    one, two = engine_table[0], engine_table[1]
    assert float(two["frames/s (all sessions)"]) == pytest.approx(
        2 * 12 / (float(two["ms per chunk"]) / 1e3), rel=0.01)
    assert float(one["real-time x per session"]) == pytest.approx(float(one["frames/s (all sessions)"]) / 16, rel=0.01)
    assert "wan-1.3b-smoke" in text and "window 12" in text and "attention sdpa" in text
    # Both photoreal recipes at their (smoke) geometry, next to each family's own policy.
    assert list(families[0]) == list(photoreal.COLUMNS)
    assert [(row["family"], row["run"], row["sessions"]) for row in families] == [
        ("livetalk-random", photoreal.OURS, "1"), ("livetalk-random", photoreal.OWN, "1"),
        ("flashhead-random", photoreal.OURS, "1"), ("flashhead-random", photoreal.OWN, "1")]
    for row in families:
        for col in ("first-frame latency ms", "ms per chunk", "frames/s (all sessions)", "real-time x per session",
                    "vs own policy"):
            v = float(row[col])
            assert math.isfinite(v) and v > 0, (row["family"], row["run"], col, row[col])
    livetalk_ours, livetalk_own, flashhead_ours, flashhead_own = families
    assert float(livetalk_own["vs own policy"]) == 1.0 == float(flashhead_own["vs own policy"])
    assert livetalk_own["note"] == "shifting KV buffer + SDPA" and "no cache" in flashhead_own["note"]
    # LiveTalk makes 12 frames per block at 16 fps, FlashHead 28 per chunk at 25 fps.
    for row, frames, fps in ((livetalk_ours, 12, 16), (flashhead_ours, 28, 25)):
        assert float(row["frames/s (all sessions)"]) == pytest.approx(frames / (float(row["ms per chunk"]) / 1e3),
                                                                      rel=0.01)
        assert float(row["real-time x per session"]) == pytest.approx(float(row["frames/s (all sessions)"]) / fps,
                                                                      rel=0.01)
    assert "livetalk 64x64 at 16 fps" in text
    # The attention benchmark ran (bench/attention.py's own table) and its rows are checked.
    assert any(row["method"] == "ours (triton, in place)" and row["ms"] != "-" for row in attention)


def test_gpu_geometry_is_wan_832x480():
    cfg = gpu.model_config(gpu.parse_args([]))
    assert (cfg.name, cfg.width, cfg.height) == ("wan-1.3b", 832, 480)
    assert cfg.tokens_per_frame == 1560  # (480/16) x (832/16): the attention benchmark's geometry
    assert (cfg.dit.dim, cfg.dit.num_layers, cfg.stream.denoise_steps) == (1536, 30, 4)
    other = gpu.model_config(gpu.parse_args(["--height", "720", "--width", "1280"]))
    assert (other.width, other.height, other.tokens_per_frame) == (1280, 720, 3600)
    args = gpu.parse_args([])
    assert args.sessions == [1, 2, 4, 8] and args.dtype == "bf16" and args.peak_tflops == 989.0
    assert args.photoreal.families == ["livetalk", "flashhead"] and args.photoreal.sessions == [1, 4]
    assert gpu.parse_args(["--families", ""]).photoreal is None
    # The photoreal rows run the released geometry: 512x512, 1024 tokens per latent frame.
    from model.wan.families import family_config
    from model.wan.photoreal import engine_config
    for name, fps in (("livetalk-1.3b", 16), ("flashhead-1.3b", 25)):
        fam = engine_config(family_config(name))
        assert (fam.width, fam.height, fam.fps, fam.tokens_per_frame, fam.dit.num_layers) == (512, 512, fps, 1024, 30)
    # At full size, independently of the formula: 2 FLOPs per weight of every linear layer a video
    # token passes through (the DiT built on the meta device; text cross-attention is not run,
    # driving k/v see driving tokens only), plus 4 * dim per attended key in every layer.
    from torch import nn

    from model.dit import DiT
    with torch.device("meta"):
        dit = DiT(cfg.dit)
    skip = ("cross_attn.", "text_embedding.", "time_", "drive_attn.k", "drive_attn.v")
    per_token = sum(m.weight.numel() for name, m in dit.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv3d)) and not any(name.startswith(s) or f".{s}" in f".{name}"
                                                                         for s in skip))
    assert 1.2e9 < per_token < 1.3e9  # Wan2.1-1.3B without text cross-attention, with driving q/o
    N, K = 4 * 1560, 4 * 1560
    expect = 2 * N * per_token + cfg.dit.num_layers * 4 * N * K * cfg.dit.dim
    assert gpu.dit_flops(cfg, 4, 4) == pytest.approx(expect, rel=0.01)


def _counted_dit_flops(fn) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return sum(counter.get_flop_counts()["DiT"].values())


def test_analytic_flops_equal_counted_flops():
    """dit_flops / ours_chunk_flops / baseline_chunk_flops against torch's FLOP counter, step by step
    while the window fills (and the baseline's cache grows)."""
    args = gpu.parse_args(["--cpu-smoke"])
    engine = gpu.build_engine(args)
    cfg, knobs = engine.config, engine.config.stream
    ref = np.zeros((cfg.height, cfg.width, 3), np.uint8)
    stream = engine.start(ref, knobs)
    for _ in range(5):  # window 0, 3, 6, 9, 12 frames
        expect = gpu.ours_chunk_flops(cfg, knobs, stream.state.window.length)
        assert _counted_dit_flops(stream.step) == pytest.approx(expect, rel=1e-9)
    base = BaselineStream(engine.model, ref, knobs, 3, 0, engine.device, engine.dtype)
    for _ in range(3):
        expect = gpu.baseline_chunk_flops(cfg, knobs, base.cache.frames)
        assert _counted_dit_flops(base.step) == pytest.approx(expect, rel=1e-9)
    assert base.cache.frames == 1 + 3 * knobs.chunk_frames


def test_baseline_attends_to_the_whole_growing_cache():
    """The baseline's dense attention equals SDPA over [all committed frames | chunk], and its cache
    holds the reference plus every committed chunk (nothing evicted)."""
    from self_forcing_baseline import DenseBlockCausal, GrowingCache

    cache = GrowingCache(2, 2, 8, 5, 4, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    past_k, past_v = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    cache.k[1, :, :, :10], cache.v[1, :, :, :10] = past_k, past_v
    cache.commit(10)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    out = DenseBlockCausal(cache).attend(1, q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2))
    torch.testing.assert_close(out, ref)
    assert cache.frames == 2
    cache.commit(5)
    with pytest.raises(RuntimeError, match="full"):
        cache.commit(10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_exits_2_with_a_message():
    for script in ("gpu.py", "photoreal.py"):
        r = subprocess.run([sys.executable, str(BENCH / script)], capture_output=True, text=True, timeout=60, env=ENV)
        assert r.returncode == 2
        assert "no CUDA device" in r.stderr and "--cpu-smoke" in r.stderr


def test_gpu_sh_passes_flags_through(tmp_path):
    """gpu.sh hands its flags to gpu.py; here the engine's fused-kernel path (Triton interpreter)."""
    out = tmp_path / "t.md"
    r = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--cpu-smoke", "--attention", "triton", "--no-attention",
                        "--no-baseline", "--families", "", "--sessions", "1", "--chunks", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env={**ENV, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    assert "attention triton" in text
    (rows,) = tables(text)
    assert [row["run"] for row in rows] == ["ours (knotstream)"]
    assert math.isfinite(float(rows[0]["frames/s (all sessions)"]))


def test_engine_steps_the_wan_geometry_at_832x480():
    """The bench's GPU geometry runs through the real engine: widths shrunk for the CPU, resolution,
    knobs and token layout those of wan-1.3b (one first chunk: 4 * 3 - 3 = 9 frames)."""
    import dataclasses

    from model.avatar import AvatarModel
    from model.engine import Engine

    full = gpu.model_config(gpu.parse_args([]))
    cfg = dataclasses.replace(gpu.smoke_config(full), height=full.height, width=full.width)
    assert cfg.tokens_per_frame == 1560 and cfg.stream == full.stream
    engine = Engine(AvatarModel.random(cfg), "cpu", torch.float32, trained=False)
    stream = engine.start(np.zeros((480, 832, 3), np.uint8))
    frames = stream.step()
    assert frames.shape == (9, 480, 832, 3) and frames.dtype == np.uint8


def test_failing_engine_gives_a_message_not_a_traceback(monkeypatch, capsys):
    from model.engine import Stream

    def broken(self, *a, **kw):
        raise RuntimeError("kernel did not compile")

    monkeypatch.setenv("KNOTSTREAM_ATTENTION", "auto")  # main() sets it; restored afterwards
    monkeypatch.setattr(Stream, "step", broken)
    assert gpu.main(["--cpu-smoke", "--no-attention", "--sessions", "1", "--chunks", "1"]) == 1
    err = capsys.readouterr().err
    assert "kernel did not compile" in err and "--attention sdpa" in err
