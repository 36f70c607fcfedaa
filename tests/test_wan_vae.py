"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, streaming decode == whole clip,
snapshot/restore, name conversion both ways, loading Wan's .pth and a diffusers folder."""

import pytest
import torch

from model.wan.checkpoints import load_wan_vae
from model.wan.vae import WanVAE, WanVAEConfig
from model.wan.vae_names import diffusers_to_wan, to_wan_names, wan_to_diffusers

diffusers = pytest.importorskip("diffusers")

# Wan2.1's layout scaled down: 4 levels, x8 space, x4 time, 2 residual blocks per level.
TINY = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=2, temporal_downsample=(False, True, True))
STATS = dict(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))
TOL = 2e-5  # fp32 noise: different (but equivalent) summation orders


@pytest.fixture(scope="module")
def pair():
    """A random diffusers AutoencoderKLWan and our WanVAE holding the same weights."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2,
                                     attn_scales=[], temperal_downsample=[False, True, True],
                                     latents_mean=list(STATS["latents_mean"]),
                                     latents_std=list(STATS["latents_std"])).eval()
    with torch.no_grad():  # keep decoded pixels inside (-1, 1), so diffusers' clamp hides nothing
        ref.decoder.conv_out.weight.mul_(0.05)
        ref.decoder.conv_out.bias.zero_()
    ours = WanVAE(WanVAEConfig(**TINY, latents_mean=None, latents_std=None)).eval()
    ours.load_state_dict(to_wan_names(ref.state_dict(), 2), strict=True)
    return ref, ours


def _video(frames=9, h=32, w=48, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, h, w, generator=g) * 2 - 1


def _latent(frames=4, h=2, w=3, batch=1, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, h, w, generator=g)


@torch.no_grad()
def test_encode_matches_diffusers_non_square_several_latents(pair):
    ref, ours = pair
    video = _video()
    dist = ref.encode(video).latent_dist
    mu, logvar = ours.encode_moments(video)
    assert mu.shape == (2, 4, 3, 4, 6)
    assert (mu - dist.mean).abs().max() < TOL
    assert (logvar - dist.logvar).abs().max() < TOL


@torch.no_grad()
def test_decode_matches_diffusers_non_square_several_latents(pair):
    ref, ours = pair
    z = _latent(h=4, w=6)
    want = ref.decode(z).sample
    got = ours.decode(z, clamp=False)
    assert got.shape == want.shape == (1, 3, 13, 32, 48)
    assert want.abs().max() < 0.99  # nothing clamped: the comparison sees every pixel
    assert (got - want).abs().max() < TOL


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1], [2, 1, 2], [1, 4]])
def test_streaming_decode_equals_whole_clip(pair, sizes):
    _, ours = pair
    z = _latent(frames=sum(sizes))
    whole = ours.decode(z, clamp=False)
    stream = ours.stream_decoder()
    parts = [stream.decode(c, clamp=False) for c in torch.split(z, sizes, dim=2)]
    assert [p.shape[2] for p in parts] == [4 * n - 3 * (i == 0) for i, n in enumerate(sizes)]
    assert (torch.cat(parts, dim=2) - whole).abs().max() < TOL
    assert stream.latents_in == sum(sizes) and stream.frames_out == whole.shape[2]


@torch.no_grad()
def test_snapshot_restore_rewinds_the_stream(pair):
    _, ours = pair
    z = _latent(frames=4)
    whole = ours.decode(z, clamp=False)
    stream = ours.stream_decoder()
    first = stream.decode(z[:, :, :2], clamp=False)
    snap = stream.snapshot()
    nbytes = stream.cache_nbytes()
    stream.decode(torch.randn_like(z[:, :, 2:]) * 3, clamp=False)  # a chunk later taken back
    stream.decode(torch.randn_like(z[:, :, 2:3]), clamp=False)
    stream.restore(snap)
    assert stream.latents_in == 2 and stream.frames_out == 5 and stream.cache_nbytes() == nbytes
    rest = stream.decode(z[:, :, 2:], clamp=False)
    assert (torch.cat([first, rest], dim=2) - whole).abs().max() < TOL


@torch.no_grad()
def test_portrait_encode_is_normalised_with_the_latent_stats(pair):
    ref, _ = pair
    vae = WanVAE(WanVAEConfig(**TINY, **STATS)).eval()
    vae.load_state_dict(to_wan_names(ref.state_dict(), 2))
    portrait = _video(frames=1, h=40, w=24, batch=1)
    z = vae.encode(portrait)
    assert z.shape == (1, 4, 1, 5, 3)
    mu = ref.encode(portrait).latent_dist.mean
    mean, std = torch.tensor(STATS["latents_mean"]), torch.tensor(STATS["latents_std"])
    assert (z - (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)).abs().max() < TOL
    assert (vae.denormalize(z) - mu).abs().max() < TOL


def test_bad_shapes_are_refused(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ours.encode(_video(frames=4))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(_video(frames=1, h=20))
    with pytest.raises(ValueError, match="latent must be"):
        ours.decode(torch.zeros(1, 3, 1, 4, 4))


def test_names_round_trip_at_wan21_geometry():
    """Every parameter of the released geometry maps to diffusers' name with the same shape, and back."""
    with torch.device("meta"):
        ours = WanVAE(WanVAEConfig())
        ref = diffusers.AutoencoderKLWan()  # its defaults are Wan2.1's VAE
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mapped = {wan_to_diffusers(k, 2): s for k, s in ours_shapes.items()}
    assert mapped == ref_shapes
    assert {diffusers_to_wan(k, 2): s for k, s in ref_shapes.items()} == ours_shapes
    assert all(diffusers_to_wan(wan_to_diffusers(k, 2), 2) == k for k in ours_shapes)


@torch.no_grad()
def test_loads_wan_pth_and_diffusers_folder(pair, tmp_path):
    ref, ours = pair
    cfg = WanVAEConfig(**TINY, latents_mean=None, latents_std=None)
    torch.save(ours.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    ref.save_pretrained(tmp_path / "vae")
    from_pth = load_wan_vae(tmp_path / "Wan2.1_VAE.pth", cfg=cfg)
    from_folder = load_wan_vae(tmp_path / "vae")
    assert from_folder.cfg.dim_mult == cfg.dim_mult and from_folder.cfg.latents_std == STATS["latents_std"]
    z = _latent(frames=2)
    want = ours.decode(z, clamp=False)
    assert torch.equal(from_pth.decode(z, clamp=False), want)
    assert (from_folder.decode(from_folder.normalize(z), clamp=False) - want).abs().max() < TOL
    with pytest.raises(FileNotFoundError, match="not found"):
        load_wan_vae(tmp_path / "nope.pth")
