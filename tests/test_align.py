"""The personal clip's crop geometry (model/personal/align.py): crops of one box at two sizes
agree (the engine makes the model-size portrait from the PORTRAIT_SIZE crop by area
averaging), and a crop's landmarks land on its pixels."""

from __future__ import annotations

import numpy as np

from model.personal import align


def _source(seed: int = 0) -> np.ndarray:
    """A 480x640 frame with texture at every scale, so a sub-pixel shift shows."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.zeros((480, 640, 3), np.float64)
    for cells in (8, 32, 96):
        out += cv2.resize(rng.uniform(0, 85, (cells, cells, 3)), (640, 480), interpolation=cv2.INTER_CUBIC)
    return np.clip(out, 0, 255).astype(np.uint8)


def _shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sub-pixel (dx, dy) of b relative to a (phase correlation of the grey images)."""
    import cv2

    grey = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64)  # noqa: E731
    (dx, dy), _ = cv2.phaseCorrelate(grey(a), grey(b))
    return np.array([dx, dy])


def test_a_crop_at_twice_the_size_area_averages_to_the_crop():
    """The 256 crop of a 300 px box needs no pre-scaling, the 128 one does (its first resize
    has its own pixel-centre convention): both must show the same picture, not one shifted
    by a fraction of a pixel (which misplaced the portrait against its landmarks)."""
    import cv2

    frame, box = _source(), (171.3, 92.7, 300.0)
    small = align.crop(frame, box, 128)
    big = cv2.resize(align.crop(frame, box, 256), (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(_shift(small, big)).max() < 0.03
    assert np.abs(small.astype(float) - big).mean() < 2.0


def test_landmarks_land_on_the_crop_pixels():
    """A round spot centred at a source point (area coordinates, as the landmark model gives
    them) has its centroid at that point's crop coordinates, at both sizes."""
    ys, xs = np.mgrid[0:480, 0:640]
    centre = np.array([301.4, 207.8])  # area coordinates: pixel u's centre is at u + 0.5
    spot = np.exp(-((xs + 0.5 - centre[0]) ** 2 + (ys + 0.5 - centre[1]) ** 2) / (2 * 9.0 ** 2))
    frame = np.repeat((255 * spot).round().astype(np.uint8)[..., None], 3, axis=2)
    box = (171.3, 92.7, 300.0)
    for size in (128, 256):
        crop = align.crop(frame, box, size)[..., 0].astype(np.float64)
        cy, cx = np.mgrid[0:size, 0:size]
        got = np.array([(crop * cx).sum(), (crop * cy).sum()]) / crop.sum()
        want = align.to_crop(np.array([[*centre, 0.0]], np.float32), box, size)[0, :2]
        assert np.abs(got - want).max() < 0.05 * size / 128, (size, got, want)


def test_the_portrait_takes_the_clips_colour():
    from model.personal.portrait import clip_colour

    rng = np.random.default_rng(1)
    clip = rng.integers(60, 200, (20, 16, 16, 3)).astype(np.uint8)
    frame = np.clip(clip[3].astype(int) + [12, -5, 20], 0, 255).astype(np.uint8)  # a brighter, bluer instant
    portrait = np.repeat(np.repeat(frame, 2, 0), 2, 1)
    out, shift = clip_colour(portrait, frame, clip)
    assert np.allclose(shift, clip.reshape(-1, 3).mean(0) - frame.reshape(-1, 3).mean(0), atol=1e-3)
    assert np.abs(out.reshape(-1, 3).mean(0) - clip.reshape(-1, 3).mean(0)).max() < 0.6
    assert np.abs(shift - [-12, 5, -20]).max() < 3


def test_the_head_fields_are_where_the_head_sits_in_its_smoothed_crop():
    from model.personal import motion as M

    rng = np.random.default_rng(4)
    T, fps = 200, 25
    s = 60.0 * np.exp(rng.normal(0, 0.01, T))                                   # pose scale, px
    t = np.c_[320 + np.cumsum(rng.normal(0, 0.4, T)), 240 + rng.normal(0, 0.5, T), np.zeros(T)]
    # A crop that follows the head exactly holds it at its rest place: all fields 0.
    exact = align.crop_track(s, t, fps, smooth_seconds=0)
    assert np.allclose(align.head_in_crop(s, t, exact), 0, atol=1e-9)
    # The smoothed crop leaves the quick moves: the pivot's offset from the crop's rest
    # place, in crop sides, and the size ratio.
    boxes = align.crop_track(s, t, fps)
    head = align.head_in_crop(s, t, boxes)
    x0, y0, side = boxes.T
    pivot_in_crop = np.c_[(t[:, 0] - x0) / side, (t[:, 1] - y0) / side]
    assert np.allclose(head[:, :2], pivot_in_crop - [0.5, align.FRAME_CENTER_Y])
    assert np.allclose(np.exp(head[:, 2]) * align.FACE_H * side, s)
    assert head[:, :2].std() > 1e-4                                              # not all zero
    # Frames without a face take their neighbours' values, in range.
    found = np.ones(T, bool)
    found[50:53] = False
    head[50:53] = np.nan
    motion = M.with_head(np.zeros((T, len(M.MOTION_FIELDS)), np.float32), head, found)
    x = motion[:, M.MOTION_FIELDS.index("head_x")]
    assert np.isfinite(motion).all() and min(x[49], x[53]) - 1e-7 <= x[51] <= max(x[49], x[53]) + 1e-7
    assert np.allclose(x[:50], head[:50, 0], atol=1e-6)
