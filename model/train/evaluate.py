"""`knotstream eval`: held-out avatars streamed through the real engine, scored against
the renderer's ground truth.

Each clip: a held-out identity (seeds >= data.HELD_OUT_IDENTITY_SEED) speaks held-out
sentences of the speech bank (index % 10 == 0) separated by pauses, under natural idle
motion; its ground truth is `world.render_clip` of that identity and motion, the mouth
following the speech (`speech.speaking_motion`, as in training).

What the model is given, exactly as a live session (`stream.step` chunk by chunk, with
the reference/window caches, knots and running ahead): the speech audio, and the motion
fields `data.GIVEN_TO_MODEL` (pose, blink, gaze, smile, brow) with their "given" flags.
The mouth fields are NOT given: the mouth must come from the audio, which is what the
lip-sync metric measures.

Systems, all in the same run on the same clips:
- model                        the preset's stream knobs
- repeat the reference frame   baseline: the reference portrait for every frame
- model, driving audio zeroed  baseline: same motion, silent audio
- ablations                    knots off, running ahead off, window 2 / 6 / 12 latent frames
  (the window equal to the preset's is the "model" row)
One long run of the model (--long-seconds) measures identity drift: PSNR to ground truth
over the first vs the last --drift-seconds.

Writes `report.md` (markdown tables, the exact command) and `strip.png` (generated vs
ground-truth frames and mouth crops) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

METRICS = ("PSNR", "SSIM", "mouth PSNR", "mouth SSIM", "lip-sync r", "jitter")
REFERENCE = "repeat the reference frame"
ZEROED = "model, driving audio zeroed"
ABLATION_WINDOWS = (2, 6, 12)
# --quick: one clip long enough for several chunk borders, a long run just long enough
# for two drift windows. Every system and metric row is still produced.
QUICK = dict(clips=1, seconds=1.0, long_seconds=1.2, drift_seconds=0.4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name or .safetensors path")
    p.add_argument("--data", default="runs/data", help="speech bank folder (generated with espeak-ng/flite when missing)")
    p.add_argument("--clips", type=int, default=2, help="held-out clips per system")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each clip")
    p.add_argument("--long-seconds", type=float, default=300.0, help="length of the drift run (0 = skip)")
    p.add_argument("--drift-seconds", type=float, default=60.0,
                   help="window averaged at the start and the end of the long run (at most half of it)")
    p.add_argument("--out", default="runs/eval", help="folder for report.md and strip.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"CI mode: {QUICK['clips']} clip of {QUICK['seconds']:g} s, a {QUICK['long_seconds']:g} s long run")


# ------------------------------------------------------------------------------------------
# Clips and systems
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalClip:
    """A held-out clip: ground truth plus everything the engine is given."""

    identity: object          # world.Identity
    motion: np.ndarray        # (T, len(MOTION_FIELDS)) ground-truth motion
    audio: np.ndarray         # (T * sr / fps + sr,) float32; sample 0 = frame 0, a second of tail for lookahead
    reference: np.ndarray     # (H, W, 3) uint8 portrait (mouth closed, eyes open)
    given: np.ndarray         # (T, 2 * len(MOTION_FIELDS)) driving vectors, mouth not given

    def truth(self, size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Ground-truth frames [start, stop) -> (n, size, size, 3) uint8."""
        from model.train import world

        return world.render_clip(self.identity, self.motion[start:stop], size)

    def mouth_boxes(self, size: int) -> list[tuple[int, int, int, int]]:
        from model.train import world

        return [world.mouth_box(self.identity, m, size) for m in self.motion]


def held_out_clip(bank, n_frames: int, fps: int, size: int, rng: np.random.Generator,
                  sample_rate: int = 16000) -> EvalClip:
    """A held-out identity speaking held-out sentences (0.4-1.5 s pauses) for `n_frames`."""
    from model.config import MOTION_FIELDS
    from model.train import speech as sp
    from model.train import world
    from model.train.data import HELD_OUT_IDENTITY_SEED, model_motion

    sentences = bank.split(held_out=True)
    if not sentences:
        raise ValueError(f"the speech bank has no held-out sentence (index % 10 == 0) among {len(bank.texts)}")
    n_samples = int(round(n_frames * sample_rate / fps))
    audio = np.zeros(n_samples + sample_rate, np.float32)
    pos = int(rng.uniform(0.2, 1.0) * sample_rate)
    while pos < len(audio):
        s = bank.sentence(int(rng.choice(sentences))) * np.float32(rng.uniform(0.6, 1.0))  # loudness as in training
        audio[pos:pos + len(s)] = s[: len(audio) - pos]
        pos += len(s) + int(rng.uniform(0.4, 1.5) * sample_rate)
    # Same held-out identity range as data.draw_clip(held_out=True).
    ident = world.identity_from_seed(HELD_OUT_IDENTITY_SEED + int(rng.integers(100)))
    motion = sp.speaking_motion(audio, fps, rng, sample_rate, n_frames=n_frames)
    ref = sp.idle_motion(1, fps, rng)[0]  # reference portrait as in training: idle pose, mouth shut, eyes open
    for name in ("mouth_open", "mouth_wide", "blink"):
        ref[MOTION_FIELDS.index(name)] = 0.0
    return EvalClip(ident, motion, audio, world.render_frame(ident, ref, size), model_motion(motion))


def systems(base) -> dict[str, tuple[object, bool]]:
    """name -> (StreamKnobs, audio zeroed) for every engine-driven system."""
    out = {"model": (base, False), ZEROED: (base, True),
           "knots off (knot_frames=0)": (base.replace(knot_frames=0), False),
           "running ahead off (ahead_frames=0)": (base.replace(ahead_frames=0), False)}
    if base.seam_blend:  # the decoder's own seams, without the post-filter (model/seams.py)
        out["seam blend off (seam_blend=0)"] = (base.replace(seam_blend=0.0), False)
    for w in ABLATION_WINDOWS:
        if w != base.window_frames:
            out[f"window {w} (window_frames={w})"] = (base.replace(window_frames=w), False)
    return out


def iter_stream(engine, clip: EvalClip, knobs, seed: int, zero_audio: bool = False, n_frames: int | None = None):
    """Stream the clip through the engine; yields (first frame index, (n, H, W, 3) uint8)
    per chunk, the last one cut at `n_frames` (default: the whole clip)."""
    from model.timeline import StepInput

    n = len(clip.motion) if n_frames is None else n_frames
    audio = np.zeros_like(clip.audio) if zero_audio else clip.audio
    stream = engine.start(clip.reference, knobs, seed=seed)
    try:
        while stream.frame_index < n:
            span = stream.next_span()
            frames = stream.step(StepInput.from_clip(span, audio, clip.given))  # past the clip's end: not given
            yield span.frame, frames[: n - span.frame]
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------


def score(gen: np.ndarray, truth: np.ndarray, mouth_boxes, starts: list[int]) -> dict[str, float]:
    """Every metric of METRICS for one clip (T, H, W, 3); starts: chunk start frames."""
    from model.train import metrics as M

    return {"PSNR": M.psnr(gen, truth), "SSIM": M.ssim(gen, truth),
            "mouth PSNR": M.psnr(gen, truth, mouth_boxes), "mouth SSIM": M.ssim(gen, truth, mouth_boxes),
            "lip-sync r": M.lip_sync(gen, truth, mouth_boxes), "jitter": M.boundary_jitter(gen, starts)}


def long_run(engine, clip: EvalClip, knobs, seed: int, size: int, progress) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame PSNR (T,) of the model and of the reference baseline on a long clip,
    rendering ground truth chunk by chunk so memory stays constant."""
    from model.train import metrics as M

    model_psnr, ref_psnr = [], []
    for f0, frames in iter_stream(engine, clip, knobs, seed):
        truth = clip.truth(size, f0, f0 + len(frames))
        model_psnr.append(M.psnr_frames(frames, truth))
        ref_psnr.append(M.psnr_frames(np.broadcast_to(clip.reference, truth.shape), truth))
        progress.update(len(frames))
    return np.concatenate(model_psnr), np.concatenate(ref_psnr)


def strip_image(gen: np.ndarray, truth: np.ndarray, boxes, n: int = 8) -> np.ndarray:
    """(4 * H, n * W, 3) uint8 RGB: rows generated, ground truth, generated mouth, ground-truth
    mouth (crops of the ground truth's mouth box, scaled to the frame size)."""
    import cv2

    idx = np.linspace(0, len(gen) - 1, n).round().astype(int)
    H, W = gen.shape[1:3]

    def mouth(frame, box):
        """The crop scaled (nearest, aspect kept) onto a black (H, W) tile."""
        x0, y0, x1, y1 = box
        crop = frame[y0:y1, x0:x1] if (x1 > x0 and y1 > y0) else frame
        k = min(W / crop.shape[1], H / crop.shape[0])
        w, h = max(1, int(crop.shape[1] * k)), max(1, int(crop.shape[0] * k))
        tile = np.zeros((H, W, 3), np.uint8)
        tile[(H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w] = cv2.resize(
            np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_NEAREST)
        return tile

    rows = [[gen[i] for i in idx], [truth[i] for i in idx],
            [mouth(gen[i], boxes[i]) for i in idx], [mouth(truth[i], boxes[i]) for i in idx]]
    return np.concatenate([np.concatenate(r, 1) for r in rows], 0)


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def command_line(args: argparse.Namespace) -> str:
    """The exact command that reproduces this run (every option spelled out)."""
    parts = ["knotstream eval", f"--model {args.model}", f"--data {args.data}", f"--clips {args.clips}",
             f"--seconds {args.seconds:g}", f"--long-seconds {args.long_seconds:g}",
             f"--drift-seconds {args.drift_seconds:g}", f"--out {args.out}", f"--seed {args.seed}"]
    return " ".join(parts)


def table(rows: dict[str, list[dict[str, float]]], names: list[str]) -> list[str]:
    """Markdown table: one row per system, one column per metric (mean over clips)."""
    lines = ["| system | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name in names:
        cells = [f"{np.mean([clip[m] for clip in rows[name]]):.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# Seams count as invisible when the model's jitter is at most this factor above the
# ground truth's with the same borders (natural motion makes the truth's differ from 1).
JITTER_TOLERANCE = 1.1


def bars(rows, truth_jitter: float, drift) -> list[str]:
    """The quality bars, each with PASS/FAIL and the numbers it was decided on."""
    mean = lambda name, m: float(np.mean([clip[m] for clip in rows[name]]))  # noqa: E731
    lines = []
    for m in METRICS[:-1]:
        model, ref, zero = mean("model", m), mean(REFERENCE, m), mean(ZEROED, m)
        ok = model > ref and model > zero
        lines.append(f"- {'PASS' if ok else 'FAIL'}: model beats both baselines on {m} "
                     f"({model:.3f} vs {ref:.3f} reference, {zero:.3f} audio zeroed)")
    r = mean("model", "lip-sync r")
    lines.append(f"- {'PASS' if r >= 0.8 else 'FAIL'}: lip-sync r >= 0.8 ({r:.3f})")
    j = mean("model", "jitter")
    lines.append(f"- {'PASS' if j <= JITTER_TOLERANCE * truth_jitter else 'FAIL'}: no visible seams, jitter <= "
                 f"{JITTER_TOLERANCE:g} x the ground truth's ({j:.3f} vs {truth_jitter:.3f})")
    if drift is not None:
        d = drift["model"]
        lines.append(f"- {'PASS' if abs(d.change) <= 0.5 else 'FAIL'}: PSNR at the end within 0.5 dB of the start "
                     f"({d.change:+.3f} dB)")
    return lines


def write_report(out: Path, args, engine, rows, truth_jitter, drift, speed, wall) -> str:
    cfg = engine.config
    ablations = [n for n in rows if n not in (REFERENCE, ZEROED)]
    lines = [f"# knotstream eval: {args.model}" + ("" if engine.trained else " (untrained: seeded random weights)"),
             "", f"Command: `{command_line(args)}`", "",
             f"{args.clips} held-out clip(s) x {args.seconds:g} s at {cfg.width}x{cfg.height}, {cfg.fps} fps; "
             f"model knobs {dataclasses.asdict(cfg.stream)}. The model is given the speech audio and the "
             "pose/blink/gaze/smile/brow motion; never the mouth. Wall time "
             f"{wall:.0f} s; the engine ran at {speed:.1f} frames/s ({speed / cfg.fps:.2f}x real time) "
             "on this machine during the run.", "",
             "## Model against baselines", "", *table(rows, ["model", REFERENCE, ZEROED]), "",
             "## Ablations (same clips, same noise)", "", *table(rows, ablations), "",
             "PSNR (dB) / SSIM against the ground-truth render, whole frame and inside the mouth box: higher is "
             "better. lip-sync r: correlation of the mouth opening measured in generated vs ground-truth frames "
             "(0 for a mouth that never moves). jitter: frame-difference energy across chunk borders / inside "
             "chunks, with the model's chunk borders (1 = seamless; the reference baseline never moves, so 1); "
             f"the ground truth itself scores {truth_jitter:.3f} with the same borders. The mouth is measured "
             "inside the ground truth's mouth box, which follows the head: on short clips a still reference can "
             "correlate by chance as its box slides over lips and skin."]
    if drift is not None:
        lines += ["", f"## Identity drift over one {args.long_seconds:g} s run", "",
                  f"| system | PSNR first {drift['window']:g} s | PSNR last {drift['window']:g} s | change (dB) |",
                  "|---|---|---|---|"]
        for name in ("model", REFERENCE):
            d = drift[name]
            lines.append(f"| {name} | {d.first:.3f} | {d.last:.3f} | {d.change:+.3f} |")
    lines += ["", "## Bars", "", *bars(rows, truth_jitter, drift)]
    lines += ["", "![generated vs ground truth](strip.png)", "",
              "Strip rows: generated (model), ground truth, generated mouth, ground-truth mouth; first clip."]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    return report


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from model.engine import Engine
    from model.train import metrics as M
    from model.train.data import speech_bank

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.clips < 1 or args.seconds <= 0 or args.long_seconds < 0 or args.drift_seconds <= 0:
        raise ValueError("--clips must be >= 1, --seconds and --drift-seconds > 0, --long-seconds >= 0")
    engine = Engine.from_pretrained(args.model)
    cfg = engine.config
    fps, size = cfg.fps, cfg.height
    n_frames, n_long = int(round(args.seconds * fps)), int(round(args.long_seconds * fps))
    if n_frames < engine.timeline.frames_for_latents(cfg.stream.chunk_frames, first=False) + 2:
        raise ValueError(f"--seconds {args.seconds:g} is shorter than two chunks; chunk borders cannot be scored")
    runs = systems(cfg.stream)
    bank = speech_bank(args.data)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: dict[str, list[dict]] = {REFERENCE: [], **{name: [] for name in runs}}  # system -> one dict per clip
    truth_jitter, strip, engine_frames, engine_time = [], None, 0, 0.0
    t0 = time.perf_counter()
    with tqdm(total=args.clips * n_frames * len(runs) + n_long, unit="frame", desc="eval", file=sys.stderr) as bar:
        for c in range(args.clips):
            clip = held_out_clip(bank, n_frames, fps, size, rng, cfg.driving.sample_rate)
            truth, boxes = clip.truth(size), clip.mouth_boxes(size)
            for name, (knobs, zero_audio) in runs.items():
                t, chunks = time.perf_counter(), []
                for f0, frames in iter_stream(engine, clip, knobs, args.seed + c, zero_audio):
                    chunks.append((f0, frames))
                    bar.update(len(frames))
                engine_time, engine_frames = engine_time + time.perf_counter() - t, engine_frames + n_frames
                gen, starts = np.concatenate([f for _, f in chunks]), [f0 for f0, _ in chunks]
                rows[name].append(score(gen, truth, boxes, starts))
                if name == "model":
                    # The reference baseline is scored with the model's chunk borders.
                    rows[REFERENCE].append(score(np.broadcast_to(clip.reference, truth.shape), truth, boxes, starts))
                    truth_jitter.append(M.boundary_jitter(truth, starts))
                    if c == 0:
                        strip = strip_image(gen, truth, boxes)
        drift = None
        if n_long:
            window = int(round(min(args.drift_seconds, args.long_seconds / 2) * fps))
            clip = held_out_clip(bank, n_long, fps, size, rng, cfg.driving.sample_rate)
            model_psnr, ref_psnr = long_run(engine, clip, cfg.stream, args.seed, size, bar)
            drift = {"window": window / fps, "model": M.identity_drift(model_psnr, window),
                     REFERENCE: M.identity_drift(ref_psnr, window)}

    cv2.imwrite(str(out / "strip.png"), np.ascontiguousarray(strip[..., ::-1]))
    report = write_report(out, args, engine, rows, float(np.mean(truth_jitter)), drift,
                          engine_frames / max(engine_time, 1e-9), time.perf_counter() - t0)
    print(report)
    return 0

