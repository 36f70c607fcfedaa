"""Evaluation statistics: t-intervals and paired differences against scipy's t-tests and a
hand-computed case, and the report's bars deciding on intervals rather than on means."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from model.train import stats as S

# ------------------------------------------------------------------------------------------
# Intervals
# ------------------------------------------------------------------------------------------


def test_t_interval_hand_computed():
    # 1..5: mean 3, s = sqrt(2.5), sem = sqrt(0.5); t_{0.975, 4} = 2.7764451051977987.
    iv = S.t_interval([1, 2, 3, 4, 5])
    half = 2.7764451051977987 * math.sqrt(0.5)
    assert (iv.mean, iv.n) == (3.0, 5)
    assert iv.low == pytest.approx(3 - half, abs=1e-12) and iv.high == pytest.approx(3 + half, abs=1e-12)
    assert iv.half_width == pytest.approx(half, abs=1e-12) and iv.format(2) == "3.00 ± 1.96"


@pytest.mark.parametrize("n", [2, 3, 8, 30])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_matches_scipy_one_sample_t_test(n, confidence):
    x = np.random.default_rng(n).normal(0.7, 2.0, n)
    ref = sps.ttest_1samp(x, 0.0).confidence_interval(confidence)
    iv = S.t_interval(x, confidence)
    assert iv.low == pytest.approx(ref.low, rel=1e-10) and iv.high == pytest.approx(ref.high, rel=1e-10)


def test_paired_difference_matches_scipy_paired_t_test():
    rng = np.random.default_rng(1)
    clip_difficulty = rng.normal(25, 3, 8)             # varies a lot between clips
    a = clip_difficulty + 0.3 + rng.normal(0, 0.1, 8)  # a small, consistent gain
    b = clip_difficulty
    ref = sps.ttest_rel(a, b).confidence_interval(0.95)
    d = S.paired_difference(a, b)
    assert d.low == pytest.approx(ref.low, rel=1e-10) and d.high == pytest.approx(ref.high, rel=1e-10)
    # Pairing resolves what the unpaired intervals cannot: they overlap, the difference excludes 0.
    ia, ib = S.t_interval(a), S.t_interval(b)
    assert ia.low < ib.high and d.low > 0


def test_interval_conventions_and_errors():
    one = S.t_interval([2.5])
    assert one.mean == 2.5 and not one.defined and math.isnan(one.low) and one.format() == "2.500"
    same = S.t_interval([1.0, 1.0, 1.0])
    assert (same.low, same.high) == (1.0, 1.0)           # no spread: a zero-width interval
    zero = S.paired_difference([3.0, 4.0, 5.0], [3.0, 4.0, 5.0])
    assert (zero.mean, zero.low, zero.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same clips"):
        S.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        S.t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        S.t_interval([])


# ------------------------------------------------------------------------------------------
# Bars decide on intervals
# ------------------------------------------------------------------------------------------


GOOD = {"PSNR": 30.0, "SSIM": 0.95, "mouth PSNR": 25.0, "mouth SSIM": 0.8, "lip-sync r": 0.97,
        "jitter": 1.0, "jitter / truth": 1.0}
BAD = {"PSNR": 20.0, "SSIM": 0.7, "mouth PSNR": 15.0, "mouth SSIM": 0.5, "lip-sync r": 0.1,
       "jitter": 1.0, "jitter / truth": 1.0}


def results(per_clip):
    """ClipResults from a list of {system: metrics} (one dict per clip)."""
    from model.train.evaluate import ClipResult

    return [ClipResult(None, scores, 1.0, 0.0) for scores in per_clip]


def rows(model, reference=BAD, zeroed=BAD, **ablations):
    """Scores of every system of any preset: ablations not named score as the model."""
    from model.config import StreamKnobs
    from model.train import evaluate as E

    every = {n for base in (StreamKnobs(), StreamKnobs(knot_frames=0, ahead_frames=0, window_frames=12))
             for n in E.systems(base)}
    return {**{n: model for n in every}, E.REFERENCE: reference, E.ZEROED: zeroed, **ablations}


def system_names(base):
    from model.train import evaluate as E

    return list(E.systems(base)) + [E.REFERENCE]


def verdicts(lines):
    return [line.split(":", 1)[0][2:] for line in lines]


def test_bars_pass_on_consistent_gains_over_clips():
    from model.config import StreamKnobs
    from model.train import eval_report as R
    from model.train import evaluate as E
    from model.train.metrics import Drift

    base = StreamKnobs(seam_blend=0.7)
    off = {n: GOOD for n in E.systems(base) if n not in (E.MODEL, E.ZEROED)}
    noise = np.random.default_rng(0).normal(0, 0.01, 4)
    per_clip = [rows({k: v + e for k, v in GOOD.items()}, **off) for e in noise]
    drift = {"seconds": 300.0, "window": 60.0, "seed": 9, E.MODEL: Drift(30.0, 29.8, -0.2)}
    lines = R.bars(results(per_clip), system_names(base), base, drift)
    # 8 "beats a baseline", lip sync, jitter with and without the blend, drift, knots x2,
    # running ahead x2, window 6 vs 2 x2, window 12 vs 6 x2.
    assert len(lines) == 8 + 1 + 2 + 1 + 8, lines
    assert set(verdicts(lines)) == {"PASS"}, lines


def test_a_better_mean_with_an_interval_across_zero_fails():
    """The model wins on average (one clip by far) but loses on the others: the paired
    interval straddles 0, so 'beats the baseline' fails. One clip would have said PASS."""
    from model.config import StreamKnobs
    from model.train import eval_report as R
    from model.train import evaluate as E

    base = StreamKnobs()
    per_clip = []
    for gain in (+6.0, -0.5, -0.4, -0.6):
        model = dict(GOOD, PSNR=25.0 + gain)
        per_clip.append(rows(model, reference=dict(GOOD, PSNR=25.0)))
    r = results(per_clip)
    assert np.mean([c.scores[E.MODEL]["PSNR"] - c.scores[E.REFERENCE]["PSNR"] for c in r]) > 0
    line = next(x for x in R.bars(r, system_names(base), base, None) if f"{E.REFERENCE} on PSNR" in x)
    assert line.startswith("- FAIL") and "interval [-" in line
    single = R.bars(r[:1], system_names(base), base, None)
    assert set(verdicts(single)) == {"N/A"}, single  # one clip: no interval, no verdict


def test_mechanism_bars_use_the_upper_bound_and_say_what_is_resolved():
    from model.config import StreamKnobs
    from model.train import eval_report as R
    from model.train import evaluate as E

    base = StreamKnobs()
    knots_off = "knots off (knot_frames=0)"
    worse = [rows(dict(GOOD, PSNR=p), **{knots_off: dict(GOOD, PSNR=p + 1.0 + e)})
             for p, e in ((30, 0.1), (28, -0.1), (26, 0.05))]
    lines = [x for x in R.bars(results(worse), system_names(base), base, None) if x.startswith("- ") and "knots" in x]
    assert lines[0].startswith("- FAIL") and "shown worse" in lines[0]      # PSNR: knots cost a consistent 1 dB
    assert lines[1].startswith("- PASS") and "no resolved difference" in lines[1]  # lip sync: identical
    better = [rows(dict(GOOD, PSNR=p), **{knots_off: dict(GOOD, PSNR=p - 1.0 + e)})
              for p, e in ((30, 0.1), (28, -0.1), (26, 0.05))]
    line = next(x for x in R.bars(results(better), system_names(base), base, None) if "knots" in x)
    assert line.startswith("- PASS") and "shown better" in line
    no_knots = StreamKnobs(knot_frames=0)  # shipped off: no "knots on - off" bar
    assert not any("knots on (shipped)" in x for x in R.bars(results(worse), system_names(no_knots), no_knots, None))


def test_difference_table_stars_only_resolved_cells():
    from model.train import eval_report as R
    from model.train import evaluate as E

    same = [rows(GOOD, **{"twin": GOOD}) for _ in range(3)]
    table = R.difference_table(results(same), ["twin", E.REFERENCE])
    twin = next(line for line in table if line.startswith("| twin"))
    assert "*" not in twin and twin.count("+0.000 ± 0.000") == 5      # a system against itself: exactly 0
    ref = next(line for line in table if line.startswith(f"| {E.REFERENCE}"))
    assert "-10.00 ± 0.00*" in ref  # PSNR 20 vs 30 on every clip


def test_bars_of_a_subset_of_systems_judge_only_the_rows_that_ran():
    """`--systems knots,window12`: no audio-zeroed or running-ahead row, so no bar about
    them; the reference is always there."""
    from model.config import StreamKnobs
    from model.train import eval_report as R
    from model.train import evaluate as E

    base = StreamKnobs()
    names = list(E.systems(base, ("knots", "window12"))) + [E.REFERENCE]
    per_clip = [{n: dict(GOOD, PSNR=25.0 + e) for n in names} for e in (0.1, -0.2, 0.3)]
    lines = R.bars(results(per_clip), names, base, None)
    # beats the reference x4, lip sync, jitter (no seam-blend row), knots x2, window 12 vs 6 x2
    assert len(lines) == 4 + 1 + 1 + 2 + 2, lines
    assert not any(E.ZEROED in x or "running ahead" in x for x in lines)


def test_compare_pairs_two_runs_by_clip_seed(tmp_path):
    """`eval --compare`: new - old per system both scored, over the clips both ran (by seed)."""
    import json

    from model.train.eval_compare import compare, load
    from server.cli import main

    def run(psnr_by_seed, extra_system=False):
        clips = []
        for seed, p in psnr_by_seed.items():
            scores = {"model": dict(GOOD, PSNR=p)}
            if extra_system:
                scores["window 2 (window_frames=2)"] = dict(GOOD)
            clips.append({"seed": seed, "frames": 500, "scores": scores})
        return {"command": "knotstream eval", "clips": clips}

    old = run({0: 20.0, 1: 22.0, 2: 24.0, 7: 30.0})
    new = run({0: 21.0, 1: 23.1, 2: 24.9}, extra_system=True)
    table = compare(old, new)
    assert "Paired over 3 clips (seeds 0, 1, 2)" in table
    row = next(x for x in table.splitlines() if x.startswith("| model |"))
    assert row.split(" | ")[1].startswith("+1.00 ± ") and row.split(" | ")[1].endswith("*")
    assert "window 2" not in table  # only the new run scored it
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps(new))
    assert load(tmp_path / "a.json") == old
    assert main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    with pytest.raises(ValueError):
        compare(old, run({5: 1.0}))
