"""Causal video VAE: geometry, streaming == whole clip, causality, normalisation, fixed-size caches."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.config import VAEConfig, from_name
from model.vae import CausalVAE, frames_for_latents, latents_for_frames
from model.vae_blocks import CausalConv3d, CausalState

SMALL = VAEConfig(z_channels=4, base_channels=8, channel_mults=(1, 2, 4, 4))
HW = 32  # small video side -> 4x4 latents
TOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return CausalVAE(SMALL).eval()


def video(frames, seed=0, hw=HW, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, hw, hw, generator=g) * 2 - 1


def latent(frames, seed=0, z=4, hw=HW // 8, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, z, frames, hw, hw, generator=g)


def split(x, sizes, dim=2):
    assert sum(sizes) == x.shape[dim]
    return list(torch.split(x, sizes, dim=dim))


# ----- geometry ------------------------------------------------------------------------


def test_tiny_preset_shapes_and_range():
    torch.manual_seed(0)
    vae = CausalVAE(from_name("tiny").vae).eval()
    with torch.inference_mode():
        v = video(9, hw=128)
        mean, logvar = vae.encode_dist(v)
        assert mean.shape == logvar.shape == (1, 16, 3, 16, 16)
        z = vae.encode(v)
        assert z.shape == (1, 16, 3, 16, 16)
        out = vae.decode(z)
        assert out.shape == (1, 3, 9, 128, 128)
        assert out.min() >= -1 and out.max() <= 1
        assert vae.decode(z[:, :, :1]).shape == (1, 3, 1, 128, 128)


def test_frame_latent_rule():
    assert [frames_for_latents(n, first=True) for n in (1, 2, 3)] == [1, 5, 9]
    assert [frames_for_latents(n, first=False) for n in (1, 2, 3)] == [4, 8, 12]
    for n in range(1, 6):
        for first in (True, False):
            assert latents_for_frames(frames_for_latents(n, first), first) == n
    for bad, first in ((4, True), (6, True), (0, True), (5, False), (0, False)):
        with pytest.raises(ValueError):
            latents_for_frames(bad, first)
    with pytest.raises(ValueError):
        frames_for_latents(0, first=True)


def test_bad_inputs_and_configs_raise(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(video(8))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(video(5, hw=36))
    with pytest.raises(ValueError, match="video must be"):
        vae.encode(torch.zeros(1, 4, 5, HW, HW))
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    enc = vae.stream_encoder()
    enc.encode(video(5))
    with pytest.raises(ValueError, match="later chunk"):
        enc.encode(video(5))
    with pytest.raises(ValueError, match="spatial_stride"):
        CausalVAE(dataclasses.replace(SMALL, spatial_stride=4))
    with pytest.raises(ValueError, match="temporal_stride"):
        CausalVAE(dataclasses.replace(SMALL, temporal_stride=3))
    with pytest.raises(ValueError, match="latent_mean"):
        CausalVAE(dataclasses.replace(SMALL, latent_mean=(0.0,) * 3, latent_std=(1.0,) * 3))


def test_other_strides_follow_the_rule():
    """Temporal stride 2 and 1 (and spatial 4) give 1 + s(F - 1) frames of side 4h."""
    for ts in (1, 2):
        cfg = VAEConfig(z_channels=3, base_channels=4, channel_mults=(1, 2, 2), temporal_stride=ts, spatial_stride=4)
        vae = CausalVAE(cfg).eval()
        with torch.inference_mode():
            z = vae.encode(video(1 + 3 * ts, hw=16))
            assert z.shape == (1, 3, 4, 4, 4)
            assert vae.decode(z).shape == (1, 3, 1 + 3 * ts, 16, 16)


# ----- the causal conv against torch's conv3d -----------------------------------------------


@pytest.mark.parametrize("kernel,stride,frames", [((3, 3, 3), (1, 1, 1), 5), ((2, 3, 3), (1, 1, 1), 4),
                                                  ((3, 3, 3), (2, 2, 2), 7), ((1, 3, 3), (1, 2, 2), 3)])
def test_causal_conv_equals_conv3d_with_past_zero_padding(kernel, stride, frames):
    """Float64 reference: torch's conv3d on (B, C, T, H, W) with kt - 1 zero frames in front."""
    torch.manual_seed(1)
    conv = CausalConv3d(3, 5, kernel, stride).double()
    x = torch.randn(2, 3, frames, 8, 8, dtype=torch.float64)
    kt, kh, kw = kernel
    ref = F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), conv.weight, conv.bias, stride)
    out = conv(x.transpose(1, 2), CausalState(1, keep=False)).transpose(1, 2)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-12


# ----- streaming == whole clip ------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 6, [2, 3, 1], [6], [1, 5], [3, 3], [2, 1, 1, 2]])
def test_chunked_decode_equals_full_decode(vae, chunks):
    z = latent(6, seed=1)
    with torch.inference_mode():
        full = vae.decode(z, clamp=False)
        assert full.std() > 1e-3  # not a constant: the comparison below means something
        dec = vae.stream_decoder()
        parts = []
        for i, part in enumerate(split(z, chunks)):
            out = dec.decode(part, clamp=False)
            assert out.shape[2] == frames_for_latents(part.shape[2], first=i == 0)
            parts.append(out)
    assert dec.frames_out == full.shape[2] == 21
    assert (torch.cat(parts, dim=2) - full).abs().max() <= TOL


def test_clamped_stream_decode_equals_clamped_decode(vae):
    z = latent(3, seed=2) * 5
    with torch.inference_mode():
        dec = vae.stream_decoder()
        out = torch.cat([dec.decode(p) for p in split(z, [1, 2])], dim=2)
        assert (out - vae.decode(z)).abs().max() <= TOL
        assert out.abs().max() <= 1


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_prefix_encode_equals_start_of_whole_encode(vae, k):
    v = video(21, seed=3)
    with torch.inference_mode():
        whole = vae.encode(v)
        prefix = vae.encode(v[:, :, :1 + 4 * k])
    assert prefix.shape[2] == 1 + k
    assert (prefix - whole[:, :, :1 + k]).abs().max() <= TOL


@pytest.mark.parametrize("chunks", [[1, 4, 4, 4, 4, 4], [5, 8, 8], [9, 12], [21], [1, 20], [13, 4, 4]])
def test_streaming_encoder_equals_whole_encode(vae, chunks):
    v = video(21, seed=4)
    with torch.inference_mode():
        whole_mean, whole_logvar = vae.encode_dist(v)
        enc = vae.stream_encoder()
        means, logvars = zip(*(enc.encode_dist(p) for p in split(v, chunks)))
    assert enc.latents_out == 6 and enc.frames_in == 21
    assert (torch.cat(means, dim=2) - whole_mean).abs().max() <= TOL
    assert (torch.cat(logvars, dim=2) - whole_logvar).abs().max() <= TOL


def test_streams_with_batch_are_independent_per_item(vae):
    """A batch of 2 streamed equals each item decoded alone (no mixing across the batch)."""
    z = latent(4, seed=5, batch=2)
    with torch.inference_mode():
        dec = vae.stream_decoder()
        both = torch.cat([dec.decode(p, clamp=False) for p in split(z, [2, 2])], dim=2)
        for b in range(2):
            assert (both[b:b + 1] - vae.decode(z[b:b + 1], clamp=False)).abs().max() <= TOL


# ----- causality ------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 1, 4, 5, 11, 20])
def test_changing_a_later_frame_never_changes_earlier_latents(vae, t):
    v = video(21, seed=6)
    w = v.clone()
    w[:, :, t] = -w[:, :, t]
    with torch.inference_mode():
        a, b = vae.encode(v), vae.encode(w)
    f = (t + 3) // 4  # the latent frame that covers video frame t
    assert torch.equal(a[:, :, :f], b[:, :, :f])
    assert (a[:, :, f] - b[:, :, f]).abs().max() > 1e-4


@pytest.mark.parametrize("f", [0, 1, 3, 5])
def test_changing_a_later_latent_never_changes_earlier_frames(vae, f):
    z = latent(6, seed=7)
    y = z.clone()
    y[:, :, f] += 1
    with torch.inference_mode():
        a, b = vae.decode(z, clamp=False), vae.decode(y, clamp=False)
    first = 0 if f == 0 else 4 * f - 3  # first video frame of latent f
    assert torch.equal(a[:, :, :first], b[:, :, :first])
    assert (a[:, :, first] - b[:, :, first]).abs().max() > 1e-5


# ----- normalisation and sampling -----------------------------------------------------------------


def test_normalisation_round_trip():
    torch.manual_seed(8)
    raw = CausalVAE(SMALL).eval()
    mean = (0.5, -1.0, 2.0, 0.0)
    std = (2.0, 0.5, 1.5, 3.0)
    normed = CausalVAE(dataclasses.replace(SMALL, latent_mean=mean, latent_std=std)).eval()
    normed.load_state_dict(raw.state_dict())  # statistics are not part of the state dict
    m = torch.tensor(mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1, 1)
    v = video(9, seed=8)
    with torch.inference_mode():
        mu, _ = normed.encode_dist(v)  # unnormalised
        z = normed.encode(v)
        assert (z - (mu - m) / s).abs().max() <= TOL
        assert (normed.denormalize(normed.normalize(mu)) - mu).abs().max() <= TOL
        # Decoding the normalised latent = decoding the raw latent with an unnormalised VAE.
        assert (normed.decode(z, clamp=False) - raw.decode(mu, clamp=False)).abs().max() <= TOL
        dec = normed.stream_decoder()
        streamed = torch.cat([dec.decode(p, clamp=False) for p in split(z, [1, 2])], dim=2)
        assert (streamed - raw.decode(mu, clamp=False)).abs().max() <= TOL
        enc = normed.stream_encoder()
        assert (torch.cat([enc.encode(p) for p in split(v, [5, 4])], dim=2) - z).abs().max() <= TOL


def test_sampling_is_seeded_and_spread_by_the_posterior(vae):
    v = video(5, seed=9)
    with torch.inference_mode():
        mean, logvar = vae.encode_dist(v)
        a = vae.encode(v, sample=True, generator=torch.Generator().manual_seed(1))
        b = vae.encode(v, sample=True, generator=torch.Generator().manual_seed(1))
        c = vae.encode(v, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # (sample - mean) / std is the standard normal draw itself.
    eps = (a - mean) / torch.exp(0.5 * logvar)
    expected = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert (eps - expected).abs().max() < 1e-3


# ----- caches --------------------------------------------------------------------------------


def test_decoder_caches_do_not_grow_and_reset_restarts(vae):
    z = latent(2, seed=10)
    with torch.inference_mode():
        dec = vae.stream_decoder()
        first = dec.decode(z, clamp=False)
        snapshots = {}
        for i in range(1, 51):
            if i > 1:
                dec.decode(latent(2, seed=10 + i), clamp=False)
            if i in (5, 50):
                snapshots[i] = (dec.cache_shapes(), dec.cache_nbytes(), [b.data_ptr() for b in dec.state.buffers])
        assert snapshots[5] == snapshots[50]  # same shapes, same bytes, same buffers (updated in place)
        assert all(s is not None for s in snapshots[5][0])
        assert dec.frames_out == 5 + 49 * 8
        dec.reset()
        assert dec.frames_out == 0 and dec.cache_nbytes() == 0
        assert torch.equal(dec.decode(z, clamp=False), first)


def test_encoder_caches_do_not_grow(vae):
    with torch.inference_mode():
        enc = vae.stream_encoder()
        enc.encode(video(5, seed=11))
        snapshots = {}
        for i in range(1, 51):
            enc.encode(video(4, seed=11 + i))
            if i in (5, 50):
                snapshots[i] = (enc.cache_shapes(), enc.cache_nbytes())
        assert snapshots[5] == snapshots[50]
        assert enc.latents_out == 2 + 50


def test_geometry_change_mid_stream_is_refused(vae):
    with torch.inference_mode():
        dec = vae.stream_decoder()
        dec.decode(latent(1))
        with pytest.raises(ValueError, match="reset"):
            dec.decode(latent(1, hw=8))


# ----- training and loading ---------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    torch.manual_seed(12)
    vae = CausalVAE(SMALL)
    mean, logvar = vae.encode_dist(video(5, seed=12))
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    loss = (vae.decode(z, clamp=False) - video(5, seed=12)).pow(2).mean() + 1e-3 * logvar.pow(2).mean()
    loss.backward()
    missing = [n for n, p in vae.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_meta_build_and_assign_load_gives_the_same_model(vae):
    with torch.device("meta"):
        loaded = CausalVAE(SMALL)
    loaded.load_state_dict(vae.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    z = latent(2, seed=13)
    with torch.inference_mode():
        assert torch.equal(loaded.eval().decode(z), vae.decode(z))


# ----- reference-conditioned decoder ---------------------------------------------------------


def _reference_upgrade(vae):
    """A copy of `vae` switched to the reference decoder as the trainer does it."""
    from model.train.trainer import add_reference_decoder

    ref_vae = CausalVAE(dataclasses.replace(vae.cfg)).eval()
    ref_vae.load_state_dict(vae.state_dict())
    add_reference_decoder(ref_vae)
    return ref_vae.eval()


def test_reference_decoder_streams_like_whole_clip_and_needs_the_portrait(vae):
    ref_vae = _reference_upgrade(vae)
    torch.manual_seed(5)
    for p in ref_vae.decoder.parameters():  # every new module active, not at its neutral start
        p.data.add_(0.05 * torch.randn_like(p))
    z, portrait = latent(5, seed=6), video(1, seed=7)[:, :, 0]
    with torch.inference_mode():
        full = ref_vae.decode(z, clamp=False, reference=portrait)
        other = ref_vae.decode(z, clamp=False, reference=video(1, seed=8)[:, :, 0])
        assert (full - other).abs().max() > 1e-3  # the portrait changes the output
        dec = ref_vae.stream_decoder(reference=portrait[:, :, None])  # (1, 3, 1, H, W) as the encoder takes it
        parts = [dec.decode(p, clamp=False) for p in split(z, [2, 1, 2])]
        dec.reset()  # a new stream of the same portrait: the reference is kept
        again = dec.decode(z, clamp=False)
    assert (torch.cat(parts, dim=2) - full).abs().max() <= TOL
    assert (again - full).abs().max() <= TOL
    with pytest.raises(ValueError, match="reference"):
        ref_vae.decode(z)
    with pytest.raises(ValueError, match="reference"):
        ref_vae.stream_decoder()
    with pytest.raises(ValueError, match="reference must be"):
        ref_vae.decode(z, reference=video(1, hw=16)[:, :, 0])


def test_reference_upgrade_starts_as_the_old_decoder_and_blend_can_copy_the_portrait(vae):
    ref_vae = _reference_upgrade(vae)
    z, portrait = latent(3, seed=9), video(1, seed=10)[:, :, 0]
    blend = ref_vae.decoder.reference_blend.conv
    with torch.inference_mode():
        old = vae.decode(z, clamp=False)
        blend.bias.fill_(-60.0)  # blend off: the injections start at zero, so exactly the old decoder
        assert (ref_vae.decode(z, clamp=False, reference=portrait) - old).abs().max() <= TOL
        blend.bias.fill_(60.0)   # blend fully on: every frame is the portrait
        copied = ref_vae.decode(z, clamp=False, reference=portrait)
    assert (copied - portrait[:, :, None]).abs().max() <= TOL
