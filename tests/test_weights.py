"""Model files: save/load round trip (built on the meta device), clear errors; sampler schedule."""

import dataclasses

import numpy as np
import pytest
import torch

from model.avatar import AvatarModel
from model.engine import Engine
from model.sampler import denoise, get_sigmas
from model.weights import load_model, read_metadata, save_model
from tests.test_train_chunks import small_config


def test_save_load_round_trip_gives_the_same_stream(tmp_path):
    cfg = small_config()
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, latent_mean=(0.1,) * 4, latent_std=(2.0,) * 4))
    model = AvatarModel.random(cfg, seed=1)
    path = tmp_path / "m.safetensors"
    save_model(model, path, extra={"note": "test"})
    meta = read_metadata(path)
    assert meta["config"] == cfg and meta["extra"] == {"note": "test"}
    loaded = load_model(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    img = np.full((40, 40, 3), 120, np.uint8)
    a = Engine(model).start(img, seed=3)
    b = Engine.from_pretrained(str(path), dtype=torch.float32).start(img, seed=3)  # as Engine(model): float32
    assert np.array_equal(a.step(), b.step())


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a knotstream model"):
        load_model(tmp_path / "other.safetensors")


def test_sigmas_and_euler_on_a_known_flow():
    s = get_sigmas(4, 3.0)
    assert s[0] == 1 and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    # For data concentrated at x0, the exact velocity is (x - x0) / sigma: Euler lands on x0.
    x0 = torch.tensor([0.3, -1.2])
    out = denoise(lambda x, sig: (x - x0) / sig, torch.tensor([2.0, 0.5]), s)
    assert torch.allclose(out, x0, atol=1e-6)


def test_a_file_of_the_ten_legacy_motion_fields_loads_and_drives_as_before(tmp_path):
    """Files written before the head fields (the bundled tiny.safetensors among them) have a
    motion encoder of 20 inputs and a warp regression over 10 fields: they load widened, and
    the widened model gives what the stored one gave for the same motion."""
    import json

    from safetensors.torch import save_file

    from model.config import LEGACY_MOTION_FIELDS, MOTION_FIELDS, ModelConfig
    from model.motion_warp import MotionWarp, features
    from model.weights import widen_motion_state

    old, new = len(LEGACY_MOTION_FIELDS), len(MOTION_FIELDS)
    cfg = small_config()
    model = AvatarModel.random(cfg, seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("motion_mlp.0.weight"))
    keep = [MOTION_FIELDS.index(f) for f in LEGACY_MOTION_FIELDS]
    legacy_w = state[key][:, keep + [new + i for i in keep]].clone()            # (h, 20) as a legacy file stores it
    state[key] = legacy_w
    d = cfg.to_dict()
    d["driving"]["motion_dim"] = 2 * old
    assert ModelConfig.from_dict(d).driving.motion_dim == 2 * new               # the config is read widened
    path = tmp_path / "legacy.safetensors"
    save_file(state, str(path), metadata={"format": "knotstream-avatar-v1", "config": json.dumps(d)})
    loaded = load_model(path)
    assert loaded.driving.motion_mlp[0].weight.shape[1] == 2 * new

    g = torch.Generator().manual_seed(0)
    legacy_vec = torch.rand(5, 2 * old, generator=g)
    vec = torch.zeros(5, 2 * new)
    vec[:, keep], vec[:, [new + i for i in keep]] = legacy_vec[:, :old], legacy_vec[:, old:]
    vec[:, MOTION_FIELDS.index("head_x")] = 0.2                                 # a head field given to a legacy model
    vec[:, new + MOTION_FIELDS.index("head_x")] = 1.0
    assert torch.allclose(loaded.driving.motion_mlp[0](vec), legacy_vec @ legacy_w.T + state[key.replace("weight", "bias")])

    # A legacy warp: its 21 regression rows (1, fields, squares) and 10 rest values.
    n_points = 7
    lm = torch.randn(1 + 2 * old, 2 * n_points, generator=g)
    wide = widen_motion_state({"warp.landmark_map": lm, "warp.rest": torch.arange(old, dtype=torch.float32)})
    warp = MotionWarp(n_points, new, 32)
    warp.set_fit(wide["warp.landmark_map"].numpy(), np.zeros((n_points, 2)), wide["warp.rest"].numpy())
    fields = torch.zeros(3, new)
    fields[:, keep] = torch.rand(3, old, generator=g)
    fields[:, MOTION_FIELDS.index("head_scale")] = 0.3
    assert torch.allclose(warp.landmarks(fields).reshape(3, -1), features(fields[:, keep]) @ lm, atol=1e-5)
    assert torch.equal(warp.rest[keep], torch.arange(old, dtype=torch.float32))


def test_a_fit_checkpointed_before_the_head_fields_resumes_its_optimiser(tmp_path):
    """A DiT-stage checkpoint of ten motion fields (model and Adam state) resumes: the
    weights widen on load (_build_model) and so do Adam's moments (the moved columns keep
    theirs, the new ones start at zero), and the next step runs. Without the widening
    the step fails on the moments' shape."""
    from types import SimpleNamespace

    from model.config import LEGACY_MOTION_FIELDS, MOTION_FIELDS
    from model.train.trainer import _build_model, _resume, save_checkpoint

    old, new = len(LEGACY_MOTION_FIELDS), len(MOTION_FIELDS)
    keep = [MOTION_FIELDS.index(f) for f in LEGACY_MOTION_FIELDS]
    columns = keep + [new + i for i in keep]
    cfg = small_config()
    model = AvatarModel.random(cfg, seed=2)
    layer = model.driving.motion_mlp[0]
    opt = torch.optim.AdamW(model.driving.parameters(), lr=1e-3)
    layer(torch.rand(3, 2 * new)).square().sum().backward()
    opt.step()

    # The same checkpoint as a legacy fit wrote it: 20 input columns, moments of 20.
    class Legacy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = model.config

        def state_dict(self):
            state = {k: v.clone() for k, v in model.state_dict().items()}
            key = next(k for k in state if k.endswith("motion_mlp.0.weight"))
            state[key] = state[key][:, columns]
            return state

    legacy_opt = opt.state_dict()
    index = [p is layer.weight for p in model.driving.parameters()].index(True)
    moments = {k: legacy_opt["state"][index][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    legacy_opt["state"][index] = {**legacy_opt["state"][index], **{k: v[:, columns] for k, v in moments.items()}}
    legacy = SimpleNamespace(state_dict=lambda: legacy_opt)
    gen = torch.Generator().manual_seed(0)
    save_checkpoint(tmp_path / "dit.pt", Legacy(), legacy, 1, gen)

    resumed = _build_model(SimpleNamespace(model="unused", seed=0), tmp_path)
    weight = resumed.driving.motion_mlp[0].weight
    assert weight.shape[1] == 2 * new
    opt2 = torch.optim.AdamW(resumed.driving.parameters(), lr=1e-3)
    assert _resume(tmp_path / "dit.pt", opt2, torch.Generator()) == 1
    for k, v in moments.items():
        state = opt2.state[weight][k]
        assert state.shape == weight.shape
        assert torch.equal(state[:, columns], v[:, columns])            # the legacy columns keep their moments
        others = [c for c in range(2 * new) if c not in columns]
        assert not state[:, others].any()                               # the head fields' start at zero
    resumed.driving.motion_mlp[0](torch.rand(3, 2 * new)).square().sum().backward()
    opt2.step()                                                         # the resumed fit steps
    assert torch.isfinite(weight).all()

    # Without the widening the step fails: what a resumed legacy fit did before.
    opt3 = torch.optim.AdamW(resumed.driving.parameters(), lr=1e-3)
    opt3.load_state_dict(torch.load(tmp_path / "dit.pt", weights_only=False)["opt"])
    with pytest.raises(RuntimeError):
        opt3.step()

    # Moments that fit no parameter are another model's checkpoint: a clear error.
    legacy_opt["state"][index]["exp_avg"] = moments["exp_avg"][:, :5]
    save_checkpoint(tmp_path / "dit.pt", Legacy(), legacy, 1, gen)
    with pytest.raises(ValueError, match="another model"):
        _resume(tmp_path / "dit.pt", torch.optim.AdamW(resumed.driving.parameters(), lr=1e-3), torch.Generator())


def test_the_bundled_model_loads_in_todays_motion_layout():
    from model.config import MOTION_FIELDS
    from model.sources import ASSETS

    model = load_model(ASSETS / "tiny.safetensors")
    assert model.driving.motion_mlp[0].weight.shape[1] == model.config.driving.motion_dim == 2 * len(MOTION_FIELDS)


def test_a_copied_fit_folder_resumes_from_the_stage_saved_last(tmp_path):
    """The trainer resumes from the checkpoint written last, as the checkpoint records it:
    a folder copied without its files' times (cp -r) can leave the decoder stage's file
    newer than the DiT stage's that followed it. By file time the resumed fit would take
    the decoder stage's weights, its DiT untrained."""
    import os
    from types import SimpleNamespace

    from model.train.trainer import _build_model, save_checkpoint

    cfg = small_config()
    gen = torch.Generator().manual_seed(0)
    decoder_stage, dit_stage = AvatarModel.random(cfg, seed=1), AvatarModel.random(cfg, seed=2)
    save_checkpoint(tmp_path / "decoder.pt", decoder_stage, None, 300, gen)
    save_checkpoint(tmp_path / "dit.pt", dit_stage, None, 800, gen)
    later = (tmp_path / "dit.pt").stat().st_mtime + 60
    os.utime(tmp_path / "decoder.pt", (later, later))    # as a copy in the wrong order leaves them
    resumed = _build_model(SimpleNamespace(model="unused", seed=0), tmp_path)
    want = dit_stage.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.state_dict().items())
