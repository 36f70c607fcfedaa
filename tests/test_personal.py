"""Personal avatars: pose math on projected landmark sets (exact), the motion measurement
on world renders of known motion (mediapipe's face mesh on cartoon heads), the whole
preparation path on a small synthetic clip through the CLI, the warp baseline and the
personal eval on that clip. Nothing is downloaded: the clip is rendered here."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from model.config import MOTION_FIELDS
from model.personal import geometry as G
from model.personal import landmarks as L
from model.personal import motion as M

_F = {n: i for i, n in enumerate(MOTION_FIELDS)}


@pytest.fixture(scope="module")
def neutral_landmarks():
    """Face mesh landmarks of one frontal, neutral world head at 256 px."""
    from model.train import world

    frame = world.render_frame(world.identity_from_seed(7), world.neutral_motion(), 256)
    lms, found = L.track_frames([frame])
    assert found.all()
    return lms[0].astype(np.float64)


def project(template: G.Template, yaw, pitch, roll, s=90.0, t=(130.0, 120.0, 5.0)) -> np.ndarray:
    return s * template.points @ G.rotation(yaw, pitch, roll).T + np.array(t)


# ------------------------------------------------------------------------------------------
# Geometry on projected landmark sets: exact
# ------------------------------------------------------------------------------------------


def test_euler_inverts_rotation():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform(-1.0, 1.0, (50, 3)):
        assert np.allclose(G.euler(G.rotation(yaw, pitch, roll)), (yaw, pitch, roll), atol=1e-9)


def test_rotation_matches_world_renderer():
    """The world's _Pose builds the same matrix (so 'yaw' here is the renderer's yaw)."""
    from model.train import world

    m = world.neutral_motion()
    m[[_F["yaw"], _F["pitch"], _F["roll"]]] = (0.3, -0.2, 0.1)
    pose = world._Pose(world.identity_from_seed(0), m, 128)
    assert np.allclose(pose.rot, G.rotation(0.3, -0.2, 0.1))


def test_pose_recovered_exactly_from_projected_template(neutral_landmarks):
    template = G.build_template(neutral_landmarks[None])
    for ypr in [(0.0, 0.0, 0.0), (0.4, -0.2, 0.1), (-0.7, 0.3, -0.25)]:
        s, R, t = G.fit_pose(project(template, *ypr), template)
        assert np.allclose(G.euler(R), ypr, atol=1e-6)
        assert s == pytest.approx(90.0) and np.allclose(t, (130.0, 120.0, 5.0))


def test_template_is_in_world_face_units(neutral_landmarks):
    """Eyes at v = -0.12, mouth at v = 0.55 (units of the half-height), x = 0 on the midline,
    the face toward +z; the pivot (origin) behind the eyes."""
    q = G.build_template(neutral_landmarks[None]).points
    eyes = q[[L.EYE_L_OUTER, L.EYE_L_INNER, L.EYE_R_OUTER, L.EYE_R_INNER]].mean(0)
    mouth = q[[L.MOUTH_L, L.MOUTH_R]].mean(0)
    assert eyes[0] == pytest.approx(0.0, abs=1e-9) and eyes[1] == pytest.approx(G.EYE_V)
    assert mouth[1] - eyes[1] == pytest.approx(G.MOUTH_V - G.EYE_V)
    # mediapipe's depth puts the mouth ahead of the eyes by MOUTH_LEAN (see geometry.py)
    assert mouth[2] - eyes[2] == pytest.approx((G.MOUTH_V - G.EYE_V) * math.tan(G.MOUTH_LEAN), abs=1e-9)
    assert eyes[2] > 0.3 and q[1, 2] > eyes[2]  # nose tip (landmark 1) ahead of the eyes


def _expressions(template: G.Template, opening: float, smile: float, brow: float) -> np.ndarray:
    """The template with the world's geometry of these expression values applied."""
    q = template.points.copy()
    q[L.LIP_IN_DOWN, 1] += 0.32 * opening
    q[[L.MOUTH_L, L.MOUTH_R], 1] -= 0.07 * smile
    q[[L.MOUTH_L, L.MOUTH_R], 1] += 0.32 * opening / 2  # corners stay level with the gap's middle
    q[list(L.BROW_L) + list(L.BROW_R), 1] -= 0.2 * (brow - 0.5)
    return q


def test_expressions_measure_in_world_units_under_any_pose(neutral_landmarks):
    """Landmark sets with known expression geometry, projected under a head pose, measure
    back to the values that geometry encodes (the units of model/train/world.py)."""
    template = G.build_template(neutral_landmarks[None])
    neutral_q = template.points[None]
    cal = M.Calibration(template, {k: float(v[0]) for k, v in M.raw_features(neutral_q).items()})
    cases = [(0.0, 0.0, 0.5), (0.6, 0.0, 0.5), (0.0, 0.8, 0.5), (0.3, 0.4, 0.9)]
    lms = np.stack([project(G.Template(_expressions(template, *c)), 0.3, -0.15, 0.1) for c in cases])
    motion, _ = M.measure(lms, np.ones(len(cases), bool), cal)
    for (opening, smile, brow), m in zip(cases, motion):
        assert m[_F["mouth_open"]] == pytest.approx(opening, abs=1e-6)
        assert m[_F["smile"]] == pytest.approx(smile, abs=1e-6)
        assert m[_F["brow"]] == pytest.approx(brow, abs=1e-6)
        assert m[_F["blink"]] == pytest.approx(0.0, abs=1e-6)
        assert np.allclose(m[[_F["yaw"], _F["pitch"], _F["roll"]]], (0.3, -0.15, 0.1), atol=1e-6)


# ------------------------------------------------------------------------------------------
# The measurement on world renders of known motion (the landmark model in the loop)
# ------------------------------------------------------------------------------------------


def test_measurement_follows_known_world_motion():
    from model.personal.check import errors, measure_world_clip

    truth, measured, found = measure_world_clip(seed=3, n_frames=100)
    assert found.all()
    e = errors(truth, measured)
    assert e["yaw"]["MAE"] < 0.08 and e["yaw"]["r"] > 0.9
    assert e["roll"]["MAE"] < 0.04 and e["roll"]["r"] > 0.9
    assert e["mouth_open"]["MAE"] < 0.15 and e["mouth_open"]["r"] > 0.85
    assert e["blink"]["r"] > 0.75


# ------------------------------------------------------------------------------------------
# The whole preparation path on a synthetic clip
# ------------------------------------------------------------------------------------------

FPS, SR, SECONDS = 25, 16000, 3.0


def _mean_face():
    """A world identity with the mean face geometry the crop normalises every face to
    (align.FACE_H, align.FRAME_CENTER_Y, geometry.EYE_GAP_A): its aligned frames should be
    its own renders."""
    import dataclasses

    from model.personal import align
    from model.train import world

    return dataclasses.replace(world.identity_from_seed(11), face_h=align.FACE_H, face_w=0.275,
                               center_y=align.FRAME_CENTER_Y, eye_gap=G.EYE_GAP_A)


MEAN_FACE = _mean_face()
HEAD_BOX = (110, 60, 200)  # where the world render sits in the synthetic clip's canvas (x0, y0, side)


@pytest.fixture(scope="module")
def synthetic_clip(tmp_path_factory):
    """A 3 s talking world head, placed off-centre on a 360x288 canvas, with an amplitude-
    modulated tone as its audio. Returns (path, truth motion, canvas box of the head)."""
    from model.personal.check import synthetic_motion
    from model.render import write_mp4
    from model.train import world

    rng = np.random.default_rng(5)
    n = int(SECONDS * FPS)
    truth = synthetic_motion(n, FPS, rng)
    truth[:12] = world.neutral_motion()  # a clean stretch for the portrait
    heads = world.render_clip(MEAN_FACE, truth, HEAD_BOX[2])
    canvas = np.zeros((n, 288, 360, 3), np.uint8)
    canvas[:] = heads[:, :1, :1]  # background colour of the render's corner
    x0, y0, side = HEAD_BOX
    canvas[:, y0:y0 + side, x0:x0 + side] = heads
    t = np.arange(int(SECONDS * SR)) / SR
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    path = tmp_path_factory.mktemp("clip") / "person.mp4"
    write_mp4(str(path), [canvas], FPS, audio, SR)
    return path, truth


def test_avatar_create_prepares_the_clip(synthetic_clip, tmp_path):
    from model.personal.prepare import load
    from model.train import metrics
    from server.cli import main

    path, truth = synthetic_clip
    out = tmp_path / "me.safetensors"
    assert main(["avatar", "create", "--video", str(path), "-o", str(out), "--prepare-only"]) == 0
    assert not out.exists()
    p = load(tmp_path / "me.prepared.safetensors")
    n = int(SECONDS * FPS)
    assert p.frames.shape == (n, 128, 128, 3) and p.motion.shape == (n, len(MOTION_FIELDS))
    assert p.found.all() and p.portrait.shape == (256, 256, 3)
    assert abs(len(p.audio) - SECONDS * SR) < 0.1 * SR  # the codec may pad a frame
    assert metrics.correlation(p.motion[:, _F["mouth_open"]], truth[:, _F["mouth_open"]]) > 0.85
    assert metrics.correlation(p.motion[:, _F["yaw"]], truth[:, _F["yaw"]]) > 0.8
    # The portrait is a clean frame: mouth closed, eyes open in the truth.
    assert truth[p.portrait_index, _F["mouth_open"]] < 0.15 and truth[p.portrait_index, _F["blink"]] < 0.3
    # Framed as the world frames its heads: the head was rendered into the canvas box
    # (110, 60, 200), which is the crop a perfect measurement gives. The landmark model
    # reads cartoon faces ~4 % small, so the tolerance is a few percent of the box.
    x0, y0, side = p.boxes.mean(0)
    assert side == pytest.approx(HEAD_BOX[2], rel=0.08)
    assert x0 + side / 2 == pytest.approx(HEAD_BOX[0] + HEAD_BOX[2] / 2, abs=0.03 * HEAD_BOX[2])
    assert y0 + side / 2 == pytest.approx(HEAD_BOX[1] + HEAD_BOX[2] / 2, abs=0.03 * HEAD_BOX[2])
    assert p.boxes[:, 2].std() < 0.02 * side  # smoothed: the crop does not breathe with the mouth


def test_a_prepared_file_is_reused_only_when_current(synthetic_clip, tmp_path):
    """Reused when newer than the clip and written by this preparation; a file of an older
    preparation (another format version) or older than the clip is prepared again."""
    import os

    from safetensors import safe_open
    from safetensors.numpy import save_file

    from model.personal.prepare import FORMAT, load_current
    from server.cli import main

    path, _ = synthetic_clip
    out = tmp_path / "me.safetensors"
    prepared = tmp_path / "me.prepared.safetensors"
    assert main(["avatar", "create", "--video", str(path), "-o", str(out), "--prepare-only"]) == 0
    assert load_current(prepared, path) is not None
    with safe_open(str(prepared), framework="numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(prepared), metadata={**meta, "format": FORMAT.rsplit("/", 1)[0] + "/1"})
    assert load_current(prepared, path) is None  # an older preparation: redone
    assert main(["avatar", "create", "--video", str(path), "-o", str(out), "--prepare-only"]) == 0
    assert load_current(prepared, path) is not None
    later = path.stat().st_mtime + 10
    os.utime(path, (later, later))  # the clip changed after it was prepared
    assert load_current(prepared, path) is None


def test_avatar_create_bad_input_exits_2(tmp_path, capsys):
    from server.cli import main

    assert main(["avatar", "create", "--video", str(tmp_path / "none.mp4"), "-o", str(tmp_path / "a.safetensors")]) == 2
    assert "video file not found" in capsys.readouterr().err
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    assert main(["avatar", "create", "--video", str(junk), "-o", str(tmp_path / "a.safetensors")]) == 2
    assert "not a readable video" in capsys.readouterr().err


def test_missing_landmark_model_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe.python.solutions", None)  # import now raises ImportError
    with pytest.raises(L.LandmarkModelMissing, match="pip install"):
        L.FaceTracker()


def test_frames_are_retimed_to_the_model_rate(tmp_path):
    from model.personal.video import iter_frames
    from model.render import write_mp4

    frames = np.zeros((48, 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(48)[:, None, None] * 5
    path = tmp_path / "24fps.mp4"
    write_mp4(str(path), [frames], 24, None, SR)
    out = list(iter_frames(path, 25))
    assert len(out) == 50  # 2 s at 25 fps
    src = np.array([f[..., 0].mean() / 5 for f in out]).round()
    assert np.all(np.diff(src) >= 0) and np.abs(src - np.arange(50) * 24 / 25).max() <= 1.0


# ------------------------------------------------------------------------------------------
# Baselines and the personal eval
# ------------------------------------------------------------------------------------------


def test_piecewise_affine_warp_moves_pixels_with_landmarks():
    from model.personal.warp import warp_portrait

    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 20:40] = 200
    pts = np.c_[rng.uniform(15, 45, (30, 2)), np.zeros(30)]
    assert np.abs(warp_portrait(image, pts, pts).astype(int) - image).max() <= 1
    moved = warp_portrait(image, pts, pts + [4.0, 0.0, 0.0])
    inside = moved[24:36, 28:36].mean()
    assert inside > 150 and moved[24:36, 20:23].mean() < inside  # the square moved right


def test_personal_eval_scores_the_baselines(synthetic_clip, tmp_path):
    from model.personal.evaluate import FRAME_METRICS, METRICS, MOTION_WARP, PER_FRAME, REPEAT, WARP, evaluate_clip

    path, _ = synthetic_clip
    r = evaluate_clip(path, tmp_path, 128, FPS, SR, lambda n: None)
    assert r["held"] == int(SECONDS * FPS) - int(round(0.8 * SECONDS * FPS))
    assert set(r["rows"]) == {REPEAT, WARP, MOTION_WARP}
    for row in r["rows"].values():
        per_frame = row.pop(PER_FRAME)  # what the intervals of the gaps between systems read
        assert set(row) == set(METRICS) and all(np.isfinite(v) for v in row.values())
        assert set(per_frame) == set(FRAME_METRICS) and all(len(v) == r["held"] for v in per_frame.values())
        assert np.mean(per_frame["PSNR"]) == pytest.approx(row["PSNR"], rel=1e-6)  # the row is their mean
    # Both warps follow the head (the real landmarks, or those the motion predicts); the
    # still portrait does not.
    for warp in (WARP, MOTION_WARP):
        assert r["rows"][warp]["head-pose error (deg)"] < r["rows"][REPEAT]["head-pose error (deg)"]


def test_motion_predicts_landmarks_it_was_fitted_on():
    """A smooth map from motion to landmarks (a pose term and a squared term, as a real
    face's) is recovered from frames with gaps, and applies to motion it never saw."""
    from model.personal.motion_landmarks import MotionLandmarks

    rng = np.random.default_rng(0)
    base = rng.uniform(20, 100, (478, 2))
    shift, bend = rng.normal(0, 3, (478, 2)), rng.normal(0, 2, (478, 2))

    def landmarks(m):
        return base + m[:, :1, None] * shift + (m[:, 1:2, None] ** 2) * bend

    motion = rng.uniform(-1, 1, (300, 10))
    points = np.concatenate([landmarks(motion), np.zeros((300, 478, 1))], axis=2)
    points[::7] = np.nan  # frames where the face mesh found no face
    fitted = MotionLandmarks.fit(motion, points)
    unseen = rng.uniform(-1, 1, (50, 10))
    assert np.abs(fitted.predict(unseen) - landmarks(unseen)).max() < 0.05
    with pytest.raises(ValueError, match="frames with a face"):
        MotionLandmarks.fit(motion[:10], points[:10])
