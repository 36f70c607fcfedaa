"""Personal avatars, step 2: fitting the bundled model to a person's clip (a small synthetic
clip rendered here, nothing downloaded), the avatar file, speech routed through the mouth
fields, and resuming a stopped fit. The serving side is tests/test_personal_serve.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import MOTION_FIELDS
from tests.test_personal import FPS, SECONDS, SR, synthetic_clip  # noqa: F401  (the clip fixture)

_F = {n: i for i, n in enumerate(MOTION_FIELDS)}
_N = len(MOTION_FIELDS)


@pytest.fixture(scope="module")
def prepared(synthetic_clip, tmp_path_factory):  # noqa: F811
    """(clip path, folder, Prepared): the clip prepared once by the CLI (`--prepare-only`)."""
    from model.personal.prepare import load
    from server.cli import main

    path, _ = synthetic_clip
    folder = tmp_path_factory.mktemp("fit")
    assert main(["avatar", "create", "--video", str(path), "-o", str(folder / "me.safetensors"), "--prepare-only"]) == 0
    return path, folder, load(folder / "me.prepared.safetensors")


def test_person_data_gives_the_trainer_its_batches(prepared):
    from model.config import from_name
    from model.personal.evaluate import mouth_boxes
    from model.personal.fit_data import MOUTH_WEIGHT, PersonData

    _, _, p = prepared
    data = PersonData(p, from_name("tiny"), drop_given=0.0)
    b = data.clips(2, 3, torch.Generator().manual_seed(0))
    assert b.frames.shape == (2, 3, 9, 128, 128) and b.reference.shape == (2, 3, 128, 128)
    assert b.frames.min() >= -1 and b.frames.max() <= 1
    # The reference is the portrait at the model's size, as the engine fits it.
    portrait = torch.from_numpy(data.reference).float().div(127.5).sub(1).permute(2, 0, 1)
    assert torch.allclose(b.reference[0], portrait)
    assert torch.all(b.motion[..., _N:] == 1)  # every field given (nothing dropped here)
    # The motion rows are the measured ones of the same window as the frames.
    start = next(s for s in range(data.windows(3)) if torch.allclose(
        b.frames[0, :, 0], torch.from_numpy(p.frames[s]).float().div(127.5).sub(1).permute(2, 0, 1)))
    assert np.allclose(b.motion[0, :, :_N].numpy(), p.motion[start:start + 9])
    # The mouth box of the real landmarks carries the mouth weight.
    x0, y0, x1, y1 = mouth_boxes(p.landmarks[start:start + 1], 128)[0]
    assert torch.all(b.weight[0, 0, 0, y0:y1, x0:x1] == MOUTH_WEIGHT) and b.weight[0, 0, 0, 0, 0] == 1
    with pytest.raises(ValueError, match="held-out"):
        data.clips(1, 3, torch.Generator(), held_out=True)
    short = PersonData(p, from_name("tiny"), frames=slice(0, 8))
    with pytest.raises(ValueError, match="record a longer clip"):
        short.clips(1, 3, torch.Generator())


def test_the_fits_warped_portraits_are_the_engines(prepared):
    """Training copies from the same warped portraits the engine makes for the same driving:
    the decoder's blend per frame, the DiT's condition latents per latent."""
    from model.engine import Engine
    from model.personal.fit import add_motion_warp
    from model.personal.fit_data import PersonData
    from model.timeline import StepInput
    from model.train.chunks import encode_hints

    _, _, p = prepared
    engine = Engine.from_pretrained("tiny", dtype=torch.float32)
    engine.config.stream = engine.config.stream.replace(knot_frames=0)
    add_motion_warp(engine.model, p)
    warp = engine.model.warp
    assert not torch.allclose(warp.landmark_map, torch.zeros(()))
    Fr = engine.config.stream.chunk_frames
    data = PersonData(p, engine.config, warp=warp)  # fields dropped at random: the rest pose where not given
    batch = data.clips(3, Fr, torch.Generator().manual_seed(1))
    n = data.clip_frames(Fr)
    assert batch.blend.shape == (3, n, 3, 128, 128) and batch.hints.shape == (3, Fr, 3, 128, 128)
    for b in range(3):
        stream = engine.start(p.portrait, knobs=engine.config.stream)
        span = stream.next_span()
        rows = np.zeros((span.driving_frames, batch.motion.shape[2]), np.float32)
        rows[:n] = batch.motion[b].numpy()
        with torch.inference_mode():
            plan = engine.recipe.plan(stream.state, stream.knobs, StepInput(span, None, rows), torch.Generator())
            blend = engine.recipe.blend_frames(stream.state, plan, 0, n)
            hint = encode_hints(engine.model.vae, batch.hints[b:b + 1])
        # The same but for the sharp mouth: the engine's blend samples a closed mouth bicubic
        # (model/motion_warp.py), training bilinear, as the fitted decoder learnt it.
        box = warp.mouth_mask(plan.motion[-plan.motion_first:][:n], warp.mouth) > 0
        assert box.any() and not box.all()
        assert torch.allclose(blend[0].masked_fill(box, 0), batch.blend[b].masked_fill(box, 0), atol=1e-5)
        assert torch.allclose(plan.hint, hint, atol=1e-4)


def test_dropped_groups_are_not_given():
    from model.personal.fit_data import GROUPS, driving_motion, drop_groups

    vec = driving_motion(np.full((4, _N), 0.3, np.float32))
    out = drop_groups(vec, np.random.default_rng(0), p=1.0)
    assert np.all(out == 0) and np.all(vec[:, _N:] == 1)  # the input is left alone
    kept = drop_groups(vec, np.random.default_rng(0), p=0.0)
    assert np.array_equal(kept, vec)
    assert sorted(f for g in GROUPS for f in g) == sorted(MOTION_FIELDS)


# ------------------------------------------------------------------------------------------
# Speech -> mouth fields
# ------------------------------------------------------------------------------------------


def _tone_after_silence(seconds=1.0, loud_from=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return np.where(t >= loud_from, 0.5 * np.sin(2 * np.pi * 220 * t), 0.0).astype(np.float32)


def test_speech_fills_the_mouth_only_where_none_is_given():
    from model.config import from_name
    from model.personal.speech_mouth import fill
    from model.timeline import Timeline

    tl = Timeline.of(from_name("tiny"))
    audio = _tone_after_silence()
    motion = np.zeros((25, 2 * _N), np.float32)
    motion[20:, _F["mouth_open"]], motion[20:, _N + _F["mouth_open"]] = 0.05, 1.0  # given: kept
    out = fill(motion, audio, 0, 0, tl, (0.6, 0.3))
    open_ = out[:, _F["mouth_open"]]
    assert np.all(out[:, _N + _F["mouth_open"]] == 1) and np.all(out[:, _N + _F["mouth_wide"]] == 1)
    assert open_[:11].max() < 0.01                      # silence: closed
    assert open_[14:20].min() > 0.5 and open_.max() <= 0.6  # loud speech: up to the person's gain
    assert np.all(open_[20:] == 0.05)
    # The same frames read from an audio slice that starts later in the stream.
    later = fill(motion[:20], audio[4000:], 4000, 0, tl, (0.6, 0.3))
    assert np.allclose(later[12:20], out[12:20], atol=1e-6)
    # Frames before the stream start (the first latent's token group) stay not given.
    early = fill(np.zeros((6, 2 * _N), np.float32), audio, 0, -3, tl, (0.6, 0.3))
    assert np.all(early[:3] == 0) and np.all(early[3:, _N + _F["mouth_open"]] == 1)


def test_engine_routes_speech_through_the_mouth_fields(tmp_path):
    """A personal model's driving tokens for speech alone equal those for the same speech
    with the mouth given explicitly as `fill` computes it: the engine hands speech to the
    model as mouth motion and nothing else."""
    from model.engine import Engine
    from model.personal.speech_mouth import fill
    from model.timeline import StepInput

    engine = Engine.from_pretrained("tiny")
    engine.config.speech_mouth = (0.7, 0.4)
    recipe = engine.recipe
    stream = engine.start(np.full((128, 128, 3), 128, np.uint8))
    stream.step()
    span = stream.next_span()
    audio = _tone_after_silence(2.0, 0.4)[span.audio_from:span.audio_to]
    first = engine.timeline.group_start(2)
    filled = fill(np.zeros((4 * 3, 2 * _N), np.float32), audio, span.audio_from, first, engine.timeline, (0.7, 0.4))
    explicit = filled[span.frame - first:]
    def tokens(inp):
        return recipe.driving_tokens(inp, recipe.driving_motion(inp, 2, 3), 2, 3)

    with torch.inference_mode():
        alone = tokens(StepInput(span, audio, None))
        given = tokens(StepInput(span, audio, explicit[:span.driving_frames]))
        engine.config.speech_mouth = None
        direct = tokens(StepInput(span, audio, None))
    assert torch.equal(alone, given)
    assert not torch.allclose(alone, direct)  # without the routing the mouth is "not given"
    assert explicit[:, _F["mouth_open"]].max() > 0.3


# ------------------------------------------------------------------------------------------
# The whole command: fit, avatar file, resume
# ------------------------------------------------------------------------------------------


def test_avatar_create_fits_writes_an_avatar_and_resumes(prepared, capsys):
    from model.engine import Engine
    from model.sources import ASSETS
    from model.personal import avatar_file, speech_mouth, torso
    from model.personal.blend_calibration import OFFSETS
    from model.personal.landmarks import LIP_IN_DOWN, LIP_IN_UP, LIPS
    from model.train.trainer import load_checkpoint
    from model.weights import load_model, read_metadata
    from server.cli import main

    path, folder, p = prepared
    out = folder / "me.safetensors"
    args = ["avatar", "create", "--video", str(path), "-o", str(out), "--threads", "1", "--decoder-steps", "2"]
    assert main(args + ["--dit-steps", "2"]) == 0
    assert "reusing" in capsys.readouterr().err  # step 1 was done by the fixture

    avatar = avatar_file.read(out)
    assert avatar.name == "me" and np.array_equal(avatar.portrait, p.portrait)
    assert avatar.info["decoder_steps"] == 2 and avatar.info["dit_steps"] == 2 and avatar.info["complete"]
    cfg = read_metadata(out)["config"]
    assert cfg.domain == "personal" and cfg.stream.knot_frames == 0 and cfg.stream.window_frames == 2
    assert cfg.speech_mouth == pytest.approx(speech_mouth.gains(p.motion))
    # The blend's trust in the warp, calibrated on the stream of the last fitting frames.
    calibration = avatar.info["blend_calibration"]
    assert cfg.warp_mouth == LIPS and cfg.warp_blend == (calibration["face"], calibration["mouth"])
    assert calibration["frames"] > 0 and {calibration["face"], calibration["mouth"]} <= set(OFFSETS)
    assert calibration["held_back"]  # the 3 s clip holds a training clip besides its calibration frames
    assert cfg.warp_absolute  # the warp goes onto the predicted landmarks (model/motion_warp.py)
    # The file is the fitted model (the last checkpoint, stored in fp16 as the bundled weights).
    ckpt = folder / "me.fit"
    fitted = load_checkpoint(ckpt / "dit.pt")["model"]
    exported, base = load_model(out).state_dict(), load_model(ASSETS / "tiny.safetensors").state_dict()
    # The portrait warp (model/motion_warp.py), with an open-mouth portrait: the synthetic
    # speaker opens the mouth wide in its fitting frames (portrait.choose_open).
    assert cfg.warp_open == (LIP_IN_UP, LIP_IN_DOWN)
    # And the body below the chin (model/personal/torso.py): the synthetic frame shows some.
    assert cfg.warp_torso == torso.TORSO_POINTS
    warp = {"warp.landmark_map", "warp.points", "warp.rest", "warp.open_image", "warp.open_points",
            "warp.torso_map", "warp.torso_line"}
    assert set(exported) == set(fitted) == set(base) | warp
    assert cfg.motion_warp == 478 and torch.equal(exported["warp.points"], torch.from_numpy(
        p.landmarks[p.portrait_index, :, :2]).half().float())
    assert all(torch.equal(exported[k], fitted[k].half().float()) for k in fitted)
    changed = {k for k in fitted if k not in warp and not torch.equal(fitted[k], base[k])}
    for part in ("vae.decoder.", "dit.", "driving."):
        assert any(k.startswith(part) for k in changed), part
    assert not any(k.startswith("vae.encoder.") for k in changed)  # frozen: the DiT's latents stay valid
    frames = Engine.from_pretrained(str(out)).start(avatar.portrait).step()
    assert frames.dtype == np.uint8 and frames.shape[1:] == (128, 128, 3)

    pool = next(ckpt.glob("latent_pool_*.pt"))
    pool_time, decoder_time = pool.stat().st_mtime_ns, (ckpt / "decoder.pt").stat().st_mtime_ns
    assert main(args + ["--dit-steps", "3"]) == 0   # asked for one more step: continues
    assert load_checkpoint(ckpt / "dit.pt")["step"] == 3
    assert pool.stat().st_mtime_ns == pool_time and (ckpt / "decoder.pt").stat().st_mtime_ns == decoder_time
    assert "DiT 3/3" in capsys.readouterr().err and avatar_file.read(out).info["dit_steps"] == 3


def test_the_blend_calibration_frames_are_held_back_from_training_when_the_clip_allows():
    from types import SimpleNamespace

    from model.config import from_name
    from model.personal.fit import FitPlan, calibration_rows

    cfg, plan = from_name("tiny"), FitPlan()
    clip = lambda n: SimpleNamespace(fit_frames=n, fps=25)  # noqa: E731
    assert calibration_rows(clip(1000), cfg, plan) == (slice(0, 850), slice(850, 1000))  # the last 6 s
    assert calibration_rows(clip(100), cfg, plan) == (slice(0, 80), slice(80, 100))      # at most a fifth
    # Too short to hold back anything and still train on one clip: calibrated on trained-on frames.
    assert calibration_rows(clip(30), cfg, plan) == (slice(0, 30), slice(0, 30))


def test_a_model_file_that_is_not_an_avatar_is_refused(tmp_path):
    from model.sources import ASSETS
    from model.personal import avatar_file

    with pytest.raises(ValueError, match="not a personal avatar"):
        avatar_file.read(ASSETS / "tiny.safetensors")
    with pytest.raises(FileNotFoundError):
        avatar_file.read(tmp_path / "none.safetensors")
    assert avatar_file.name_from_path("My Avatar!.safetensors") == "my-avatar"
    with pytest.raises(ValueError):
        avatar_file.name_from_path("???.safetensors")


# ------------------------------------------------------------------------------------------
# The fitted avatar in the personal eval
# ------------------------------------------------------------------------------------------


def test_av_sync_finds_the_lag_of_a_delayed_mouth():
    from model.personal.speech_eval import av_sync, envelope

    rng = np.random.default_rng(1)
    env = np.convolve(rng.standard_normal(300), np.ones(5) / 5, mode="same")
    late = np.r_[np.zeros(3), env[:-3]]          # the mouth follows the sound by 3 frames
    s = av_sync(late, env)
    assert s["lag"] == 3 and s["r_best"] > 0.99 and s["r"] < s["r_best"]
    early = av_sync(env[2:], env[:-2])           # ... or leads it by 2
    assert early["lag"] == -2
    with_gaps = late.copy()
    with_gaps[::7] = np.nan                      # frames without a face are left out
    assert av_sync(with_gaps, env)["lag"] == 3
    tone = _tone_after_silence()
    db = envelope(tone, FPS, SR, 25)
    assert db[:11].max() == pytest.approx(-60.0) and db[14:].min() > -15


def test_personal_eval_scores_a_fitted_avatar(prepared, tmp_path):
    """evaluate_clip with the fitted avatar (a fit cut short by its time limit): its row has
    every metric, and the speech-driven, drift and fit records are there."""
    import argparse

    from model.personal.evaluate import METRICS, MOTION_WARP, REPEAT, WARP, evaluate_clip, report
    from model.personal.evaluate_fit import AUDIO_PATH, FITTED, ROUTED

    path, _, _ = prepared
    speech = [("tone", _tone_after_silence(1.0, 0.4))]
    options = argparse.Namespace(fit_minutes=0.05, model="tiny", speech=speech, long_seconds=2.0, drift_seconds=0.5,
                                 progress=lambda n: None)
    r = evaluate_clip(path, tmp_path, 128, FPS, SR, lambda n: None, options)
    assert set(r["rows"]) == {REPEAT, WARP, MOTION_WARP, FITTED}
    row = r["rows"][FITTED]
    assert set(METRICS) <= set(row) and all(np.isfinite(row[m]) for m in METRICS) and row["jitter / real"] > 0
    fit = r["fitted"]
    assert (tmp_path / f"{path.stem}.avatar.safetensors").is_file() and fit["fit"]["complete"] is False
    assert set(fit["speech"]["tone"]) == {ROUTED, AUDIO_PATH}
    for s in fit["speech"]["tone"].values():
        assert -1 <= s["r"] <= 1 and abs(s["lag"]) <= 10
    d = fit["drift"]
    assert d["seconds"] >= 2.0 and 0 < 2 * d["window_seconds"] <= d["seconds"] and np.isfinite(d["change"])
    text = report([r], "knotstream eval --personal ...", 1.0)
    assert "## Fitted avatars" in text and ROUTED in text and "Identity drift" in text
    # The gaps to each baseline with their intervals, and the bars read from them.
    assert all(f"| {path.name} | {name} | " in text for name in (REPEAT, WARP, MOTION_WARP))
    assert "Bars (beat the still portrait and the landmark warp" in text and " of 6 held" in text
    calibration = fit["fit"]["blend_calibration"]
    assert f"({calibration['frames']} held-back frames)" in text  # the 3 s clip holds its calibration frames back
    assert r["strip"].shape[0] == 5 * 128   # real, three baselines, the fitted avatar


def test_speech_that_ends_before_the_frames_reads_as_silence():
    from model.config import from_name
    from model.personal.speech_mouth import fill
    from model.timeline import Timeline

    tl = Timeline.of(from_name("tiny"))
    audio = _tone_after_silence(0.6, 0.0)                        # 15 frames of sound for 25 frames
    out = fill(np.zeros((25, 2 * _N), np.float32), audio, 0, 0, tl, (0.6, 0.3))
    assert out[5:14, _F["mouth_open"]].min() > 0.5 and out[18:, _F["mouth_open"]].max() < 0.1
    short = fill(np.zeros((25, 2 * _N), np.float32), audio[:100], 0, 0, tl, (0.6, 0.3))
    assert short.shape == (25, 2 * _N) and short[5:, _F["mouth_open"]].max() < 0.05  # then released


def test_snapshot_steps_and_the_stretches_they_are_judged_on():
    from model.personal.snapshots import snapshot_steps, stretch_rows

    assert snapshot_steps(800) == (400, 600) and snapshot_steps(2) == (1,) and snapshot_steps(1) == ()
    assert stretch_rows(1000) == [slice(0, 250), slice(250, 500), slice(500, 750), slice(750, 1000)]
    assert stretch_rows(1600) == [slice(s, s + 250) for s in (0, 450, 900, 1350)]  # spread over the clip
    assert stretch_rows(60) == [slice(0, 60)]  # a short clip: one stretch, all of it


def _spoil(path):
    """Overwrite the DiT's and decoder's weights in a checkpoint with noise."""
    from model.train.trainer import load_checkpoint

    state = load_checkpoint(path)
    gen = torch.Generator().manual_seed(1)
    for k, v in state["model"].items():
        if (k.startswith("dit.") or k.startswith("vae.decoder.")) and v.is_floating_point():
            v.add_(torch.randn(v.shape, generator=gen) * 3)
    torch.save(state, path)


def test_a_fit_writes_the_dit_snapshot_that_streams_its_fitting_frames_best(prepared, tmp_path, monkeypatch):
    """The kept DiT steps and the last are calibrated and scored on streamed stretches of the
    fitting frames; the avatar is written from the best, with that step's calibration. A
    spoilt snapshot is never chosen; a spoilt last step is passed over; a finished fit
    re-run scores nothing again."""
    from model.personal import snapshots
    from model.personal.fit import FitPlan, fit, write_avatar
    from model.personal import avatar_file
    from model.train.trainer import load_checkpoint
    from model.weights import read_metadata

    _, _, p = prepared
    plan = FitPlan(decoder_steps=1, dit_steps=2)
    out = tmp_path / "fit"
    result = fit(p, "tiny", out, plan)
    assert set(snapshots.kept_steps(out)) == {1}
    assert "opt" in load_checkpoint(out / "dit.pt") and load_checkpoint(out / "dit_1.pt")["opt"] is None
    choice = result.snapshot
    scores = {c.step: c.psnr for c in choice.candidates}
    assert set(scores) == {1, 2} and all(np.isfinite(list(scores.values())))
    assert choice.step == max(scores, key=scores.get)
    written = load_checkpoint(out / ("dit.pt" if choice.step == 2 else "dit_1.pt"))["model"]
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in written.items())
    chosen = next(c for c in choice.candidates if c.step == choice.step)
    assert result.model.config.warp_blend == (chosen.calibration["face"], chosen.calibration["mouth"])
    write_avatar(result, p, tmp_path / "me.safetensors", "me")
    info = avatar_file.read(tmp_path / "me.safetensors").info
    assert info["dit_snapshot"]["chosen"] == choice.step and set(info["dit_snapshot"]["psnr"]) == {"1", "2"}
    assert read_metadata(tmp_path / "me.safetensors")["config"].warp_blend == result.model.config.warp_blend

    # Re-run on the finished fit: the recorded scores stand, nothing is streamed again.
    streamed = []
    real_stream = snapshots.stream_psnr
    monkeypatch.setattr(snapshots, "stream_psnr", lambda *a, **k: streamed.append(1) or real_stream(*a, **k))
    again = fit(p, "tiny", out, plan)
    assert not streamed and again.snapshot.step == choice.step
    assert again.model.config.warp_blend == result.model.config.warp_blend

    # A snapshot spoilt with noise streams worse than the last step, and the reverse.
    for spoilt, kept in (("dit_1.pt", 2), ("dit.pt", 1)):
        (out / snapshots.SCORES_FILE).unlink()
        _spoil(out / spoilt)
        r = fit(p, "tiny", out, plan)
        by_step = {c.step: c.psnr for c in r.snapshot.candidates}
        assert r.snapshot.step == kept and by_step[kept] > by_step[3 - kept] + 3, by_step
        if spoilt == "dit_1.pt":  # restore it for the second round: a fit from scratch is slow
            torch.save(load_checkpoint(out / "dit.pt") | {"opt": None, "step": 1}, out / "dit_1.pt")


def test_drift_windows_are_whole_passes_of_the_looped_frames():
    """The first and the last drift window must score the same held-out frames: franck's
    1000 frames looped over 300 s with 60 s windows compared different stretches."""
    from model.personal.evaluate_fit import drift_frames

    for loop, fps, seconds, window_s in ((1000, 24, 300, 60), (244, 25, 300, 60), (15, 25, 2.0, 0.5),
                                         (3000, 24, 300, 60)):
        run, window = drift_frames(loop, fps, seconds, window_s)
        assert window % loop == 0 and run % loop == 0 and run >= seconds * fps and run >= 2 * window
        first, last = np.arange(window) % loop, np.arange(run - window, run) % loop
        assert np.array_equal(first, last)
    assert drift_frames(1000, 24, 300, 60) == (8000, 1000)  # 60 s is nearer one pass (41.7 s) than two
