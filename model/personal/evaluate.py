"""`knotstream eval --personal`: personal avatars scored on real clips of real people.

Each clip is prepared (`prepare.prepare`) with the calibration and the portrait taken
from its first FIT_FRACTION; the rest is held out. Every system produces the held-out
frames from the portrait and is scored against the real aligned frames:

  repeat the portrait      the portrait for every frame (what a still avatar shows)
  piecewise-affine warp    the portrait warped onto each held-out frame's real landmarks
                           (`warp`): a classical reenactment given more than a motion
                           vector, every landmark of the real frame
  warp driven by motion    the same warp onto the landmarks that the held-out frames'
                           motion predicts (`motion_landmarks`, fitted on the first 80 %):
                           a classical reenactment given exactly what the avatar is given

Metrics: PSNR and SSIM of the whole frame, PSNR inside the mouth box (the real frame's
lip landmarks, 30 % margin), mouth-opening error and head-pose error: the landmark model
run on generated and on real frames alike (both at the model's size), measured with the
clip's calibration, |mouth_open| difference in motion units and the angle between the
two head rotations in degrees, over the frames where both have a face ("tracked" says
how many of the generated frames had one).

With --fit-minutes, each clip also gets a personal avatar fitted on its first 80 % and
scored the same way, plus speech-driven, drift and chunk-border scores
(`evaluate_fit`).

Writes report.md and strip.png (real vs each system; the clips' faces are not ours to
publish: never commit it) to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from model.personal.scoring import (BETTER, FRAME_METRICS, METRICS, PER_FRAME, measured, mouth_boxes,  # noqa: F401
                                    score)  # (re-exported)

FIT_FRACTION = 0.8
REPEAT, WARP, MOTION_WARP = "repeat the portrait", "piecewise-affine warp", "warp driven by motion"


def systems(prepared, held: slice) -> dict[str, np.ndarray]:
    """name -> generated held-out frames (T_held, S, S, 3)."""
    from model.personal.motion_landmarks import MotionLandmarks
    from model.personal.warp import warp_portrait

    p = prepared
    still = p.frames[p.portrait_index]
    src = p.landmarks[p.portrait_index]

    def warped_onto(landmarks: np.ndarray) -> np.ndarray:
        return np.stack([warp_portrait(still, src, dst) for dst in landmarks])

    predicted = MotionLandmarks.fit(p.motion[:held.start], p.landmarks[:held.start]).predict(p.motion[held])
    return {REPEAT: np.broadcast_to(still, p.frames[held].shape), WARP: warped_onto(p.landmarks[held]),
            MOTION_WARP: warped_onto(predicted)}


def evaluate_clip(video: Path, out: Path, size: int, fps: int, sample_rate: int, progress, fitted=None) -> dict:
    """Prepare (or reuse the prepared file in `out`), run every system, score it. fitted:
    the options of the fitted avatar's scores (`evaluate_fit.evaluate`), None to skip them."""
    from model.personal import prepare as P

    cached = out / f"{video.stem}.prepared.safetensors"
    prepared = P.load_current(cached, video)
    if prepared is None:
        prepared = P.prepare(video, size=size, fps=fps, sample_rate=sample_rate, fit_fraction=FIT_FRACTION)
        P.save(prepared, cached)
    if prepared.size != size:
        raise ValueError(f"{cached} was prepared at {prepared.size} px, the model needs {size}: delete it")
    held = slice(prepared.fit_frames, len(prepared.frames))
    real = prepared.frames[held]
    if len(real) < 2:
        raise ValueError(f"{video} is too short: {len(real)} held-out frames")
    boxes = mouth_boxes(prepared.landmarks[held], size)
    real_measure = measured(real, prepared.calibration)
    gens = systems(prepared, held)
    rows = {name: score(gen, real, boxes, real_measure, prepared.calibration) for name, gen in gens.items()}
    result = {"name": video.name, "frames": len(prepared.frames), "held": len(real), "rows": rows,
              "tracked real": float(real_measure[2].mean())}
    if fitted is not None:
        from model.personal import evaluate_fit

        fit = evaluate_fit.evaluate(prepared, held, real, boxes, real_measure, out, video.stem, fitted)
        rows[evaluate_fit.FITTED], gens[evaluate_fit.FITTED] = fit.pop("row"), fit.pop("frames")
        result["fitted"] = fit
    result["strip"] = strip(real, gens)
    progress(1)
    return result


def strip(real: np.ndarray, gens: dict[str, np.ndarray], n: int = 8) -> np.ndarray:
    """Rows: real held-out frames, then each system, at n evenly spread frames."""
    idx = np.linspace(0, len(real) - 1, n).round().astype(int)
    return np.concatenate([np.concatenate(list(rows[idx]), 1) for rows in (real, *gens.values())], 0)


def report(results: list[dict], command: str, wall: float) -> str:
    lines = ["# knotstream eval --personal", "", f"Command: `{command}`", "",
             f"Each clip: calibration and portrait from the first {FIT_FRACTION:.0%}, scored on the last "
             f"{1 - FIT_FRACTION:.0%}. Wall time {wall:.0f} s.", "",
             "| clip | system | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for r in results:
        for name, row in r["rows"].items():
            lines.append(f"| {r['name']} ({r['held']} frames) | {name} | "
                         + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |")
    names = list(results[0]["rows"]) if results else []
    for name in names:
        mean = {m: np.nanmean([r["rows"][name][m] for r in results]) for m in METRICS}
        lines.append(f"| mean | {name} | " + " | ".join(f"{mean[m]:.3f}" for m in METRICS) + " |")
    if results and "fitted" in results[0]:
        from model.personal.evaluate_fit import report_lines

        lines += gap_lines(results)
        lines += report_lines(results)
    lines += ["", "Better: " + ", ".join(f"{m} {b}" for m, b in BETTER.items()) + ". The landmark model found a "
              "face in " + ", ".join(f"{100 * r['tracked real']:.0f} %" for r in results)
              + " of the real held-out frames (same order as the clips).",
              "", "strip.png rows: real, then each system (not for publishing: the clips' faces are not ours)."]
    return "\n".join(lines) + "\n"


def gap_lines(results: list[dict]) -> list[str]:
    """The report's table of the fitted avatar's per-clip gaps to each baseline, with their
    intervals (model/personal/intervals.py), and the issue's bars read from it."""
    from model.personal.evaluate_fit import FITTED
    from model.personal.intervals import BLOCK_FRAMES, LEVEL, RESAMPLES, paired_gap

    lines = ["", f"Fitted avatar minus each baseline, per clip: mean over the held-out frames and the {LEVEL:.0%} "
             f"interval of a paired block bootstrap (blocks of {BLOCK_FRAMES} frames, {RESAMPLES} resamples; the "
             "spread of the frames, not of the fit). PSNR and SSIM: above 0 is better; mouth-open error: below 0 "
             "is better. * : the interval leaves out 0.", "",
             "| clip | baseline | " + " | ".join(FRAME_METRICS) + " |", "|---" * (len(FRAME_METRICS) + 2) + "|"]
    verdicts = []
    for r in results:
        ours = r["rows"][FITTED][PER_FRAME]
        for name in (REPEAT, WARP, MOTION_WARP):
            gaps = {m: paired_gap(ours[m], r["rows"][name][PER_FRAME][m]) for m in FRAME_METRICS}
            lines.append(f"| {r['name']} | {name} | "
                         + " | ".join(f"{g}{' *' if g.sure else ''}" for g in gaps.values()) + " |")
            if name in (REPEAT, WARP):  # the bars: beat the still portrait and the landmark warp
                for m, g in gaps.items():
                    better = g.mean < 0 if BETTER[m] == "lower" else g.mean > 0
                    verdicts.append((r["name"], name, m, better, g.sure))
    lost = [v for v in verdicts if not v[3]]
    lines += ["", f"Bars (beat the still portrait and the landmark warp on {', '.join(FRAME_METRICS)}, per clip): "
              + (f"{len(verdicts) - len(lost)} of {len(verdicts)} held"
                 + ("." if not lost else "; missed: " + "; ".join(
                     f"{c} {m} vs {b} ({'sure' if s else 'within the interval'})" for c, b, m, _, s in lost) + "."))]
    return lines


def fitted_options(args: argparse.Namespace, cfg):
    """The fitted avatar's eval options from the command line, None without --fit-minutes."""
    from model.media import load_audio
    from model.personal.speech_eval import tts_speech

    if getattr(args, "fit_minutes", None) is None:
        if getattr(args, "speech", None):
            raise ValueError("--speech needs --fit-minutes (the speech drives the fitted avatars)")
        return None
    if args.fit_minutes < 0:
        raise ValueError("--fit-minutes must not be negative (0 = no limit)")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    sr = cfg.driving.sample_rate
    seconds = args.seconds   # of each speech clip
    speech = [(Path(p).name, load_audio(p, sample_rate=sr)[:int(seconds * sr)]) for p in args.speech or ()]
    speech.append(("TTS (espeak-ng/flite)", tts_speech(seconds, sr)))
    drift_seconds = min(args.drift_seconds, args.long_seconds / 2)
    return argparse.Namespace(fit_minutes=args.fit_minutes, model=str(args.model), speech=speech,
                              long_seconds=args.long_seconds,
                              drift_seconds=drift_seconds, progress=lambda n: None)


def run(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from model.config import from_name
    from model.weights import read_metadata

    videos = [Path(v) for v in (args.videos or [])]
    if not videos:
        raise ValueError("--personal needs --videos CLIP [CLIP ...] (bench/personal_clips.py fetches the "
                         "real clips the benchmarks use)")
    for v in videos:
        if not v.is_file():
            raise FileNotFoundError(f"video not found: {v}")
    cfg = read_metadata(args.model)["config"] if str(args.model).endswith(".safetensors") else from_name(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fitted = fitted_options(args, cfg)
    t0, results = time.perf_counter(), []
    with tqdm(total=len(videos), unit="clip", desc="eval --personal", file=sys.stderr) as bar:
        for v in videos:
            results.append(evaluate_clip(v, out, cfg.height, cfg.fps, cfg.driving.sample_rate, bar.update, fitted))
    command = f"knotstream eval --personal --model {args.model} --out {args.out} --videos " + " ".join(map(str, videos))
    if fitted is not None:
        command += (f" --fit-minutes {args.fit_minutes:g} --seconds {args.seconds:g} --long-seconds {args.long_seconds:g}"
                    + (" --speech " + " ".join(args.speech) if args.speech else ""))
    text = report(results, command, time.perf_counter() - t0)
    (out / "report.md").write_text(text)
    image = np.concatenate([r["strip"] for r in results], 0)
    cv2.imwrite(str(out / "strip.png"), np.ascontiguousarray(image[..., ::-1]))
    print(text)
    return 0
