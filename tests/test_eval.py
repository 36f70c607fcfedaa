"""`knotstream eval`: held-out clips and their seeds, the engine driven as a live session,
pairing (same clip, same noise), clip-length prefixes, and `--quick` end to end through the
CLI on the bundled tiny model. Metrics: tests/test_metrics.py; intervals and bars:
tests/test_eval_stats.py."""

import numpy as np
import pytest

from model.train import metrics as M
from tests.test_metrics import clip


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


def tone_bank():
    """11 one-second tone 'sentences' (0 and 10 held out): no TTS needed."""
    from model.train.data import SpeechBank

    t = np.arange(16000) / 16000
    return SpeechBank(np.tile((0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 11),
                      np.arange(12) * 16000, [str(i) for i in range(11)])


class Bar:
    """A progress bar that shows nothing."""

    def update(self, n):
        pass


def test_eval_quick_end_to_end(tmp_path, capsys):
    from model.train import evaluate
    from server.cli import main

    small_speech_bank(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--quick", "--prefix-seconds", "0.4", "--data", str(tmp_path), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Command: `knotstream eval --model tiny --data" in report and "--clips 2 --seconds 0.6 " in report
    assert report.rstrip("`\n").count("--prefix-seconds 0.4") == 1
    header = "| system | " + " | ".join(evaluate.METRICS) + " |"
    tables, after = report.split("## Clips")  # systems and paired differences; clips, lengths, drift, bars
    assert tables.count(header) == 2  # baselines table and ablation table
    assert tables.count("| system - model | " + " | ".join(evaluate.METRICS) + " |") == 1
    length = after.split("## Clip length")[1].split("## Identity drift")[0]
    assert [r.split(" | ")[0] for r in length.splitlines() if r.startswith("| ") and " s |" in r] == ["| 0.4 s", "| 0.6 s"]
    assert length.count("### First 0.4 s") == 1 and length.count("| system - model |") == 1
    # The bundled file's stream defaults decide which mechanism rows are "off" and which "on",
    # and which mechanisms get a bar (those shipped on: running ahead; the knot ships off).
    from model.sources import ASSETS
    from model.weights import read_metadata

    shipped = read_metadata(ASSETS / "tiny.safetensors")["config"].stream
    knot_row = evaluate.toggled(shipped, "knot_frames", 1)
    mechanism_bars = 2 * (bool(shipped.knot_frames) + bool(shipped.ahead_frames) + 2)  # + window 6-2, 12-6
    assert len([x for x in length.splitlines() if x.startswith(("- PASS", "- FAIL"))]) == 8 + 1 + 2 + mechanism_bars
    rows = [line for line in tables.splitlines() if line.startswith("| ") and not line.startswith("| system")]
    names = [r.split(" | ")[0][2:] for r in rows]
    expected = ("model", evaluate.REFERENCE, evaluate.ZEROED, f"knots {knot_row[0]}",
                "running ahead off (ahead_frames=0)", "window 2 (window_frames=2)", "window 12 (window_frames=12)",
                "seam blend off (seam_blend=0)", evaluate.MOUTH_GIVEN)  # the bundled model blends seams
    for name in expected:
        assert name in names, f"row {name!r} missing from the report"
    for name in expected[1:]:  # once as a system, once as a paired difference
        assert names.count(name) == 2, name
    system_rows = [r for r in rows if r.split(" | ")[0][2:] in expected]
    for r in system_rows:  # every metric: a number with its interval (two clips)
        cells = r.strip("| ").split(" | ")[1:]
        assert len(cells) == len(evaluate.METRICS), r
        for c in cells:
            mean, half = c.rstrip("*").split(" ± ")
            assert np.isfinite(float(mean)) and float(half) >= 0, r
    clip_rows = [r for r in report.splitlines() if r.startswith(("| 0 |", "| 1 |"))]
    assert [r.split(" | ")[1:3] for r in clip_rows] == [["0", "1000000"], ["1", "1000001"]]  # seeds recorded
    assert "Identity drift over one 0.8 s run (seed 2)" in report
    main_bars = report.split("## Bars (issue 21)")[1]
    verdicts = [line for line in main_bars.splitlines() if line.startswith(("- PASS", "- FAIL"))]
    # beats 2 baselines on 4 metrics, lip sync, jitter with/without blend, drift, the mechanism pairs x 2
    assert len(verdicts) == 8 + 1 + 2 + 1 + mechanism_bars, verdicts
    import json

    scores = json.loads((out / "scores.json").read_text())
    assert [c["seed"] for c in scores["clips"]] == [0, 1] and scores["command"] in report
    first = scores["clips"][0]
    assert set(first["scores"]) == set(expected) and set(first["prefixes"]) == {"10"}
    assert f"| 0 | 0 | 1000000 | {' '.join(map(str, first['sentences']))} | {first['scores']['model']['PSNR']:.2f} |" \
        in report  # the report's clip table and the JSON agree
    import cv2

    strip = cv2.imread(str(out / "strip.png"))
    assert strip is not None and strip.shape == (4 * 128, 8 * 128, 3)


def test_eval_rejects_bad_arguments(tmp_path):
    from server.cli import main

    small_speech_bank(tmp_path)
    common = ["--long-seconds", "0", "--data", str(tmp_path), "--out", str(tmp_path / "eval")]
    assert main(["eval", "--seconds", "0.2", *common]) == 2   # shorter than two chunks
    assert main(["eval", "--clips", "0", *common]) == 2
    assert main(["eval", "--clips", "101", *common]) == 2     # more clips than held-out identities
    assert main(["eval", "--seed", "-1", *common]) == 2
    assert main(["eval", "--threads", "-1", *common]) == 2
    assert main(["eval", "--seconds", "2", "--prefix-seconds", "2", *common]) == 2   # a prefix as long as the clip
    assert main(["eval", "--seconds", "2", "--prefix-seconds", "0.2", *common]) == 2  # a prefix under two chunks
    with pytest.raises(SystemExit):
        main(["eval", "--prefix-seconds", "ten", *common])  # argparse: usage message, exit code 2


def test_clip_seeds_fix_the_material_and_shorter_clips_are_prefixes():
    """One seed = one identity, sentence order, motion and reference; a 1 s clip is the
    start of the 3 s clip of the same seed; consecutive seeds are different people."""
    from model.train import evaluate as E

    bank = tone_bank()
    short, long_ = (E.held_out_clip(bank, n, 25, 64, seed=7) for n in (25, 75))
    assert short.identity_seed == long_.identity_seed == 1_000_007 and short.seed == 7
    np.testing.assert_array_equal(short.motion, long_.motion[:25])
    np.testing.assert_array_equal(short.given, long_.given[:50])  # the tail: a second past the end
    np.testing.assert_array_equal(short.reference, long_.reference)
    np.testing.assert_array_equal(short.audio, long_.audio[:len(short.audio)])
    assert long_.sentences[:len(short.sentences)] == short.sentences and all(i % 10 == 0 for i in long_.sentences)
    other = E.held_out_clip(bank, 25, 25, 64, seed=8)
    assert other.identity_seed == 1_000_008 and not np.array_equal(other.motion, short.motion)
    again = E.held_out_clip(bank, 25, 25, 64, seed=7)
    np.testing.assert_array_equal(again.motion, short.motion)
    np.testing.assert_array_equal(again.audio, short.audio)


@pytest.fixture(scope="module")
def tiny_engine():
    from model.engine import Engine

    return Engine.from_pretrained("tiny")


def test_pairing_same_system_twice_differs_by_exactly_zero(tiny_engine):
    """Two systems with the same knobs on the same clip stream identical frames (the noise
    seed is the clip's), so their paired difference is exactly 0 on every metric; the same
    clip with another noise seed does differ (the noise does reach the frames)."""
    import dataclasses

    from model.train import eval_report as R
    from model.train import evaluate as E

    engine = tiny_engine
    base = engine.config.stream
    clip = E.held_out_clip(tone_bank(), 13, engine.config.fps, engine.config.height, seed=3)  # two chunks
    runs = {E.MODEL: E.System(base), "model again": E.System(base)}
    r = E.evaluate_clip(engine, clip, runs, engine.config.height, Bar())
    assert r.scores[E.MODEL] == r.scores["model again"]
    assert r.scores[E.MODEL]["PSNR"] != r.scores[E.REFERENCE]["PSNR"]
    d = R.difference([r, r], "model again", E.MODEL, "PSNR")
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    reseeded = E.evaluate_clip(engine, dataclasses.replace(clip, seed=4), {E.MODEL: E.System(base)},
                               engine.config.height, Bar())
    assert reseeded.scores[E.MODEL]["PSNR"] != r.scores[E.MODEL]["PSNR"]


def test_a_prefix_of_a_long_clip_scores_as_the_short_clip(tiny_engine):
    """The bundled engine streaming a 25-frame clip, scored over its first 13 frames, gives
    exactly the scores of the 13-frame clip of the same seed (every metric, the reference
    baseline and the truth's jitter): the clip-length study needs no second run."""
    from model.train import evaluate as E

    cfg = tiny_engine.config
    bank = tone_bank()
    runs = {E.MODEL: E.System(cfg.stream)}
    long_, short = (E.held_out_clip(bank, n, cfg.fps, cfg.height, seed=5) for n in (25, 13))
    whole = E.evaluate_clip(tiny_engine, long_, runs, cfg.height, Bar(), prefixes=(13,))
    alone = E.evaluate_clip(tiny_engine, short, runs, cfg.height, Bar())
    assert whole.prefixes[13].scores == alone.scores and whole.prefixes[13].truth_jitter == alone.truth_jitter
    assert whole.scores[E.MODEL] != alone.scores[E.MODEL]  # the whole clip is scored on more frames


def test_a_short_clip_drives_the_engine_as_the_start_of_a_long_one():
    """Every step of a short clip gets the same audio and motion as the same step of a
    longer clip of the same seed, lookahead past the short clip's end included."""
    from model.train import evaluate as E

    bank = tone_bank()
    logs = []
    for n in (30, 60):
        engine = FakeEngine()
        list(E.iter_stream(engine, E.held_out_clip(bank, n, 25, 64, seed=2), E.System(engine.config.stream)))
        logs.append(engine.log)
    short, long_ = logs
    assert len(long_) > len(short)
    for (f0, audio, motion), (g0, audio2, motion2) in zip(short, long_):
        assert f0 == g0
        np.testing.assert_array_equal(audio, audio2)
        np.testing.assert_array_equal(motion, motion2)


def test_systems_toggle_what_the_preset_ships():
    from model.config import StreamKnobs
    from model.train import evaluate as E

    on = E.systems(StreamKnobs(seam_blend=0.7))
    assert list(on)[:2] == [E.MODEL, E.ZEROED] and on[E.ZEROED].zero_audio
    assert on["knots off (knot_frames=0)"].knobs.knot_frames == 0
    assert on["running ahead off (ahead_frames=0)"].knobs.ahead_frames == 0
    assert on["seam blend off (seam_blend=0)"].knobs.seam_blend == 0
    assert "window 6 (window_frames=6)" not in on and on["window 12 (window_frames=12)"].knobs.window_frames == 12
    some = E.systems(StreamKnobs(), ("knots", "window12"))
    assert list(some) == [E.MODEL, "knots off (knot_frames=0)", "window 12 (window_frames=12)"]
    with pytest.raises(ValueError):
        E.systems(StreamKnobs(), ("knots", "window 12"))
    off = E.systems(StreamKnobs(knot_frames=0, ahead_frames=0, window_frames=12))
    assert off["knots on (knot_frames=1)"].knobs.knot_frames == 1
    assert off["running ahead on (ahead_frames=4)"].knobs.ahead_frames == 4
    assert off["seam blend on (seam_blend=0.7)"].knobs.seam_blend == 0.7
    assert "window 6 (window_frames=6)" in off and "window 12 (window_frames=12)" not in off


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

        self.config, self.log, self.seeds = from_name("tiny"), [], []

    def start(self, reference, knobs, seed):
        self.seeds.append((seed, knobs))
        return FakeStream(self.log, knobs.chunk_frames)


def test_stream_driving_alignment_and_long_run_scoring():
    """Each step gets the audio and given motion of exactly its span (audio with the context
    before its first frame, motion from its first frame, driving_frames long); the last chunk
    is cut at the clip's end; the long run's chunk-wise per-frame PSNR equals PSNR on the
    whole clip."""
    from model.train import evaluate as E

    clip = E.held_out_clip(tone_bank(), 30, 25, 128, seed=0)
    from model.config import MOTION_FIELDS
    from model.train.data import GIVEN_TO_MODEL

    F = len(MOTION_FIELDS)
    # The mouth is never given (it must come from the audio), nor are the head fields the
    # cartoon world does not have.
    assert "mouth_open" not in GIVEN_TO_MODEL and "head_x" not in GIVEN_TO_MODEL
    for name in MOTION_FIELDS:
        i = MOTION_FIELDS.index(name)
        given = name in GIVEN_TO_MODEL
        assert (clip.given[:, F + i] == float(given)).all(), name
        np.testing.assert_array_equal(clip.given[:30, i], clip.motion[:, i] if given else 0.0)
    assert clip.given.shape == (30 + 25, 2 * F)  # a second of driving past the end: the engine's lookahead
    assert clip.motion[:, MOTION_FIELDS.index("mouth_open")].max() > 0.3  # the truth does speak
    engine = FakeEngine()
    chunks = list(E.iter_stream(engine, clip, E.System(engine.config.stream)))
    assert [f0 for f0, _ in chunks] == [0, 5, 13, 21, 29]
    gen = np.concatenate([f for _, f in chunks])
    assert len(gen) == 30 and (gen[:, 0, 0, 0] == np.arange(30)).all()
    for span, audio, motion in engine.log:
        assert span.audio_from <= max(0, span.frame - 2) * 640 and len(audio) == span.samples
        np.testing.assert_array_equal(audio, clip.audio[span.audio_from:span.audio_to])
        np.testing.assert_array_equal(motion, clip.given[span.frame:span.frame + span.driving_frames])
    # Past the clip's end the driving goes on (the clip's second of tail), as in a longer clip.
    last_span, _, last_motion = engine.log[-1]
    assert len(last_motion) == last_span.driving_frames > 1 and (last_motion[:, F:] != 0).any()
    zeroed = FakeEngine()
    list(E.iter_stream(zeroed, clip, E.System(zeroed.config.stream, zero_audio=True)))
    assert all(not a.any() for _, a, _ in zeroed.log)
    assert {seed for seed, _ in engine.seeds} == {clip.seed}  # the clip's seed is the noise seed

    model_psnr, ref_psnr = E.long_run(FakeEngine(), clip, E.System(engine.config.stream), 128, Bar())
    truth = clip.truth(128)
    np.testing.assert_allclose(model_psnr, M.psnr_frames(gen, truth), rtol=1e-12)
    np.testing.assert_allclose(ref_psnr, M.psnr_frames(np.repeat(clip.reference[None], 30, 0), truth), rtol=1e-12)
