"""The paired block bootstrap of the personal eval's per-clip gaps (model/personal/intervals.py)
and the report's reading of the issue's bars from it."""

from __future__ import annotations

import numpy as np
import pytest

from model.personal.intervals import paired_gap


def test_a_real_gap_is_sure_and_no_gap_is_not():
    rng = np.random.default_rng(0)
    base = rng.normal(25, 2, 400)                      # per-frame scores that vary a lot with the frame
    better = base + 0.3 + rng.normal(0, 0.2, 400)      # the same frames, 0.3 higher
    g = paired_gap(better, base)
    assert g.sure and g.low > 0 and g.low < 0.3 < g.high and g.mean == pytest.approx(0.3, abs=0.05)
    same = base + rng.normal(0, 0.2, 400)
    assert not paired_gap(same, base).sure
    # Paired: the frames' own spread (std 2) does not widen the interval of their difference.
    assert g.high - g.low < 0.1


def test_blocks_widen_the_interval_of_slowly_varying_differences():
    rng = np.random.default_rng(1)
    drift = np.repeat(rng.normal(0, 1, 50), 8)          # a difference that holds for a chunk at a time
    a, b = drift + rng.normal(0, 0.1, 400), np.zeros(400)
    by_frame, by_block = paired_gap(a, b, block=1), paired_gap(a, b, block=8)
    assert (by_block.high - by_block.low) > 2 * (by_frame.high - by_frame.low)
    assert by_block.blocks == 50


def test_frames_without_a_score_are_left_out():
    a, b = np.array([1.0, np.nan, 3.0, 5.0]), np.array([0.0, 0.0, np.nan, 4.0])
    g = paired_gap(a, b, block=1)
    assert g.mean == pytest.approx(1.0) and g.low == pytest.approx(1.0) and g.high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no frame"):
        paired_gap(np.full(4, np.nan), b)
    with pytest.raises(ValueError, match="one length"):
        paired_gap(a, b[:3])


def test_the_report_reads_the_bars_from_the_gaps():
    from model.personal.evaluate import MOTION_WARP, PER_FRAME, REPEAT, WARP, gap_lines
    from model.personal.evaluate_fit import FITTED

    rng = np.random.default_rng(2)
    T = 160

    def row(psnr, ssim, opening):
        return {PER_FRAME: {"PSNR": psnr + rng.normal(0, 0.05, T), "SSIM": ssim + rng.normal(0, 0.001, T),
                            "mouth-open error": opening + rng.normal(0, 0.001, T)}}

    rows = {REPEAT: row(24.0, 0.85, 0.01), WARP: row(26.0, 0.90, 0.03), MOTION_WARP: row(25.5, 0.89, 0.03),
            FITTED: row(26.5, 0.88, 0.02)}     # beats the warp on PSNR, loses its SSIM; loses the still's opening
    text = "\n".join(gap_lines([{"name": "clip.mp4", "rows": rows}]))
    assert f"| clip.mp4 | {WARP} | +0.5" in text
    assert "4 of 6 held; missed:" in text
    assert "clip.mp4 SSIM vs piecewise-affine warp (sure)" in text
    assert "clip.mp4 mouth-open error vs repeat the portrait (sure)" in text
