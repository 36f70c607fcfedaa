"""Avatar world: deterministic renders, every motion field visible, mouth measure tracks truth, data split."""

import importlib.util

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


# ---- stored datasets: generate_dataset, WorldClipDataset, RealClipDataset --------------------

needs_tts_aligner = pytest.mark.skipif(
    not sp.tts_available() or importlib.util.find_spec("pocketsphinx") is None,
    reason="dataset generation needs Debian espeak-ng/flite and the PyPI package pocketsphinx")


@needs_tts_aligner
def test_generated_dataset_split_determinism_and_windows(tmp_path):
    from model.train.data import WorldClipDataset, collate_windows, generate_dataset, sentence_held_out

    train = generate_dataset(tmp_path / "a", 2, 1, 3.0, seed=1, split="train", progress=False)
    test = generate_dataset(tmp_path / "a", 2, 1, 3.0, seed=1, split="test", progress=False)
    again = generate_dataset(tmp_path / "b", 2, 1, 3.0, seed=1, split="train", progress=False)
    load = lambda p: dict(np.load(p))  # noqa: E731
    for p, q in zip(train, again):  # same seed -> identical files, array by array
        a, b = load(p), load(q)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tr, te = [load(p) for p in train], [load(p) for p in test]
    tr_ids, te_ids = {int(c["identity_seed"]) for c in tr}, {int(c["identity_seed"]) for c in te}
    assert max(tr_ids) < HELD_OUT_IDENTITY_SEED <= min(te_ids)
    tr_texts, te_texts = {str(t) for c in tr for t in c["texts"]}, {str(t) for c in te for t in c["texts"]}
    assert tr_texts and te_texts and tr_texts.isdisjoint(te_texts)
    assert not any(map(sentence_held_out, tr_texts)) and all(map(sentence_held_out, te_texts))
    c = tr[0]
    assert c["motion"].shape == (75, len(MOTION_FIELDS)) and c["audio"].shape == (75 * 640,)
    assert set(c["mouth_sources"]) <= {"alignment", "loudness"} and "alignment" in set(c["mouth_sources"])
    np.testing.assert_array_equal(c["motion"][:, F["mouth_open"]], c["visemes"][:, 0])
    # The mouth is open while a phone is spoken, closed far from any phone.
    t = np.arange(75) / 25
    near = np.zeros(75, bool)
    for s, e in zip(c["phone_start"], c["phone_end"]):
        near |= (t > s - 0.15) & (t < e + 0.15)
    assert c["visemes"][~near, 0].max(initial=0) < 0.02 and c["visemes"][near, 0].mean() > 0.15

    ds = WorldClipDataset(tmp_path / "a", "train", n_frames=9, windows_per_clip=3, seed=0)
    assert len(ds) == 6
    item = ds[1]
    clip, s0 = next(c for c in tr if int(c["identity_seed"]) == item["identity_seed"]), item["start"]
    ident = world.identity_from_seed(int(clip["identity_seed"]))
    truth = world.render_clip(ident, clip["motion"][s0:s0 + 9])
    np.testing.assert_allclose(item["frames"].permute(1, 2, 3, 0).numpy(), truth / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(item["audio"][:9 * 640].numpy(), clip["audio"][s0 * 640:(s0 + 9) * 640])
    assert item["audio"].shape == ((9 + 5) * 640,) and item["audio_before"].shape == (2 * 640,)
    if s0 >= 2:
        np.testing.assert_array_equal(item["audio_before"].numpy(), clip["audio"][(s0 - 2) * 640:s0 * 640])
    assert torch.equal(ds[1]["frames"], item["frames"])           # reproducible windows
    batch = collate_windows([ds[0], ds[1]])
    assert batch.frames.shape == (2, 3, 9, 128, 128) and batch.motion.shape == (2, 9, 2 * len(MOTION_FIELDS))
    assert batch.weight.shape == (2, 1, 9, 128, 128)


def _write_mp4(path, frames, audio, fps=25, sample_rate=16000):
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.height, v.width, v.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        v.options = {"crf": "18"}
        a = out.add_stream("aac", rate=sample_rate)
        a.layout = "mono"
        for f in frames:
            out.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(v.encode())
        step = 1024
        for i in range(0, len(audio), step):
            frame = av.AudioFrame.from_ndarray(audio[None, i:i + step], format="flt", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, i
            out.mux(a.encode(frame))
        out.mux(a.encode())


def test_real_clip_dataset_on_synthesised_mp4(tmp_path):
    from model.train.data import RealClipDataset, load_real_clip

    ident, n = world.identity_from_seed(0), 50
    motion = np.repeat(world.neutral_motion()[None], n, 0)
    motion[:, F["mouth_open"]] = np.linspace(0, 1, n)
    faces = world.render_clip(ident, motion)
    frames = np.full((n, 192, 256, 3), 90, np.uint8)
    frames[:, 40:168, 112:240] = faces                      # face centre (176, 104)
    t = np.arange(2 * 16000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (t > 1.0)).astype(np.float32)  # silent, then a tone
    _write_mp4(tmp_path / "talk.mp4", frames, audio)

    clip = load_real_clip(tmp_path / "talk.mp4", size=64)
    assert clip.face_found and clip.frames.shape == (n, 64, 64, 3)
    x0, y0, x1, y1 = clip.face_box
    assert abs((x0 + x1) / 2 - 176) < 12 and abs((y0 + y1) / 2 - 112) < 14 and 0.4 < (x1 - x0) / 128 < 1.6
    assert abs(len(clip.audio) - len(audio)) < 0.1 * 16000
    rms = lambda a: float(np.sqrt(np.mean(a ** 2)))  # noqa: E731
    assert rms(clip.audio[2000:14000]) < 0.01 and rms(clip.audio[18000:30000]) > 0.1  # aligned, not shifted
    ds = RealClipDataset(tmp_path, n_frames=5, size=64, windows_per_clip=2)
    item = ds[0]
    assert item["frames"].shape == (3, 5, 64, 64) and item["reference"].shape == (3, 64, 64)
    assert item["motion"].shape == (5, 2 * len(MOTION_FIELDS)) and item["motion"].abs().max() == 0
    assert item["audio"].shape == ((5 + 5) * 640,)
    np.testing.assert_allclose(item["frames"].permute(1, 2, 3, 0).numpy(),
                               clip.frames[item["start"]:item["start"] + 5] / 127.5 - 1, atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        RealClipDataset(tmp_path / "empty")


def test_real_clip_without_face_uses_centre_crop(tmp_path):
    from model.train.data import load_real_clip

    frames = np.zeros((10, 96, 160, 3), np.uint8)
    frames[..., 1] = np.linspace(0, 255, 160, dtype=np.uint8)  # a gradient, no face
    _write_mp4(tmp_path / "noface.mp4", frames, np.zeros(6400, np.float32))
    clip = load_real_clip(tmp_path / "noface.mp4", size=32)
    assert not clip.face_found and clip.face_box == (32, 0, 128, 96)
