"""Trainer mechanics: the training chunk equals the engine's chunk, the loss falls, checkpoints round-trip."""

import dataclasses

import numpy as np
import pytest
import torch

from model.avatar import AvatarModel
from model.config import DiTConfig, DrivingConfig, StreamKnobs, VAEConfig, from_name
from model.train.chunks import ChunkPlan, ChunkTrainer, ClipBatch, plan_chunk
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
        drive = trainer.drive(batch, 0, 6)
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


def test_a_generated_context_chunk_is_the_engines_chunk():
    """The trainer's rollout and the engine run one chunk step (model/knot_forcing.py): the
    first chunk generated from the same reference, noise and (silent) driving, with the same
    reference position, is the engine's chunk."""
    from model.cache import ReferenceCache, WindowCache
    from model.engine import Engine
    from model.knot_forcing import encode_reference
    from model.timeline import StepInput

    torch.manual_seed(0)
    cfg = small_config()
    model = AvatarModel(cfg).eval()
    for b in model.dit.blocks:  # make the driving path live
        torch.nn.init.normal_(b.drive_attn.o.weight, std=0.2)
    engine = Engine(model)
    stream = engine.start(np.full((32, 32, 3), 90, np.uint8), seed=5)
    k = stream.knobs
    with torch.inference_mode():
        plan = engine.recipe.plan(stream.state, k, StepInput(stream.next_span()), stream.generator)
        want = engine.recipe.denoise([stream.state], [plan], k, k.denoise_steps, lambda: None)

    trainer = ChunkTrainer(model)
    d, T = cfg.dit, cfg.tokens_per_frame
    batch = ClipBatch(frames=None, reference=None, audio=torch.zeros(1, 16000),
                      motion=torch.zeros(1, 40, cfg.driving.motion_dim), weight=None)
    rc = ReferenceCache(d.num_layers, 1, d.num_heads, T, d.head_dim, torch.float32, "cpu")
    wc = WindowCache(d.num_layers, 1, d.num_heads, k.window_frames, T, d.head_dim, torch.float32, "cpu")
    ref = stream.state.reference_latent.clone()
    with torch.no_grad():
        rc.position = 1 + k.chunk_frames + k.knot_frames + k.ahead_frames  # the engine's running-ahead start
        encode_reference(model.dit, ref, rc)
        drive = trainer.drive(batch, 0, k.chunk_frames + k.knot_frames)
        clean, knot = trainer._generate(ref, 0, None, drive, rc, wc, k, torch.Generator().manual_seed(5))
    assert rc.position == stream.state.reference.position
    got = torch.cat([clean, knot], dim=2)
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-4
