"""The report of `knotstream eval`: every system's mean with its confidence interval over
clips, every other system's paired difference to the model, the clips' seeds, identity
drift, and the bars of issue 21, each decided on an interval (never on one clip).

Intervals are Student's t over clips (`model/train/stats.py`); a bar needs at least two
clips, with one it reads N/A. Each bar is its own 95 % statement: over the ~20 bars of a
report about one in twenty can flip by chance when the true value sits near its bound.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from model.train.eval_results import METRICS, MODEL, REFERENCE, ZEROED, ClipResult, window_name
from model.train.stats import CONFIDENCE, Interval, paired_difference, t_interval

# Bars (issue 21, "Done when").
BEAT_METRICS = ("PSNR", "SSIM", "mouth PSNR", "lip-sync r")   # the model beats both baselines on these
LIP_SYNC_BAR = 0.9            # lower bound of the model's lip-sync r
JITTER_TOLERANCE = 1.1        # upper bound of jitter / the ground truth's jitter
DRIFT_DB = 0.5                # |PSNR change| from the first to the last drift window
MECHANISM_METRICS = ("PSNR", "lip-sync r")  # a mechanism shipped on must not lose on these
# Mechanisms whose "off" row is the ablation of evaluate.MECHANISMS (seam blend has its own bar).
SHIPPED_MECHANISMS = (("knots", "knot_frames"), ("running ahead", "ahead_frames"))
SHORT_WINDOW, LONG_WINDOW, MID_WINDOW = 2, 12, 6


def values(results: Sequence[ClipResult], system: str, metric: str) -> list[float]:
    """One value per clip, in clip order (the pairing of every difference)."""
    return [r.scores[system][metric] for r in results]


def interval(results, system: str, metric: str) -> Interval:
    return t_interval(values(results, system, metric))


def difference(results, a: str, b: str, metric: str) -> Interval:
    """Paired difference a - b over the same clips."""
    return paired_difference(values(results, a, metric), values(results, b, metric))


def _digits(metric: str) -> int:
    return 2 if "PSNR" in metric else 3


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------


def _header(first: str) -> list[str]:
    return [f"| {first} | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]


def _summary_row(label: str, results, name: str) -> str:
    return f"| {label} | " + " | ".join(interval(results, name, m).format(_digits(m)) for m in METRICS) + " |"


def summary_table(results, names: list[str]) -> list[str]:
    """One row per system: mean ± half-width of the t-interval, per metric."""
    return _header("system") + [_summary_row(name, results, name) for name in names]


def difference_cell(d: Interval, metric: str) -> str:
    """A paired difference as a table cell: signed mean ± half-width, starred when its
    interval excludes 0."""
    star = "*" if d.defined and (d.low > 0 or d.high < 0) else ""
    return ("+" if d.mean >= 0 else "") + d.format(_digits(metric)) + star


def difference_table(results, names: list[str]) -> list[str]:
    """One row per system: its paired difference to the model (system - model). A cell
    whose interval excludes 0 is starred."""
    return _header("system - model") + [
        f"| {name} | " + " | ".join(difference_cell(difference(results, name, MODEL, m), m) for m in METRICS) + " |"
        for name in names]


def clip_table(results) -> list[str]:
    """Per clip: its seeds and the model's main metrics (what one clip alone would say)."""
    lines = ["| clip | seed (noise too) | identity seed | sentences (bank index) | PSNR | SSIM | mouth PSNR | "
             "lip-sync r | jitter / truth | truth jitter |", "|---" * 10 + "|"]
    for i, r in enumerate(results):
        s = r.scores[MODEL]
        lines.append(f"| {i} | {r.clip.seed} | {r.clip.identity_seed} | {' '.join(map(str, r.clip.sentences))} | "
                     f"{s['PSNR']:.2f} | {s['SSIM']:.3f} | {s['mouth PSNR']:.2f} | {s['lip-sync r']:.3f} | "
                     f"{s['jitter / truth']:.3f} | {r.truth_jitter:.3f} |")
    return lines


def length_section(results, names: list[str], base, fps: int) -> list[str]:
    """The clip-length study: the model per length, then every paired difference and the
    bars (drift aside) per shorter length (the same streams scored over their first n
    frames, `--prefix-seconds`; the whole length is the report's main tables)."""
    views = {n: [r.prefixes[n] for r in results] for n in sorted(results[0].prefixes)}
    whole = {len(results[0].clip.motion): list(results)}
    lines = ["## Clip length: the same streams scored over their first seconds", "", *_header("model, first"),
             *(_summary_row(f"{n / fps:g} s", view, MODEL) for n, view in {**views, **whole}.items())]
    for n, view in views.items():
        lines += ["", f"### First {n / fps:g} s", "", *difference_table(view, [x for x in names if x != MODEL]),
                  "", *bars(view, names, base, None)]
    return lines


# ------------------------------------------------------------------------------------------
# Bars
# ------------------------------------------------------------------------------------------


def _verdict(ok: bool, defined: bool = True) -> str:
    return "N/A" if not defined else "PASS" if ok else "FAIL"


def _shown(d: Interval, digits: int) -> str:
    if not d.defined:
        return f"{d.mean:+.{digits}f} (1 clip: no interval)"
    return f"{d.mean:+.{digits}f}, interval [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def not_negative(results, a: str, b: str, what: str) -> list[str]:
    """Bars "a - b is not negative" on MECHANISM_METRICS: PASS when the interval's upper
    bound is >= 0 (a is not shown to be worse); the line also says whether a is shown to
    be better (lower bound > 0)."""
    lines = []
    for m in MECHANISM_METRICS:
        d = difference(results, a, b, m)
        resolved = "" if not d.defined else "; shown better (lower bound > 0)" if d.low > 0 else \
            "; shown worse" if d.high < 0 else "; no resolved difference"
        lines.append(f"- {_verdict(d.high >= 0, d.defined)}: {what}, {m} not negative (upper bound >= 0): "
                     f"{_shown(d, _digits(m))}{resolved}")
    return lines


def bars(results: Sequence[ClipResult], names: Sequence[str], base, drift: dict | None) -> list[str]:
    """Every bar of issue 21 with PASS / FAIL / N/A and the interval it was decided on.
    names: the systems present; base: the model's StreamKnobs."""
    lines = []
    for m in BEAT_METRICS:
        for baseline in (b for b in (REFERENCE, ZEROED) if b in names):
            d = difference(results, MODEL, baseline, m)
            lines.append(f"- {_verdict(d.low > 0, d.defined)}: model beats {baseline} on {m} (lower bound of "
                         f"model - baseline > 0): {_shown(d, _digits(m))}")
    r = interval(results, MODEL, "lip-sync r")
    lines.append(f"- {_verdict(r.low >= LIP_SYNC_BAR, r.defined)}: lip-sync r >= {LIP_SYNC_BAR:g} (lower bound): "
                 f"{r.mean:.3f}, interval [{r.low:.3f}, {r.high:.3f}]")
    blend = next((n for n in names if n.startswith("seam blend")), None)
    for name in [MODEL] + ([blend] if blend else []):
        j = interval(results, name, "jitter / truth")
        lines.append(f"- {_verdict(j.high <= JITTER_TOLERANCE, j.defined)}: {name}: no visible seams, jitter <= "
                     f"{JITTER_TOLERANCE:g} x the ground truth's (upper bound of jitter / truth): {j.mean:.3f}, "
                     f"interval [{j.low:.3f}, {j.high:.3f}]")
    if drift is not None:
        d = drift[MODEL]
        lines.append(f"- {_verdict(abs(d.change) <= DRIFT_DB)}: PSNR at the end of the {drift['seconds']:g} s run "
                     f"within {DRIFT_DB:g} dB of the start (one run, seed {drift['seed']}): {d.change:+.3f} dB")
    for label, knob in SHIPPED_MECHANISMS:
        if getattr(base, knob) and f"{label} off ({knob}=0)" in names:
            lines += not_negative(results, MODEL, f"{label} off ({knob}=0)", f"{label} on (shipped) - off")
    if base.window_frames > SHORT_WINDOW and window_name(SHORT_WINDOW) in names:
        lines += not_negative(results, MODEL, window_name(SHORT_WINDOW),
                              f"window {base.window_frames} (shipped) - window {SHORT_WINDOW}")
    row = lambda w: MODEL if w == base.window_frames else window_name(w)  # noqa: E731
    if row(LONG_WINDOW) in names and row(MID_WINDOW) in names:
        lines += not_negative(results, row(LONG_WINDOW), row(MID_WINDOW),
                              f"window {LONG_WINDOW} - window {MID_WINDOW}")
    return lines


# ------------------------------------------------------------------------------------------
# The whole report
# ------------------------------------------------------------------------------------------


def render(command: str, title: str, setup: str, results: Sequence[ClipResult], names: list[str], base,
           drift: dict | None, fps: int) -> str:
    """report.md. names: the engine-driven systems (the model first); setup: a paragraph on
    the clips, knobs and wall time."""
    ablations = [n for n in names if n not in (MODEL, ZEROED)]
    baselines = [REFERENCE] + [ZEROED] * (ZEROED in names)
    truth = t_interval([r.truth_jitter for r in results])
    pct = f"{CONFIDENCE:.0%}"
    lines = [f"# knotstream eval: {title}", "", f"Command: `{command}`", "", setup, "",
             f"Every cell: mean over {len(results)} clips ± half-width of its {pct} Student t-interval over "
             "clips (the clip is the unit: its frames are correlated). Differences are paired: each system "
             "minus the model on the same clip with the same noise seed, then the t-interval of those "
             "differences (systems with the model's chunk geometry draw identical noise; toggling the knot "
             "changes how many latent frames each chunk draws, so that row gets other noise from the same "
             f"seed). The ground truth's own jitter with the same chunk borders: {truth.format()}.", "",
             "## Model and baselines", "", *summary_table(results, [MODEL, *baselines]), "",
             "## Ablations", "", *summary_table(results, ablations), "",
             "## Paired differences against the model (* = interval excludes 0)", "",
             *difference_table(results, baselines + ablations), "",
             "PSNR (dB) / SSIM against the ground-truth render, whole frame and inside the mouth box: higher is "
             "better. lip-sync r: correlation of the mouth opening measured in generated vs ground-truth frames "
             "(0 for a mouth that never moves). jitter: frame-difference energy across chunk borders / inside "
             "chunks, with the model's chunk borders (1 = seamless; the reference baseline never moves, so 1); "
             "jitter / truth divides it by the ground truth's with the same borders, per clip. The mouth is "
             "measured inside the ground truth's mouth box, which follows the head: on short clips a still "
             "reference can correlate by chance as its box slides over lips and skin.", "",
             "## Clips", "", *clip_table(results)]
    if results[0].prefixes:
        lines += ["", *length_section(results, [MODEL, *baselines] + ablations, base, fps)]
    if drift is not None:
        lines += ["", f"## Identity drift over one {drift['seconds']:g} s run (seed {drift['seed']})", "",
                  f"| system | PSNR first {drift['window']:g} s | PSNR last {drift['window']:g} s | change (dB) |",
                  "|---|---|---|---|"]
        for name in (MODEL, REFERENCE):
            d = drift[name]
            lines.append(f"| {name} | {d.first:.3f} | {d.last:.3f} | {d.change:+.3f} |")
    lines += ["", "## Bars (issue 21)", "", *bars(results, names + [REFERENCE], base, drift)]
    lines += ["", "![generated vs ground truth](strip.png)", "",
              "Strip rows: generated (model), ground truth, generated mouth, ground-truth mouth; first clip."]
    return "\n".join(lines) + "\n"


def knobs_text(knobs) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(knobs).items())
