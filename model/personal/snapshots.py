"""Which of the DiT stage's snapshots a fit keeps: the last step, or an earlier one whose
stream of the fitting frames is nearer the real frames.

A few hundred steps on one person's clip do not converge: the DiT's weights wander, and
which step streams best depends on the fit's seed. On three real clips, fitted with seeds
0 and 1 (docs/benchmarks.md), the held-out frames of the last step's avatar differed by up
to 1.5 dB between the two seeds. Streaming stretches of the fitting frames with each kept
step and keeping the best one never chose a step worse than the last on the held-out
frames, and cut that spread to 0.24 dB.

Each candidate is calibrated first (model/personal/blend_calibration.py): the blend's
offsets belong to the DiT they were measured with, and a candidate is judged as its avatar
would stream. The measure is the PSNR of `STRETCHES` stretches of `STRETCH_FRAMES` fitting
frames, spread over the clip, each streamed from its start as a session would be (the
stream's own frames feed its window; a DiT that lets a face drift shows it there), driven
by the stretch's measured motion. The held-out frames of `knotstream eval --personal` are
never read.

What each candidate scored is kept in the checkpoint folder (`SCORES_FILE`), with its
calibration: a stopped fit does not score a candidate twice, and a finished one re-run
writes the same avatar.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FRACTIONS = (0.5, 0.75)   # of the DiT steps: the snapshots kept besides the last step
STRETCHES = 4
STRETCH_FRAMES = 250      # 10 s at 25 fps: long enough for a stream to drift
SCORES_FILE = "snapshots.json"
MEASURE = f"{STRETCHES}x{STRETCH_FRAMES} fitting frames, calibrated"  # scores of another measure are not reused


def snapshot_steps(dit_steps: int, fractions: tuple[float, ...] = FRACTIONS) -> tuple[int, ...]:
    """The DiT steps kept for the choice, besides the last one."""
    return tuple(sorted({round(f * dit_steps) for f in fractions} - {0, dit_steps}))


def stretch_rows(fit_frames: int, count: int = STRETCHES, length: int = STRETCH_FRAMES) -> list[slice]:
    """`count` stretches of `length` frames (all of them when fewer) spread evenly from the
    first fitting frame to the last; a short clip gives fewer, as they would coincide."""
    length = min(length, fit_frames)
    starts = sorted({int(s) for s in np.linspace(0, fit_frames - length, count).round()})
    return [slice(s, s + length) for s in starts]


def stream_psnr(model, prepared, rows: list[slice], seed: int = 0) -> float:
    """Mean PSNR (dB) of the model's stream of each stretch of `rows` against its real
    frames, driven by the stretch's measured motion; the mean over stretches."""
    from model.personal.drive import cpu_engine, generate
    from model.personal.fit_data import driving_motion
    from model.train.metrics import psnr_frames

    engine = cpu_engine(model)
    scores = []
    for r in rows:
        frames, _ = generate(engine, prepared.portrait, driving_motion(prepared.motion[r]), None, r.stop - r.start,
                             seed=seed)
        scores.append(float(psnr_frames(frames, prepared.frames[r]).mean()))
    return float(np.mean(scores))


@dataclass
class Candidate:
    step: int
    psnr: float                     # stream_psnr of its stretches
    calibration: dict | None        # blend_calibration.Calibration's fields, None for a fit without one


@dataclass
class Choice:
    step: int                       # the DiT step the avatar is written from
    candidates: list[Candidate]     # every step scored, in step order

    def info(self) -> dict:
        """What the avatar file records."""
        return {"chosen": self.step, "measure": MEASURE,
                "psnr": {str(c.step): round(c.psnr, 3) for c in self.candidates}}


def kept_steps(out: Path, stage: str = "dit") -> dict[int, Path]:
    """step -> file of the DiT weights the trainer kept in `out` (trainer.kept_checkpoint)."""
    found = {}
    for path in out.glob(f"{stage}_*.pt"):
        m = re.fullmatch(rf"{stage}_(\d+)\.pt", path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def _load_scores(out: Path) -> dict[int, Candidate]:
    path = out / SCORES_FILE
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged record is measured again, not trusted
    if saved.get("measure") != MEASURE:
        return {}
    return {int(c["step"]): Candidate(**c) for c in saved.get("candidates", [])}


def _save_scores(out: Path, scored: dict[int, Candidate]) -> None:
    path = out / SCORES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"measure": MEASURE, "candidates": [asdict(scored[k]) for k in sorted(scored)]},
                              indent=1))
    tmp.replace(path)


def choose(model, prepared, out: Path, last_step: int, calibrate: Callable | None, deadline: float | None = None,
           on_progress: Callable | None = None, log: Callable[[str], None] = print):
    """Score the model as trained (`last_step`) and every earlier kept DiT step in `out`,
    load the best into `model` and set its calibration. calibrate(model) -> Calibration
    (None: the model has no calibration). The last step is always scored; earlier ones,
    newest first, while `deadline` (a time.time()) allows another. -> (Choice, Calibration
    or None)."""
    from model.personal.blend_calibration import Calibration
    from model.train.trainer import load_checkpoint
    from model.weights import widen_motion_state

    rows = stretch_rows(prepared.fit_frames)
    earlier = {k: p for k, p in kept_steps(out).items() if k < last_step}
    order = [last_step] + sorted(earlier, reverse=True)
    scored = {k: c for k, c in _load_scores(out).items() if k in order}
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    took = 0.0
    for i, step in enumerate(order):
        if on_progress is not None:
            on_progress("calibrate", i, len(order), None)
        if step in scored:
            continue
        if step != last_step and deadline is not None and time.time() + took > deadline:
            log(f"DiT snapshot choice: no time left for step {step} and earlier ones")
            break
        t0 = time.time()
        if step != last_step:
            model.load_state_dict(widen_motion_state(load_checkpoint(earlier[step])["model"]))
        calibration = calibrate(model) if calibrate is not None else None
        psnr = stream_psnr(model.eval(), prepared, rows)
        scored[step] = Candidate(step, psnr, None if calibration is None else asdict(calibration))
        _save_scores(out, scored)
        took = max(took, time.time() - t0)
        log(f"DiT step {step}: {psnr:.2f} dB on {len(rows)} streamed stretches of the fitting frames "
            f"({time.time() - t0:.0f} s)")
    best = max(scored.values(), key=lambda c: c.psnr)
    if best.step == last_step:
        model.load_state_dict(trained)
    else:
        model.load_state_dict(widen_motion_state(load_checkpoint(earlier[best.step])["model"]))
    calibration = None
    if best.calibration is not None:
        calibration = Calibration(**best.calibration)
        model.config.warp_blend = (calibration.face, calibration.mouth)
    return Choice(best.step, [scored[k] for k in sorted(scored)]), calibration
