"""DiT: cache equivalence (streaming == one masked pass), RoPE rotation, Wan compatibility."""

import math

import pytest
import torch

from model.cache import ReferenceCache, WindowCache, _rotate_keys
from model.config import DiTConfig
from model.dit import DiT, EncodeReference, FullSequence, Streaming
from model.rope import Rope3D, apply_rope, cos_sin



@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def small_dit(**kw) -> DiT:
    cfg = DiTConfig(latent_channels=4, cond_mask_channels=4, dim=48, ffn_dim=96, num_heads=2, num_layers=3,
                    freq_dim=32, drive_dim=16, **kw)
    torch.manual_seed(0)
    model = DiT(cfg).double()
    # Make the driving path live (it is zero-initialised) so the test covers it.
    for b in model.blocks:
        torch.nn.init.normal_(b.drive_attn.o.weight, std=0.2)
    return model


def stream_chunks(model, ref, ref_pos, frames, t, drive, chunk, window, pos0=1.0):
    """Run frames chunk by chunk through the caches; returns outputs (B, C, N, h, w)."""
    cfg = model.cfg
    B, C, N, h, w = frames.shape
    T = (h // 2) * (w // 2)
    rc = ReferenceCache(cfg.num_layers, B, cfg.num_heads, T, cfg.head_dim, frames.dtype, "cpu")
    rc.position = ref_pos
    model(ref, torch.zeros(B, 1, dtype=frames.dtype), torch.tensor([ref_pos]), EncodeReference(rc))
    wc = WindowCache(cfg.num_layers, B, cfg.num_heads, window, T, cfg.head_dim, frames.dtype, "cpu")
    outs = []
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        pos = torch.arange(s, e, dtype=torch.float64) + pos0
        outs.append(model(frames[:, :, s:e], t[:, s:e], pos, Streaming(rc, wc, write=True), drive=drive[:, s:e]))
        wc.commit(e - s)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("window", [None, 2, 3])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_equals_masked_full_pass(chunk, window):
    model = small_dit()
    B, C, N, h, w = 2, 4, 7, 6, 8
    T = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(B, C, 1, h, w, generator=g, dtype=torch.float64)
    frames = torch.randn(B, C, N, h, w, generator=g, dtype=torch.float64)
    t = torch.rand(B, N, generator=g, dtype=torch.float64) * 1000
    drive = torch.randn(B, N, 5, 16, generator=g, dtype=torch.float64)
    ref_pos = 9.0

    full = model(torch.cat([ref, frames], 2), torch.cat([torch.zeros(B, 1, dtype=torch.float64), t], 1),
                 torch.cat([torch.tensor([ref_pos]), torch.arange(N, dtype=torch.float64) + 1]),
                 FullSequence(prefix_len=T, chunk_len=chunk * T, window_len=None if window is None else window * T),
                 drive=drive)[:, :, 1:]
    capacity = N if window is None else window
    streamed = stream_chunks(model, ref, ref_pos, frames, t, drive, chunk, capacity)
    assert (streamed - full).abs().max().item() <= 1e-4
    # The test can fail: a wrong window changes the result.
    if window is not None and N > chunk + window:
        wrong = stream_chunks(model, ref, ref_pos, frames, t, drive, chunk, window + 1)
        assert (wrong - full).abs().max().item() > 1e-3


def test_rotating_cached_keys_equals_recomputing_at_shifted_positions():
    rope = Rope3D(64)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 4, 3 * 12, 64, generator=g)
    pos = torch.tensor([5.0, 6.0, 7.0])
    for delta in (3.0, -250.0, 4096.0):
        at_pos = apply_rope(k, *cos_sin(rope.grid_angles(pos, 3, 4), torch.float32, "cpu"))
        rotated = at_pos.clone()
        _rotate_keys(rotated, rope, delta)
        expected = apply_rope(k, *cos_sin(rope.grid_angles(pos + delta, 3, 4), torch.float32, "cpu"))
        assert (rotated - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_rebasing_positions_leaves_outputs_unchanged():
    """Streaming with every position (and every cached key) shifted by -D gives the same output."""
    model = small_dit()
    B, C, N, h, w = 1, 4, 6, 4, 4
    T = 4
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(B, C, 1, h, w, generator=g, dtype=torch.float64)
    frames = torch.randn(B, C, N, h, w, generator=g, dtype=torch.float64)
    t = torch.rand(B, N, generator=g, dtype=torch.float64) * 1000
    drive = torch.randn(B, N, 3, 16, generator=g, dtype=torch.float64)
    base = stream_chunks(model, ref, 12.0, frames, t, drive, 2, 3, pos0=1000.0)
    # Same stream; after the first two chunks, rebase: rotate caches by -D and shift positions.
    cfg = model.cfg
    rc = ReferenceCache(cfg.num_layers, B, cfg.num_heads, T, cfg.head_dim, torch.float64, "cpu")
    rc.position = 12.0
    model(ref, torch.zeros(B, 1, dtype=torch.float64), torch.tensor([12.0]), EncodeReference(rc))
    wc = WindowCache(cfg.num_layers, B, cfg.num_heads, 3, T, cfg.head_dim, torch.float64, "cpu")
    outs, shift = [], 0.0
    for s in range(0, N, 2):
        if s == 4:
            shift = 1003.0
            rc.move(model.rope, -shift)
            wc.move(model.rope, -shift)
        pos = torch.arange(s, s + 2, dtype=torch.float64) + 1000.0 - shift
        outs.append(model(frames[:, :, s:s + 2], t[:, s:s + 2], pos, Streaming(rc, wc, write=True), drive=drive[:, s:s + 2]))
        wc.commit(2)
    assert (torch.cat(outs, 2) - base).abs().max().item() <= 1e-5


def test_wan_compatibility_with_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from model.weights import convert_wan_state_dict

    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64,
    ).eval()
    # diffusers initialises some tables to zero; randomise everything so a wrong mapping shows.
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    cfg = DiTConfig(latent_channels=16, cond_mask_channels=4, dim=48, ffn_dim=64, num_heads=2, num_layers=2,
                    freq_dim=32, text_dim=32, drive_dim=16, cross_attn_norm=True)
    ours = DiT(cfg).eval()
    ours.load_state_dict(convert_wan_state_dict(ref.state_dict(), cfg))

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 3, 8, 6, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    expected = ref(x, torch.tensor([437.0]), text, return_dict=False)[0]
    L = 3 * 4 * 3
    got = ours(x, torch.full((1, 3), 437.0), torch.arange(3, dtype=torch.float64),
               FullSequence(prefix_len=0, chunk_len=L, window_len=None), text=text)
    assert got.shape == expected.shape
    err = (got - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, expected.abs().max().item()), err
    # The driving path and the condition channels are inert after conversion...
    drive = torch.randn(1, 3, 4, 16, generator=g)
    got_drive = ours(x, torch.full((1, 3), 437.0), torch.arange(3, dtype=torch.float64),
                     FullSequence(0, L, None), text=text, drive=drive,
                     cond=torch.randn(1, 20, 3, 8, 6, generator=g))
    assert (got_drive - got).abs().max().item() == 0.0


def test_original_wan_names_load_directly():
    from model.weights import convert_wan_state_dict

    cfg = DiTConfig(latent_channels=16, cond_mask_channels=4, dim=48, ffn_dim=64, num_heads=2, num_layers=2,
                    freq_dim=32, text_dim=32, drive_dim=16)
    torch.manual_seed(0)
    src = DiT(cfg).state_dict()
    original = {k: v for k, v in src.items() if "drive" not in k}
    original["patch_embedding.weight"] = original["patch_embedding.weight"][:, :16].clone()
    out = convert_wan_state_dict(original, cfg)
    assert torch.equal(out["blocks.1.self_attn.q.weight"], src["blocks.1.self_attn.q.weight"])
    assert torch.equal(out["patch_embedding.weight"][:, 16:], torch.zeros_like(out["patch_embedding.weight"][:, 16:]))
    with pytest.raises(ValueError, match="no place"):
        convert_wan_state_dict({**original, "blocks.9.self_attn.q.weight": torch.zeros(1)}, cfg)
