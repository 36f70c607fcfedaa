"""`knotstream avatar create --video me.mp4 -o me.safetensors`: a personal avatar from a clip.

Two steps: (1) preparation: face tracking, alignment, a portrait, the motion track and the
speech, written to `<out stem>.prepared.safetensors` (reused when run again on the same
clip); (2) fitting: the bundled model fine-tuned on the prepared clip (model/personal/fit.py),
checkpointed in `<out stem>.fit/`, written to `<out>` (model/personal/avatar_file.py).
Running the same command again continues a fit that a time limit (or Ctrl-C) stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from model.personal.fit import FitPlan

    d = FitPlan()
    sub = p.add_subparsers(dest="avatar_command", metavar="ACTION")
    c = sub.add_parser("create", help="make a personal avatar from a short video of one person",
                       description=__doc__.splitlines()[0])
    c.add_argument("--video", required=True, help="a clip of the person talking at the camera (mp4, mov, webm...)")
    c.add_argument("-o", "--out", required=True, help="the avatar file to make (.safetensors)")
    c.add_argument("--name", default=None, help="the avatar's name in the server's list (default: the file's stem)")
    c.add_argument("--prepared", default=None,
                   help="where the prepared clip goes (default: <out stem>.prepared.safetensors beside --out)")
    c.add_argument("--checkpoints", default=None, help="the fit's checkpoint folder (default: <out stem>.fit/)")
    c.add_argument("--model", default="tiny", help="the model to fit: a preset with bundled weights or a model file")
    c.add_argument("--max-minutes", type=float, default=0,
                   help="stop after this long (preparation included) and write the avatar as fitted so far; "
                        "the same command continues the fit (0 = no limit)")
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    c.add_argument("--decoder-steps", type=int, default=d.decoder_steps)
    c.add_argument("--dit-steps", type=int, default=d.dit_steps)
    c.add_argument("--progress", default=None, help=argparse.SUPPRESS)  # JSON progress file (the server's fit job)
    c.add_argument("--prepare-only", action="store_true", help="stop after step 1 (exit 0)")


def prepared_path(out: str, prepared: str | None) -> Path:
    if prepared:
        return Path(prepared)
    out_path = Path(out)
    return out_path.with_name(out_path.stem + ".prepared.safetensors")


def checkpoint_dir(out: str, checkpoints: str | None) -> Path:
    return Path(checkpoints) if checkpoints else Path(out).with_name(Path(out).stem + ".fit")


class ProgressFile:
    """The command's progress as one small JSON file, rewritten at most once a second
    (atomically), for a process watching from outside (server/fitjobs.py)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.last = 0.0
        self.state: dict = {}

    def update(self, force: bool = False, **state) -> None:
        self.state.update(state)
        if self.path is None or (not force and time.monotonic() - self.last < 1.0):
            return
        self.last = time.monotonic()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)


def _model_geometry(name: str) -> tuple[int, int, int]:
    """(size, fps, sample_rate) of a preset or a model file, without loading weights."""
    from model.config import from_name
    from model.weights import read_metadata

    if name.endswith(".safetensors"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"model file not found: {name}")
        cfg = read_metadata(name)["config"]
    else:
        cfg = from_name(name)
    if cfg.height != cfg.width:
        raise ValueError(f"personal avatars need a square model, {name} is {cfg.width}x{cfg.height}")
    return cfg.height, cfg.fps, cfg.driving.sample_rate


def prepare_step(args, target: Path, progress: ProgressFile):
    """Step 1, or the prepared file of an earlier run on the same clip."""
    from tqdm import tqdm

    from model.personal import landmarks, video
    from model.personal.prepare import load_current, prepare, save

    size, fps, sample_rate = _model_geometry(args.model)
    prepared = load_current(target, args.video)
    if prepared is not None and (prepared.size, prepared.fps, prepared.sample_rate) == (size, fps, sample_rate):
        print(f"step 1 of 2, preparation: reusing {target}", file=sys.stderr)
        return prepared
    info = video.probe(args.video)
    try:
        landmarks.FaceTracker(video=True).close()  # fail now, not after decoding, when mediapipe is missing
    except landmarks.LandmarkModelMissing as exc:
        raise ValueError(str(exc)) from None
    total = 2 * max(1, int(round(info["seconds"] * fps)))
    print(f"step 1 of 2, preparation: {args.video} ({info['width']}x{info['height']}, {info['seconds']:.1f} s, "
          f"{'with' if info['has_audio'] else 'no'} audio) -> {size}x{size} at {fps} fps", file=sys.stderr)

    with tqdm(total=total, unit="frame", desc="track + align", file=sys.stderr) as bar:
        def advance(n: int) -> None:
            bar.update(n)
            progress.update(stage="prepare", step=bar.n, total=total, loss=None)

        prepared = prepare(args.video, size=size, fps=fps, sample_rate=sample_rate, progress=advance)
    save(prepared, target)
    cost = prepared.meta["portrait_cost"]
    speech = "no speech" if prepared.audio is None else f"speech {len(prepared.audio) / sample_rate:.1f} s"
    print(f"prepared {len(prepared.frames)} frames (face tracked in {100 * prepared.meta['tracked']:.0f} %), "
          f"portrait = frame {prepared.portrait_index} (cost {cost['total']:.2f}), "
          f"{speech} -> {target}", file=sys.stderr)
    return prepared


def fit_step(args, prepared, name: str, started: float, progress: ProgressFile) -> int:
    """Step 2: fit, then write the avatar file (also when the time limit cut the fit)."""
    import torch

    from model.personal.fit import FitPlan, fit, write_avatar

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = FitPlan(decoder_steps=args.decoder_steps, dit_steps=args.dit_steps)
    minutes = 0.0
    if args.max_minutes:
        minutes = args.max_minutes - (time.time() - started) / 60
        if minutes <= 0:
            raise ValueError(f"--max-minutes {args.max_minutes:g} was spent on the preparation: nothing left to fit")
    ckpt = checkpoint_dir(args.out, args.checkpoints)
    print(f"step 2 of 2, fitting {args.model} to the person ({plan.decoder_steps} decoder + {plan.dit_steps} DiT "
          f"steps, checkpoints in {ckpt})", file=sys.stderr)
    result = fit(prepared, args.model, ckpt, plan, minutes,
                 on_progress=lambda stage, step, total, loss: progress.update(stage=stage, step=step, total=total,
                                                                              loss=loss))
    write_avatar(result, prepared, args.out, name)
    total = (time.time() - started) / 60
    print(f"wrote {args.out}: avatar {name!r} (decoder {result.decoder_step}/{plan.decoder_steps}, DiT "
          f"{result.dit_step}/{plan.dit_steps} steps; {total:.1f} min in this run)", file=sys.stderr)
    if not result.complete:
        print(f"the time limit stopped the fit early: the avatar works but is not fully fitted. Run the same "
              f"command again to continue from {ckpt}.", file=sys.stderr)
    progress.update(force=True, stage="done", step=1, total=1, complete=result.complete)
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "avatar_command", None) != "create":
        print("knotstream avatar: choose an action: create (see knotstream avatar create --help)", file=sys.stderr)
        return 2
    from model.personal.avatar_file import NAME_RE, name_from_path

    started = time.time()
    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors file, got {args.out}")
    name = args.name or name_from_path(args.out)
    if not NAME_RE.match(name):
        raise ValueError(f"--name {name!r}: 1-32 of a-z, 0-9, '-', '_', starting with a letter or digit")
    if args.max_minutes < 0 or args.decoder_steps < 0 or args.dit_steps < 0 or args.threads < 0:
        raise ValueError("--max-minutes, --decoder-steps, --dit-steps and --threads must not be negative")
    if not Path(args.video).is_file():
        raise FileNotFoundError(f"video file not found: {args.video}")
    progress = ProgressFile(args.progress)
    prepared = prepare_step(args, prepared_path(args.out, args.prepared), progress)
    if args.prepare_only:
        return 0
    return fit_step(args, prepared, name, started, progress)
