"""FlashHead's colour correction: each decoded frame's CIELAB statistics matched to the portrait's.

Chunk after chunk, FlashHead re-encodes its own last frames as the next chunk's motion
latents, so a colour drift would feed on itself. Its pipeline therefore moves every decoded
frame's per-channel L*a*b* mean and standard deviation (over the picture) to those of the
reference portrait, blended with the frame by `strength` (1.0 in its release), before the
frames are shown and re-encoded.

The colour space is sRGB (D65) -> linear RGB -> XYZ -> CIELAB and back, with two choices
FlashHead makes that a textbook conversion does not: XYZ (relative to the white point) is
clamped to [1e-8, 1] before the cube root, and the result is clamped to [0, 1] in sRGB.
"""

from __future__ import annotations

import torch
from torch import Tensor

# sRGB primaries, D65 white: linear RGB -> XYZ (rows X, Y, Z), and its inverse as published.
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_XYZ_TO_RGB = ((3.2404542, -1.5371385, -0.4985314),
               (-0.9692660, 1.8760108, 0.0415560),
               (0.0556434, -0.2040259, 1.0572252))
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_EPSILON, _KAPPA = 0.008856, 903.3  # CIE's (6/29)^3 and (29/3)^3, as decimals


def _matmul(x: Tensor, matrix) -> Tensor:
    """x (..., 3) times a 3x3 matrix given row by row: out[..., i] = sum_j m[i][j] x[..., j]."""
    return x @ torch.tensor(matrix, dtype=x.dtype, device=x.device).T


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """(..., 3) sRGB in [0, 1] -> (..., 3) L* a* b* (L* in [0, 100])."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _matmul(linear, _RGB_TO_XYZ) / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = xyz.clamp(1e-8, 1.0)
    f = torch.where(xyz > _EPSILON, xyz ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)


def lab_to_srgb(lab: Tensor) -> Tensor:
    """(..., 3) L* a* b* -> (..., 3) sRGB, clamped to [0, 1]."""
    L, a, b = lab.unbind(-1)
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    x = torch.where(fx ** 3 > _EPSILON, fx ** 3, (116 * fx - 16) / _KAPPA)
    y = torch.where(L > _KAPPA * _EPSILON, fy ** 3, L / _KAPPA)
    z = torch.where(fz ** 3 > _EPSILON, fz ** 3, (116 * fz - 16) / _KAPPA)
    xyz = torch.stack([x, y, z], dim=-1) * torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device)
    linear = _matmul(xyz, _XYZ_TO_RGB)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def match_colours(video: Tensor, reference: Tensor, strength: float) -> Tensor:
    """video (B, 3, T, H, W) and reference (B, 3, 1, H, W), both in [-1, 1] -> video whose
    frames have the reference's L*a*b* mean and std per channel (population std over the
    picture), blended with the frames as they were: (1 - strength) * frame + strength *
    matched. strength 0 returns the video unchanged."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return video
    # float32 whatever the model's dtype: bfloat16 would quantise L* to steps of 0.5.
    src = ((video.float() + 1) / 2).permute(0, 2, 3, 4, 1)        # (B, T, H, W, 3) in [0, 1]
    ref = ((reference.float() + 1) / 2).permute(0, 2, 3, 4, 1)    # (B, 1, H, W, 3)
    src_lab, ref_lab = srgb_to_lab(src), srgb_to_lab(ref)
    mean, std = src_lab.mean(dim=(2, 3), keepdim=True), src_lab.std(dim=(2, 3), keepdim=True, unbiased=False)
    ref_mean, ref_std = ref_lab.mean(dim=(2, 3), keepdim=True), ref_lab.std(dim=(2, 3), keepdim=True, unbiased=False)
    std = torch.where(std < 1e-8, torch.ones_like(std), std)  # a flat channel keeps its spread
    matched = lab_to_srgb((src_lab - mean) * (ref_std / std) + ref_mean)
    out = (1 - strength) * src + strength * matched
    return (out.permute(0, 4, 1, 2, 3) * 2 - 1).to(video.dtype).contiguous()
