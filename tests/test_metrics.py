"""Evaluation metrics (model/train/metrics.py) on hand-checked cases and float64 references."""

import numpy as np
import pytest

from model.train import metrics as M


def clip(seed=0, n=4, size=32, smooth=False):
    """(n, size, size, 3) uint8 noise; `smooth` blurs it so small shifts change it little."""
    x = np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3))
    if smooth:
        import cv2

        x = np.stack([cv2.GaussianBlur(f, (0, 0), 3) for f in x])
        x = (x - x.min()) / (x.max() - x.min()) * 255
    return x.round().astype(np.uint8)


# ------------------------------------------------------------------------------------------
# PSNR / SSIM
# ------------------------------------------------------------------------------------------


def test_psnr_identical_is_capped_and_offset_is_exact():
    a = clip()
    assert M.psnr(a, a) == M.PSNR_CAP and np.isfinite(M.psnr_frames(a, a)).all()
    b = np.full((2, 8, 8, 3), 100, np.uint8)
    assert M.psnr(b, b + 10) == pytest.approx(20 * np.log10(255 / 10), abs=1e-12)


def test_psnr_per_frame_matches_float64_reference():
    a, b = clip(1), clip(2)
    ref = [10 * np.log10(255.0 ** 2 / ((x.astype(np.float64) - y) ** 2).mean()) for x, y in zip(a, b)]
    np.testing.assert_allclose(M.psnr_frames(a, b), ref, rtol=1e-12)


def test_psnr_in_box_counts_only_the_box():
    a = np.full((3, 16, 16, 3), 50, np.uint8)
    b = a.copy()
    b[:, :, 8:] += 20                    # differs only in the right half
    left, right = (0, 0, 8, 16), (8, 0, 16, 16)
    assert M.psnr(a, b, [left] * 3) == M.PSNR_CAP
    assert M.psnr(a, b, right) == pytest.approx(20 * np.log10(255 / 20), abs=1e-12)
    assert M.psnr(a, b, (4, 4, 4, 9)) == M.PSNR_CAP  # empty box: nothing differs
    with pytest.raises(ValueError, match="one box per frame"):
        M.psnr(a, b, [left] * 2)


def test_psnr_rejects_mismatched_clips():
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(clip(size=32), clip(size=16))


def test_ssim_of_flat_images_is_the_luminance_term():
    # Flat images: variances and covariance vanish, the contrast term is c2/c2 = 1, and
    # SSIM = (2 mx my + c1) / (mx^2 + my^2 + c1) everywhere (hand-checked formula).
    a, b = np.full((1, 24, 24, 3), 100, np.uint8), np.full((1, 24, 24, 3), 110, np.uint8)
    expected = (2 * 100 * 110 + M.SSIM_C1) / (100 ** 2 + 110 ** 2 + M.SSIM_C1)
    assert M.ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_map_matches_direct_gaussian_window_sums():
    x, y = M.luma(clip(3)[0]), M.luma(clip(4)[0])
    r = M.SSIM_WINDOW // 2
    g = np.exp(-((np.arange(-r, r + 1)) ** 2) / (2 * M.SSIM_SIGMA ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()   # (11, 11) normalised Gaussian window
    smap = M.ssim_map(x, y)
    for cy, cx in ((16, 16), (8, 20), (5, 5)):  # windows that fit inside the 32x32 image
        px, py = x[cy - r:cy + r + 1, cx - r:cx + r + 1], y[cy - r:cy + r + 1, cx - r:cx + r + 1]
        mx, my = (w * px).sum(), (w * py).sum()
        vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
        cxy = (w * (px - mx) * (py - my)).sum()
        ref = ((2 * mx * my + M.SSIM_C1) * (2 * cxy + M.SSIM_C2)) / ((mx ** 2 + my ** 2 + M.SSIM_C1) * (vx + vy + M.SSIM_C2))
        assert smap[cy, cx] == pytest.approx(ref, rel=1e-7)


def test_noise_and_shifts_lower_psnr_and_ssim():
    a = clip(5, smooth=True)
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert 20 < M.psnr(a, noisy) < 40 and M.ssim(a, noisy) < 0.95
    shift = lambda k: np.roll(a, k, axis=2)  # noqa: E731
    p = [M.psnr(a, shift(k)) for k in (1, 3, 6)]
    s = [M.ssim(a, shift(k)) for k in (1, 3, 6)]
    assert M.PSNR_CAP > p[0] > p[1] > p[2] and 1 > s[0] > s[1] > s[2]
    box = (4, 4, 12, 12)
    assert M.ssim(a, a, box) == pytest.approx(1.0) and M.ssim(a, noisy, box) < 0.95


# ------------------------------------------------------------------------------------------
# Lip sync
# ------------------------------------------------------------------------------------------


def test_correlation_conventions():
    x = np.sin(np.arange(50) / 3)
    assert M.correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert M.correlation(x, -x) == pytest.approx(-1.0)
    y = np.random.default_rng(0).normal(size=50)
    assert M.correlation(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert M.correlation(x, np.ones(50)) == 0.0          # constant: no information, not NaN
    assert M.correlation(np.full(50, 0.1), np.full(50, 0.1)) == 0.0
    assert M.correlation([1.0], [2.0]) == 0.0
    with pytest.raises(ValueError, match="same length"):
        M.correlation(x, x[:-1])


def test_lip_sync_of_rendered_mouths():
    from model.config import MOTION_FIELDS
    from model.train import world

    ident = world.identity_from_seed(1_000_003)
    motion = np.tile(world.neutral_motion(), (40, 1))
    motion[:, MOTION_FIELDS.index("mouth_open")] = 0.5 + 0.5 * np.sin(np.arange(40) / 2.5)
    truth = world.render_clip(ident, motion, 128)
    boxes = [world.mouth_box(ident, m, 128) for m in motion]
    closed = motion.copy()
    closed[:, MOTION_FIELDS.index("mouth_open")] = 0.0
    reversed_ = motion.copy()
    reversed_[:, MOTION_FIELDS.index("mouth_open")] = 1.0 - motion[:, MOTION_FIELDS.index("mouth_open")]
    assert M.lip_sync(truth, truth, boxes) == pytest.approx(1.0)
    assert M.lip_sync(world.render_clip(ident, closed, 128), truth, boxes) == 0.0
    assert M.lip_sync(world.render_clip(ident, reversed_, 128), truth, boxes) < -0.8


# ------------------------------------------------------------------------------------------
# Chunk seams and drift
# ------------------------------------------------------------------------------------------


def test_chunk_starts():
    assert M.chunk_starts([5, 8, 8, 4]) == [0, 5, 13, 21]
    assert M.chunk_starts([]) == []


def test_jitter_smooth_static_and_seam():
    ramp = np.stack([np.full((8, 8, 3), 10 * t, np.uint8) for t in range(20)])  # +10 per frame
    starts = [0, 4, 8, 12, 16]
    assert M.boundary_jitter(ramp, starts) == pytest.approx(1.0)
    assert M.boundary_jitter(np.repeat(ramp[:1], 20, 0), starts) == pytest.approx(1.0)  # static clip
    seam = ramp.copy()
    seam[8:] += 40   # the step 7 -> 8 (a border) is 50 instead of 10
    # borders 4, 8, 12, 16: energies 100, 2500, 100, 100; inside: 15 steps of 100.
    expected = ((2500 + 300) / 4 + M.JITTER_EPS) / (100 + M.JITTER_EPS)
    assert M.boundary_jitter(seam, starts) == pytest.approx(expected)
    # The same jump inside a chunk raises the inside energy instead: seams look smoother than it.
    assert M.boundary_jitter(seam, [5, 10]) == pytest.approx((100 + M.JITTER_EPS) / (4100 / 17 + M.JITTER_EPS))
    with pytest.raises(ValueError, match="border"):
        M.boundary_jitter(ramp, [0])


def test_identity_drift():
    p = np.concatenate([np.full(10, 30.0), np.full(30, 29.0), np.full(10, 28.0)])
    d = M.identity_drift(p, 10)
    assert (d.first, d.last, d.change) == (30.0, 28.0, -2.0)
    with pytest.raises(ValueError, match="window"):
        M.identity_drift(p, 26)
