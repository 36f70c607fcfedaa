"""Evaluation: metrics on hand-checked cases and float64 references, and `knotstream eval
--quick` end to end through the CLI on the current tiny model."""

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


# ------------------------------------------------------------------------------------------
# `knotstream eval --quick` end to end
# ------------------------------------------------------------------------------------------


def small_speech_bank(folder):
    """11 sentences (2 held out) spoken by espeak-ng/flite; without a TTS tool, a named
    fallback of tone bursts so the pipeline still runs (lip sync is then meaningless)."""
    from model.train import data, speech

    if speech.tts_available():
        return data.speech_bank(folder, n=11, seed=0)
    t = np.arange(8000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(np.pi * t / t[-1])).astype(np.float32)
    bank = data.SpeechBank(np.tile(tone, 11), np.arange(12) * len(tone), [f"tone {i}" for i in range(11)])
    bank.save(folder / "speech_bank.npz")
    return bank


def test_eval_quick_end_to_end(tmp_path, capsys):
    from model.train import evaluate
    from server.cli import main

    small_speech_bank(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--quick", "--data", str(tmp_path), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Command: `knotstream eval --model tiny" in report
    header = "| system | " + " | ".join(evaluate.METRICS) + " |"
    assert report.count(header) == 2  # baselines table and ablation table
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| system")]
    names = [r.split(" | ")[0][2:] for r in rows]
    for name in ("model", evaluate.REFERENCE, evaluate.ZEROED, "knots off (knot_frames=0)",
                 "running ahead off (ahead_frames=0)", "window 2 (window_frames=2)", "window 12 (window_frames=12)",
                 "seam blend off (seam_blend=0)"):  # the bundled model blends seams
        assert name in names, f"row {name!r} missing from the report"
    for r in rows:  # every metric filled with a number (drift rows have 3)
        cells = r.strip("| ").split(" | ")[1:]
        assert len(cells) in (len(evaluate.METRICS), 3) and all(np.isfinite(float(c)) for c in cells), r
    assert "Identity drift" in report
    verdicts = [line for line in report.splitlines() if line.startswith(("- PASS", "- FAIL"))]
    assert len(verdicts) == len(evaluate.METRICS) - 1 + 3  # beats baselines per metric, lip sync, seams, drift
    import cv2

    strip = cv2.imread(str(out / "strip.png"))
    assert strip is not None and strip.shape == (4 * 128, 8 * 128, 3)


def test_eval_rejects_clips_shorter_than_two_chunks(tmp_path):
    from server.cli import main

    small_speech_bank(tmp_path)
    assert main(["eval", "--seconds", "0.2", "--long-seconds", "0", "--data", str(tmp_path),
                 "--out", str(tmp_path / "eval")]) == 2


def test_bars_decide_on_the_numbers():
    from model.train import evaluate as E

    good = {"PSNR": 30.0, "SSIM": 0.9, "mouth PSNR": 25.0, "mouth SSIM": 0.8, "lip-sync r": 0.9, "jitter": 1.0}
    bad = {"PSNR": 20.0, "SSIM": 0.7, "mouth PSNR": 15.0, "mouth SSIM": 0.5, "lip-sync r": 0.1, "jitter": 1.0}
    drift = {"model": M.Drift(30.0, 29.8, -0.2)}
    verdicts = E.bars({"model": [good], E.REFERENCE: [bad], E.ZEROED: [bad]}, 1.0, drift)
    assert all(v.startswith("- PASS") for v in verdicts) and len(verdicts) == 8
    jittery = dict(good, jitter=1.5)
    verdicts = E.bars({"model": [jittery], E.REFERENCE: [good], E.ZEROED: [bad]}, 1.0, None)
    assert [v[2:6] for v in verdicts] == ["FAIL"] * 5 + ["PASS", "FAIL"]


def test_strip_rows_and_mouth_tiles():
    from model.train import evaluate as E

    gen, truth = clip(0, n=10, size=64), clip(1, n=10, size=64)
    strip = E.strip_image(gen, truth, [(10, 20, 40, 30)] * 10, n=5)
    assert strip.shape == (4 * 64, 5 * 64, 3)
    np.testing.assert_array_equal(strip[:64, :64], gen[0])
    np.testing.assert_array_equal(strip[64:128, -64:], truth[-1])
    # A 30x10 crop keeps its aspect: scaled x2 (64 / 30 -> 2.13, 64 / 10 -> 6.4), black above and below.
    tile = strip[192:256, :64]
    assert (tile[:5] == 0).all() and (tile[-5:] == 0).all() and tile[32].any()


class FakeStream:
    """The engine's stream geometry (first chunk 4c-3 frames, then 4c) without a model:
    frame t is filled with t % 256, and every step's driving is recorded."""

    def __init__(self, log, chunk=2):
        from model.timeline import Timeline

        self.log, self.c, self.latent, self.timeline = log, chunk, 0, Timeline(25, 16000)

    def next_span(self):
        return self.timeline.span(self.latent, self.c, self.c + 1)

    @property
    def frame_index(self):
        return self.next_span().frame

    def step(self, inp):
        span = inp.span
        self.log.append((span, inp.audio.copy(), None if inp.motion is None else inp.motion.copy()))
        frames = np.stack([np.full((128, 128, 3), (span.frame + i) % 256, np.uint8) for i in range(span.frames)])
        self.latent += self.c
        return frames

    def close(self):
        pass


class FakeEngine:
    def __init__(self):
        from model.config import from_name

        self.config, self.log = from_name("tiny"), []

    def start(self, reference, knobs, seed):
        return FakeStream(self.log, knobs.chunk_frames)


def test_stream_driving_alignment_and_long_run_scoring():
    """Each step gets the audio and given motion of exactly its span (audio with the context
    before its first frame, motion from its first frame, driving_frames long); the last chunk
    is cut at the clip's end; the long run's chunk-wise per-frame PSNR equals PSNR on the
    whole clip."""
    from model.train import evaluate as E
    from model.train.data import SpeechBank

    t = np.arange(16000) / 16000
    bank = SpeechBank(np.tile((0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 11),
                      np.arange(12) * 16000, [str(i) for i in range(11)])
    clip = E.held_out_clip(bank, 30, 25, 128, np.random.default_rng(0))
    from model.config import MOTION_FIELDS

    F = len(MOTION_FIELDS)
    for name in MOTION_FIELDS:  # the mouth is never given: it must come from the audio
        i = MOTION_FIELDS.index(name)
        given = name not in ("mouth_open", "mouth_wide")
        assert (clip.given[:, F + i] == float(given)).all(), name
        np.testing.assert_array_equal(clip.given[:, i], clip.motion[:, i] if given else 0.0)
    assert clip.motion[:, MOTION_FIELDS.index("mouth_open")].max() > 0.3  # the truth does speak
    engine = FakeEngine()
    chunks = list(E.iter_stream(engine, clip, engine.config.stream, seed=0))
    assert [f0 for f0, _ in chunks] == [0, 5, 13, 21, 29]
    gen = np.concatenate([f for _, f in chunks])
    assert len(gen) == 30 and (gen[:, 0, 0, 0] == np.arange(30)).all()
    for span, audio, motion in engine.log:
        assert span.audio_from <= max(0, span.frame - 2) * 640 and len(audio) == span.samples
        np.testing.assert_array_equal(audio, clip.audio[span.audio_from:span.audio_to])
        np.testing.assert_array_equal(motion, clip.given[span.frame:span.frame + span.driving_frames])
    assert engine.log[-1][2] is not None and len(engine.log[-1][2]) == 1  # only frame 29 is inside the clip
    zeroed = FakeEngine()
    list(E.iter_stream(zeroed, clip, zeroed.config.stream, seed=0, zero_audio=True))
    assert all(not a.any() for _, a, _ in zeroed.log)

    class Bar:
        def update(self, n):
            pass

    model_psnr, ref_psnr = E.long_run(FakeEngine(), clip, engine.config.stream, 0, 128, Bar())
    truth = clip.truth(128)
    np.testing.assert_allclose(model_psnr, M.psnr_frames(gen, truth), rtol=1e-12)
    np.testing.assert_allclose(ref_psnr, M.psnr_frames(np.repeat(clip.reference[None], 30, 0), truth), rtol=1e-12)
