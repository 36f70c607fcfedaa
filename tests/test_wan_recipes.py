"""The photoreal recipes against their families' own loops, on the scaled-down random presets.

References (written here, following LiveTalk's `inference_example.py` and FlashHead's
`generate_video.py --audio_encode_mode stream`):
- LiveTalk: blocks of 3 latents over LiveTalk's own cache policy (one shifting buffer per
  layer, `ShiftingKVCache`), x0 + fresh-noise steps, the clean pass, one decode of the
  whole clip at the end;
- FlashHead: chunks of 9 latents from an 8 s audio deque, motion latents put back before
  every pass, each chunk decoded alone, colour-corrected, its last 5 frames re-encoded.
Both draw the same random numbers in the same order as the engine's stream (one
generator: a block's noise, then fresh noise between passes). The engine must give the
same latents and frames (fp32, CPU).
"""

import numpy as np
import pytest
import torch

from model.engine import Engine
from model.timeline import StepInput

pytest.importorskip("transformers")

SR = 16000


# float32 throughout: these tests compare the engine with each family's own loop exactly
# (the CPU bfloat16 autocast of the auto dtype has its own tests, test_engine_precision.py).
@pytest.fixture(scope="module")
def livetalk():
    return Engine.from_pretrained("livetalk-random", dtype=torch.float32)


@pytest.fixture(scope="module")
def flashhead():
    return Engine.from_pretrained("flashhead-random", dtype=torch.float32)


def portrait(seed=0, size=(90, 70)):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 220, (1, 1, 3))
    return np.clip(base + rng.integers(-30, 30, (*size, 3)), 0, 255).astype(np.uint8)


def speech(seconds, seed=1):
    t = np.arange(int(SR * seconds)) / SR
    rng = np.random.default_rng(seed)
    voiced = np.sin(2 * np.pi * 150 * t) + 0.3 * rng.standard_normal(len(t))
    return (0.3 * voiced * (np.sin(2 * np.pi * 2.5 * t) > 0)).astype(np.float32)


def to_uint8(video):
    """(1, 3, n, H, W) in [-1, 1] -> (n, H, W, 3) uint8, as the engine converts."""
    return ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def run_engine(engine, audio, steps, seed=5, knobs=None):
    """The engine's frames and committed latents over `steps` steps driven by `audio`."""
    committed = []
    recipe = engine.recipe
    finish = recipe.finish

    def keep(state, k, x0):
        out = finish(state, k, x0)
        committed.append(out.clone())
        return out

    recipe.finish = keep
    try:
        s = engine.start(portrait(), knobs, seed=seed)
        frames = [s.step(StepInput.from_clip(s.next_span(), audio, None)) for _ in range(steps)]
    finally:
        del recipe.finish
    return s, np.concatenate(frames), torch.cat(committed, dim=2)


def portrait_video(engine, s):
    return torch.from_numpy(s.reference_image).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1


# ----- LiveTalk -----------------------------------------------------------------------------


@torch.inference_mode()
def livetalk_reference(engine, image, audio, n_blocks, seed):
    """LiveTalk's loop over its own cache policy (see the module docstring)."""
    from model.wan.audio import livetalk_audio_groups
    from model.wan.baselines import ShiftingKVCache
    from model.wan.dit import livetalk_condition
    from model.wan.sampling import livetalk_sigmas

    m, fam = engine.model, engine.model.family
    d, T = m.config.dit, m.config.tokens_per_frame
    g = torch.Generator().manual_seed(seed)
    ref = m.vae.encode(image)
    h, w = ref.shape[-2:]
    cache = ShiftingKVCache(d.num_layers, d.num_heads, 9, 15, T, d.head_dim, torch.float32, "cpu")
    text = m.dit.text_kv(m.prompt)
    wav = fam.audio_stream(m.audio)
    spf = fam.audio_layout.samples_per_frame
    sigmas, timesteps = livetalk_sigmas(4, 5.0)
    blocks = []
    for b in range(n_blocks):
        noise = torch.randn(1, 16, 3, h, w, generator=g)
        first, n = (0, 9) if b == 0 else (12 * b - 3, 12)
        lo, hi = wav.span(first, n)
        clip = torch.from_numpy(audio[lo * spf:lo * spf + fam.audio_layout.samples_for(hi - lo)])
        audio_in = livetalk_audio_groups(wav.features(clip, lo, first, n), first_chunk=b == 0)
        kw = dict(cond=livetalk_condition(ref, 3, 3 * b), audio=audio_in, text=text)
        pos = torch.arange(3 * b, 3 * b + 3, dtype=torch.float64)
        x = noise
        for i in range(4):
            if b == 0:
                x[:, :, :1] = ref
            v = m.dit(x, torch.full((1, 3), float(timesteps[i])), pos, cache.attention(False), **kw)
            x0 = (x.double() - float(sigmas[i]) * v.double()).float()
            if i < 3:
                s1 = float(sigmas[i + 1])
                x = (1 - s1) * x0 + s1 * torch.randn(x0.shape, generator=g)
        if b == 0:
            x0[:, :, :1] = ref
        blocks.append(x0)
        m.dit(x0, torch.zeros(1, 3), pos, cache.attention(True), **kw)
        cache.commit(3)
    latents = torch.cat(blocks, dim=2)
    return latents, to_uint8(m.vae.decode(latents))


def test_livetalk_recipe_equals_its_own_loop_over_its_cache_policy(livetalk):
    blocks = 7  # the sink fills in 3, the window rolls from block 5 on
    audio = speech(6.0)
    s, frames, committed = run_engine(livetalk, audio, blocks)
    assert frames.shape == (9 + 12 * (blocks - 1), 64, 64, 3)
    assert s.state.cache.sink.length == 9 and s.state.cache.window.length == 3
    latents, ref_frames = livetalk_reference(livetalk, portrait_video(livetalk, s), audio, blocks, seed=5)
    torch.testing.assert_close(committed, latents, atol=2e-5, rtol=1e-5)
    assert np.abs(frames.astype(int) - ref_frames.astype(int)).max() <= 1
    # The portrait is the stream's first latent frame, exactly.
    with torch.inference_mode():
        assert torch.equal(committed[:, :, :1], livetalk.model.vae.encode(portrait_video(livetalk, s)))


def test_livetalk_on_its_own_cache_policy_gives_the_same_frames(livetalk):
    """The bench's baseline (LiveTalk's shifting buffer + SDPA) is the same recipe: same frames."""
    from model.wan.baselines import LiveTalkShifting

    audio = speech(4.0)
    _, ours, ours_latents = run_engine(livetalk, audio, 6, seed=2)
    baseline = Engine(livetalk.model, trained=False)
    baseline.recipe = LiveTalkShifting(baseline.model, baseline.device, baseline.dtype)
    _, theirs, their_latents = run_engine(baseline, audio, 6, seed=2)
    torch.testing.assert_close(ours_latents, their_latents, atol=2e-5, rtol=1e-5)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_livetalk_rebasing_leaves_the_frames_unchanged(livetalk):
    audio = speech(5.0)
    _, plain, a = run_engine(livetalk, audio, 7, seed=3)
    knobs = livetalk.config.stream.replace(rebase_every=16)
    s, rebased, b = run_engine(livetalk, audio, 7, seed=3, knobs=knobs)
    assert s.state.offset > 0  # it did rebase
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert np.abs(plain.astype(int) - rebased.astype(int)).max() <= 1


def test_livetalk_knots_and_running_ahead_are_knobs(livetalk):
    """Off by default (LiveTalk's own loop has neither); on, the stream still makes whole blocks,
    its sink runs ahead of the block and the knot is the next block's start."""
    assert (livetalk.config.stream.knot_frames, livetalk.config.stream.ahead_frames) == (0, 0)
    knobs = livetalk.config.stream.replace(knot_frames=1, ahead_frames=2)
    s, frames, _ = run_engine(livetalk, speech(5.0), 6, knobs=knobs)
    assert frames.shape[0] == 9 + 12 * 5 and np.isfinite(frames).all()
    assert s.state.knot.shape[2] == 1
    # The last block planned ended at next_latent + knot: the sink ran ahead of it.
    assert s.state.cache.sink_position >= s.state.next_latent + 1 - s.state.offset


# ----- FlashHead ----------------------------------------------------------------------------


@torch.inference_mode()
def flashhead_reference(engine, image, audio, n_chunks, seed):
    """FlashHead's streaming loop (see the module docstring)."""
    from collections import deque

    from model.dit import FullSequence
    from model.wan.audio import flashhead_audio_windows
    from model.wan.colour import match_colours
    from model.wan.sampling import flashhead_sigmas

    m = engine.model
    wan = m.vae.wan
    T = m.config.tokens_per_frame
    g = torch.Generator().manual_seed(seed)
    still = wan.encode(image.expand(-1, -1, 33, -1, -1))
    motion = still[:, :, :1]
    sigmas, timesteps = flashhead_sigmas(4, 5.0)
    buffer = deque([0.0] * (8 * SR), maxlen=8 * SR)
    out = []
    for k in range(n_chunks):
        buffer.extend(audio[k * 28 * 640:(k + 1) * 28 * 640].tolist())
        feats = m.audio.encode(torch.tensor(list(buffer), dtype=torch.float32), n_frames=200)
        tokens = m.dit.audio_proj(*flashhead_audio_windows(feats, 200 - 33, 9))
        x = torch.randn(1, 16, 9, *still.shape[-2:], generator=g)
        for i in range(4):
            x[:, :, :motion.shape[2]] = motion
            v = m.dit(x, torch.full((1, 9), float(timesteps[i])), torch.arange(9, dtype=torch.float64),
                      FullSequence(0, 9 * T, None), cond=still, audio=tokens)
            x = x - float(sigmas[i]) * v
            if i < 3:
                x = (1 - float(sigmas[i + 1])) * x + float(sigmas[i + 1]) * torch.randn(x.shape, generator=g)
        x[:, :, :motion.shape[2]] = motion
        video = match_colours(wan.decode(x), image, 1.0)
        out.append(to_uint8(video[:, :, 5:]))
        motion = wan.encode(video[:, :, -5:])
    return np.concatenate(out)


def test_flashhead_recipe_equals_its_own_streaming_loop(flashhead):
    chunks = 3
    audio = speech(chunks * 28 / 25)
    s, frames, committed = run_engine(flashhead, audio, chunks)
    assert frames.shape == (28 * chunks, 64, 64, 3) and committed.shape[2] == 9 * chunks
    assert s.state.motion.shape[2] == 2
    ref = flashhead_reference(flashhead, portrait_video(flashhead, s), audio, chunks, seed=5)
    assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1


# ----- the parts -----------------------------------------------------------------------------


def test_samplers_noise_levels_and_bf16_timesteps():
    from model.wan.sampling import flashhead_sigmas, livetalk_sigmas

    sig, t = livetalk_sigmas(4, 5.0)
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.9375, 5 / 6, 0.625]))
    assert t.tolist() == [1000.0, 936.0, 832.0, 624.0]  # bf16 of 937.5, 833.3, 625
    sig, t = flashhead_sigmas(4, 5.0)
    assert sig.tolist() == [1.0, 0.9375, 0.83203125, 0.625] and t.tolist() == [1000.0, 936.0, 832.0, 624.0]
    assert flashhead_sigmas(2, 5.0)[1].tolist() == [1000.0, 832.0]
    with pytest.raises(ValueError):
        livetalk_sigmas(0, 5.0)


def test_lab_conversion_matches_opencv_and_round_trips():
    import cv2

    from model.wan.colour import lab_to_srgb, srgb_to_lab

    rgb = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    ours = srgb_to_lab(torch.from_numpy(rgb).double()).numpy()
    diff = np.abs(ours - cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab))
    # OpenCV's float path approximates the gamma and cube root (up to 0.5 in a*, 0.08 on
    # average); a wrong matrix or white point would be off by whole units.
    assert diff.max() < 0.6 and diff.mean() < 0.1
    known = {(1, 1, 1): (100.0, 0.0, 0.0), (0, 0, 0): (0.0, 0.0, 0.0), (1, 0, 0): (53.24, 80.09, 67.20),
             (0, 0, 1): (32.30, 79.19, -107.86)}  # CIELAB of sRGB white, black, red, blue (D65)
    for rgb_value, lab in known.items():
        got = srgb_to_lab(torch.tensor(rgb_value, dtype=torch.float64)).numpy()
        assert np.abs(got - lab).max() < 0.02, (rgb_value, got)
    back = lab_to_srgb(torch.from_numpy(ours)).numpy()
    assert np.abs(back - rgb).max() < 1e-5  # the published matrices are inverses to 7 digits


def test_colour_matching_moves_frame_statistics_to_the_portrait():
    from model.wan.colour import match_colours, srgb_to_lab

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 1, 16, 16, generator=g) * 1.2 - 0.6
    video = (torch.rand(1, 3, 4, 16, 16, generator=g) * 0.8 - 0.1).clamp(-1, 1)
    out = match_colours(video, ref, 1.0)
    lab = srgb_to_lab(((out + 1) / 2).permute(0, 2, 3, 4, 1).double())
    ref_lab = srgb_to_lab(((ref + 1) / 2).permute(0, 2, 3, 4, 1).double())
    torch.testing.assert_close(lab.mean(dim=(2, 3))[0], ref_lab.mean(dim=(2, 3))[0].expand(4, 3), atol=0.5, rtol=0)
    assert torch.equal(match_colours(video, ref, 0.0), video)
    half = match_colours(video, ref, 0.5)
    torch.testing.assert_close(half, (video + out) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,rebase_every", [("livetalk", 1024), ("livetalk", 16), ("flashhead", 1024)])
def test_restore_goes_back_over_whole_steps(family, rebase_every, livetalk, flashhead):
    """Rewind three steps (LiveTalk: after the ring wrapped; with rebase_every=16 across a
    rebase) and step again with the same driving: the same frames (bit for bit without a
    rebase; undoing a rebase rotates keys back, which rounds)."""
    engine = livetalk if family == "livetalk" else flashhead
    knobs = engine.config.stream.replace(rebase_every=rebase_every)
    audio = speech(9.0)
    s = engine.start(portrait(), knobs, seed=11)
    s.keep_history(4)
    steps = 8 if family == "livetalk" else 4
    frames = [s.step(StepInput.from_clip(s.next_span(), audio, None)) for _ in range(steps)]
    back = steps - 3
    snap = s.rewind_point(sum(len(f) for f in frames[:back]))
    assert snap is not None and snap.frame == sum(len(f) for f in frames[:back])
    s.restore(snap)
    again = [s.step(StepInput.from_clip(s.next_span(), audio, None)) for _ in range(3)]
    tolerance = 1 if rebase_every == 16 else 0
    for a, b in zip(frames[back:], again):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= tolerance
    assert getattr(s.state, "offset", 0) > 0 or rebase_every == 1024


@pytest.mark.parametrize("family", ["livetalk", "flashhead"])
def test_streams_stepped_together_equal_streams_stepped_alone(family, livetalk, flashhead):
    """Engine.step_many batches the streams of one recipe into each model pass (the prompt's
    keys/values shared across the batch): the frames are each stream's own."""
    engine = livetalk if family == "livetalk" else flashhead
    audios = [speech(5.0, seed=1), speech(5.0, seed=2)]
    steps = 5 if family == "livetalk" else 2
    together = [engine.start(portrait(seed=i), seed=20 + i) for i in range(2)]
    got = [[], []]
    for _ in range(steps):
        out = engine.step_many(together, [StepInput.from_clip(s.next_span(), a, None) for s, a in zip(together, audios)])
        for i, frames in enumerate(out):
            got[i].append(frames)
    for i in range(2):
        alone = engine.start(portrait(seed=i), seed=20 + i)
        for k in range(steps):
            want = alone.step(StepInput.from_clip(alone.next_span(), audios[i], None))
            assert np.abs(want.astype(int) - got[i][k].astype(int)).max() <= 1, (i, k)
