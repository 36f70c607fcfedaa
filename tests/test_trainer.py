"""`knotstream train` end to end on a small config: stages run, checkpoints resume, export loads."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.avatar import AvatarModel
from model.engine import Engine
from model.train import trainer
from model.train.data import SpeechBank
from model.weights import save_model
from tests.test_train_chunks import small_config


def args_for(tmp_path, **kw):
    base = dict(stage="all", model=str(tmp_path / "start.safetensors"), out=str(tmp_path / "ck"),
                data=str(tmp_path / "data"), vae_steps=3, dit_steps=3, rollout_steps=2, rollout_context="all", decoder_steps=2,
                reference_decoder=False, temporal_weight=1.0, knob=[], batch=2, lr=1e-3,
                clip_latents=5, pool=4, threads=0, seed=0, save_every=1, max_minutes=0,
                export=str(tmp_path / "out.safetensors"), context_steps=0, replay_steps=3, replay_every=2,
                replay_chains=4, chain_chunks=1, teacher_forced=0.3, windows=None, keep_every=0, keep_steps=(),
                mouth_given=0.0, mouth_alone=0.5)
    base.update(kw)
    return argparse.Namespace(**base)


def small_setup(tmp_path):
    """A small start model and a two-sentence speech bank in tmp_path."""
    save_model(AvatarModel.random(small_config(), seed=0), tmp_path / "start.safetensors")
    t = np.arange(16000) / 16000
    bank = SpeechBank((0.2 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), np.array([0, 8000, 16000]), ["a", "b"])
    (tmp_path / "data").mkdir()
    bank.save(tmp_path / "data" / "speech_bank.npz")


def test_train_all_stages_resume_and_export(tmp_path):
    small_setup(tmp_path)

    assert trainer.run(args_for(tmp_path)) == 0
    ck = tmp_path / "ck"
    steps = {s: torch.load(ck / f"{s}.pt", weights_only=False)["step"] for s in ("vae", "dit", "rollout", "decoder")}
    assert steps == {"vae": 3, "dit": 3, "rollout": 2, "decoder": 2}
    # The decoder stage trains the decoder alone: the encoder (the DiT's latent space) is untouched.
    before = torch.load(ck / "rollout.pt", weights_only=False)["model"]
    after = torch.load(ck / "decoder.pt", weights_only=False)["model"]
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("vae.decoder."), name
    vae_state = torch.load(ck / "vae.pt", weights_only=False)
    assert vae_state["extra"]["stats_done"] and vae_state["config"]["vae"]["latent_std"] is not None

    # Resuming continues from the saved step instead of starting over. With --mouth-given the
    # driving encoder's mouth inputs get gradients (never given, they only decay: AdamW).
    from model.config import MOTION_FIELDS

    mouth = [MOTION_FIELDS.index("mouth_open"), len(MOTION_FIELDS) + MOTION_FIELDS.index("mouth_open")]
    w0 = torch.load(ck / "dit.pt", weights_only=False)["model"]["driving.motion_mlp.0.weight"][:, mouth]
    assert trainer.run(args_for(tmp_path, stage="dit", dit_steps=5, mouth_given=1.0)) == 0
    state = torch.load(ck / "dit.pt", weights_only=False)
    assert state["step"] == 5
    ratio = state["model"]["driving.motion_mlp.0.weight"][:, mouth] / w0
    assert float(ratio.max() - ratio.min()) > 1e-3, "the mouth columns only decayed: the mouth was not given"

    engine = Engine.from_pretrained(str(tmp_path / "out.safetensors"))
    assert engine.config.vae.latent_std is not None
    frames = engine.start(np.full((32, 32, 3), 128, np.uint8)).step()
    assert frames.shape[1:] == (32, 32, 3)

    # A finished VAE asked for more steps trains on; the DiT stage then re-encodes its pool.
    pool_before = torch.load(ck / "latent_pool_5.pt", weights_only=False)["vae_fingerprint"]
    assert trainer.run(args_for(tmp_path, stage="vae", vae_steps=5)) == 0
    assert torch.load(ck / "vae.pt", weights_only=False)["step"] == 5
    assert trainer.run(args_for(tmp_path, stage="dit", dit_steps=7, pool=40, batch=8)) == 0
    pool = torch.load(ck / "latent_pool_5.pt", weights_only=False)
    assert not torch.equal(pool["vae_fingerprint"], pool_before) and len(pool["latents"]) == 40

    # The decoder stage can switch to the reference-conditioned decoder; the latent pool stays
    # valid (same encoder) and the exported model streams with it.
    assert trainer.run(args_for(tmp_path, stage="decoder", decoder_steps=4, reference_decoder=True,
                                knob=["denoise_steps=2"])) == 0
    state = torch.load(ck / "decoder.pt", weights_only=False)
    assert state["step"] == 4 and state["config"]["vae"]["reference_decoder"] is True
    assert any(k.startswith("vae.decoder.reference_blend.") for k in state["model"])
    encoder_before = torch.load(ck / "dit.pt", weights_only=False)["model"]
    assert all(torch.equal(v, state["model"][k]) for k, v in encoder_before.items() if k.startswith("vae.encoder."))
    engine = Engine.from_pretrained(str(tmp_path / "out.safetensors"))
    assert engine.config.vae.reference_decoder and engine.config.stream.denoise_steps == 2  # --knob exported
    assert engine.start(np.full((32, 32, 3), 128, np.uint8)).step().shape[1:] == (32, 32, 3)


def test_replay_stage_fine_tunes_a_model_file_resumes_and_exports(tmp_path):
    """`--stage replay` (not part of `all`): fine-tunes the given file on replayed chains with
    random window lengths, checkpoints, resumes from its step and exports a model that streams."""
    small_setup(tmp_path)
    args = args_for(tmp_path, stage="replay", clip_latents=7, chain_chunks=2, windows=(2, 4), batch=2,
                    replay_chains=4, replay_every=2, replay_steps=3, pool=6, keep_every=2)
    assert trainer.run(args) == 0
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["latent_pool_7.pt", "replay.pt", "replay_2.pt"]
    state = torch.load(ck / "replay.pt", weights_only=False)
    start = AvatarModel.random(small_config(), seed=0).state_dict()
    assert state["step"] == 3
    assert any(not torch.equal(start[k], v) for k, v in state["model"].items() if k.startswith("dit."))
    assert all(torch.equal(start[k], v) for k, v in state["model"].items() if k.startswith("vae."))
    args.replay_steps = 4
    assert trainer.run(args) == 0
    assert torch.load(ck / "replay.pt", weights_only=False)["step"] == 4
    frames = Engine.from_pretrained(str(tmp_path / "out.safetensors")).start(np.full((32, 32, 3), 128, np.uint8)).step()
    assert frames.shape[1:] == (32, 32, 3)
    # A kept checkpoint exports on its own (a run evaluated part way), with stream knobs.
    assert trainer.run(args_for(tmp_path, stage="replay", replay_steps=0, model=str(ck / "replay_2.pt"),
                                out=str(tmp_path / "ck2"), knob=["knot_frames=0"])) == 0
    part = Engine.from_pretrained(str(tmp_path / "out.safetensors"))
    kept = torch.load(ck / "replay_2.pt", weights_only=False)
    assert kept["opt"] is None  # the weights only: a kept step is read, never resumed
    kept = kept["model"]
    assert part.config.stream.knot_frames == 0
    exported = part.model.state_dict()
    assert all(torch.equal(exported[k], v.half().float()) for k, v in kept.items() if k.startswith("dit."))
    with pytest.raises(ValueError):  # a buffer of 3 chains cannot be split into groups of one batch (2)
        trainer.run(args_for(tmp_path, stage="replay", replay_chains=3, replay_steps=9, clip_latents=7,
                             chain_chunks=2, pool=6))


@pytest.mark.parametrize("option, value", [("--mouth-given", "1.5"), ("--mouth-alone", "-0.1"), ("--mouth-given", "half")])
def test_a_share_outside_0_1_exits_2_with_a_message(option, value):
    r = subprocess.run([sys.executable, "-m", "server.cli", "train", option, value], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and option in r.stderr and "between 0 and 1" in r.stderr and "Traceback" not in r.stderr
