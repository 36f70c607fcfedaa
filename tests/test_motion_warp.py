"""The portrait warp a personal avatar carries (model/motion_warp.py): its landmarks are the
regression's, the fast warp is the exact piecewise-affine one (an opening mouth too), fields not
given stay at the portrait's, and the engine hands the warp to the DiT's condition and the
decoder's blend (the training side's batches are checked against the engine in
tests/test_personal_fit.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import MOTION_FIELDS

S = 128
_F = {n: i for i, n in enumerate(MOTION_FIELDS)}
_N = len(MOTION_FIELDS)


def _points(n: int = 60, seed: int = 0) -> np.ndarray:
    """Face-like landmarks: a jittered ring and a cloud inside it, crop pixels."""
    rng = np.random.default_rng(seed)
    a = np.linspace(0, 2 * np.pi, n // 2, endpoint=False)
    ring = np.c_[64 + 40 * np.cos(a), 64 + 48 * np.sin(a)]
    inner = rng.uniform(35, 93, (n - len(ring), 2))
    return np.r_[ring, inner]


def _texture(seed: int = 1) -> np.ndarray:
    """A smooth random RGB picture (uint8), so a misplaced pixel shows in the PSNR."""
    import cv2
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8), (S, S), interpolation=cv2.INTER_CUBIC)


def _fit(points: np.ndarray, seed: int = 2):
    """MotionLandmarks fitted on synthetic motion that moves the points: yaw shifts them
    sideways (3 px per unit), mouth_open stretches the lower half down (4 px per unit)."""
    from model.personal.motion_landmarks import MotionLandmarks

    rng = np.random.default_rng(seed)
    motion = rng.uniform(-1, 1, (200, _N))
    lower = (points[:, 1] > 64).astype(float)
    lm = points[None] + 3 * motion[:, _F["yaw"], None, None] * np.array([1.0, 0.0]) \
        + 4 * motion[:, _F["mouth_open"], None, None] * (lower[:, None] * np.array([0.0, 1.0]))
    return MotionLandmarks.fit(motion, lm), motion


def _warp(points, rest=None):
    from model.motion_warp import MotionWarp

    regression, _ = _fit(points)
    warp = MotionWarp(len(points), _N, S)
    warp.set_fit(regression.weights, points, np.zeros(_N) if rest is None else rest)
    return warp, regression


def _unit(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).float().div(127.5).sub(1).permute(2, 0, 1)[None]


def _uint8(t: torch.Tensor) -> np.ndarray:
    return ((t + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / max(1e-10, np.mean((a.astype(float) - b.astype(float)) ** 2))))


def test_landmarks_are_the_regressions():
    points = _points()
    warp, regression = _warp(points)
    motion = np.random.default_rng(5).uniform(-1, 1, (7, _N))
    got = warp.landmarks(torch.from_numpy(motion).float()).numpy()
    assert np.allclose(got, regression.predict(motion), atol=1e-3)


def test_rest_motion_leaves_the_portrait_and_motion_moves_it():
    points, image = _points(), _texture()
    rest = np.random.default_rng(3).uniform(-0.3, 0.3, _N)
    warp, _ = _warp(points, rest)
    still = _uint8(warp.warp(_unit(image), torch.from_numpy(rest).float()[None]))[0]
    assert _psnr(still, image) > 45   # the identity grid up to float rounding
    moved = rest.copy()
    moved[_F["yaw"]] += 1.0
    shifted = _uint8(warp.warp(_unit(image), torch.from_numpy(moved).float()[None]))[0]
    assert _psnr(shifted, image) < 30
    # Inside the face the content moved right by ~3 px: the warped picture there is the
    # portrait's from 3 px to the left.
    assert _psnr(shifted[50:80, 53:75], image[50:80, 50:72]) > _psnr(shifted[50:80, 53:75], image[50:80, 53:75]) + 6


def test_fast_warp_matches_the_exact_piecewise_affine_warp():
    from model.personal.warp import warp_portrait

    points, image = _points(), _texture()
    warp, regression = _warp(points)
    motion = np.random.default_rng(7).uniform(-1, 1, (5, _N))
    fast = _uint8(warp.warp(_unit(image), torch.from_numpy(motion).float()))
    # The classical warp (its own triangulation of each frame's landmarks), from rest (all
    # zeros) landmarks to each frame's. The meshes differ where a motion flips an edge.
    src = regression.predict(np.zeros((1, _N)))[0]
    exact = np.stack([warp_portrait(image, src, dst) for dst in regression.predict(motion)])
    assert _psnr(fast, exact) > 38
    assert _psnr(fast, exact) > _psnr(np.broadcast_to(image, exact.shape), exact) + 15


def test_absolute_warp_goes_onto_the_predicted_landmarks_not_the_portraits_own():
    """A portrait whose landmarks sit 1.5 px right of where its motion predicts them (its
    head off the mean in the crop at that instant): the relative warp keeps the offset in
    every frame, the absolute one puts the face where the motion predicts it, as the
    classical warp onto the predicted landmarks does."""
    from model.motion_warp import MotionWarp
    from model.personal.warp import warp_portrait

    points, image = _points(), _texture()
    regression, _ = _fit(points)
    offset = np.array([1.5, 0.0])
    motion = np.random.default_rng(9).uniform(-1, 1, (4, _N))
    fields = torch.from_numpy(motion).float()
    warps = {}
    for absolute in (False, True):
        warps[absolute] = MotionWarp(len(points), _N, S, absolute=absolute)
        warps[absolute].set_fit(regression.weights, points + offset, np.zeros(_N))
    t = {a: w._tables(torch.device("cpu")) for a, w in warps.items()}
    predicted = regression.predict(motion)
    moved_abs = warps[True]._moved(t[True], _features(fields))[:, :len(points)].numpy()
    moved_rel = warps[False]._moved(t[False], _features(fields))[:, :len(points)].numpy()
    assert np.abs(moved_abs - predicted).max() < 1e-3
    at_rest = regression.predict(np.zeros((1, _N)))[0]
    assert np.abs(moved_rel - (points + offset + predicted - at_rest)).max() < 1e-3
    exact = np.stack([warp_portrait(image, points + offset, dst) for dst in predicted])
    fast = {a: _uint8(w.warp(_unit(image), fields)) for a, w in warps.items()}
    assert _psnr(fast[True], exact) > 38
    assert _psnr(fast[True], exact) > _psnr(fast[False], exact) + 8


def _features(fields):
    from model.motion_warp import features

    return features(fields)


def test_the_absolute_flag_travels_with_the_model_file():
    from model.avatar import AvatarModel
    from model.config import from_name

    tiny = from_name("tiny")
    cfg = dataclasses.replace(tiny, motion_warp=8, warp_absolute=True,
                              vae=dataclasses.replace(tiny.vae, reference_decoder=True))
    model = AvatarModel(cfg)
    assert model.warp.absolute
    back = type(cfg).from_dict(cfg.to_dict())
    assert back.warp_absolute and AvatarModel(back).warp.absolute
    old = cfg.to_dict()
    del old["warp_absolute"]  # an avatar fitted before the flag: relative, as it was trained
    assert not type(cfg).from_dict(old).warp_absolute


def _slit_mouth():
    """A closed-lip face: a ring of landmarks and four rows of lip landmarks (the inner two
    0.6 px apart), the picture of it, and a warp whose mouth_open (1.0) moves the lower
    inner lip and the lower lip 10 px down. -> warp, points, opening (N, 2), image."""
    from model.motion_warp import MotionWarp

    a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = np.c_[64 + 44 * np.cos(a), 64 + 50 * np.sin(a)]
    xs = np.arange(52.0, 77.0, 4.0)
    lips = {"upper": 76.0, "upper inner": 80.0, "lower inner": 80.6, "lower": 85.0}
    points = np.r_[ring, *[np.c_[xs, np.full_like(xs, y)] for y in lips.values()]]
    image = np.full((S, S, 3), (200, 150, 130), np.uint8)
    image[76:86, 50:79] = (170, 60, 60)   # lips
    image[80, 50:79] = (20, 10, 10)       # the line where they meet
    opening = np.zeros_like(points)
    opening[len(ring) + 2 * len(xs):, 1] = 10.0
    landmark_map = np.zeros((1 + 2 * _N, 2 * len(points)))
    landmark_map[0] = points.ravel()
    landmark_map[1 + _F["mouth_open"]] = opening.ravel()
    warp = MotionWarp(len(points), _N, S)
    warp.set_fit(landmark_map, points, np.zeros(_N))
    return warp, points, opening, image


def test_an_opening_mouth_stretches_the_lip_line_as_the_exact_warp_does():
    """A closed-lip portrait: its inner-lip triangles are a slit. Opening the mouth stretches
    the slit's dark line over the opening (the exact piecewise-affine map); moving each pixel
    back by the portrait's displacement field (the first-order guess) would fill it with
    the skin above the lips."""
    from model.personal.warp import warp_portrait

    warp, points, opening, image = _slit_mouth()
    fields = torch.zeros(1, _N)
    fields[0, _F["mouth_open"]] = 1.0
    got = _uint8(warp.warp(_unit(image), fields))[0]
    exact = warp_portrait(image, points, points + opening)
    gap = (slice(83, 89), slice(56, 73))  # inside the opened mouth
    assert got[gap].mean() < 60 and exact[gap].mean() < 60          # the stretched dark line
    assert np.abs(got[gap].astype(int) - exact[gap]).mean() < 8
    assert _psnr(got, exact) > 35


def test_the_mouth_box_follows_the_mouths_landmarks():
    warp, points, _, _ = _slit_mouth()
    mouth = list(range(24, len(points)))  # the lip rows
    fields = torch.zeros(2, _N)
    fields[1, _F["mouth_open"]] = 1.0
    mask = warp.mouth_mask(fields, mouth)[:, 0]
    assert mask.shape == (2, S, S) and mask.min() >= 0 and mask.max() <= 1
    # Lips x 52-76, y 76-85 at rest (box grown by 30 %, fading out over 3 px).
    assert torch.all(mask[:, 80, 52:77] == 1) and mask[0, 20, 20] == 0 and mask[0, 80, 100] == 0
    # The open mouth's lower lip is at 95: the box reaches down there only when it is open.
    assert mask[0, 95, 64] == 0 and mask[1, 95, 64] == 1
    assert 0 < mask[0, 89, 64] < 1  # the soft edge


def test_fields_not_given_take_the_portraits_motion():
    points = _points()
    rest = np.arange(_N, dtype=np.float32) / 10
    warp, _ = _warp(points, rest)
    driving = torch.zeros(4, 2 * _N)
    driving[:, _F["yaw"]], driving[:, _N + _F["yaw"]] = 0.7, 1.0   # yaw given, nothing else
    fields = warp.fields(driving)
    assert torch.allclose(fields[:, _F["yaw"]], torch.tensor(0.7))
    others = [i for i in range(_N) if i != _F["yaw"]]
    assert torch.allclose(fields[:, others], torch.from_numpy(rest[others]).expand(4, -1))
    # A latent's fields: the mean over its group of frames.
    driving[2:, _F["yaw"]] = -0.7
    assert torch.allclose(warp.latent_fields(driving, 2)[:, _F["yaw"]], torch.tensor([0.7, -0.7]))
    assert torch.allclose(warp.latent_fields(driving, 4)[:, _F["yaw"]], torch.tensor([0.0]), atol=1e-6)


@pytest.fixture(scope="module")
def warped_engine():
    """The tiny model (random weights) with a motion warp, as a personal avatar's, and its portrait."""
    from model.avatar import AvatarModel
    from model.config import from_name
    from model.engine import Engine

    cfg = from_name("tiny")
    cfg.vae = dataclasses.replace(cfg.vae, reference_decoder=True)  # as the bundled weights have it
    cfg.motion_warp = 60
    cfg.stream = cfg.stream.replace(knot_frames=0)
    model = AvatarModel.random(cfg)
    regression, _ = _fit(_points())
    model.warp.set_fit(regression.weights, _points(), np.zeros(_N))
    return Engine(model), _texture()


def _driving(engine, stream, yaw: float):
    from model.timeline import StepInput

    span = stream.next_span()
    motion = np.zeros((span.driving_frames, 2 * _N), np.float32)
    motion[:, _F["yaw"]], motion[:, _N + _F["yaw"]] = yaw, 1.0
    return StepInput(span, np.zeros(span.audio_to - span.audio_from, np.float32), motion)


def test_the_engine_conditions_and_blends_on_the_warp(warped_engine):
    from model.knot_forcing import warped_latents

    engine, portrait = warped_engine
    stream = engine.start(portrait)
    state, recipe = stream.state, engine.recipe
    inp = _driving(engine, stream, 1.0)
    with torch.inference_mode():
        plan = recipe.plan(state, stream.knobs, inp, torch.Generator().manual_seed(0))
        Fr = stream.knobs.chunk_frames
        assert plan.hint.shape[2] == Fr
        # Latent 0's group is 3 frames before the stream (the portrait's rest) and frame 0.
        yaw = torch.tensor([0.25] + [1.0] * (Fr - 1))
        fields = torch.zeros(Fr, _N)
        fields[:, _F["yaw"]] = yaw
        assert torch.allclose(plan.hint, warped_latents(engine.model.vae, engine.model.warp, state.portrait, fields),
                              atol=1e-5)
        assert not torch.allclose(plan.hint[:, :, 1:], state.reference_latent, atol=1e-2)
        n = engine.timeline.frames_for_latents(Fr, first=True)
        blend = recipe.blend_frames(state, plan, 0, n)
        assert blend.shape == (1, n, 3, S, S)
        one = torch.zeros(1, _N)
        one[0, _F["yaw"]] = 1.0
        assert torch.allclose(blend[0, 1], engine.model.warp.warp(state.portrait, one)[0], atol=1e-6)
    # The frames follow the warp: the same stream driven with another yaw differs.
    a = engine.start(portrait).step(_driving(engine, stream, 1.0))
    b = engine.start(portrait).step(_driving(engine, stream, -1.0))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5


def test_a_model_file_keeps_its_warp(warped_engine, tmp_path):
    from model.weights import load_model, save_model

    engine, _ = warped_engine
    path = tmp_path / "warped.safetensors"
    save_model(engine.model, path)
    loaded = load_model(path)
    assert loaded.config.motion_warp == 60
    for name in ("landmark_map", "points", "rest"):
        assert torch.equal(getattr(loaded.warp, name), getattr(engine.model.warp, name))


def test_calibrated_offsets_reach_the_decoders_blend(warped_engine):
    """A personal avatar's calibrated blend offsets (ModelConfig.warp_blend) ride along the
    blend frames as a 4th channel, face offset outside the mouth box, mouth offset inside;
    the decoder's blend adds them to its logit."""
    from model.vae_blocks import CausalState, ReferenceBlend, number_slots

    engine, portrait = warped_engine
    cfg = engine.config
    mouth = list(range(40, 60))
    cfg.warp_mouth, cfg.warp_blend = tuple(mouth), (-3.0, 5.0)
    try:
        stream = engine.start(portrait)
        with torch.inference_mode():
            plan = engine.recipe.plan(stream.state, stream.knobs, _driving(engine, stream, 0.5), torch.Generator())
            n = engine.timeline.frames_for_latents(stream.knobs.chunk_frames, first=True)
            blend = engine.recipe.blend_frames(stream.state, plan, 0, n)
            mask = engine.model.warp.mouth_mask(plan.motion[-plan.motion_first:][:n], mouth)  # from frame 0
        assert blend.shape == (1, n, 4, S, S)
        assert torch.allclose(blend[0, :, 3:], -3.0 + 8.0 * mask)
        assert (mask == 1).any() and (mask == 0).any()
        frames = stream.step(_driving(engine, stream, 0.5))
        assert frames.shape[1:] == (S, S, 3)
    finally:
        cfg.warp_mouth, cfg.warp_blend = (), (0.0, 0.0)
    layer = ReferenceBlend(8)
    torch.nn.init.normal_(layer.conv.weight)
    x, rgb = torch.randn(1, 2, 8, 4, 4), torch.rand(1, 2, 3, 8, 8)
    reference, offset = torch.rand(1, 2, 3, 8, 8), torch.randn(1, 2, 1, 8, 8) * 3
    logit = layer.logits(x, CausalState(number_slots(layer), keep=False))
    out = layer(x, rgb, torch.cat([reference, offset], 2), CausalState(number_slots(layer), keep=False))
    assert torch.allclose(out, rgb + torch.sigmoid(logit + offset) * (reference - rgb), atol=1e-6)
    assert not torch.allclose(out, layer(x, rgb, reference, CausalState(number_slots(layer), keep=False)), atol=1e-3)


def test_the_head_fields_small_as_they_are_move_the_predicted_landmarks():
    """A real head sits in its smoothed crop within a few thousandths of the side (std ~0.003:
    tenths of a pixel at 128 px). The regression must keep that: a ridge sized for fields of
    order 1 shrank it away (docs/benchmarks.md)."""
    from model.personal.motion_landmarks import MotionLandmarks

    rng = np.random.default_rng(11)
    points = _points()
    motion = np.zeros((800, _N))
    motion[:, _F["yaw"]] = rng.uniform(-0.3, 0.3, 800)
    motion[:, _F["head_x"]] = rng.normal(0, 0.003, 800)
    motion[:, _F["head_y"]] = rng.normal(0, 0.002, 800)
    motion[:, _F["head_scale"]] = rng.normal(0, 0.003, 800)
    centre = np.array([64.0, 65.0])
    lm = (centre + (points - centre)[None] * np.exp(motion[:, _F["head_scale"], None, None])
          + 3 * motion[:, _F["yaw"], None, None] * np.array([1.0, 0.0])
          + S * motion[:, None, [_F["head_x"], _F["head_y"]]])
    fit, held = slice(0, 600), slice(600, 800)
    regression = MotionLandmarks.fit(motion[fit], lm[fit])
    err = np.linalg.norm(regression.predict(motion[held]) - lm[held], axis=-1).mean()
    without = motion.copy()
    without[:, [_F["head_x"], _F["head_y"], _F["head_scale"]]] = 0
    blind = np.linalg.norm(MotionLandmarks.fit(without[fit], lm[fit]).predict(without[held]) - lm[held], axis=-1).mean()
    assert blind > 0.3          # the head's moves are a third of a pixel
    assert err < 0.1 * blind


def test_the_fields_a_model_reads_are_told_from_its_config():
    """A session names the fields its model reads and acks the others as ignored
    (streaming/messages.py): the head fields only where a portrait warp moves the face."""
    from model.config import HEAD_FIELDS, from_name, motion_fields_read

    cartoon = from_name("tiny")
    assert set(motion_fields_read(cartoon)) == set(MOTION_FIELDS) - set(HEAD_FIELDS)
    warped = dataclasses.replace(cartoon, domain="personal", motion_warp=478,
                                 vae=dataclasses.replace(cartoon.vae, reference_decoder=True))
    assert motion_fields_read(warped) == MOTION_FIELDS
    assert motion_fields_read(dataclasses.replace(cartoon, domain="photoreal")) == ()


def _open_mouth_warp():
    """The slit-mouth face of `_slit_mouth`, plus an open-mouth portrait of the same face: the
    lower lip 10 px down and a light interior (teeth) between the inner lips."""
    from model.motion_warp import MotionWarp

    closed, points, opening, image = _slit_mouth()
    n_ring, n_row = 24, 7
    mouth = tuple(range(n_ring, len(points)))
    up, down = n_ring + n_row + 3, n_ring + 2 * n_row + 3     # the middle of the inner lips
    opened_points = points + opening
    opened = np.full((S, S, 3), (200, 150, 130), np.uint8)
    opened[76:81, 50:79] = (170, 60, 60)     # upper lip
    opened[81:90, 50:79] = (235, 235, 225)   # the teeth, in the opening
    opened[90:96, 50:79] = (170, 60, 60)     # lower lip, moved down
    warp = MotionWarp(len(points), _N, S, mouth=mouth, open_pair=(up, down))
    warp.set_fit(closed.landmark_map.numpy(), points, np.zeros(_N))
    warp.set_open(opened, opened_points)
    return warp, closed, image, opened


def test_an_open_mouth_portrait_fills_the_opening_a_closed_one_stretches():
    """With an open-mouth portrait the warp takes the opening from it (teeth, not the closed
    portrait's stretched lip line), crossfading by how far the mouth opens; a closed mouth
    is the closed portrait's warp exactly, and nothing outside the mouth box changes."""
    warp, closed, image, _ = _open_mouth_warp()
    fields = torch.zeros(3, _N)
    fields[1, _F["mouth_open"]], fields[2, _F["mouth_open"]] = 0.5, 1.0
    weight = warp.open_weight(fields)
    assert weight[0] == 0 and abs(float(weight[1]) - 0.5) < 0.02 and weight[2] == 1
    got = warp.warp(_unit(image), fields)
    plain = closed.warp(_unit(image), fields)
    assert torch.equal(got[0], plain[0])
    gap = (slice(83, 89), slice(56, 73))  # inside the opened mouth
    got8, plain8 = _uint8(got), _uint8(plain)
    assert plain8[2][gap].mean() < 60 and got8[2][gap].mean() > 200      # stretched line -> teeth
    half = got8[1][gap[0].start - 3:gap[0].stop - 3, gap[1]].astype(float).mean()
    assert plain8[1][gap[0].start - 3:gap[0].stop - 3, gap[1]].mean() < half < got8[2][gap].mean()
    box = warp.mouth_mask(fields, warp.mouth)[:, 0] > 0
    assert torch.equal(got.permute(0, 2, 3, 1)[~box], plain.permute(0, 2, 3, 1)[~box])


def test_a_sharp_mouth_keeps_the_line_of_closed_lips():
    """sharp_mouth samples the mouth box bicubic as far as the predicted inner lips are
    closed: the face moved half a pixel, the 1-px dark line where the closed lips meet stays
    darker than bilinear's two half-dark rows (which the landmark model reads as lips
    slightly parted); an open mouth and everything outside the box stay bilinear."""
    from model.motion_warp import SHARP_GAP

    warp, _, image, _ = _open_mouth_warp()
    landmark_map = warp.landmark_map.numpy().copy()
    down = np.zeros((len(warp.points), 2))
    down[:, 1] = 0.5
    landmark_map[1 + _F["pitch"]] = down.ravel()
    warp.set_fit(landmark_map, warp.points.numpy(), np.zeros(_N))
    fields = torch.zeros(2, _N)
    fields[:, _F["pitch"]] = 1.0
    fields[1, _F["mouth_open"]] = 1.0
    closed = warp.closed_weight(fields)
    assert abs(float(closed[0]) - (1 - 0.6 / SHARP_GAP)) < 1e-4 and closed[1] == 0  # the slit is 0.6 px; open: 10.6
    plain = warp.warp(_unit(image), fields)
    sharp = warp.warp(_unit(image), fields, sharp_mouth=True)
    assert torch.equal(sharp[1], plain[1])
    box = warp.mouth_mask(fields, warp.mouth)[0, 0]
    assert torch.equal(sharp[0].permute(1, 2, 0)[box == 0], plain[0].permute(1, 2, 0)[box == 0])
    cubic = F.grid_sample(_unit(image), warp.grid(fields[:1]), mode="bicubic", padding_mode="border",
                          align_corners=True).clamp(-1, 1)
    want = torch.lerp(plain[:1], cubic, closed[0])
    assert torch.allclose(sharp[0].permute(1, 2, 0)[box == 1], want[0].permute(1, 2, 0)[box == 1], atol=1e-6)
    line = (slice(78, 84), slice(56, 73))
    assert _uint8(sharp)[0][line][..., 0].min() < _uint8(plain)[0][line][..., 0].min() - 4  # red: 20 on 170 lips
    # A warp without the inner-lip pair has nothing to tell a closed mouth by: bilinear.
    bare, _ = _warp(_points())
    assert torch.equal(bare.warp(_unit(image), fields, sharp_mouth=True), bare.warp(_unit(image), fields))


def test_where_the_lips_cross_the_open_mouth_keeps_its_teeth(monkeypatch):
    """A lower inner-lip landmark driven past its neighbour folds the moved mesh: some pixels
    in the opening lie in no triangle. The open portrait samples them from the triangle next
    to the fold (teeth), not at the closed portrait's first-order guess (its lip line: the
    dark and red dots of the first refit, docs/benchmarks.md)."""
    import model.motion_warp as motion_warp

    warp, _, image, _ = _open_mouth_warp()
    landmark_map = warp.landmark_map.numpy().copy()
    fold = np.zeros((len(warp.points), 2))
    fold[warp.open_pair[1], 0] = 7.0            # the middle lower inner lip, 7 px sideways: 4 px apart
    landmark_map[1 + _F["mouth_wide"]] = fold.ravel()
    warp.set_fit(landmark_map, warp.points.numpy(), np.zeros(_N))
    fields = torch.zeros(1, _N)
    fields[0, _F["mouth_open"]] = fields[0, _F["mouth_wide"]] = 1.0
    held = {}
    locate = motion_warp._locate

    def recorded(*args):
        found, tri = locate(*args)
        held["found"] = found.reshape(S, S)
        return found, tri

    monkeypatch.setattr(motion_warp, "_locate", recorded)
    got = _uint8(warp.warp(_unit(image), fields))[0]
    gap = (slice(82, 89), slice(54, 75))        # inside the opened mouth
    assert (~held["found"][gap]).sum() > 0      # the fold leaves holes there
    assert got[gap].min() >= 200                 # and every pixel of the opening is teeth


def test_the_open_mouth_portrait_travels_with_the_model_file(tmp_path):
    from model.avatar import AvatarModel
    from model.config import from_name
    from model.weights import load_model, save_model

    warp, _, _, opened = _open_mouth_warp()
    tiny = from_name("tiny")
    cfg = dataclasses.replace(tiny, motion_warp=len(warp.points), warp_absolute=False, warp_mouth=warp.mouth,
                              warp_open=warp.open_pair, vae=dataclasses.replace(tiny.vae, reference_decoder=True))
    model = AvatarModel(cfg)
    model.warp.load_state_dict(warp.state_dict())
    save_model(model, tmp_path / "open.safetensors")
    back = load_model(tmp_path / "open.safetensors")
    assert back.config.warp_open == warp.open_pair and back.warp.open_pair == warp.open_pair
    assert torch.equal(back.warp.open_image, warp.open_image) and torch.equal(back.warp.open_points, warp.open_points)
    assert _uint8(back.warp.open_image[None])[0].tolist() == opened.tolist()
    with pytest.raises(ValueError, match="warp_open"):
        dataclasses.replace(cfg, warp_open=(0,))
    with pytest.raises(ValueError, match="warp_open"):
        dataclasses.replace(cfg, warp_mouth=())


def test_the_open_mouth_portrait_is_a_clean_wide_open_frame():
    from model.personal.portrait import OPEN_MIN, choose_open

    rng = np.random.default_rng(3)
    T = 200
    motion = np.zeros((T, _N))
    motion[:, _F["mouth_open"]] = rng.uniform(0, 0.3, T)
    motion[[10, 20, 30], _F["mouth_open"]] = 0.9, 0.95, 0.92   # the widest openings...
    motion[20, _F["yaw"]] = 0.4                                 # ...the widest with the head turned away
    frames = np.repeat(_texture()[None], T, 0)
    landmarks = np.repeat(_points()[None], T, 0)
    found = np.ones(T, bool)
    found[30] = False                                           # no face: never chosen
    assert choose_open(motion, frames, landmarks, found, portrait_index=0) == 10
    quiet = motion.copy()
    quiet[:, _F["mouth_open"]] = np.minimum(quiet[:, _F["mouth_open"]], OPEN_MIN * 0.9)
    assert choose_open(quiet, frames, landmarks, found, portrait_index=0) is None


def _body_warp(torso_disp):
    """_warp's face, plus body points whose displacement is torso_disp(motion) (T, n, 2),
    regressed as the fit does; torso line at y = 100."""
    from model.motion_warp import MotionWarp
    from model.personal.motion_landmarks import MotionLandmarks
    from model.personal.torso import TORSO_POINTS

    points = _points()
    regression, motion = _fit(points)
    plain = MotionWarp(len(points), _N, S)
    body = MotionWarp(len(points), _N, S, torso=TORSO_POINTS)
    for w in (plain, body):
        w.set_fit(regression.weights, points, np.zeros(_N))
    body.set_torso(MotionLandmarks.fit(motion, torso_disp(motion)).weights, 100.0)
    return plain, body


def test_the_body_below_the_chin_moves_with_the_motion():
    from model.motion_warp import TORSO_RAMP, torso_columns
    from model.personal.torso import TORSO_POINTS

    # pitch moves body point k right by (k + 1) px per unit (the face's landmarks ignore pitch).
    def disp(motion):
        k = np.arange(TORSO_POINTS) + 1.0
        return np.stack([motion[:, _F["pitch"], None] * k, np.zeros((len(motion), TORSO_POINTS))], -1)

    plain, body = _body_warp(disp)
    fields = torch.zeros(1, _N)
    fields[0, _F["pitch"]] = 1.0
    d = body.torso_displacement(fields)[0]                                    # (S, S, 2)
    cols = torso_columns(TORSO_POINTS, S)
    below = 100 + int(TORSO_RAMP) + 1
    assert d[:100].abs().max() < 1e-6                                        # above the line: no motion
    for k, x in enumerate(cols):                                             # at a body point: its displacement
        assert float(d[below, round(x), 0]) == pytest.approx(k + 1, abs=0.15)
    mid = round((cols[1] + cols[2]) / 2)                                     # between two: interpolated
    assert float(d[below, mid, 0]) == pytest.approx(2.5, abs=0.15)
    assert float(d[below, 0, 0]) == pytest.approx(1, abs=1e-3) and float(d[below, S - 1, 0]) == pytest.approx(5, abs=1e-3)
    assert float(d[100 + int(TORSO_RAMP) // 2, round(cols[0]), 0]) == pytest.approx(0.5, abs=0.1)  # fading in

    # The warped picture: the face as without body points, the body shifted by its displacement.
    def uniform(motion):  # every body point (2, 1) px per unit of pitch
        return np.stack([2 * motion[:, _F["pitch"]], motion[:, _F["pitch"]]], -1)[:, None].repeat(TORSO_POINTS, 1)

    plain, body = _body_warp(uniform)
    image = _unit(_texture())
    fields = torch.zeros(1, _N)
    fields[0, _F["pitch"]], fields[0, _F["yaw"]] = 1.5, 0.4                  # body (3, 1.5) px; face 1.2 px right
    a, b = _uint8(plain.warp(image, fields))[0], _uint8(body.warp(image, fields))[0]
    assert _psnr(a[:100], b[:100]) > 50                                      # the face is the plain warp's
    y0 = below + 2
    moved = plain.warp(image, fields)
    moved = torch.nn.functional.grid_sample(moved, _shift_grid(3.0, 1.5), mode="bilinear", padding_mode="border",
                                            align_corners=True)
    assert _psnr(b[y0:S - 2, 4:S - 4], _uint8(moved)[0][y0:S - 2, 4:S - 4]) > 40
    assert _psnr(b[y0:S - 2, 4:S - 4], a[y0:S - 2, 4:S - 4]) < 30           # and that is not where it was


def _shift_grid(dx: float, dy: float) -> torch.Tensor:
    """grid_sample coordinates that move a picture by (dx, dy) px."""
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    return torch.stack([(xs - dx) * 2 / (S - 1) - 1, (ys - dy) * 2 / (S - 1) - 1], -1)[None]


def test_the_body_points_are_tracked_in_the_clip():
    import cv2

    from model.personal.torso import TORSO_POINTS, body_line, track

    image = _texture(seed=4)
    shifts = [(0.0, 0.0), (2.0, 1.0), (-1.5, 0.5), (3.0, -2.0)]
    frames = np.stack([cv2.warpAffine(image, np.float32([[1, 0, dx], [0, 1, dy]]), (S, S), borderMode=cv2.BORDER_REFLECT)
                       for dx, dy in shifts])
    got = track(frames, image, 80.0)
    assert got.shape == (len(shifts), TORSO_POINTS, 2)
    assert np.abs(got - np.array(shifts)[:, None]).max() < 0.3
    chin = np.zeros((478, 3), np.float32)
    chin[152, 1] = 100.0
    assert body_line(chin, S) == 100.0
    chin[152, 1] = S - 4.0                                                   # no body under the chin
    assert body_line(chin, S) is None
    chin[152, 1] = np.nan
    assert body_line(chin, S) is None


def test_the_body_points_travel_with_the_model_file(tmp_path):
    from model.avatar import AvatarModel
    from model.config import MAX_TORSO_POINTS, from_name
    from model.personal.torso import TORSO_POINTS
    from model.weights import load_model, save_model

    _, body = _body_warp(lambda m: np.stack([m[:, _F["pitch"]], m[:, _F["roll"]]], -1)[:, None].repeat(TORSO_POINTS, 1))
    tiny = from_name("tiny")
    cfg = dataclasses.replace(tiny, motion_warp=len(body.points), warp_torso=TORSO_POINTS,
                              vae=dataclasses.replace(tiny.vae, reference_decoder=True))
    model = AvatarModel(cfg)
    model.warp.load_state_dict(body.state_dict())
    save_model(model, tmp_path / "body.safetensors")
    back = load_model(tmp_path / "body.safetensors")
    assert back.config.warp_torso == TORSO_POINTS and back.warp.torso == TORSO_POINTS
    assert torch.equal(back.warp.torso_map, body.torso_map) and float(back.warp.torso_line) == 100.0
    fields = torch.rand(3, _N)
    assert torch.allclose(back.warp.torso_displacement(fields), body.torso_displacement(fields))
    for bad in (MAX_TORSO_POINTS + 1, -1):
        with pytest.raises(ValueError, match="warp_torso"):
            dataclasses.replace(cfg, warp_torso=bad)
    with pytest.raises(ValueError, match="warp_torso"):
        dataclasses.replace(tiny, warp_torso=TORSO_POINTS)                   # no warp to carry them


def test_the_fit_keeps_the_body_only_where_it_brings_the_warp_nearer_held_back_frames():
    """fit.body_helps on a clip whose body shifts with pitch (the face still): the regression of
    the tracked shift is kept; a 'tracked' shift that is noise, on a body that never moves, is
    not (both judged on the last frames, which the regression does not see)."""
    import cv2
    from types import SimpleNamespace

    from model.personal.fit import body_helps
    from model.personal.motion_landmarks import MotionLandmarks
    from model.personal.torso import TORSO_POINTS

    rng = np.random.default_rng(8)
    image, points, n = _texture(seed=6), _points(), 120
    motion = np.zeros((n, _N), np.float32)
    motion[:, _F["pitch"]] = rng.uniform(-1, 1, n)
    shift = 3 * motion[:, _F["pitch"]]                                       # the body: 3 px right per unit

    def clip(shifts):
        frames = []
        for dx in shifts:
            moved = cv2.warpAffine(image, np.float32([[1, 0, dx], [0, 1, 0]]), (S, S), borderMode=cv2.BORDER_REFLECT)
            frames.append(np.concatenate([image[:100], moved[100:]]))        # the body below y = 100 moves
        lms = np.repeat(np.c_[points, np.zeros(len(points))][None], n, 0).astype(np.float32)
        return SimpleNamespace(frames=np.stack(frames), landmarks=lms, motion=motion, portrait_index=0, size=S)

    check = slice(90, n)
    moving = clip(shift)
    moving.frames[0] = image                                                 # the portrait: the body at rest
    landmarks = MotionLandmarks.fit(motion, moving.landmarks)
    tracked = np.repeat(np.c_[shift, np.zeros(n)][:, None], TORSO_POINTS, 1)
    assert body_helps(moving, landmarks, 96.0, tracked, check)

    still = clip(np.zeros(n))
    noise = rng.normal(0, 2, (n, TORSO_POINTS, 2))
    noise[:, :, 0] += 2 * motion[:, _F["pitch"], None] * (np.arange(n) < 90)[:, None]  # a spurious link in the first frames
    assert not body_helps(still, landmarks, 96.0, noise, check)
