"""Does the motion measurement mean what the model's units mean? Checked on world renders.

World clips (model/train/world.py) have exactly known motion: idle head sway, blinks,
gaze saccades, smiles and brow raises (`speech.idle_motion`) plus a syllable-like mouth
track. They are rendered at the bundled avatars' 256 px, tracked with the face mesh,
calibrated on themselves and measured (`motion.calibrate` + `motion.measure`), exactly
as a person's clip is; the measurement is compared with the truth per field.

mediapipe's face mesh tracks the cartoon heads (every frame found), but it was trained on
human faces: what it reports on cartoons mixes our measurement error with the mesh's own
misreading of a drawn face (its iris model, for one, is a poor judge of cartoon eyes).
The numbers bound the measurement from above; the pose math alone is checked exactly on
projected landmark sets in tests/test_personal.py.

`python -m model.personal.check --clips 8 --seconds 10` prints the table.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from model.config import HEAD_FIELDS, MOTION_FIELDS

_F = {name: i for i, name in enumerate(MOTION_FIELDS)}
SIZE = 256
# Head sway 2.5x the training clips' idle motion (yaw about +-0.4 rad): a pose check needs
# more than the 2-degree pitch wobble of a calm speaker to tell signal from noise.
LIVELY = 2.5


def synthetic_motion(n_frames: int, fps: int, rng: np.random.Generator) -> np.ndarray:
    """(n_frames, len(MOTION_FIELDS)) world motion: idle motion plus a talking mouth
    (syllables at ~4 Hz in phrases of a few seconds, closed between them); the head sways
    LIVELY times as much as in training clips."""
    from model.train import speech

    m = speech.idle_motion(n_frames, fps, rng, lively=LIVELY)
    t = np.arange(n_frames) / fps
    phrases = np.sin(2 * np.pi * rng.uniform(0.15, 0.3) * t + rng.uniform(0, 2 * np.pi)) > -0.2
    syllables = np.clip(0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, 1)
    m[:, _F["mouth_open"]] = syllables * rng.uniform(0.5, 1.0) * phrases
    m[:, _F["mouth_wide"]] = np.clip(0.3 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.8, 1.6) * t), 0, 1) * phrases
    return m


def measure_world_clip(seed: int, n_frames: int, fps: int = 25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One world clip: (truth motion, measured motion, found) for a held-out identity."""
    from model.personal import landmarks as L
    from model.personal import motion as M
    from model.train import world
    from model.train.data import HELD_OUT_IDENTITY_SEED

    rng = np.random.default_rng(seed)
    ident = world.identity_from_seed(HELD_OUT_IDENTITY_SEED + seed)
    truth = synthetic_motion(n_frames, fps, rng)
    lms, found = L.track_frames(world.render_clip(ident, truth, SIZE))
    measured, _ = M.measure(lms, found, M.calibrate(lms, found))
    return truth, measured, found


def errors(truth: np.ndarray, measured: np.ndarray) -> dict[str, dict[str, float]]:
    """Per field: mean absolute error, bias (measured - truth), correlation, truth's std."""
    from model.train.metrics import correlation

    return {name: {"MAE": float(np.abs(measured[:, j] - truth[:, j]).mean()),
                   "bias": float((measured[:, j] - truth[:, j]).mean()),
                   "r": correlation(measured[:, j], truth[:, j]), "truth std": float(truth[:, j].std())}
            for j, name in enumerate(MOTION_FIELDS) if name not in HEAD_FIELDS}  # the world's head stays in place


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (1 <= args.clips <= 100 and 1 <= args.seconds <= 120):
        raise SystemExit("--clips must be in [1, 100] and --seconds in [1, 120]")
    per_clip, found_rate = [], []
    for c in range(args.clips):
        truth, measured, found = measure_world_clip(args.seed + c, int(args.seconds * 25))
        per_clip.append(errors(truth, measured))
        found_rate.append(found.mean())
    print(f"{args.clips} world clips x {args.seconds:g} s at {SIZE} px; face found in "
          f"{100 * np.mean(found_rate):.1f} % of frames. Mean over clips:\n")
    print("| field | unit | MAE | bias | r | truth std |\n|---|---|---|---|---|---|")
    for name in per_clip[0]:
        unit = "rad" if name in ("yaw", "pitch", "roll") else ""
        v = {k: np.mean([c[name][k] for c in per_clip]) for k in ("MAE", "bias", "r", "truth std")}
        print(f"| {name} | {unit} | {v['MAE']:.3f} | {v['bias']:+.3f} | {v['r']:.2f} | {v['truth std']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
