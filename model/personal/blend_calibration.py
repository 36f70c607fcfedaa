"""How much a fitted avatar's decoder copies from its portrait warp: two offsets of the
blend's logit, calibrated at the end of the fit (`ModelConfig.warp_blend`).

The decoder's blend (vae_blocks.ReferenceBlend) is fitted on the VAE encoder's latents of
the person's own frames, but it streams the DiT's latents, which are a poorer picture of
the frame (colour drift, a blurred mouth). Fitted on the better latents, it trusts its
latent over the warp more than a stream should, most of all in the mouth, where the warp
has the opening right and the small latent does not (docs/benchmarks.md). That trust
cannot be learnt from the encoder's latents; it is measured on the stream itself:

1. the engine streams the last `CALIBRATION_SECONDS` of the fitting frames, driven by
   their measured motion and the clip's audio (nothing after the fitting frames is read).
   The fit holds those frames back from training (`fit.calibration_rows`): on frames it
   was trained on, the decoder's own image is better than on any other, and the offsets
   chosen there trust the warp too little (on two of three real clips the held-out frames
   wanted +3 to +6 where the trained-on ones chose +1 / +2; docs/benchmarks.md);
2. every blend of that stream is recorded: the decoded image, the blend's logit, the warp,
   and the frame's mouth box (`MotionWarp.mouth_mask`);
3. the face offset (added to the logit outside the mouth box) is the one of `OFFSETS`
   whose re-blended frames are nearest the real ones in squared error (`best_offsets`);
   the mouth offset (inside the box) is the one whose re-blended frames open the mouth as
   the real ones do, as the landmark model measures both (`mouth_offset_by_opening`):
   squared error in the mouth prefers a blurred half-open mouth to an opening a pixel off.

Re-blending the recorded frames (`reblend`: the blend, the decoder's clamp, the seam blend
of model/seams.py) gives the frames the stream makes with those offsets: nothing the blend
outputs feeds back into the DiT's chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CALIBRATION_SECONDS = 6.0
OFFSETS = (-2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)  # logit offsets tried; 0: the blend as fitted


@dataclass
class Calibration:
    face: float
    mouth: float
    frames: int             # fitting frames streamed
    held_back: bool         # those frames were held back from training (else trained on: a short clip)
    psnr_fitted: float      # of those frames with the blend as fitted (offsets 0, 0)
    psnr: float             # with the chosen offsets


@dataclass
class _Recorded:
    rgb: Tensor             # (T, 3, H, W) the decoder's own image, [-1, 1]
    logit: Tensor           # (T, 1, H, W) the blend's logit
    warp: Tensor            # (T, 3, H, W) what it copies from


def record_blends(engine, portrait: np.ndarray, motion: np.ndarray, audio: np.ndarray | None,
                  n_frames: int) -> _Recorded:
    """Stream `n_frames` driven by `motion` / `audio` (drive.generate) and record the inputs
    and logit of every decoder blend, in frame order."""
    from model.personal.drive import generate

    blend = engine.model.vae.decoder.reference_blend
    parts: list[tuple[Tensor, ...]] = []
    logits: list[Tensor] = []
    plain_logits = blend.logits

    def logits_recorded(x, state):
        out = plain_logits(x, state)
        logits.append(out[0].float().cpu())
        return out

    def on_blend(module, args, output):
        _, rgb, reference, _ = args
        if reference.dim() != 5 or reference.shape[2] != 3:
            raise ValueError("calibration needs the warp's per-frame blend without offsets")
        parts.append((rgb[0].float().cpu(), reference[0].float().cpu()))

    handle = blend.register_forward_hook(on_blend)
    blend.logits = logits_recorded
    try:
        generate(engine, portrait, motion, audio, n_frames)
    finally:
        handle.remove()
        del blend.logits
    if len(parts) != len(logits):
        raise RuntimeError("the decoder's blend ran without its logit")
    rgb, warp = (torch.cat([p[i] for p in parts])[:n_frames] for i in (0, 1))
    logit = torch.cat(logits)[:n_frames]
    if len(rgb) < n_frames:
        raise RuntimeError(f"recorded {len(rgb)} blended frames of {n_frames}")
    return _Recorded(rgb, logit, warp)


def reblend(rec: _Recorded, offset: Tensor, seam_blend: float = 0.0, temporal_stride: int = 4) -> Tensor:
    """The stream's frames (T, 3, H, W) in [-1, 1] had the blend's logit been offset by
    `offset` (broadcast to (T, 1, H, W)): the blend, the decoder's clamp, the seam blend."""
    from model.seams import spread_latent_steps
    from model.vae_blocks import ReferenceBlend

    out = ReferenceBlend.mix(rec.rgb, rec.logit + offset, rec.warp).clamp(-1, 1)
    if seam_blend:
        out = spread_latent_steps(out.transpose(0, 1)[None], 0, None, seam_blend, temporal_stride)[0].transpose(0, 1)
    return out


def best_offsets(rec: _Recorded, mouth: Tensor, real: Tensor, seam_blend: float = 0.0,
                 temporal_stride: int = 4) -> tuple[float, float, dict]:
    """The (face, mouth) pair of OFFSETS whose re-blended frames have the least squared error
    to `real` (T, 3, H, W) in [-1, 1]; mouth: (T, 1, H, W) mask (all zeros: one offset for
    the whole frame, mouth = face). -> face, mouth, {pair: MSE}."""
    errors = {}
    has_mouth = bool(mouth.any())
    for face in OFFSETS:
        for m in OFFSETS if has_mouth else (face,):
            out = reblend(rec, face + (m - face) * mouth, seam_blend, temporal_stride)
            errors[(face, m)] = float((out - real).pow(2).mean())
    face, m = min(errors, key=errors.get)
    return face, m, errors


def mouth_offset_by_opening(rec: _Recorded, mouth: Tensor, face: float, real: np.ndarray, calibration,
                            fallback: float, seam_blend: float = 0.0, temporal_stride: int = 4) -> float:
    """The mouth offset of OFFSETS whose re-blended frames open the mouth most nearly as the
    real frames (T, H, W, 3) uint8 do, as the landmark model measures both
    (scoring.measured); `face` outside the mouth box. Squared error in the mouth prefers a
    blurred, half-open mouth (the average of open and closed) to an opening slightly
    misplaced; the opening is what a viewer reads. `fallback` when the landmark model finds
    no face in most frames."""
    from model.personal.scoring import measured

    real_open, _, real_found = measured(real, calibration)
    errors = {}
    for m in OFFSETS:
        out = reblend(rec, face + (m - face) * mouth, seam_blend, temporal_stride)
        frames = ((out + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        gen_open, _, found = measured(frames, calibration)
        both = found & real_found
        if both.sum() >= max(2, len(real) // 2):  # a face in most frames, else not comparable
            errors[m] = float(np.abs(gen_open[both] - real_open[both]).mean())
    return min(errors, key=errors.get) if errors else fallback


def last_fitting_rows(fit_frames: int, fps: float) -> slice:
    """The last CALIBRATION_SECONDS of `fit_frames` fitting frames (at least 2, at most all)."""
    n = min(fit_frames, max(2, round(CALIBRATION_SECONDS * fps)))
    return slice(fit_frames - n, fit_frames)


def calibrate(model, prepared, rows: slice | None = None, held_back: bool = False, seed: int = 0,
              mouth_by_opening: bool = True) -> Calibration:
    """Choose and set `model.config.warp_blend` (the model needs its motion warp) from the
    prepared clip's frames `rows` (default: the last CALIBRATION_SECONDS of its fitting
    frames); held_back: whether the fit trained without them (recorded). mouth_by_opening:
    the mouth offset by `mouth_offset_by_opening`, else by squared error as the face's."""
    from model.personal.drive import cpu_engine
    from model.personal.fit_data import driving_motion

    if model.warp is None:
        raise ValueError("blend calibration needs a model with a motion warp")
    p, cfg = prepared, model.config
    if rows is None:
        rows = last_fitting_rows(p.fit_frames, p.fps)
    n = rows.stop - rows.start
    if n < 2 or rows.stop > p.fit_frames:
        raise ValueError(f"calibration rows {rows} must be >= 2 of the {p.fit_frames} fitting frames")
    audio = None
    if p.audio is not None:
        audio = p.audio[round(rows.start * p.sample_rate / p.fps):round(rows.stop * p.sample_rate / p.fps)]
    motion = driving_motion(p.motion[rows])
    cfg.warp_blend = (0.0, 0.0)  # record the blend as fitted
    engine = cpu_engine(model)
    torch.manual_seed(seed)
    rec = record_blends(engine, p.portrait, motion, audio, n)
    fields = model.warp.fields(torch.as_tensor(np.asarray(motion), dtype=torch.float32))
    mouth = model.warp.mouth_mask(fields, cfg.warp_mouth) if cfg.warp_mouth else torch.zeros_like(rec.logit)
    real = torch.from_numpy(np.ascontiguousarray(p.frames[rows])).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    seam, stride = cfg.stream.seam_blend, engine.timeline.temporal_stride
    face, m, errors = best_offsets(rec, mouth, real, seam, stride)
    if cfg.warp_mouth and mouth_by_opening:
        m = mouth_offset_by_opening(rec, mouth, face, p.frames[rows], p.calibration, m, seam, stride)
    cfg.warp_blend = (face, m)

    def psnr(mse: float) -> float:
        return float(10 * np.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 in [-1, 1]

    return Calibration(face, m, n, held_back, psnr(errors[(0.0, 0.0)]), psnr(errors.get((face, m), float("nan"))))
