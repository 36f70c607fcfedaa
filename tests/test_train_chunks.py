"""Trainer mechanics: the training chunk equals the engine's chunk, the loss falls, checkpoints round-trip."""

import dataclasses

import numpy as np
import pytest
import torch

from model.avatar import AvatarModel
from model.config import DiTConfig, DrivingConfig, StreamKnobs, VAEConfig, from_name
from model.train.chunks import ChunkPlan, ChunkTrainer, ClipBatch, Context, plan_chunk
from model.train.losses import latent_weight, x0_loss


def small_config():
    cfg = from_name("tiny")
    return dataclasses.replace(
        cfg, height=32, width=32,
        dit=DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, drive_dim=32, latent_channels=4),
        vae=VAEConfig(z_channels=4, base_channels=8, channel_mults=(1, 2, 2, 2)),
        driving=DrivingConfig(hidden=16),
        stream=StreamKnobs(chunk_frames=2, window_frames=4, knot_frames=1, ahead_frames=2, denoise_steps=2))


def fixed_batch(cfg, n_latents=6, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = 1 + 4 * (n_latents - 1)
    frames = torch.rand(batch, 3, T, cfg.height, cfg.width, generator=g) * 2 - 1
    frames = frames.cumsum(2).clamp(-1, 1)
    return ClipBatch(frames=frames, reference=frames[:, :, -1], audio=torch.randn(batch, T * 640, generator=g) * 0.1,
                     motion=torch.zeros(batch, T, cfg.driving.motion_dim),
                     weight=torch.ones(batch, 1, T, cfg.height, cfg.width))


def test_training_chunk_equals_one_masked_pass_over_reference_context_and_chunk():
    """Without knots the cached training chunk equals an independent computation: one
    block-causal windowed pass over [reference | clean context at t=0 | noisy chunk]."""
    from model.dit import FullSequence
    from model.knot_forcing import build_cond

    torch.manual_seed(0)
    cfg = small_config()
    cfg.stream = cfg.stream.replace(knot_frames=0, window_frames=2)
    model = AvatarModel(cfg).eval()
    for b in model.dit.blocks:  # make the driving path live
        torch.nn.init.normal_(b.drive_attn.o.weight, std=0.2)
    trainer = ChunkTrainer(model)
    batch = fixed_batch(cfg)
    plan = ChunkPlan(start=4, knobs=cfg.stream, ref_lead=1)
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        out = trainer.forward(batch, plan, sigma, torch.Generator().manual_seed(1))
        z, ref = trainer.latents(batch)
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(out["x0"].shape, generator=g)
        x_t = 0.3 * z[:, :, 4:6] + 0.7 * noise
        seq = torch.cat([ref, z[:, :, :4], x_t], dim=2)
        t = torch.cat([torch.zeros(2, 5), torch.full((2, 2), 700.0)], dim=1)
        ref_pos = 4 + 1 + 2 + 1
        pos = torch.tensor([ref_pos, 1, 2, 3, 4, 5, 6], dtype=torch.float64)
        cond = torch.cat([build_cond(cfg, ref, None, 1) * 0, build_cond(cfg, ref, None, 6)], dim=2)
        drive = torch.cat([trainer.drive(batch, s, 2) for s in (0, 2, 4)], dim=1)  # each step reads its own audio
        T = cfg.tokens_per_frame
        v = model.dit(seq, t, pos, FullSequence(T, 2 * T, 2 * T), cond=cond, drive=drive)[:, :, 5:]
        expected = x_t - 0.7 * v
    assert (out["x0_pred"] - expected).abs().max().item() < 1e-4
    # ...and the context matters.
    with torch.no_grad():
        other = dataclasses.replace(batch, frames=batch.frames.flip(2))
        c = trainer.forward(other, plan, sigma, torch.Generator().manual_seed(1))
    assert not torch.allclose(out["x0_pred"], c["x0_pred"])


def test_rollout_context_runs_and_differs_from_teacher_forcing():
    torch.manual_seed(0)
    cfg = small_config()
    model = AvatarModel(cfg).eval()
    trainer = ChunkTrainer(model)
    batch = fixed_batch(cfg, n_latents=7)
    plan = ChunkPlan(start=4, knobs=cfg.stream, ref_lead=0)
    with torch.no_grad():
        tf = trainer.forward(batch, plan, torch.full((2,), 0.5), torch.Generator().manual_seed(3))
        ro = trainer.forward(batch, plan, torch.full((2,), 0.5), torch.Generator().manual_seed(3), rollout="all")
        last = trainer.forward(batch, plan, torch.full((2,), 0.5), torch.Generator().manual_seed(3), rollout="last")
    assert not torch.allclose(tf["x0_pred"], ro["x0_pred"])
    # "last" generates only the chunk before the trained one: neither of the other two...
    assert not torch.allclose(last["x0_pred"], ro["x0_pred"]) and not torch.allclose(last["x0_pred"], tf["x0_pred"])
    # ...and exactly "all" when that chunk is the only context (the stream's first chunk).
    first = ChunkPlan(start=2, knobs=cfg.stream, ref_lead=0)
    with torch.no_grad():
        a = trainer.forward(batch, first, torch.full((2,), 0.5), torch.Generator().manual_seed(3), rollout="all")
        b = trainer.forward(batch, first, torch.full((2,), 0.5), torch.Generator().manual_seed(3), rollout="last")
    assert torch.equal(a["x0_pred"], b["x0_pred"])


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    cfg = small_config()
    model = AvatarModel(cfg)
    trainer = ChunkTrainer(model)
    batch = fixed_batch(cfg)
    params = list(model.dit.parameters()) + list(model.driving.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    plan = ChunkPlan(start=2, knobs=cfg.stream, ref_lead=1)
    losses = []
    for step in range(30):
        out = trainer.forward(batch, plan, torch.full((2,), 0.8), torch.Generator().manual_seed(0))
        loss = x0_loss(out["x0_pred"], out["x0"], latent_weight(batch.weight, plan.start, 3, spatial=8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_latent_weight_keeps_the_mouth_weight():
    w = torch.ones(1, 1, 9, 32, 32)
    w[:, :, 5, 20:22, 10:12] = 4.0  # a small mouth in video frame 5 -> latent frame 2
    lw = latent_weight(w, 0, 3)
    assert lw.shape == (1, 1, 3, 4, 4)
    assert lw[0, 0, 2, 2, 1] == 4.0 and lw[0, 0, 1].max() == 1.0


def test_plan_chunk_on_the_engine_grid():
    g = torch.Generator().manual_seed(0)
    knobs = StreamKnobs(chunk_frames=2, knot_frames=1, ahead_frames=4)
    plans = [plan_chunk(8, knobs, g) for _ in range(50)]
    assert {p.start for p in plans} <= {0, 2, 4}
    assert all(0 <= p.ref_lead <= 4 for p in plans)
    with pytest.raises(ValueError):
        plan_chunk(2, knobs, g)
    assert {p.knobs.window_frames for p in plans} == {knobs.window_frames}
    windows = {plan_chunk(8, knobs, g, windows=(2, 12)).knobs.window_frames for _ in range(200)}
    assert windows == set(range(2, 13))


def live_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = AvatarModel(cfg).eval()
    for b in model.dit.blocks:  # make the driving path live
        torch.nn.init.normal_(b.drive_attn.o.weight, std=0.2)
    return model


def speech_clip(cfg, frames, seed=0):
    """16 kHz audio (a gated tone) from sample 0 and given motion from frame 0, as numpy."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames * 640 + 16000) / 16000
    gate = np.repeat(rng.random(len(t) // 1600 + 1) > 0.5, 1600)[:len(t)]
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * gate).astype(np.float32)
    motion = np.zeros((frames + 25, cfg.driving.motion_dim), np.float32)
    motion[:, 0] = 0.2 * np.sin(np.arange(len(motion)) / 5)  # yaw, given
    motion[:, cfg.driving.motion_dim // 2] = 1.0
    return audio, motion


def engine_chain(model, knobs, audio, motion, n_chunks, seed):
    """What the engine streams: per chunk its committed latents and its knot (inference mode)."""
    from model.engine import Engine
    from model.timeline import StepInput

    engine = Engine(model)
    stream = engine.start(np.full((32, 32, 3), 90, np.uint8), knobs, seed=seed)
    recipe, latents, knots, positions = engine.recipe, [], [], []
    with torch.inference_mode():
        for _ in range(n_chunks):
            inp = StepInput.from_clip(stream.next_span(), audio, motion)
            plan = recipe.plan(stream.state, knobs, inp, stream.generator)
            positions.append(stream.state.reference.position)
            x0 = recipe.denoise([stream.state], [plan], knobs, knobs.denoise_steps, lambda: None)
            committed = recipe.finish(stream.state, knobs, x0)
            recipe.write([stream.state], [plan], knobs, committed, [None])
            latents.append(committed.clone())
            knots.append(stream.state.knot)
    return stream.state.reference_latent.clone(), latents, knots, positions


@pytest.mark.parametrize("knobs", [StreamKnobs(chunk_frames=2, window_frames=3, knot_frames=1, ahead_frames=2,
                                               denoise_steps=2, knot_fusion=0.7),
                                   StreamKnobs(chunk_frames=2, window_frames=2, knot_frames=0, ahead_frames=0,
                                               denoise_steps=3)])
def test_a_chain_is_the_engines_stream(knobs):
    """The trainer's chain (replay buffer) and the engine run the same chunk step: from the
    same reference, driving (speech and motion through each side's own path) and noise, every
    chunk's committed latents and knot are the engine's, over a window that fills and evicts
    (window 3 < 5 chunks x 2), with knots fused, running ahead moving the reference, or off."""
    from model.knot_forcing import reference_position

    cfg = small_config()
    model = live_model(cfg)
    n = 5
    audio, motion = speech_clip(cfg, 1 + 4 * (2 * n + 1))
    ref, want, want_knots, want_pos = engine_chain(model, knobs, audio, motion, n, seed=7)
    assert want_pos == [reference_position(knobs, 2 * i) for i in range(n)]

    g = torch.Generator().manual_seed(7)  # the engine's stream generator: one draw per chunk
    batch = ClipBatch(frames=None, reference=None, audio=torch.from_numpy(audio)[None],
                      motion=torch.from_numpy(motion)[None], weight=None,
                      latents=torch.zeros(1, 4, 2 * n + 1, 4, 4), ref_latent=ref)
    chain = ChunkTrainer(model).rollout_chain(batch, knobs, n, [7], noise_of=lambda s, i, shape: torch.randn(
        (1, *shape), generator=g)[0])
    assert chain.latents.shape == (1, 4, 2 * n, 4, 4)
    for i in range(n):
        assert (chain.latents[:, :, 2 * i:2 * i + 2] - want[i]).abs().max().item() < 1e-4, i
        if knobs.knot_frames:
            assert (chain.knots[i] - want_knots[i]).abs().max().item() < 1e-4, i
        else:
            assert chain.knots[i] is None and want_knots[i] is None


def test_a_chain_regenerated_from_its_seed_is_the_same():
    """Replay-buffer determinism: a chain's noise is keyed by (seed, chunk), so regenerating
    it gives the same context; another seed another one; a chain does not depend on the
    other chains generated in the same batch."""
    cfg = small_config()
    model = live_model(cfg)
    trainer = ChunkTrainer(model)
    batch = fixed_batch(cfg, n_latents=9, batch=2)
    z, ref = trainer.latents(batch)
    pool_batch = ClipBatch(None, None, batch.audio, batch.motion, None, z, ref)
    k = cfg.stream
    a = trainer.rollout_chain(pool_batch, k, 4, [11, 12])
    b = trainer.rollout_chain(pool_batch, k, 4, [11, 12])
    assert torch.equal(a.latents, b.latents) and all(torch.equal(x, y) for x, y in zip(a.knots, b.knots))
    c = trainer.rollout_chain(pool_batch, k, 4, [11, 13])
    assert torch.equal(c.latents[0], a.latents[0]) and not torch.allclose(c.latents[1], a.latents[1])
    alone = trainer.rollout_chain(ClipBatch(None, None, batch.audio[1:], batch.motion[1:], None, z[1:], ref[1:]),
                                  k, 4, [12])
    assert (alone.latents[0] - a.latents[1]).abs().max().item() < 1e-5
    ctx = a.context(3, k.chunk_frames)
    assert ctx.latents.shape[2] == 6 and torch.equal(ctx.knot, a.knots[2])


def test_a_given_context_of_the_truth_is_teacher_forcing():
    """forward(context=...) writes the given latents into the window as teacher forcing
    writes the clip's own: with the truth and the same knot it is the same computation."""
    cfg = small_config()
    model = live_model(cfg)
    trainer = ChunkTrainer(model)
    batch = fixed_batch(cfg, n_latents=9)
    plan = ChunkPlan.as_engine(4, cfg.stream)
    sigma = torch.full((2,), 0.6)
    with torch.no_grad():
        z, _ = trainer.latents(batch)
        tf = trainer.forward(batch, plan, sigma, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        knot = trainer._noisy_knot(z[:, :, 4:5], g)
        given = trainer.forward(batch, plan, sigma, g, context=Context(z[:, :, :4], knot))
        other = trainer.forward(batch, plan, sigma, torch.Generator().manual_seed(1),
                                context=Context(z[:, :, :4].flip(0), knot))
    assert torch.equal(tf["x0_pred"], given["x0_pred"])
    assert not torch.allclose(tf["x0_pred"], other["x0_pred"])
    with pytest.raises(ValueError):
        trainer.forward(batch, plan, sigma, g, context=Context(z[:, :, :2], knot))


def test_truncated_rollout_trains_through_the_chunk_before():
    """rollout="truncated": the loss reaches the weights also through the previous chunk's
    generation (its window K/V and knot), so the gradient differs from "all", whose context
    carries none; their forward values are the same computation."""
    cfg = small_config()
    model = live_model(cfg).train()
    trainer = ChunkTrainer(model)
    batch = fixed_batch(cfg, n_latents=9)
    plan = ChunkPlan.as_engine(4, cfg.stream)
    grads, preds = {}, {}
    for mode in ("all", "truncated"):
        model.zero_grad()
        out = trainer.forward(batch, plan, torch.full((2,), 0.6), torch.Generator().manual_seed(2), rollout=mode)
        x0_loss(out["x0_pred"], out["x0"], torch.ones_like(out["x0"][:, :1])).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.dit.parameters() if p.grad is not None])
        preds[mode] = out["x0_pred"].detach()
    assert (preds["all"] - preds["truncated"]).abs().max().item() < 1e-5
    assert not torch.allclose(grads["all"], grads["truncated"], rtol=1e-3, atol=1e-7)


def test_replay_buffer_samples_the_chains_it_made():
    from model.train.data import LatentPool
    from model.train.replay import ReplayBuffer

    cfg = small_config()
    model = live_model(cfg)
    trainer = ChunkTrainer(model)
    batch = fixed_batch(cfg, n_latents=9, batch=4)
    z, ref = trainer.latents(batch)
    pool = LatentPool({"latents": z, "ref_latent": ref, "latent_weight": torch.ones(4, 1, 9, 4, 4),
                       "audio": batch.audio, "motion": batch.motion})
    with pytest.raises(ValueError):  # 4 chunks of context + the trained one need 11 latents
        ReplayBuffer(trainer, pool, cfg.stream, 4, 2, 2, (2, 4), 0.3)
    buf = ReplayBuffer(trainer, pool, cfg.stream, 3, 2, 2, (2, 4), 0.3)
    gen = torch.Generator().manual_seed(0)
    buf.refresh(gen)
    assert len(buf.groups) == 2 and all(2 <= g.knobs.window_frames <= 4 for g in buf.groups)
    # Determinism: a stored chain is what its clips and seeds regenerate.
    g0 = buf.groups[0]
    again = buf.generate(g0.clips, g0.seeds, g0.knobs.window_frames)
    assert torch.equal(again.chain.latents, g0.chain.latents)
    teacher = 0
    for _ in range(40):
        s = buf.sample(gen)
        c = s.plan.knobs.chunk_frames
        assert s.plan.start % c == 0 and s.plan.start + c + 1 <= 9
        assert s.plan == ChunkPlan.as_engine(s.plan.start, s.plan.knobs)
        if s.context is None:
            teacher += 1
        else:
            assert s.plan.start >= c and s.context.latents.shape[2] == s.plan.start
            group = next(g for g in buf.groups if g.knobs == s.plan.knobs and torch.equal(
                g.chain.latents[:, :, :s.plan.start], s.context.latents))
            assert torch.equal(s.batch.latents, pool.take(group.clips).latents)
    assert 3 <= teacher <= 25
    with torch.no_grad():
        s = next(s for s in iter(lambda: buf.sample(gen), None) if s.context is not None)
        out = trainer.forward(s.batch, s.plan, torch.full((2,), 0.5), gen, context=s.context)
    assert out["x0_pred"].shape == (2, 4, 3, 4, 4)
