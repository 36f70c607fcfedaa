"""Evaluation: metrics on known cases, and `knotstream eval` end to end on a short clip."""

import argparse

import numpy as np
import pytest

from model.train import metrics as M


def frames(seed=0, n=6):
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)


def test_psnr_ssim_known_cases():
    a = frames()
    assert M.psnr(a, a) == M.PSNR_CAP and M.ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert 15 < M.psnr(a, noisy) < 40 and M.ssim(a, noisy) < 0.99
    # 10 grey levels everywhere: PSNR = 20 log10(255/10).
    b = np.full((2, 8, 8, 3), 100, np.uint8)
    assert M.psnr(b, b + 10) == pytest.approx(20 * np.log10(25.5), abs=1e-9)
    assert M.psnr_boxes(b, b + 10, [(0, 0, 4, 4)] * 2) == pytest.approx(20 * np.log10(25.5), abs=1e-9)


def test_correlation_and_jitter():
    x = np.sin(np.arange(50) / 3)
    assert M.correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert M.correlation(x, np.ones(50)) == 0.0  # constant: no information, not NaN
    smooth = np.stack([np.full((8, 8, 3), 10 * t, np.uint8) for t in range(20)])
    assert M.boundary_jitter(smooth, [4, 8, 12, 16]) == pytest.approx(1.0)
    seam = smooth.copy()
    seam[8:] = np.clip(seam[8:].astype(int) + 40, 0, 255).astype(np.uint8)
    assert M.boundary_jitter(seam, [4, 8, 12, 16]) > 2


def test_eval_runs_end_to_end(tmp_path):
    from model.train import evaluate
    from model.train.data import SpeechBank

    t = np.arange(16000) / 16000
    bank = SpeechBank((0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32).repeat(2), np.array([0, 16000, 32000]),
                      ["a", "b"])
    bank.save(tmp_path / "speech_bank.npz")
    args = argparse.Namespace(model="tiny", data=str(tmp_path), clips=1, seconds=1.0, long_seconds=0.0,
                              out=str(tmp_path / "eval"), seed=0, quick=False)
    assert evaluate.run(args) == 0
    report = (tmp_path / "eval" / "report.md").read_text()
    for row in ("repeat the reference frame", "| model |", "driving audio zeroed", "knots off", "running ahead off",
                "window 2", "window 12"):
        assert row in report
    for metric in ("PSNR", "SSIM", "mouth PSNR", "lip-sync r", "jitter"):
        assert metric in report
    assert (tmp_path / "eval" / "strip.png").stat().st_size > 1000
