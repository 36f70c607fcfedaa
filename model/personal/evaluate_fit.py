"""The fitted personal avatar in `knotstream eval --personal --fit`.

Per clip: the avatar is fitted on the clip's first 80 % (the fit a user gets: `fit.fit`
with the time limit of `--fit-minutes`; an avatar file already in the output folder is
reused, delete it to fit again) and then scored on the held-out 20 %:

- reenactment: driven by the held-out frames' measured motion (every field given, the
  clip's own audio or silence), scored by `evaluate.score` beside the two baselines, plus
  the chunk-border jitter of the generated frames over the real frames' with the same borders;
- speech-driven: unseen speech alone (no motion) drives the avatar, through the shipped
  route (speech -> mouth fields) and, for comparison, through the DiT's own audio path
  (`speech_mouth` off); `speech_eval.av_sync` of the measured mouth with the envelope;
- identity drift: a long run driven by the held-out motion looped, PSNR to the looped real
  frames over the first vs the last window, both whole passes of the loop (same driving,
  same targets: only the stream's age differs; `drift_frames`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FITTED = "fitted avatar"
ROUTED, AUDIO_PATH = "speech -> mouth fields (shipped)", "DiT audio path"


def ensure_avatar(prepared, out: Path, stem: str, minutes: float, model: str = "tiny") -> tuple[Path, dict]:
    """The clip's fitted avatar file in `out` (fitted now when missing) and its fit record."""
    from model.personal import avatar_file
    from model.personal.fit import fit, write_avatar

    path = out / f"{stem}.avatar.safetensors"
    if not path.is_file():
        result = fit(prepared, model, out / f"{stem}.fit", max_minutes=minutes)
        write_avatar(result, prepared, path, avatar_file.name_from_path(stem))
    return path, avatar_file.read(path).info


def reenactment(engine, prepared, held: slice, real, boxes, real_measure) -> tuple[dict, np.ndarray]:
    """The avatar's row of the reenactment table (+ "jitter / real") and its frames."""
    from model.personal.drive import generate
    from model.personal.scoring import score
    from model.personal.fit_data import driving_motion
    from model.train.metrics import boundary_jitter

    audio = None
    if prepared.audio is not None:
        audio = prepared.audio[round(held.start * prepared.sample_rate / prepared.fps):]
    gen, starts = generate(engine, prepared.portrait, driving_motion(prepared.motion[held]), audio, len(real))
    row = score(gen, real, boxes, real_measure, prepared.calibration)
    row["jitter / real"] = boundary_jitter(gen, starts) / boundary_jitter(real, starts)
    return row, gen


def speech_driven(engine, prepared, speech: list[tuple[str, np.ndarray]]) -> dict[str, dict[str, dict]]:
    """{speech name: {ROUTED | AUDIO_PATH: av_sync scores}} of the avatar driven by each
    speech clip alone."""
    from model.personal.drive import generate
    from model.personal.scoring import measured
    from model.personal.speech_eval import av_sync, envelope

    cfg = engine.config
    routed_gains, out = cfg.speech_mouth, {}
    for name, audio in speech:
        n = int(len(audio) * cfg.fps / cfg.driving.sample_rate)
        env = envelope(audio, cfg.fps, cfg.driving.sample_rate, n)
        out[name] = {}
        for system, gains in ((ROUTED, routed_gains), (AUDIO_PATH, None)):
            cfg.speech_mouth = gains
            try:
                frames, _ = generate(engine, prepared.portrait, None, audio, n)
            finally:
                cfg.speech_mouth = routed_gains
            mouth, _, found = measured(frames, prepared.calibration)
            out[name][system] = {**av_sync(np.where(found, mouth, np.nan), env), "tracked": float(found.mean())}
    return out


def drift_frames(loop: int, fps: float, seconds: float, window_s: float) -> tuple[int, int]:
    """(run, window) in frames for a drift run over a loop of `loop` held-out frames: the
    window is a whole number of passes (nearest `window_s`, at least one) and the run at
    least `seconds`, rounded up to whole passes and to two windows. The first and the last
    window then score the same frames with the same motion; windows cut mid-pass would
    compare different stretches of the loop (on franck's 1000 held-out frames, 60 s windows
    of a 300 s run differed by +0.5 dB from that alone)."""
    passes = max(1, round(window_s * fps / loop))
    window = passes * loop
    run = max(int(seconds * fps), 2 * window)
    return -(-run // loop) * loop, window


def drift(engine, prepared, held: slice, seconds: float, window_s: float, progress) -> dict[str, float]:
    """PSNR over the first and the last window of a run of at least `seconds` driven by the
    held-out motion looped, against the looped real frames (`drift_frames`)."""
    from model.personal.drive import chunks, looped
    from model.personal.fit_data import driving_motion
    from model.train.metrics import identity_drift, psnr_frames

    fps = prepared.fps
    real = prepared.frames[held]
    n, window = drift_frames(len(real), fps, seconds, window_s)
    motion = looped(driving_motion(prepared.motion[held]), n)
    idx = np.arange(n) % len(real)
    per_frame = []
    for f0, frames in chunks(engine, prepared.portrait, motion, None, n):
        per_frame.append(psnr_frames(frames, real[idx[f0:f0 + len(frames)]]))
        progress(len(frames))
    d = identity_drift(np.concatenate(per_frame), window)
    return {"seconds": n / fps, "window_seconds": window / fps, "first": d.first, "last": d.last, "change": d.change}


def evaluate(prepared, held: slice, real, boxes, real_measure, out: Path, stem: str, options) -> dict:
    """Every fitted-avatar result of one clip (see the module docstring). options: fit_minutes,
    speech [(name, audio)], long_seconds, drift_seconds, progress."""
    from model.engine import Engine

    path, fit_info = ensure_avatar(prepared, out, stem, options.fit_minutes, options.model)
    engine = Engine.from_pretrained(str(path))
    row, gen = reenactment(engine, prepared, held, real, boxes, real_measure)
    result = {"row": row, "frames": gen, "fit": fit_info, "speech": speech_driven(engine, prepared, options.speech)}
    if options.long_seconds:
        result["drift"] = drift(engine, prepared, held, options.long_seconds, options.drift_seconds, options.progress)
    return result


def report_lines(results: list[dict]) -> list[str]:
    """The report's sections on the fitted avatars (after the reenactment table)."""
    lines = ["", "## Fitted avatars", "", "| clip | decoder steps | DiT steps | complete | last fit run, wall minutes "
             "| last fit run, CPU minutes | blend offsets face / mouth | jitter / real |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, row = r["fitted"]["fit"], r["rows"][FITTED]
        c = f.get("blend_calibration")
        offsets = "-"
        if c:
            # Avatars fitted before 2026-12-02 calibrated on frames they trained on (no record).
            where = "held-back" if c.get("held_back") else "trained-on"
            offsets = f"{c['face']:+g} / {c['mouth']:+g} ({c['frames']} {where} frames)"
        dit = f.get("dit_steps")
        snapshot = f.get("dit_snapshot")  # the step the avatar was written from, when the fit chose one
        if snapshot and snapshot["chosen"] != dit:
            dit = f"{dit}, step {snapshot['chosen']} kept"
        lines.append(f"| {r['name']} | {f.get('decoder_steps')} | {dit} | {f.get('complete')} | "
                     f"{f.get('run_minutes', '-')} | {f.get('run_cpu_minutes', '-')} | {offsets} | "
                     f"{row['jitter / real']:.3f} |")
    lines += ["", "The fit minutes are those of the run that finished the fit: a fit resumed from its "
              "checkpoints counts only its last run. Blend offsets: what the fit's calibration adds to the "
              "decoder blend's logit outside / inside the mouth box (model/personal/blend_calibration.py), "
              "chosen on the stream of the last fitting frames, held back from training when the clip allows. "
              "A DiT step kept: the earlier snapshot that streamed the fitting frames better than the last "
              "(model/personal/snapshots.py).",
              "", "Speech-driven (speech alone, no motion): correlation of the mouth opening measured on the "
              "generated frames with the speech envelope, at lag 0 and at the best lag (positive: the mouth "
              "follows the sound; 1 frame = 40 ms).", "",
              "| clip | speech | route | r | best lag (ms) | r at best lag | tracked |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for speech, systems in r["fitted"]["speech"].items():
            for system, s in systems.items():
                lines.append(f"| {r['name']} | {speech} | {system} | {s['r']:.3f} | {40 * s['lag']:+.0f} | "
                             f"{s['r_best']:.3f} | {s['tracked']:.2f} |")
    drifts = [(r["name"], r["fitted"]["drift"]) for r in results if "drift" in r["fitted"]]
    if drifts:
        lines += ["", "Identity drift: a long run driven by the held-out motion looped, PSNR (dB) to the looped "
                  "real frames over the first vs the last window. Both windows are whole passes of the held-out "
                  "frames, and the run is rounded up to whole passes: they score the same frames.", "",
                  "| clip | run (s) | window (s) | first | last | change |", "|---|---|---|---|---|---|"]
        # Records written before the windows were whole passes have no window length.
        lines += [f"| {name} | {d['seconds']:.1f} | {d.get('window_seconds', float('nan')):.1f} | {d['first']:.2f} | "
                  f"{d['last']:.2f} | {d['change']:+.2f} |" for name, d in drifts]
    return lines
