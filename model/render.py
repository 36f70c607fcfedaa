"""`knotstream render`: portrait + driving audio/motion -> H.264 MP4 with the audio muxed.

The engine alone, no server: the same chunk loop a live session runs, fed from files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", required=True, help="portrait image (png/jpg/...)")
    p.add_argument("--audio", help="driving speech (wav/mp3/ogg/flac...); omitted = silence (idle)")
    p.add_argument("--motion", help="JSON lines of motion/expression, see docs (`{\"t\": 1.5, \"yaw\": 0.3}`)")
    p.add_argument("--seconds", type=float, help="length (default: the audio's length, or 5 s)")
    p.add_argument("--model", default="tiny",
                   help="preset name or a local .safetensors path (default: tiny, the bundled model; "
                        "seeded random weights when no trained weights are bundled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="stream knob override, e.g. --knob knot_frames=0 --knob window_frames=12")
    p.add_argument("-o", "--output", required=True, help="output .mp4")


def parse_knobs(defaults, items: list[str]):
    """`name=value` strings -> StreamKnobs (typed like the default's field)."""
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    changes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"bad --knob {item!r}: expected NAME=VALUE with NAME in {sorted(fields)}")
        kind = type(getattr(defaults, name))
        try:
            changes[name] = kind(value)
        except ValueError:
            raise ValueError(f"bad --knob {item!r}: {value!r} is not a {kind.__name__}") from None
    return defaults.replace(**changes)


def load_motion_track(path: str, fps: int, n_frames: int) -> np.ndarray:
    """JSON lines `{"t": seconds | "frame": n, field: value | null, ...}` -> (n_frames, motion_dim).

    A field set on a line holds from that time until a later line sets it again (null
    clears it: "not given" again).
    """
    from model.config import MOTION_FIELDS
    from model.driving import motion_vector

    events = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            frame = int(msg.pop("frame")) if "frame" in msg else int(round(float(msg.pop("t")) * fps))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 't' or 'frame' ({exc})") from None
        unknown = set(msg) - set(MOTION_FIELDS)
        if unknown:
            raise ValueError(f"{path}:{lineno}: unknown motion fields {sorted(unknown)}; known: {MOTION_FIELDS}")
        events.append((frame, msg))
    events.sort(key=lambda e: e[0])
    track = np.zeros((n_frames, 2 * len(MOTION_FIELDS)), dtype=np.float32)
    state: dict[str, float] = {}
    i = 0
    for f in range(n_frames):
        while i < len(events) and events[i][0] <= f:
            for k, v in events[i][1].items():
                if v is None:
                    state.pop(k, None)
                else:
                    state[k] = float(v)
            i += 1
        track[f] = motion_vector(state)
    return track


def write_mp4(path: str, frames: list[np.ndarray], fps: int, audio: np.ndarray | None, sample_rate: int) -> None:
    """frames: list of (n, H, W, 3) uint8; audio float32 mono or None."""
    import av

    with av.open(path, "w") as out:
        v = out.add_stream("libx264", rate=fps)
        h, w = frames[0].shape[1:3]
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.options = {"crf": "18", "preset": "veryfast"}
        a = None
        if audio is not None:
            a = out.add_stream("aac", rate=sample_rate)
            a.layout = "mono"
        for block in frames:
            for img in block:
                for packet in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
        for packet in v.encode():
            out.mux(packet)
        if a is not None:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
            step = 1024
            for s in range(0, len(pcm), step):
                frame = av.AudioFrame.from_ndarray(pcm[None, s:s + step], format="s16", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = s
                for packet in a.encode(frame):
                    out.mux(packet)
            for packet in a.encode():
                out.mux(packet)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.engine import Engine
    from model.media import load_audio, load_image
    from model.timeline import StepInput

    image = load_image(args.reference)
    engine = Engine.from_pretrained(args.model)
    cfg = engine.config
    knobs = parse_knobs(cfg.stream, args.knob)
    sr, fps = cfg.driving.sample_rate, cfg.fps
    audio = load_audio(args.audio, sample_rate=sr) if args.audio else None
    seconds = args.seconds if args.seconds is not None else (len(audio) / sr if audio is not None else 5.0)
    if not (0 < seconds <= 24 * 3600):
        raise ValueError(f"--seconds must be in (0, 86400], got {seconds}")
    n_frames = max(1, math.ceil(seconds * fps))
    motion = load_motion_track(args.motion, fps, n_frames + 64) if args.motion else None
    if not engine.trained:
        print("note: no trained weights bundled for this model: rendering with seeded random weights",
              file=sys.stderr)

    stream = engine.start(image, knobs, seed=args.seed)
    out, produced = [], 0
    t0 = time.perf_counter()
    with tqdm(total=n_frames, unit="frame", desc="render", file=sys.stderr) as bar:
        while produced < n_frames:
            frames = stream.step(StepInput.from_clip(stream.next_span(), audio, motion))[: n_frames - produced]
            out.append(frames)
            produced += len(frames)
            bar.update(len(frames))
    elapsed = time.perf_counter() - t0
    track = None
    if audio is not None:
        track = np.zeros(round(n_frames * sr / fps), dtype=np.float32)
        track[: min(len(track), len(audio))] = audio[: len(track)]
    write_mp4(args.output, out, fps, track, sr)
    print(f"wrote {args.output}: {n_frames} frames ({n_frames / fps:.2f} s) at {cfg.width}x{cfg.height}, "
          f"{fps} fps in {elapsed:.2f} s; real-time factor {n_frames / fps / elapsed:.2f}x")
    return 0
