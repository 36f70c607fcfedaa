"""Fitting the bundled model to one person: step 2 of `knotstream avatar create`.

The person's prepared clip (`prepare`) goes through the bundled model's own training
stages (model/train/trainer.py), fed by `fit_data.PersonData` instead of the procedural
world, starting from the bundled weights:

1. decoder: the reference-conditioned VAE decoder on the person's frames, the encoder
   frozen (the DiT's latent space stays valid). Cheap, and it carries most of the identity:
   the bundled decoder draws cartoon skin; a hundred steps on a real face raise the
   held-out reconstruction by about 6 dB (docs/benchmarks.md).
2. dit: the DiT and the driving encoder, teacher-forced on the person's latents (a latent
   pool of the clip), driven by the measured motion with every field given (the bundled
   model never had the mouth given: it learns the mouth fields here) and the clip's audio.

Speech reaches the mouth through the motion fields, not through the DiT's audio path: the
procedural world's mouth is a fixed function of the speech (`train.speech.mouth_track`),
which the engine evaluates on the session's audio and hands to the model as mouth_open /
mouth_wide wherever the client gives no mouth (`speech_mouth`), scaled to this person's
mouth (`speech_mouth.gains`). The person's clip teaches motion -> face, which it has data
for (a silent clip included); the comparison with the DiT's own audio path is in
docs/benchmarks.md.

The portrait warp (`FitPlan.motion_warp`, model/motion_warp.py): before training, the
person's landmarks are regressed on their motion (the fitting frames) and the model carries
that map; the DiT's condition channels then hold, per latent, the portrait warped onto that
latent's motion, and the decoder's blend copies from the portrait warped onto each frame's,
in training as in the engine. The still portrait alone gives the model no picture of the
person in any other pose; the warp gives it one from nothing but the motion it is driven
with (docs/benchmarks.md).

Knots and window: the avatar streams with `knot_frames=0` and a window of 2 latent frames
(written into its stream defaults and used in training). Chained knot predictions drift
in colour on real faces as they do on the bundled model, and a 6-frame window of its own
generated frames lets a moving face fall apart within seconds (docs/benchmarks.md); a fit
of a few hundred steps cannot train that out, a model leaning on its reference can.

The blend calibration's frames (the last seconds of the fitting frames, `calibration_rows`)
are held back from both stages: the decoder's trust in its warp is measured on frames it
has not learnt.

Resumable: the trainer's checkpoints (model, optimiser, step, RNG) and the latent pool live
in the checkpoint folder; the same command continues where a stopped one ended. The time
limit is shared between the stages (`DECODER_SHARE` of it for the decoder), and when it
runs out the avatar is still written from where the fit got to (and says so).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.personal import snapshots

DECODER_SHARE = 0.3   # of the time limit, at most, for the decoder stage
CALIBRATION_RESERVE_S = 60.0  # of a time limit, kept for the blend calibration after the DiT stage
SNAPSHOT_RESERVE_S = 50.0  # of a time limit, per earlier DiT snapshot scored (snapshots.choose; 35-46 s measured)
POOL_PER_TILE = 1.0   # latent-pool clips per distinct clip-length stretch of the fitting frames
MAX_POOL = 96        # encoding the pool is a large share of a short fit on a CPU
CALIBRATION_SHARE = 0.2  # of the fitting frames, at most, held back from training for the blend calibration


@dataclass
class FitPlan:
    """What one fit runs; the defaults are the shipped ones (docs/personal-avatars.md)."""

    # Sized so that preparing and fitting a 2-minute clip takes at most 30 minutes of one CPU
    # core (docs/benchmarks.md), whatever the time limit.
    decoder_steps: int = 300
    dit_steps: int = 800
    batch: int = 8
    decoder_lr: float = 3e-4
    dit_lr: float = 2e-4
    warmup_steps: int = 50
    clip_latents: int = 8
    knot_frames: int = 0
    window_frames: int = 2
    seed: int = 0
    save_every: int = 50
    # The DiT's condition and the decoder's blend copy from the portrait warped onto each
    # frame's motion (model/motion_warp.py) instead of the still portrait.
    motion_warp: bool = True
    # After training, calibrate how much the decoder copies from the warp, on the stream of
    # the last fitting frames (model/personal/blend_calibration.py).
    calibrate_blend: bool = True
    # Keep the DiT at these shares of its steps and write the avatar from the kept step, or
    # the last, that streams the fitting frames best (model/personal/snapshots.py); () = the last.
    snapshot_fractions: tuple[float, ...] = snapshots.FRACTIONS


@dataclass
class FitResult:
    model: object          # the fitted AvatarModel
    decoder_step: int
    dit_step: int
    complete: bool         # both stages reached their steps (not cut by the time limit)
    minutes: float         # wall time of this call
    cpu_minutes: float     # CPU time of this process during the call (all its threads)
    calibration: object = None  # blend_calibration.Calibration of the warp's blend, None without a warp
    snapshot: object = None     # snapshots.Choice: the DiT step written, of those scored; None: the last, unscored


def trainer_args(plan: FitPlan, base: str, pool: int, clip_latents: int,
                 on_progress: Callable | None) -> argparse.Namespace:
    """The namespace the trainer's stages read: the trainer's own defaults
    (model/train/trainer.py add_arguments), so a stage's new option has its default here
    too, with the fit's plan over them."""
    from model.train.trainer import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(
        model=base, seed=plan.seed, batch=plan.batch, save_every=plan.save_every,
        decoder_steps=plan.decoder_steps, reference_decoder=False, temporal_weight=1.0,
        dit_steps=plan.dit_steps, rollout_steps=0, rollout_context="last", clip_latents=clip_latents,
        pool=pool, mouth_given=0.0, warmup_steps=plan.warmup_steps, lr=plan.decoder_lr, on_progress=on_progress,
        keep_steps=snapshots.snapshot_steps(plan.dit_steps, plan.snapshot_fractions))
    return args


def pool_size(data, clip_latents: int) -> int:
    tiles = len(data.frames) / data.clip_frames(clip_latents)
    return int(min(MAX_POOL, max(8, math.ceil(POOL_PER_TILE * tiles))))


def fitted_clip_latents(data, wanted: int) -> int:
    """The longest clip (in latents, at most `wanted`) the fitting frames hold; a short clip
    gets shorter training clips. ValueError when not even one chunk fits."""
    for n in range(wanted, 1, -1):
        if len(data.frames) >= data.clip_frames(n):
            return n
    raise ValueError(f"the clip has {len(data.frames)} fitting frames; fitting needs at least "
                     f"{data.clip_frames(2)}: record a longer clip")


def _stage_step(out: Path, stage: str) -> int:
    from model.train.trainer import load_checkpoint

    ck = out / f"{stage}.pt"
    return int(load_checkpoint(ck)["step"]) if ck.exists() else 0


def fit(prepared, base: str, out: str | Path, plan: FitPlan | None = None, max_minutes: float = 0,
        on_progress: Callable | None = None) -> FitResult:
    """Fit the model `base` (a preset name or a model file) to `prepared`, checkpointing in
    `out`. max_minutes: the time limit of this call (0 = none). on_progress(stage, step,
    total, loss): called after every training step."""
    import torch

    from model.personal.fit_data import PersonData
    from model.train import trainer

    plan = plan or FitPlan()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.time(), time.process_time()
    deadline = t0 + 60 * max_minutes if max_minutes else None
    base_path = _base_file(base)
    probe = trainer_args(plan, base_path, 0, plan.clip_latents, on_progress)
    model = trainer._build_model(probe, out)  # the newest checkpoint in `out`, else the base weights
    torch.manual_seed(plan.seed)
    held_rows = calibration_rows(prepared, model.config, plan)  # (training, held back), with a warp
    held_back = held_rows[0].stop <= held_rows[1].start
    if plan.motion_warp and model.warp is None:  # a resumed fit has it from its checkpoint
        add_motion_warp(model, prepared, held_rows[1] if held_back else None)
    calibrating = model.warp is not None and plan.calibrate_blend
    train_rows, calib_rows = held_rows if calibrating else (slice(0, prepared.fit_frames), None)
    data = PersonData(prepared, model.config, frames=train_rows, warp=model.warp)
    clip_latents = fitted_clip_latents(data, plan.clip_latents)
    args = trainer_args(plan, base_path, pool_size(data, clip_latents), clip_latents, on_progress)

    share = None if deadline is None else t0 + DECODER_SHARE * (deadline - t0)
    trainer.train_decoder(model, data, args, out, share)
    model.config.domain = "personal"
    model.config.stream = model.config.stream.replace(knot_frames=plan.knot_frames, window_frames=plan.window_frames)
    args.lr = plan.dit_lr
    if on_progress is not None:
        on_progress("encode", 0, 1, None)  # the latent pool is encoded first (minutes for a long clip)
    train_deadline = None
    if deadline is not None:
        train_deadline = (deadline - (CALIBRATION_RESERVE_S if calibrating else 0)
                          - len(args.keep_steps) * SNAPSHOT_RESERVE_S)
    trainer.train_dit(model, data, args, out, train_deadline, "dit")
    dec, dit = _stage_step(out, "decoder"), _stage_step(out, "dit")
    calibrate = None
    if calibrating:
        from model.personal.blend_calibration import calibrate as calibrate_blend

        def calibrate(m):
            return calibrate_blend(m.eval(), prepared, calib_rows, held_back=held_back)

    choice, calibration = None, None
    if any(k < dit for k in snapshots.kept_steps(out)):
        choice, calibration = snapshots.choose(model, prepared, out, dit, calibrate, deadline, on_progress,
                                               log=lambda line: print(line, file=sys.stderr))
    elif calibrate is not None:
        if on_progress is not None:
            on_progress("calibrate", 0, 1, None)
        calibration = calibrate(model)
    return FitResult(model.eval(), dec, dit, dec >= plan.decoder_steps and dit >= plan.dit_steps,
                     (time.time() - t0) / 60, (time.process_time() - cpu0) / 60, calibration, choice)


def calibration_rows(prepared, config, plan: FitPlan) -> tuple[slice, slice]:
    """(training rows, blend-calibration rows) of the prepared clip's fitting frames. The
    last CALIBRATION_SECONDS (at most `CALIBRATION_SHARE` of them) are held back from
    training for the calibration (model/personal/blend_calibration.py) when what is left
    still holds a training clip of `plan.clip_latents`; a shorter clip is calibrated on
    frames it trains on (the fallback: the calibration then trusts the warp too little)."""
    from model.personal.blend_calibration import CALIBRATION_SECONDS, last_fitting_rows
    from model.timeline import Timeline

    n_fit = prepared.fit_frames
    n = min(round(CALIBRATION_SECONDS * prepared.fps), int(CALIBRATION_SHARE * n_fit))
    needed = Timeline.of(config).frames_for_latents(plan.clip_latents, first=True)
    if n >= 2 and n_fit - n >= needed:
        return slice(0, n_fit - n), slice(n_fit - n, n_fit)
    return slice(0, n_fit), last_fitting_rows(n_fit, prepared.fps)


def add_motion_warp(model, prepared, check_rows: slice | None = None) -> None:
    """Give the model the person's portrait warp (model/motion_warp.py): the landmarks of the
    fitting frames regressed on their motion, the portrait's landmarks and motion, an
    open-mouth frame of the fitting frames when the clip has one (`portrait.choose_open`),
    and where the body below the chin sits, regressed the same way, when the frame shows
    some (model/personal/torso.py) and, given `check_rows` (the last fitting frames, which
    training holds back), when it brings the warp nearer those frames (`body_helps`)."""
    from model.config import MOTION_FIELDS
    from model.motion_warp import MotionWarp
    from model.personal import torso
    from model.personal.landmarks import LIP_IN_DOWN, LIP_IN_UP, LIPS
    from model.personal.motion_landmarks import MotionLandmarks
    from model.personal.portrait import choose_open, clip_colour

    p, rows = prepared, slice(0, prepared.fit_frames)
    landmarks = MotionLandmarks.fit(p.motion[rows], p.landmarks[rows])
    model.config.motion_warp = landmarks.n_points
    model.config.warp_mouth = LIPS if landmarks.n_points > max(LIPS) else ()
    model.config.warp_absolute = True  # onto the predicted landmarks (model/motion_warp.py)
    opened = choose_open(p.motion[rows], p.frames[rows], p.landmarks[rows], p.found[rows], p.portrait_index)
    model.config.warp_open = (LIP_IN_UP, LIP_IN_DOWN) if opened is not None and model.config.warp_mouth else ()
    line = torso.body_line(p.landmarks[p.portrait_index], p.size)
    moved = None if line is None else torso.track(p.frames[rows], p.frames[p.portrait_index], line)
    if moved is not None and check_rows is not None and not body_helps(prepared, landmarks, line, moved, check_rows):
        moved = None
    model.config.warp_torso = torso.TORSO_POINTS if moved is not None else 0
    cfg = model.config
    model.warp = MotionWarp(landmarks.n_points, len(MOTION_FIELDS), cfg.height, cfg.warp_absolute, cfg.warp_mouth,
                            cfg.warp_open, cfg.warp_torso)
    model.warp.set_fit(landmarks.weights, p.landmarks[p.portrait_index], p.motion[p.portrait_index])
    if cfg.warp_open:  # in the clip's colour, as the portrait (portrait.clip_colour)
        image, _ = clip_colour(p.frames[opened], p.frames[opened], p.frames[rows])
        model.warp.set_open(image, p.landmarks[opened])
    if cfg.warp_torso:
        model.warp.set_torso(MotionLandmarks.fit(p.motion[rows], moved).weights, line)


def body_helps(prepared, landmarks, line: float, moved, check_rows: slice) -> bool:
    """Whether the body regression, fitted on the fitting frames before `check_rows`, brings
    the portrait's warp below the chin line nearer the real `check_rows` frames (squared
    error) than leaving the body where the portrait has it. Some bodies move in ways a shift
    does not follow (a bow reshapes a collar): on one of three real clips the shift cost the
    avatar 0.25 dB, and these frames said so (docs/benchmarks.md)."""
    import numpy as np
    import torch

    from model.config import MOTION_FIELDS
    from model.motion_warp import MotionWarp
    from model.personal import torso
    from model.personal.fit_data import driving_motion
    from model.personal.motion_landmarks import MotionLandmarks

    p, before = prepared, slice(0, check_rows.start)
    warp = MotionWarp(landmarks.n_points, len(MOTION_FIELDS), p.size, True, torso=torso.TORSO_POINTS)
    warp.set_fit(landmarks.weights, p.landmarks[p.portrait_index], p.motion[p.portrait_index])
    warp.set_torso(MotionLandmarks.fit(p.motion[before], moved[before]).weights, line)
    fields = warp.fields(torch.as_tensor(np.asarray(driving_motion(p.motion[check_rows])), dtype=torch.float32))
    portrait = torch.from_numpy(p.frames[p.portrait_index]).float().div(127.5).sub(1).permute(2, 0, 1)[None]
    real = torch.from_numpy(p.frames[check_rows]).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    below = int(line)
    errors = []
    for body in (warp.torso_map.clone(), torch.zeros_like(warp.torso_map)):
        warp.torso_map.copy_(body)
        with torch.no_grad():
            pictures = torch.cat([warp.warp(portrait, fields[i:i + 64]) for i in range(0, len(fields), 64)])
        errors.append(float((pictures[:, :, below:] - real[:, :, below:]).pow(2).mean()))
    return errors[0] < errors[1]


def _base_file(base: str) -> str:
    """A model file the trainer can start from: a path as given, a preset's bundled weights."""
    from model.config import PRESETS
    from model.sources import ASSETS

    if base in PRESETS:
        bundled = ASSETS / f"{base}.safetensors"
        if not bundled.is_file():
            raise ValueError(f"preset {base!r} has no bundled weights to fit")
        return str(bundled)
    if not Path(base).is_file():
        raise FileNotFoundError(f"model file not found: {base}")
    return base


def write_avatar(result: FitResult, prepared, path: str | Path, name: str) -> None:
    """The fitted model as an avatar file: its speech -> mouth gains from the person's own
    mouth (the fitting frames), the portrait, and what the fit did."""
    from model.personal import avatar_file, speech_mouth

    model = result.model
    model.config.speech_mouth = speech_mouth.gains(prepared.motion[:prepared.fit_frames])
    info = {"source": prepared.meta.get("source"), "fit_frames": prepared.fit_frames,
            "decoder_steps": result.decoder_step, "dit_steps": result.dit_step, "complete": result.complete,
            "run_minutes": round(result.minutes, 1), "run_cpu_minutes": round(result.cpu_minutes, 1)}
    if result.snapshot is not None:
        info["dit_snapshot"] = result.snapshot.info()
    if result.calibration is not None:
        c = result.calibration
        info["blend_calibration"] = {"face": c.face, "mouth": c.mouth, "frames": c.frames, "held_back": c.held_back,
                                     "psnr_fitted": round(c.psnr_fitted, 2), "psnr": round(c.psnr, 2)}
    avatar_file.save(model, prepared.portrait, path, name, info)
