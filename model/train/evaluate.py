"""`knotstream eval`: held-out avatars streamed through the real engine, scored against
the renderer's ground truth, over several clips with confidence intervals.

Each clip has its own seed, which fixes everything about it: a held-out identity
(`data.HELD_OUT_IDENTITY_SEED + seed % 100`, so consecutive seeds are different people),
held-out sentences of the speech bank (index % 10 == 0) separated by pauses, natural idle
motion, and the engine's noise. Its ground truth is `world.render_clip` of that identity
and motion, the mouth following the speech (`speech.speaking_motion`, as in training).
Clips of `--clips` are seeded `--seed`, `--seed` + 1, ...; the drift run takes the next seed.

What the model is given, exactly as a live session (`stream.step` chunk by chunk, with
the reference/window caches, knots and running ahead): the speech audio, and the motion
fields `data.GIVEN_TO_MODEL` (pose, blink, gaze, smile, brow) with their "given" flags.
The mouth fields are NOT given: the mouth must come from the audio, which is what the
lip-sync metric measures.

Systems, all on the same clips with the same noise seed per clip (paired):
- model                        the preset's stream knobs
- repeat the reference frame   baseline: the reference portrait for every frame
- model, driving audio zeroed  baseline: same motion, silent audio
- ablations                    knots off, running ahead off, seam blend off (each toggled
  on instead when the preset ships it off), window 2 / 6 / 12 latent frames (the window
  equal to the preset's is the "model" row)
Every system is reported as a mean with its 95 % t-interval over clips, and every other
system as its paired difference to the model (`model/train/stats.py`); the bars of
issue 21 are decided on those intervals (`model/train/eval_report.py`). One long run of
the model (--long-seconds) measures identity drift: PSNR to ground truth over the first
vs the last --drift-seconds.

Writes `report.md` (tables, per-clip seeds, the exact command), `scores.json` (every
clip's metrics per system, written after each clip, so another run on the same seeds can
be compared clip by clip) and `strip.png` (generated vs ground-truth frames and mouth
crops of the first clip) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from model.train.eval_results import METRICS, MODEL, REFERENCE, ZEROED, MOUTH_GIVEN, ClipResult, EvalClip, window_name  # noqa: F401  (re-exported)

ABLATION_WINDOWS = (2, 6, 12)
# data.draw_clip(held_out=True) draws its identities from this many seeds.
HELD_OUT_IDENTITIES = 100
# Speech and motion of a clip are drawn in blocks of this length (see held_out_clip).
MATERIAL_SECONDS = 60
# --quick: two clips (the fewest that give an interval), each long enough for several
# chunk borders, a long run just long enough for two drift windows. Every system,
# metric and bar is still produced.
QUICK = dict(clips=2, seconds=0.6, long_seconds=0.8, drift_seconds=0.4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name or .safetensors path")
    p.add_argument("--data", default="runs/data", help="speech bank folder (generated with espeak-ng/flite when missing)")
    p.add_argument("--clips", type=int, default=8,
                   help=f"held-out clips per system (1-{HELD_OUT_IDENTITIES}; intervals need at least 2)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="length of each clip (--personal --fit-minutes: of each speech clip)")
    p.add_argument("--long-seconds", type=float, default=300.0, help="length of the drift run (0 = skip)")
    p.add_argument("--drift-seconds", type=float, default=60.0,
                   help="window averaged at the start and the end of the long run (at most half of it)")
    p.add_argument("--out", default="runs/eval", help="folder for report.md and strip.png")
    p.add_argument("--prefix-seconds", type=_seconds_list, default=(), metavar="S,S,...",
                   help="also score the first S seconds of every clip (the same streams: a clip-length study)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first clip (clip i: seed + i; drift run: seed + clips)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is far faster on a CPU other jobs load")
    p.add_argument("--personal", action="store_true",
                   help="score personal avatars on real clips instead (model/personal/evaluate.py; needs --videos)")
    p.add_argument("--videos", nargs="+", default=None, help="--personal: clips of real people talking")
    p.add_argument("--fit-minutes", type=float, default=None, metavar="M",
                   help="--personal: also fit an avatar to each clip's first 80%% (within M minutes) and score it")
    p.add_argument("--speech", nargs="+", default=None, metavar="WAV",
                   help="--personal --fit-minutes: unseen real speech to drive each avatar with (besides a TTS voice)")
    p.add_argument("--systems", type=_keys, default=SYSTEM_KEYS, metavar="KEY,KEY,...",
                   help=f"systems besides the model (default all: {','.join(SYSTEM_KEYS)}); fewer run faster "
                        "(an early look at new weights), bars whose rows are missing are left out")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), default=None,
                   help="compare two runs' scores.json (new weights against old, paired by clip seed) and exit")
    p.add_argument("--quick", action="store_true",
                   help=f"CI mode: {QUICK['clips']} clips of {QUICK['seconds']:g} s, a {QUICK['long_seconds']:g} s long run")


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = set(keys) - set(SYSTEM_KEYS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEM_KEYS)}")
    return keys


def _seconds_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds separated by commas, got {text!r}") from None


# ------------------------------------------------------------------------------------------
# Clips and systems
# ------------------------------------------------------------------------------------------


def held_out_clip(bank, n_frames: int, fps: int, size: int, seed: int, sample_rate: int = 16000) -> EvalClip:
    """The held-out clip of `seed`, `n_frames` long: one identity speaking held-out sentences
    with 0.4-1.5 s pauses, under idle motion.

    Speech and motion are drawn for a whole number of MATERIAL_SECONDS blocks and cut, from
    independent random streams of the seed, keeping a second past the end (the engine's
    lookahead reads it): a shorter clip of a seed is exactly the start of a longer one,
    driving included, so its frames are the longer clip's first frames and clip lengths
    can be compared on the same material (`--prefix-seconds`)."""
    from model.config import MOTION_FIELDS
    from model.train import speech as sp
    from model.train import world
    from model.train.data import GIVEN_TO_MODEL, HELD_OUT_IDENTITY_SEED, MOUTH, model_motion

    if seed < 0:
        raise ValueError(f"clip seeds must be >= 0, got {seed}")
    sentences = bank.split(held_out=True)
    if not sentences:
        raise ValueError(f"the speech bank has no held-out sentence (index % 10 == 0) among {len(bank.texts)}")
    speech_rng, motion_rng, ref_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    block = MATERIAL_SECONDS * fps
    n_drawn = -(-(n_frames + fps) // block) * block
    n_samples = int(round(n_frames * sample_rate / fps))
    audio = np.zeros(int(round(n_drawn * sample_rate / fps)) + sample_rate, np.float32)
    spoken = []
    pos = int(speech_rng.uniform(0.2, 1.0) * sample_rate)
    while pos < len(audio):
        sentence = int(speech_rng.choice(sentences))
        if pos < n_samples:
            spoken.append(sentence)
        s = bank.sentence(sentence) * np.float32(speech_rng.uniform(0.6, 1.0))  # loudness as in training
        audio[pos:pos + len(s)] = s[: len(audio) - pos]
        pos += len(s) + int(speech_rng.uniform(0.4, 1.5) * sample_rate)
    identity_seed = HELD_OUT_IDENTITY_SEED + seed % HELD_OUT_IDENTITIES  # the held-out range of data.draw_clip
    ident = world.identity_from_seed(identity_seed)
    motion = sp.speaking_motion(audio, fps, motion_rng, sample_rate, n_frames=n_drawn)[:n_frames + fps]
    ref = sp.idle_motion(1, fps, ref_rng)[0]  # reference portrait as in training: idle pose, mouth shut, eyes open
    for name in ("mouth_open", "mouth_wide", "blink"):
        ref[MOTION_FIELDS.index(name)] = 0.0
    return EvalClip(seed, identity_seed, spoken, ident, motion[:n_frames], audio[:n_samples + sample_rate],
                    world.render_frame(ident, ref, size), model_motion(motion),
                    model_motion(motion, GIVEN_TO_MODEL + MOUTH))


@dataclasses.dataclass(frozen=True)
class System:
    """An engine-driven system: stream knobs, and whether the driving audio is zeroed."""

    knobs: object             # model.config.StreamKnobs
    zero_audio: bool = False
    give_mouth: bool = False  # the true mouth fields given as motion (a client that sends the mouth)


def toggled(base, knob: str, on_value) -> tuple[str, object]:
    """(row name, knobs) of `base` with one mechanism switched: off when the preset ships it
    on, on (at `on_value`) when it ships it off."""
    value = getattr(base, knob)
    new = 0 if value else on_value
    return f"{'off' if value else 'on'} ({knob}={new:g})", base.replace(**{knob: new})


# Mechanisms that are toggled in the ablations: (--systems key, label, knob, value used to switch it on).
MECHANISMS = (("knots", "knots", "knot_frames", 1), ("ahead", "running ahead", "ahead_frames", 4),
              ("blend", "seam blend", "seam_blend", 0.7))
# Every key `--systems` accepts, in report order (the model always runs).
SYSTEM_KEYS = ("zeroed", "mouth", *(m[0] for m in MECHANISMS), *(f"window{w}" for w in ABLATION_WINDOWS))


def systems(base, keys: Sequence[str] = SYSTEM_KEYS) -> dict[str, System]:
    """name -> System for the model (first) and the engine-driven systems of `keys`
    (SYSTEM_KEYS; a window key equal to the model's window adds nothing)."""
    unknown = set(keys) - set(SYSTEM_KEYS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEM_KEYS)}")
    out = {MODEL: System(base)}
    if "zeroed" in keys:
        out[ZEROED] = System(base, zero_audio=True)
    if "mouth" in keys:
        # Audio zeroed: the mouth can only come from the fields (with the audio, which already
        # drives the mouth, this row could not tell a model that reads them from one that does not).
        out[MOUTH_GIVEN] = System(base, zero_audio=True, give_mouth=True)
    for key, label, knob, on_value in MECHANISMS:
        if key in keys:
            suffix, knobs = toggled(base, knob, on_value)
            out[f"{label} {suffix}"] = System(knobs)
    for w in ABLATION_WINDOWS:
        if w != base.window_frames and f"window{w}" in keys:
            out[window_name(w)] = System(base.replace(window_frames=w))
    return out


def iter_stream(engine, clip: EvalClip, system: System, n_frames: int | None = None):
    """Stream the clip through the engine; yields (first frame index, (n, H, W, 3) uint8)
    per chunk, the last one cut at `n_frames` (default: the whole clip).

    The one place that drives the engine. The noise seed is the clip's: every system
    streams the same clip from the same generator state, which is what makes the
    comparisons paired (systems with the same chunk geometry draw identical noise).
    Past the clip's end the driving goes on from the clip's second of tail."""
    from model.timeline import StepInput

    n = len(clip.motion) if n_frames is None else n_frames
    audio = np.zeros_like(clip.audio) if system.zero_audio else clip.audio
    given = clip.given_mouth if system.give_mouth else clip.given
    stream = engine.start(clip.reference, system.knobs, seed=clip.seed)
    try:
        while stream.frame_index < n:
            span = stream.next_span()
            frames = stream.step(StepInput.from_clip(span, audio, given))
            yield span.frame, frames[: n - span.frame]
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------


def score(gen: np.ndarray, truth: np.ndarray, mouth_boxes, starts: list[int]) -> dict[str, float]:
    """Every metric of METRICS for one clip (T, H, W, 3); starts: chunk start frames.
    "jitter / truth" divides by the ground truth's jitter with the same chunk borders
    (natural motion makes the truth's differ from 1, and it differs between clips)."""
    from model.train import metrics as M

    jitter = M.boundary_jitter(gen, starts)
    return {"PSNR": M.psnr(gen, truth), "SSIM": M.ssim(gen, truth),
            "mouth PSNR": M.psnr(gen, truth, mouth_boxes), "mouth SSIM": M.ssim(gen, truth, mouth_boxes),
            "lip-sync r": M.lip_sync(gen, truth, mouth_boxes), "jitter": jitter,
            "jitter / truth": jitter / M.boundary_jitter(truth, starts)}


def evaluate_clip(engine, clip: EvalClip, runs: dict[str, System], size: int, progress,
                  keep_strip: bool = False, prefixes: tuple[int, ...] = ()) -> ClipResult:
    """Stream `clip` through every system of `runs` and score each against the ground truth;
    the reference baseline is scored with the model's chunk borders. `prefixes`: frame
    counts over which the same streams are also scored (a causal stream's first n frames
    are those of an n-frame clip of the same seed)."""
    from model.train import metrics as M

    truth, boxes = clip.truth(size), clip.mouth_boxes(size)
    lengths = (len(truth), *prefixes)
    scores = {n: {} for n in lengths}
    engine_seconds, strip, starts = 0.0, None, None
    for name, system in runs.items():
        t, chunks = time.perf_counter(), []
        for f0, frames in iter_stream(engine, clip, system):
            chunks.append((f0, frames))
            progress.update(len(frames))
        engine_seconds += time.perf_counter() - t
        gen, starts_ = np.concatenate([f for _, f in chunks]), [f0 for f0, _ in chunks]
        for n in lengths:
            scores[n][name] = score(gen[:n], truth[:n], boxes[:n], starts_)
        if name == MODEL:
            starts = starts_
            strip = strip_image(gen, truth, boxes) if keep_strip else None
    for n in lengths:
        scores[n][REFERENCE] = score(np.broadcast_to(clip.reference, truth[:n].shape), truth[:n], boxes[:n], starts)
    jitter = {n: M.boundary_jitter(truth[:n], starts) for n in lengths}
    return ClipResult(clip, scores[len(truth)], jitter[len(truth)], engine_seconds, strip,
                      {n: ClipResult(clip, scores[n], jitter[n], 0.0) for n in prefixes})


def long_run(engine, clip: EvalClip, system: System, size: int, progress) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame PSNR (T,) of the model and of the reference baseline on a long clip,
    rendering ground truth chunk by chunk so memory stays constant."""
    from model.train import metrics as M

    model_psnr, ref_psnr = [], []
    for f0, frames in iter_stream(engine, clip, system):
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
# Entry point
# ------------------------------------------------------------------------------------------


def command_line(args: argparse.Namespace) -> str:
    """The exact command that reproduces this run (every option spelled out)."""
    parts = ["knotstream eval", f"--model {args.model}", f"--data {args.data}", f"--clips {args.clips}",
             f"--seconds {args.seconds:g}", f"--long-seconds {args.long_seconds:g}",
             f"--drift-seconds {args.drift_seconds:g}", f"--out {args.out}", f"--seed {args.seed}"]
    if args.prefix_seconds:
        parts.append("--prefix-seconds " + ",".join(f"{x:g}" for x in args.prefix_seconds))
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if tuple(args.systems) != SYSTEM_KEYS:
        parts.append("--systems " + ",".join(args.systems))
    return " ".join(parts)


def write_scores(path: Path, command: str, results: list[ClipResult]) -> None:
    """Every clip's seeds and metrics per system (and per prefix length, in frames) as JSON."""
    import json

    def clip_entry(r: ClipResult) -> dict:
        return {"seed": r.clip.seed, "identity_seed": r.clip.identity_seed, "sentences": r.clip.sentences,
                "frames": len(r.clip.motion), "truth_jitter": r.truth_jitter, "scores": r.scores,
                "prefixes": {str(n): {"truth_jitter": p.truth_jitter, "scores": p.scores} for n, p in r.prefixes.items()}}

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"command": command, "clips": [clip_entry(r) for r in results]}, indent=1))
    tmp.replace(path)


def check_arguments(args: argparse.Namespace) -> None:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if not 1 <= args.clips <= HELD_OUT_IDENTITIES:
        raise ValueError(f"--clips must be in [1, {HELD_OUT_IDENTITIES}] (one held-out identity each), got {args.clips}")
    if args.seconds <= 0 or args.long_seconds < 0 or args.drift_seconds <= 0 or args.seed < 0 or args.threads < 0:
        raise ValueError("--seconds and --drift-seconds must be > 0, --long-seconds, --seed and --threads >= 0")
    if any(not 0 < x < args.seconds for x in args.prefix_seconds):
        raise ValueError(f"--prefix-seconds must lie between 0 and --seconds {args.seconds:g}")


def run(args: argparse.Namespace) -> int:
    import cv2
    import torch
    from tqdm import tqdm

    from model.engine import Engine
    from model.train import eval_report
    from model.train import metrics as M
    from model.train.data import speech_bank

    if getattr(args, "personal", False):
        from model.personal.evaluate import run as run_personal

        return run_personal(args)
    if getattr(args, "compare", None):
        from model.train.eval_compare import compare, load

        print(compare(load(args.compare[0]), load(args.compare[1])))
        return 0
    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model)
    cfg = engine.config
    fps, size, sr = cfg.fps, cfg.height, cfg.driving.sample_rate
    n_frames, n_long = int(round(args.seconds * fps)), int(round(args.long_seconds * fps))
    prefixes = tuple(sorted({int(round(x * fps)) for x in args.prefix_seconds}))
    if min((n_frames, *prefixes)) < engine.timeline.frames_for_latents(cfg.stream.chunk_frames, first=False) + 2:
        raise ValueError("--seconds and --prefix-seconds must be at least two chunks long; chunk borders cannot be scored")
    runs = systems(cfg.stream, args.systems)
    bank = speech_bank(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    t0 = time.perf_counter()
    with tqdm(total=args.clips * n_frames * len(runs) + n_long, unit="frame", desc="eval", file=sys.stderr) as bar:
        for c in range(args.clips):
            clip = held_out_clip(bank, n_frames, fps, size, args.seed + c, sr)
            results.append(evaluate_clip(engine, clip, runs, size, bar, keep_strip=c == 0, prefixes=prefixes))
            write_scores(out / "scores.json", command_line(args), results)
        drift = None
        if n_long:
            window = int(round(min(args.drift_seconds, args.long_seconds / 2) * fps))
            clip = held_out_clip(bank, n_long, fps, size, args.seed + args.clips, sr)
            model_psnr, ref_psnr = long_run(engine, clip, runs[MODEL], size, bar)
            drift = {"window": window / fps, "seconds": args.long_seconds, "seed": clip.seed,
                     MODEL: M.identity_drift(model_psnr, window), REFERENCE: M.identity_drift(ref_psnr, window)}
    wall = time.perf_counter() - t0

    cv2.imwrite(str(out / "strip.png"), np.ascontiguousarray(results[0].strip[..., ::-1]))
    speed = args.clips * n_frames * len(runs) / max(sum(r.engine_seconds for r in results), 1e-9)
    setup = (f"{args.clips} held-out clip(s) x {args.seconds:g} s at {cfg.width}x{cfg.height}, {fps} fps, "
             f"seeds {args.seed}-{args.seed + args.clips - 1}; model knobs: {eval_report.knobs_text(cfg.stream)}. "
             "The model is given the speech audio and the pose/blink/gaze/smile/brow motion; never the mouth "
             f"(except in the row \"{MOUTH_GIVEN}\", which shows whether it follows a mouth a client sends: "
             "its lip-sync r near 0 means the mouth fields are ignored). "
             f"Wall time {wall:.0f} s; the engine ran at {speed:.1f} frames/s ({speed / fps:.2f}x real time) "
             f"with {torch.get_num_threads()} torch thread(s) on this machine during the run (under whatever else "
             "loaded it).")
    title = args.model + ("" if engine.trained else " (untrained: seeded random weights)")
    report = eval_report.render(command_line(args), title, setup, results, list(runs), cfg.stream, drift, fps)
    (out / "report.md").write_text(report)
    print(report)
    return 0
