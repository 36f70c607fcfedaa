"""The names the evaluation and its report share: the metrics, the systems' names, a
held-out clip and its results. Kept apart so the report (model/train/eval_report.py) reads results
without importing the evaluator that produces them."""

from __future__ import annotations

import dataclasses
import numpy as np

METRICS = ("PSNR", "SSIM", "mouth PSNR", "mouth SSIM", "lip-sync r", "jitter", "jitter / truth")
MODEL = "model"
REFERENCE = "repeat the reference frame"
ZEROED = "model, driving audio zeroed"
MOUTH_GIVEN = "model, mouth fields given, audio zeroed"


def window_name(frames: int) -> str:
    return f"window {frames} (window_frames={frames})"


@dataclasses.dataclass
class EvalClip:
    """A held-out clip: ground truth plus everything the engine is given."""

    seed: int                 # fixes identity, sentences, motion and the engine's noise
    identity_seed: int        # world.identity_from_seed argument
    sentences: list[int]      # speech bank indices, in the order spoken
    identity: object          # world.Identity
    motion: np.ndarray        # (T, len(MOTION_FIELDS)) ground-truth motion
    audio: np.ndarray         # (T * sr / fps + sr,) float32; sample 0 = frame 0, a second of tail for lookahead
    reference: np.ndarray     # (H, W, 3) uint8 portrait (mouth closed, eyes open)
    given: np.ndarray         # (T + fps, 2 * len(MOTION_FIELDS)) driving vectors, mouth not given; a second of tail
    given_mouth: np.ndarray   # the same with the true mouth fields given too

    def truth(self, size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Ground-truth frames [start, stop) -> (n, size, size, 3) uint8."""
        from model.train import world

        return world.render_clip(self.identity, self.motion[start:stop], size)

    def mouth_boxes(self, size: int) -> list[tuple[int, int, int, int]]:
        from model.train import world

        return [world.mouth_box(self.identity, m, size) for m in self.motion]


@dataclasses.dataclass
class ClipResult:
    """Every system's metrics on one clip, and what else the report shows of it."""

    clip: EvalClip
    scores: dict[str, dict[str, float]]  # system name -> metric -> value
    truth_jitter: float                  # the ground truth's jitter with the model's chunk borders
    engine_seconds: float                # time spent streaming (all engine-driven systems)
    strip: np.ndarray | None = None      # strip_image of the model's video, when asked for
    # The same streams scored over their first n frames only: n -> result (--prefix-seconds).
    prefixes: dict[int, "ClipResult"] = dataclasses.field(default_factory=dict)
