"""Reference attention: explicit masks and a plain softmax, any dtype (float64 in tests).

Slow and memory-hungry on purpose: it is the definition the kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_window_mask(L: int, prefix_len: int, chunk_len: int, window_len: int | None,
                      device: torch.device | str = "cpu") -> Tensor:
    """(L, L) bool, True where query i may attend key j (see `block_window_attention`)."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    chunk = torch.div(i - prefix_len, chunk_len, rounding_mode="floor")
    cs = prefix_len + chunk * chunk_len
    ce = torch.clamp(cs + chunk_len, max=L)
    lo = torch.clamp(cs - window_len, min=prefix_len) if window_len is not None else torch.full_like(cs, prefix_len)
    frames = (j < prefix_len) | ((j >= lo) & (j < ce))
    return torch.where(i < prefix_len, j < prefix_len, frames)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v in q's dtype precision; q (B, H, Lq, D), k/v (B, H, Lk, D)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def ring_indices(ring_start: int, ring_len: int, capacity: int, device: torch.device | str = "cpu") -> Tensor:
    """Physical indices of the valid ring-buffer tokens, oldest first."""
    return (ring_start + torch.arange(ring_len, device=device)) % max(capacity, 1)


def window_attention_reference(q, ref_k, ref_v, ring_k, ring_v, ring_start, ring_len, chunk_k, chunk_v) -> Tensor:
    """Gather [reference | valid ring tokens, oldest first | chunk] and attend densely; (B, H, Lq, D)."""
    idx = ring_indices(ring_start, ring_len, ring_k.shape[2], q.device)
    k = torch.cat([ref_k, ring_k[:, :, idx], chunk_k], dim=2)
    v = torch.cat([ref_v, ring_v[:, :, idx], chunk_v], dim=2)
    return attention(q, k, v)


def block_window_attention_reference(q, k, v, *, prefix_len, chunk_len, window_len) -> Tensor:
    """Dense (L, L) mask from `block_window_mask`, then plain softmax attention; (B, H, L, D)."""
    return attention(q, k, v, block_window_mask(q.shape[2], prefix_len, chunk_len, window_len, q.device))
