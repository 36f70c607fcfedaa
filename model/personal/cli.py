"""`knotstream avatar create --video me.mp4 -o me.safetensors`: a personal avatar from a clip.

Two steps make a personal avatar: (1) preparation: face tracking, alignment, a portrait,
the motion track and the speech, written to `<out>.prepared.safetensors`; (2) fitting:
the model fine-tuned on the prepared clip, written to `<out>`. This build has step 1
only: the command prepares the clip, says so, and exits with FITTING_MISSING_EXIT unless
--prepare-only asked for the preparation alone (then 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FITTING_MISSING_EXIT = 3  # prepared, but the avatar file the user asked for was not written


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="avatar_command", metavar="ACTION")
    c = sub.add_parser("create", help="prepare a personal avatar from a short video of one person",
                       description=__doc__.splitlines()[0] + " Fitting (step 2) is not in this build yet.")
    c.add_argument("--video", required=True, help="a clip of the person talking at the camera (mp4, mov, webm...)")
    c.add_argument("-o", "--out", required=True, help="the avatar file to make (.safetensors)")
    c.add_argument("--prepared", default=None,
                   help="where the prepared clip goes (default: <out stem>.prepared.safetensors beside --out)")
    c.add_argument("--model", default="tiny", help="the model the avatar is for: its size, fps and audio rate")
    c.add_argument("--prepare-only", action="store_true", help="stop after step 1 (exit 0)")


def prepared_path(out: str, prepared: str | None) -> Path:
    if prepared:
        return Path(prepared)
    out_path = Path(out)
    return out_path.with_name(out_path.stem + ".prepared.safetensors")


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


def run(args: argparse.Namespace) -> int:
    if getattr(args, "avatar_command", None) != "create":
        print("knotstream avatar: choose an action: create (see knotstream avatar create --help)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from model.personal import landmarks, video
    from model.personal.prepare import prepare, save

    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors file, got {args.out}")
    size, fps, sample_rate = _model_geometry(args.model)
    target = prepared_path(args.out, args.prepared)
    info = video.probe(args.video)
    try:
        landmarks.FaceTracker(video=True).close()  # fail now, not after decoding, when mediapipe is missing
    except landmarks.LandmarkModelMissing as exc:
        raise ValueError(str(exc)) from None
    total = 2 * max(1, int(round(info["seconds"] * fps)))
    print(f"step 1 of 2, preparation: {args.video} ({info['width']}x{info['height']}, {info['seconds']:.1f} s, "
          f"{'with' if info['has_audio'] else 'no'} audio) -> {size}x{size} at {fps} fps", file=sys.stderr)
    with tqdm(total=total, unit="frame", desc="track + align", file=sys.stderr) as bar:
        prepared = prepare(args.video, size=size, fps=fps, sample_rate=sample_rate, progress=bar.update)
    save(prepared, target)
    cost = prepared.meta["portrait_cost"]
    speech = "no speech" if prepared.audio is None else f"speech {len(prepared.audio) / sample_rate:.1f} s"
    print(f"prepared {len(prepared.frames)} frames (face tracked in {100 * prepared.meta['tracked']:.0f} %), "
          f"portrait = frame {prepared.portrait_index} (cost {cost['total']:.2f}), "
          f"{speech} -> {target}", file=sys.stderr)
    if args.prepare_only:
        return 0
    print(f"step 2 of 2, fitting the model to the person: not available in this build. {args.out} was NOT "
          f"written; the fitting step will read {target}. Use --prepare-only to stop after step 1.",
          file=sys.stderr)
    return FITTING_MISSING_EXIT
