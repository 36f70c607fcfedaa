"""Loading a family from a download folder laid out as its README says: files written from
the random presets load back into the same model; missing files and wrong files get errors
that name them."""

import json

import pytest
import torch
from safetensors.torch import save_file

from model.dit import FullSequence
from model.wan.audio import flashhead_audio_windows, livetalk_audio_groups
from model.wan.checkpoints import MissingWeights
from model.wan.dit import flashhead_condition, livetalk_condition
from model.wan.families import random_family
from model.wan.load import (
    FLASHHEAD_FILES,
    LIVETALK_FILES,
    PROMPT_FILE,
    load_family,
    load_prompt_embedding,
    ours_to_flashhead,
    save_prompt_embedding,
)

pytest.importorskip("transformers")


def write_livetalk(m, root):
    (root / "LiveTalk-1.3B-V0.1").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in m.dit.state_dict().items()}, str(root / LIVETALK_FILES[0].path))
    (root / "Wan2.1-T2V-1.3B").mkdir()
    torch.save(m.vae.state_dict(), root / LIVETALK_FILES[1].path)
    m.audio.model.save_pretrained(root / "wav2vec2")
    save_prompt_embedding(root / PROMPT_FILE, m.prompt[:, : m.config.text_len // 4])


def write_flashhead(m, root):
    pro = root / "SoulX-FlashHead-1_3B" / "Model_Pro"
    pro.mkdir(parents=True)
    c = m.config.dit
    (pro / "config.json").write_text(json.dumps(dict(
        dim=c.dim, in_dim=2 * c.latent_channels, ffn_dim=c.ffn_dim, out_dim=c.latent_channels, text_dim=16,
        freq_dim=c.freq_dim, eps=c.eps, vae_stride=[4, 8, 8], patch_size=list(c.patch_size), num_heads=c.num_heads,
        num_layers=c.num_layers, has_image_input=False)))
    state = {ours_to_flashhead(k): v.contiguous() for k, v in m.dit.state_dict().items()}
    state["text_embedding.0.weight"] = torch.randn(c.dim, 16)  # defined by FlashHead, never used
    state["audio_emb.proj.1.weight"] = torch.randn(32, 32)
    save_file(state, str(pro / "diffusion_pytorch_model.safetensors"))
    (root / "SoulX-FlashHead-1_3B" / "VAE_Wan").mkdir()
    torch.save(m.vae.state_dict(), root / FLASHHEAD_FILES[1].path)
    m.audio.model.save_pretrained(root / "wav2vec2-base-960h")


def _same_outputs(a, b):
    cfg = a.config
    h, w = cfg.latent_hw
    g = torch.Generator().manual_seed(7)
    x, ref = torch.randn(1, 16, 3, h, w, generator=g), torch.randn(1, 16, 1, h, w, generator=g)
    audio = torch.randn(cfg.audio_layout.samples_for(9), generator=g) * 0.1
    args = (x, torch.full((1, 3), 937.5), torch.arange(3, dtype=torch.float64), FullSequence(0, 3 * h * w // 4, None))
    outs = []
    with torch.no_grad():
        for m in (a, b):
            feats = m.audio.encode(audio)
            if cfg.family == "livetalk":
                out = m.dit(*args, cond=livetalk_condition(ref, 3, 0), audio=livetalk_audio_groups(feats, True),
                            text=m.prompt)
            else:
                out = m.dit(*args, cond=flashhead_condition(ref, 3), audio=flashhead_audio_windows(feats, 0, 3))
            outs.append((out, m.vae.decode(out)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_livetalk_folder_loads_back(tmp_path):
    m = random_family("livetalk-random", seed=3)
    write_livetalk(m, tmp_path)
    loaded = load_family(f"livetalk:{tmp_path}", preset="livetalk-random")
    assert all(not p.is_meta for p in loaded.dit.parameters())
    kept = (torch.arange(m.config.text_len) < m.config.text_len // 4)[None, :, None]  # the saved tokens
    assert torch.equal(loaded.prompt, m.prompt * kept)
    loaded.prompt = m.prompt
    _same_outputs(m, loaded)


def test_flashhead_folder_loads_back(tmp_path):
    m = random_family("flashhead-random", seed=4)
    write_flashhead(m, tmp_path)
    loaded = load_family(f"flashhead:{tmp_path}", preset="flashhead-random")
    assert loaded.config.dit == m.config.dit
    _same_outputs(m, loaded)


def test_missing_files_are_each_named_with_their_source(tmp_path):
    with pytest.raises(MissingWeights) as err:
        load_family(f"livetalk:{tmp_path}")
    text = str(err.value)
    assert "4 file(s) missing" in text
    for need in LIVETALK_FILES:
        assert str(tmp_path / need.path) in text and need.source in text
    with pytest.raises(MissingWeights, match="Soul-AILab/SoulX-FlashHead-1_3B"):
        load_family(f"flashhead:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_family(f"flashhead:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="expected livetalk:DIR"):
        load_family("wan:/x")


def test_a_file_that_is_not_livetalk_is_refused_by_fingerprint(tmp_path):
    write_livetalk(random_family("livetalk-random"), tmp_path)
    with pytest.raises(ValueError, match="not LiveTalk-1.3B-V0.1 .*fingerprint"):
        load_family(f"livetalk:{tmp_path}")  # the released geometry expects the released file


def test_prompt_embedding_is_zero_padded_and_checked(tmp_path):
    emb = torch.randn(5, 8)
    save_prompt_embedding(tmp_path / "p.safetensors", emb[None])
    out = load_prompt_embedding(tmp_path / "p.safetensors", text_len=12, text_dim=8)
    assert out.shape == (1, 12, 8) and torch.equal(out[0, :5], emb) and out[0, 5:].eq(0).all()
    with pytest.raises(ValueError, match="prompt must be"):
        load_prompt_embedding(tmp_path / "p.safetensors", text_len=4, text_dim=8)
    save_file({"a": emb, "b": emb.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="one tensor named 'prompt'"):
        load_prompt_embedding(tmp_path / "two.safetensors", 12, 8)
