"""PyTorch path: segments gathered into contiguous K/V, then `scaled_dot_product_attention`.

Runs everywhere (CPU, CUDA, any dtype incl. float64) and supports autograd. Inference
copies [reference | window | chunk] into one K/V per call; the fused Triton kernel
exists to avoid that copy on GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _ring_valid(ring: Tensor, start: int, length: int) -> list[Tensor]:
    """The valid tokens as at most two contiguous views (no copy for the common cases)."""
    cap = ring.shape[2]
    if length == 0:
        return []
    end = start + length
    if end <= cap:
        return [ring[:, :, start:end]]
    return [ring[:, :, start:], ring[:, :, : end - cap]]


def window_attention(q, ref_k, ref_v, ring_k, ring_v, ring_start: int, ring_len: int, chunk_k, chunk_v) -> Tensor:
    k = torch.cat([ref_k, *_ring_valid(ring_k, ring_start, ring_len), chunk_k], dim=2)
    v = torch.cat([ref_v, *_ring_valid(ring_v, ring_start, ring_len), chunk_v], dim=2)
    return F.scaled_dot_product_attention(q, k, v)


def block_window_attention(q, k, v, *, prefix_len: int, chunk_len: int, window_len: int | None) -> Tensor:
    """One SDPA call per chunk over [prefix | window before it | itself]: exact, no dense mask."""
    L = q.shape[2]
    outs = []
    if prefix_len:
        outs.append(F.scaled_dot_product_attention(q[:, :, :prefix_len], k[:, :, :prefix_len], v[:, :, :prefix_len]))
    for cs in range(prefix_len, L, chunk_len):
        ce = min(cs + chunk_len, L)
        lo = prefix_len if window_len is None else max(prefix_len, cs - window_len)
        kk = torch.cat([k[:, :, :prefix_len], k[:, :, lo:ce]], dim=2)
        vv = torch.cat([v[:, :, :prefix_len], v[:, :, lo:ce]], dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, cs:ce], kk, vv))
    return torch.cat(outs, dim=2)
