"""The photoreal families' DiTs: LiveTalk parity with diffusers' Wan model plus its audio
path, FlashHead's audio projection, the text K/V cache, condition layouts, and coverage of
every checkpoint name and shape (LiveTalk's own fingerprint; FlashHead's from its config)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import DiTConfig
from model.dit import FullSequence
from model.wan.checkpoints import fingerprint
from model.wan.dit import FlashHeadDiT, LiveTalkDiT, flashhead_condition, livetalk_condition
from model.wan.families import build_dit, family_config
from model.wan.load import FLASHHEAD_UNUSED, LIVETALK_FINGERPRINT, flashhead_to_ours, ours_to_flashhead

TOL = 1e-5


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_livetalk_fingerprint_from_the_meta_model():
    """md5 over the sorted name:shape list, LiveTalk's own check of its merged checkpoint:
    our model at the released geometry has exactly its names and shapes."""
    cfg = family_config("livetalk-1.3b")
    with torch.device("meta"):
        dit = build_dit(cfg)
    assert isinstance(dit, LiveTalkDiT) and all(p.is_meta for p in dit.parameters())
    assert fingerprint(shapes(dit)) == LIVETALK_FINGERPRINT
    assert fingerprint({**shapes(dit), "extra.weight": (1,)}) != LIVETALK_FINGERPRINT


def flashhead_reference_shapes(c: dict, wav2vec_hidden=768, wav2vec_layers=12) -> dict:
    """Names and shapes of FlashHead's WanModelAudioProject for config `c`, as its __init__
    builds them (has_image_input False; audio adapter: window 5, vae stride 4, 512 wide,
    32 tokens of 1536)."""
    d, ffn, p = c["dim"], c["ffn_dim"], tuple(c["patch_size"])
    lin = lambda name, o, i: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}  # noqa: E731
    norm = lambda name, n: {f"{name}.weight": (n,), f"{name}.bias": (n,)}  # noqa: E731
    out = {"patch_embedding.weight": (d, c["in_dim"], *p), "patch_embedding.bias": (d,)}
    out |= lin("text_embedding.0", d, c["text_dim"]) | lin("text_embedding.2", d, d)
    out |= lin("time_embedding.0", d, c["freq_dim"]) | lin("time_embedding.2", d, d)
    out |= lin("time_projection.1", 6 * d, d)
    for i in range(c["num_layers"]):
        for attn in ("self_attn", "cross_attn"):
            for x in "qkvo":
                out |= lin(f"blocks.{i}.{attn}.{x}", d, d)
            out |= {f"blocks.{i}.{attn}.norm_q.weight": (d,), f"blocks.{i}.{attn}.norm_k.weight": (d,)}
        out |= norm(f"blocks.{i}.norm3", d) | lin(f"blocks.{i}.ffn.0", ffn, d) | lin(f"blocks.{i}.ffn.2", d, ffn)
        out[f"blocks.{i}.modulation"] = (1, 6, d)
    out |= lin("head.head", c["out_dim"] * math.prod(p), d) | {"head.modulation": (1, 2, d)}
    h = wav2vec_hidden
    out |= norm("audio_emb.proj.0", h) | lin("audio_emb.proj.1", h, h) | lin("audio_emb.proj.3", d, h)
    out |= norm("audio_emb.proj.4", d)
    feat = wav2vec_layers * h
    out |= lin("audio_proj.proj1", 512, 5 * feat) | lin("audio_proj.proj1_vf", 512, 8 * feat)
    out |= lin("audio_proj.proj2", 512, 512) | lin("audio_proj.proj3", 32 * 1536, 512) | norm("audio_proj.norm", 1536)
    return out


FLASHHEAD_PRO = dict(dim=1536, in_dim=32, ffn_dim=8960, out_dim=16, text_dim=4096, freq_dim=256, eps=1e-6,
                     vae_stride=[4, 8, 8], patch_size=[1, 2, 2], num_heads=12, num_layers=30, has_image_input=False)


def test_flashhead_names_and_shapes_cover_its_checkpoint(tmp_path):
    import json

    from model.wan.load import flashhead_dit_config

    (tmp_path / "config.json").write_text(json.dumps(FLASHHEAD_PRO))
    cfg = family_config("flashhead-1.3b").replace(dit=flashhead_dit_config(tmp_path))
    with torch.device("meta"):
        dit = build_dit(cfg)
    theirs = flashhead_reference_shapes(FLASHHEAD_PRO)
    ours = {ours_to_flashhead(k): s for k, s in shapes(dit).items()}
    assert len(ours) == len(shapes(dit))  # no two of our names map onto one of theirs
    unused = {k: s for k, s in theirs.items() if k.startswith(FLASHHEAD_UNUSED)}
    assert ours == {k: s for k, s in theirs.items() if k not in unused}
    assert sorted({k.split(".")[0] for k in unused}) == ["audio_emb", "text_embedding"]
    as_loaded = flashhead_to_ours({k: torch.empty(0) for k in theirs})
    assert set(as_loaded) == set(shapes(dit))


@pytest.fixture(scope="module")
def livetalk_pair():
    """diffusers' WanTransformer3DModel (33 input channels) and our LiveTalkDiT with its weights."""
    diffusers = pytest.importorskip("diffusers")
    from model.weights import convert_wan_state_dict

    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=33, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=6, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    cfg = DiTConfig(latent_channels=16, cond_mask_channels=1, dim=48, ffn_dim=64, num_heads=2, num_layers=6,
                    freq_dim=32, text_dim=32, drive_dim=0)
    ours = LiveTalkDiT(cfg, audio_in=40, audio_hidden=8).eval()
    state = convert_wan_state_dict(ref.state_dict(), cfg)
    missing = ours.load_state_dict(state, strict=False).missing_keys
    assert missing and all(k.startswith(("audio_proj.", "audio_cond_projs.")) for k in missing)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("audio"):
                p.copy_(torch.randn_like(p) * 0.3)
    return ref, ours


def test_livetalk_matches_diffusers_with_audio_added_before_blocks_2_to_half(livetalk_pair):
    ref, ours = livetalk_pair
    g = torch.Generator().manual_seed(3)
    Fr, h, w = 3, 8, 6
    x = torch.randn(1, 16, Fr, h, w, generator=g)
    reference = torch.randn(1, 16, 1, h, w, generator=g)
    cond = livetalk_condition(reference, Fr, start_frame=0)
    text = torch.randn(1, 7, 32, generator=g)
    groups = torch.randn(1, Fr, 40, generator=g)

    # The reference: diffusers' model, LiveTalk's audio term added by pre-hooks on blocks 2..3.
    packed = F.layer_norm(F.linear(groups, ours.audio_proj.proj.weight, ours.audio_proj.proj.bias), (8,),
                          ours.audio_proj.norm_out.weight, ours.audio_proj.norm_out.bias)
    hooks = []
    for j, proj in enumerate(ours.audio_cond_projs):
        add = F.linear(packed, proj.weight, proj.bias)  # (1, F, dim), one vector per latent frame
        per_token = add[:, :, None].expand(1, Fr, (h // 2) * (w // 2), 48).reshape(1, -1, 48)
        hooks.append(ref.blocks[2 + j].register_forward_pre_hook(
            lambda m, args, a=per_token: (args[0] + a, *args[1:])))
    try:
        with torch.no_grad():
            want = ref(torch.cat([x, cond], dim=1), torch.tensor([624.0]), text, return_dict=False)[0]
    finally:
        for hk in hooks:
            hk.remove()
    assert len(ours.audio_cond_projs) == 6 // 2 - 1
    with torch.no_grad():
        got = ours(x, torch.full((1, Fr), 624.0), torch.arange(Fr, dtype=torch.float64),
                   FullSequence(0, Fr * (h // 2) * (w // 2), None), cond=cond, audio=groups, text=text)
        no_audio = ours(x, torch.full((1, Fr), 624.0), torch.arange(Fr, dtype=torch.float64),
                        FullSequence(0, Fr * (h // 2) * (w // 2), None), cond=cond, text=text)
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max().item())
    assert (got - no_audio).abs().max() > 1e-2  # the audio path does something


def test_text_kv_cache_equals_recomputing_the_context(livetalk_pair):
    _, ours = livetalk_pair
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    cond = livetalk_condition(torch.randn(1, 16, 1, 4, 4, generator=g), 2, start_frame=3)
    text, groups = torch.randn(1, 9, 32, generator=g), torch.randn(1, 2, 40, generator=g)
    args = (x, torch.full((1, 2), 500.0), torch.arange(3, 5, dtype=torch.float64), FullSequence(0, 8, None))
    with torch.no_grad():
        kv = ours.text_kv(text)
        adds = ours.audio_adds(groups)
        want = ours(*args, cond=cond, audio=groups, text=text)
        got = ours(*args, cond=cond, audio=adds, text=kv)
    assert kv.k.shape == (6, 1, 2, 9, 24)
    assert torch.equal(got, want)


def test_condition_layouts():
    ref = torch.randn(2, 16, 1, 4, 6)
    c0 = livetalk_condition(ref, 3, start_frame=0)
    assert c0.shape == (2, 17, 3, 4, 6)
    assert torch.equal(c0[:, :16], ref.expand(2, 16, 3, 4, 6))
    assert c0[:, 16, 0].eq(0).all() and c0[:, 16, 1:].eq(1).all()  # 0 = given, on the stream's frame 0 only
    assert livetalk_condition(ref, 3, start_frame=3)[:, 16].eq(1).all()
    assert torch.equal(flashhead_condition(ref, 9), ref.expand(2, 16, 9, 4, 6))


def test_flashhead_audio_projection_matches_its_recipe():
    """AudioProjModel: proj1 on the first latent's 5 windows, proj1_vf on each later latent's 8,
    ReLU, proj2 + ReLU, proj3 to tokens x 1536-wide vectors, LayerNorm (float32)."""
    from model.wan.families import random_family

    m = random_family("flashhead-random", seed=1)
    cfg, dit = m.config, m.dit
    assert isinstance(dit, FlashHeadDiT)
    ap = dit.audio_proj
    g = torch.Generator().manual_seed(5)
    first, later = torch.randn(2, 1, 5, 2, 32, generator=g), torch.randn(2, 3, 8, 2, 32, generator=g)
    a = torch.relu(first.reshape(2, -1) @ ap.proj1.weight.T + ap.proj1.bias)[:, None]
    b = torch.relu(later.reshape(2, 3, -1) @ ap.proj1_vf.weight.T + ap.proj1_vf.bias)
    h = torch.relu(torch.cat([a, b], 1) @ ap.proj2.weight.T + ap.proj2.bias) @ ap.proj3.weight.T + ap.proj3.bias
    want = F.layer_norm(h.view(2, 4, cfg.audio_tokens, 64), (64,), ap.norm.weight, ap.norm.bias, 1e-5)
    with torch.no_grad():
        got = ap(first, later)
    assert (got - want).abs().max() < TOL
    # Through the DiT: one token set per latent frame, into every block's per-frame cross-attention.
    x = torch.randn(2, 16, 4, 4, 4, generator=g)
    cond = flashhead_condition(torch.randn(2, 16, 1, 4, 4, generator=g), 4)
    run = lambda audio: dit(x, torch.full((2, 4), 900.0), torch.arange(4, dtype=torch.float64),  # noqa: E731
                            FullSequence(0, 16, None), cond=cond, audio=audio)
    with torch.no_grad():
        assert torch.equal(run((first, later)), run(got))
        assert (run((first, later)) - run(torch.zeros_like(got))).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["livetalk-random", "flashhead-random"])
def test_random_presets_keep_the_real_layout(name):
    from model.wan.families import random_family

    m = random_family(name)
    cfg = m.config
    assert cfg.dit.in_channels == (33 if cfg.family == "livetalk" else 32)
    h, w = cfg.latent_hw
    assert (h, w) == (8, 8)
    portrait = torch.rand(1, 3, 1, cfg.height, cfg.width) * 2 - 1
    with torch.no_grad():
        ref_latent = m.vae.encode(portrait)
        assert ref_latent.shape == (1, 16, 1, h, w)
        x = torch.randn(1, 16, 3, h, w)
        t, pos, ctx = torch.full((1, 3), 1000.0), torch.arange(3, dtype=torch.float64), FullSequence(0, 48, None)
        feats = m.audio.encode(torch.randn(m.config.audio_layout.samples_for(9)) * 0.1)
        if cfg.family == "livetalk":
            from model.wan.audio import livetalk_audio_groups

            out = m.dit(x, t, pos, ctx, cond=livetalk_condition(ref_latent, 3, 0),
                        audio=livetalk_audio_groups(feats, first_chunk=True), text=m.prompt)
        else:
            from model.wan.audio import flashhead_audio_windows

            out = m.dit(x, t, pos, ctx, cond=flashhead_condition(ref_latent, 3),
                        audio=flashhead_audio_windows(feats, 0, 3))
        frames = m.vae.stream_decoder().decode(out)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert frames.shape == (1, 3, 9, cfg.height, cfg.width)
