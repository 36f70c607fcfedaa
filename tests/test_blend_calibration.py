"""The calibration of a fitted avatar's blend (model/personal/blend_calibration.py): the
recorded blends re-blended with offsets are the frames the stream makes with them, and the
offsets chosen are those nearest the real frames. The fit runs it (tests/test_personal_fit.py)."""

from __future__ import annotations

import numpy as np
import torch

from tests.test_motion_warp import _F, _N, S, warped_engine  # noqa: F401  (the engine fixture)


def _motion(n: int) -> np.ndarray:
    """n driving rows: yaw and mouth_open swinging, both given."""
    t = np.arange(n) / 25
    rows = np.zeros((n, 2 * _N), np.float32)
    rows[:, _F["yaw"]], rows[:, _F["mouth_open"]] = 0.8 * np.sin(2 * t), 0.5 + 0.5 * np.sin(7 * t)
    rows[:, _N + _F["yaw"]] = rows[:, _N + _F["mouth_open"]] = 1.0
    return rows


def test_reblended_recordings_are_the_streams_frames_with_the_offsets(warped_engine):  # noqa: F811
    from model.personal.blend_calibration import reblend, record_blends
    from model.personal.drive import generate

    engine, portrait = warped_engine
    cfg, n = engine.config, 30
    motion = _motion(n)
    mouth = tuple(range(40, 60))
    knobs = cfg.stream
    cfg.warp_mouth, cfg.stream = mouth, knobs.replace(seam_blend=0.6)  # the seam blend, post-filter, too
    try:
        rec = record_blends(engine, portrait, motion, None, n)
        assert rec.rgb.shape == rec.warp.shape == (n, 3, S, S) and rec.logit.shape == (n, 1, S, S)
        cfg.warp_blend = (1.5, 4.0)
        streamed, _ = generate(engine, portrait, motion, None, n)
    finally:
        seam = cfg.stream.seam_blend
        cfg.warp_mouth, cfg.warp_blend, cfg.stream = (), (0.0, 0.0), knobs
    fields = engine.model.warp.fields(torch.from_numpy(motion))
    offset = 1.5 + 2.5 * engine.model.warp.mouth_mask(fields, mouth)
    out = reblend(rec, offset, seam, engine.timeline.temporal_stride)
    got = ((out + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(got.astype(int) - streamed).max() <= 2
    # ... and not what the stream makes without them.
    plain = ((reblend(rec, torch.zeros(()), seam) + 1) * 127.5).round().clamp(0, 255)
    assert np.abs(plain.byte().permute(0, 2, 3, 1).numpy().astype(int) - streamed).mean() > 1


def test_best_offsets_copy_the_warp_where_it_is_right():
    """Real frames that are the warp inside the mouth box and the decoder's own image outside
    it: the mouth offset that copies most, the face offset that copies least."""
    from model.personal.blend_calibration import OFFSETS, _Recorded, best_offsets

    g = torch.Generator().manual_seed(0)
    T = 6
    rgb, warp = torch.rand(T, 3, 16, 16, generator=g) * 2 - 1, torch.rand(T, 3, 16, 16, generator=g) * 2 - 1
    logit = torch.zeros(T, 1, 16, 16)
    mouth = torch.zeros(T, 1, 16, 16)
    mouth[..., 6:10, 4:12] = 1
    real = torch.where(mouth > 0, warp, rgb)
    face, m, errors = best_offsets(_Recorded(rgb, logit, warp), mouth, real)
    assert (face, m) == (min(OFFSETS), max(OFFSETS))
    assert errors[(face, m)] < errors[(0.0, 0.0)]
    # Without a mouth box there is one offset for the whole frame.
    face, m, errors = best_offsets(_Recorded(rgb, logit, warp), torch.zeros_like(mouth), warp)
    assert face == m == max(OFFSETS) and len(errors) == len(OFFSETS)


def test_the_mouth_offset_is_the_one_that_opens_the_mouth_as_the_real_frames(monkeypatch):
    """The mouth offset is chosen by the opening the landmark model measures, not by pixels:
    here a stand-in measurement reads the opening as the darkness of the mouth box, the warp
    has the real (dark) opening and the decoder's image a grey one, and the real frames are
    sharper than any blend, so the best opening is the offset that copies the warp."""
    from model.personal import scoring
    from model.personal.blend_calibration import _Recorded, mouth_offset_by_opening

    T, box = 6, (slice(6, 10), slice(4, 12))

    def opening(frames, calibration):
        dark = 1 - frames[:, box[0], box[1]].astype(float).mean((1, 2, 3)) / 255
        return dark, np.zeros((len(frames), 3, 3)), np.ones(len(frames), bool)

    monkeypatch.setattr(scoring, "measured", opening)
    rgb, warp = torch.zeros(T, 3, 16, 16), torch.zeros(T, 3, 16, 16)
    warp[..., box[0], box[1]] = -0.9
    mouth = torch.zeros(T, 1, 16, 16)
    mouth[..., box[0], box[1]] = 1
    real = np.full((T, 16, 16, 3), 127, np.uint8)
    real[:, box[0], box[1]] = 10
    rec = _Recorded(rgb, torch.zeros(T, 1, 16, 16), warp)
    assert mouth_offset_by_opening(rec, mouth, 0.0, real, None, fallback=0.0) >= 6.0  # 6 and 8: the same uint8
    # A real mouth half as dark: the offset whose blend is nearest that.
    real[:, box[0], box[1]] = 127 - 0.5 * 0.9 * 127.5
    assert mouth_offset_by_opening(rec, mouth, 0.0, real, None, fallback=1.0) == 0.0
    # No face found: the fallback.
    monkeypatch.setattr(scoring, "measured", lambda f, c: (*opening(f, c)[:2], np.zeros(len(f), bool)))
    assert mouth_offset_by_opening(rec, mouth, 0.0, real, None, fallback=3.0) == 3.0
