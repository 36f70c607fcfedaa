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
