"""The seam blend (model/seams.py): what it moves, what it leaves, and that it streams."""

import numpy as np
import pytest
import torch

from model.seams import latent_starts, spread_latent_steps
from model.train import metrics as M


def stepping_clip(n_latents: int) -> torch.Tensor:
    """(1, 1, 1 + 4n, 2, 2): still inside each latent frame, a jump of 1 into the next one,
    the way the small decoder draws motion."""
    values = [0.0] + [float(f) for f in range(1, n_latents + 1) for _ in range(4)]
    return torch.tensor(values).view(1, 1, -1, 1, 1).expand(1, 1, -1, 2, 2).clone()


def test_latent_starts_follow_the_vae_geometry():
    assert latent_starts(0, 9) == [1, 5]   # frame 0 alone, then groups of 4
    assert latent_starts(9, 12) == [0, 4, 8]  # a later chunk holds whole latent frames
    assert latent_starts(6, 8) == [3, 7]   # from the middle of a latent frame: the next start
    with pytest.raises(ValueError):
        latent_starts(-1, 4)


def test_zero_amount_is_the_identity_and_full_amount_makes_even_steps():
    clip = stepping_clip(3)
    assert torch.equal(spread_latent_steps(clip, 0, None, 0.0), clip)
    even = spread_latent_steps(clip, 0, None, 1.0)[0, 0, :, 0, 0]
    assert torch.allclose(torch.diff(even), torch.full((12,), 0.25))  # each jump of 1 over 4 frames
    # A latent frame's last frame stays as decoded: nothing carries over to the next one.
    assert torch.equal(even[4::4], clip[0, 0, 4::4, 0, 0])


def test_partial_amount_shrinks_the_border_step_by_the_stated_factor():
    clip = stepping_clip(2)
    out = spread_latent_steps(clip, 0, None, 0.6)[0, 0, :, 0, 0]
    steps = torch.diff(out)
    assert steps[0].item() == pytest.approx(1 - 0.6 * 3 / 4)   # the border step into latent 1
    assert steps[1:4].tolist() == pytest.approx([0.6 / 4] * 3)  # the rest spread inside it
    assert steps[4].item() == pytest.approx(1 - 0.6 * 3 / 4)


def test_chunk_by_chunk_equals_the_whole_clip():
    gen = torch.Generator().manual_seed(0)
    clip = torch.randn(2, 3, 1 + 4 * 7, 8, 8, generator=gen)
    whole = spread_latent_steps(clip, 0, None, 0.7)
    parts, prev, first = [], None, 0
    for n in (1 + 4 * 2, 4 * 3, 4 * 2):  # a first chunk, then later chunks of whole latents
        chunk = clip[:, :, first:first + n]
        parts.append(spread_latent_steps(chunk, first, prev, 0.7))
        prev, first = chunk[:, :, -1], first + n
    assert torch.allclose(torch.cat(parts, dim=2), whole, atol=1e-6)


def test_lowers_the_boundary_jitter_of_a_stepping_video():
    clip = stepping_clip(12) * 20  # 8-bit-like (<= 240): jumps of 20 at every latent border
    blended = spread_latent_steps(clip, 0, None, 1.0)

    def frames(t):
        return t[0].permute(1, 2, 3, 0).expand(-1, -1, -1, 3).numpy().astype(np.uint8)

    starts = list(range(1, clip.shape[2], 8))  # chunks of 2 latent frames
    assert M.boundary_jitter(frames(clip), starts) > 2
    assert M.boundary_jitter(frames(blended), starts) == pytest.approx(1.0, abs=0.05)


def test_bad_arguments_fail_clearly():
    clip = stepping_clip(2)
    with pytest.raises(ValueError, match="amount"):
        spread_latent_steps(clip, 0, None, 1.5)
    with pytest.raises(ValueError, match="pass the frame before"):
        spread_latent_steps(clip[:, :, 1:], 5, None, 0.5)
    with pytest.raises(ValueError, match=r"\(B, C, n, H, W\)"):
        spread_latent_steps(clip[0], 0, None, 0.5)
