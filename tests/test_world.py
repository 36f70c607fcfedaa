"""Avatar world: deterministic renders, every motion field visible, mouth measure tracks truth, data split."""

import numpy as np
import pytest
import torch

from model.config import MOTION_FIELDS, from_name
from model.train import speech as sp
from model.train import world
from model.train.data import HELD_OUT_IDENTITY_SEED, SpeechBank, TrainingData, draw_clip, model_motion

F = {n: i for i, n in enumerate(MOTION_FIELDS)}


def with_(**fields):
    m = world.neutral_motion()
    for k, v in fields.items():
        m[F[k]] = v
    return m


def test_render_is_deterministic_and_identities_differ():
    a = world.identity_from_seed(3)
    m = with_(yaw=0.2, mouth_open=0.4)
    assert np.array_equal(world.render_frame(a, m), world.render_frame(world.identity_from_seed(3), m))
    b = world.identity_from_seed(4)
    assert np.abs(world.render_frame(a, m).astype(int) - world.render_frame(b, m)).mean() > 5


@pytest.mark.parametrize("field, value, region", [
    ("mouth_open", 1.0, "mouth"), ("mouth_wide", 1.0, "mouth"), ("smile", 1.0, "mouth"),
    ("blink", 1.0, "eyes"), ("gaze_x", 1.0, "eyes"), ("brow", 1.0, "all"),
    ("yaw", 0.5, "all"), ("pitch", 0.4, "all"), ("roll", 0.4, "all")])
def test_each_motion_field_changes_the_pixels_it_should(field, value, region):
    ident = world.identity_from_seed(7)
    base = world.neutral_motion()
    a, b = world.render_frame(ident, base), world.render_frame(ident, with_(**{field: value}))
    diff = np.abs(a.astype(int) - b).sum(-1)
    if region == "mouth":
        x0, y0, x1, y1 = world.mouth_box(ident, base)
        inside = diff[y0:y1, x0:x1].sum()
        assert inside > 0.9 * diff.sum() and inside > 500
    elif region == "eyes":
        inside = sum(diff[y0:y1, x0:x1].sum() for x0, y0, x1, y1 in world.eye_boxes(ident, base))
        assert inside > 0.8 * diff.sum() and inside > 300
    else:
        assert diff.sum() > 2000


def test_mouth_measure_correlates_with_truth():
    rng = np.random.default_rng(0)
    truth, measured = [], []
    for seed in range(6):
        ident = world.identity_from_seed(seed)
        motion = sp.idle_motion(30, 25, rng)
        motion[:, F["mouth_open"]] = rng.uniform(0, 1, 30)
        frames = world.render_clip(ident, motion)
        boxes = [world.mouth_box(ident, m) for m in motion]
        truth += list(motion[:, F["mouth_open"]])
        measured += list(world.measure_mouth_open(frames, boxes))
    assert np.corrcoef(truth, measured)[0, 1] > 0.9


def test_mouth_track_follows_speech_and_silence():
    t = np.arange(16000 * 2) / 16000
    audio = np.where((t > 0.5) & (t < 1.5), 0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 300 * t)), 0)
    track = sp.mouth_track(audio.astype(np.float32), 25)
    assert track.shape == (50, 2)
    assert track[30:35, 0].mean() > 0.5 and track[:8, 0].max() < 0.05 and track[45:, 0].max() < 0.1


@pytest.mark.skipif(not sp.tts_available(), reason="no offline TTS installed (Debian espeak-ng / flite)")
def test_real_speech_opens_the_mouth():
    audio = sp.synthesize("Hello there, how are you today?", sp.VOICES[0])
    track = sp.mouth_track(audio, 25)
    quiet = np.abs(audio).max() * 0.02
    voiced_frames = [v for v in range(len(track)) if np.abs(audio[v * 640:(v + 1) * 640]).max() > 10 * quiet]
    assert track[voiced_frames, 0].mean() > 0.4
    silent = sp.mouth_track(np.zeros(16000, np.float32), 25)
    assert silent.max() == 0


def test_split_and_clips(tmp_path):
    rng = np.random.default_rng(0)
    bank = SpeechBank(np.concatenate([np.zeros(800, np.float32), 0.2 * np.ones(16000, np.float32)] * 20),
                      np.arange(21) * 16800, [f"s{i}" for i in range(20)])
    assert set(bank.split(True)).isdisjoint(bank.split(False)) and bank.split(True) == [0, 10]
    clip = draw_clip(bank, 21, 25, rng)
    assert clip.motion.shape == (21, len(MOTION_FIELDS)) and len(clip.audio) == 21 * 640
    held = draw_clip(bank, 5, 25, rng, held_out=True)
    held_ids = [world.identity_from_seed(s) for s in range(HELD_OUT_IDENTITY_SEED, HELD_OUT_IDENTITY_SEED + 100)]
    assert held.identity in held_ids and clip.identity not in held_ids
    mm = model_motion(clip.motion)
    assert mm[:, len(MOTION_FIELDS) + F["mouth_open"]].max() == 0  # the mouth is never given
    assert mm[:, len(MOTION_FIELDS) + F["yaw"]].min() == 1


def test_training_batches(tmp_path):
    bank = SpeechBank(0.1 * np.ones(32000, np.float32), np.array([0, 16000, 32000]), ["a", "b"])
    bank.save(tmp_path / "speech_bank.npz")
    data = TrainingData(tmp_path, from_name("tiny"))
    b = data.clips(2, 3, torch.Generator().manual_seed(0))
    assert b.frames.shape == (2, 3, 9, 128, 128) and b.frames.min() >= -1 and b.frames.max() <= 1
    assert b.reference.shape == (2, 3, 128, 128) and b.weight.max() > 1
    again = data.clips(2, 3, torch.Generator().manual_seed(0))
    assert torch.equal(b.frames, again.frames)


def test_give_mouth_gives_the_rendered_mouth_in_a_share_of_clips(tmp_path):
    """--mouth-given: the mouth fields the world rendered (mouth_track of the clip's audio),
    flagged given, in the chosen clips only; every other field as it was."""
    from model.train.data import give_mouth

    rng = np.random.default_rng(1)
    speechy = rng.normal(0, 0.1, 64000).astype(np.float32) * (np.sin(np.arange(64000) / 900) > 0)
    bank = SpeechBank(speechy, np.array([0, 32000, 64000]), ["a", "b"])
    bank.save(tmp_path / "speech_bank.npz")
    data = TrainingData(tmp_path, from_name("tiny"))
    b = data.clips(4, 3, torch.Generator().manual_seed(0))
    n, mo = len(MOTION_FIELDS), F["mouth_open"]
    assert give_mouth(b, 0.0, 25, torch.Generator()) is b
    all_given = give_mouth(b, 1.0, 25, torch.Generator().manual_seed(0))
    T = b.motion.shape[1]
    for i in range(4):
        track = sp.mouth_track(b.audio[i].numpy(), 25, n_frames=T)
        assert np.allclose(all_given.motion[i, :, mo].numpy(), track[:, 0])
        assert np.allclose(all_given.motion[i, :, F["mouth_wide"]].numpy(), track[:, 1])
    assert all_given.motion[:, :, n + mo].min() == 1 and all_given.motion[:, :, mo].max() > 0.3
    others = [i for i in range(2 * n) if i not in (mo, F["mouth_wide"], n + mo, n + F["mouth_wide"])]
    assert torch.equal(all_given.motion[:, :, others], b.motion[:, :, others])
    assert b.motion[:, :, n + mo].max() == 0  # the batch it came from is untouched
    some = give_mouth(b, 0.5, 25, torch.Generator().manual_seed(3))
    flags = some.motion[:, 0, n + mo]
    assert set(flags.tolist()) <= {0.0, 1.0}
    picked = [give_mouth(b, 0.5, 25, torch.Generator().manual_seed(s)).motion[:, 0, n + mo].sum() for s in range(20)]
    assert any(0 < x < 4 for x in picked)  # a share of a batch, not all or nothing
    assert 20 < sum(picked) < 60
    assert torch.equal(all_given.audio, b.audio)  # alone=0: the audio stays
    mixed = next(s for s, x in enumerate(picked) if 0 < x < 4)
    alone = give_mouth(b, 0.5, 25, torch.Generator().manual_seed(mixed), alone=1.0)
    given = alone.motion[:, 0, n + mo] == 1
    assert torch.equal(alone.motion, give_mouth(b, 0.5, 25, torch.Generator().manual_seed(mixed)).motion)
    assert alone.audio[given].abs().max() == 0 and torch.equal(alone.audio[~given], b.audio[~given])
    assert b.audio.abs().max() > 0  # the batch it came from keeps its audio
