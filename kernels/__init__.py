"""Attention for knotstream: the one dispatch point the engine and the trainer call.

Two operations:
- `window_attention`: a streaming chunk's queries over [reference cache | window ring
  buffer (valid range given by start/length, may wrap) | the chunk itself];
- `block_window_attention`: a whole sequence [reference prefix | frames] under the
  block-causal sliding-window mask with an always-visible prefix (training, tests).

Backends, chosen per call in this order (the reason is logged once at debug level):
the `backend=` argument, else `KNOTSTREAM_ATTENTION` (`sdpa`, `triton`, `auto`); under
`auto`, `triton` when the tensors are on CUDA and the fused kernels import, otherwise
`sdpa` (PyTorch). Forcing `triton` on CPU tensors needs `TRITON_INTERPRET=1` set before
the kernel modules are first imported (tests do this); otherwise a ValueError says why it cannot run.

Modules: `sdpa` (PyTorch path), `triton_window` (fused inference kernel), `triton_block`
(fused training kernel, forward + backward), `reference` (dense float64-capable definition).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from kernels import sdpa

log = logging.getLogger("knotstream.kernels")
BACKENDS = ("sdpa", "triton")
_logged: set[tuple] = set()
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def choose_backend(q: Tensor, backend: str | None = None) -> str:
    """Pick a backend for tensors like `q`; raises ValueError when a forced one cannot run."""
    wanted = (backend or os.environ.get("KNOTSTREAM_ATTENTION", "auto")).lower()
    if wanted not in BACKENDS + ("auto",):
        raise ValueError(f"unknown attention backend {wanted!r}; choose from {BACKENDS + ('auto',)}")
    if wanted == "sdpa":
        return _log_once("sdpa", "forced (KNOTSTREAM_ATTENTION or backend=)")
    if wanted == "auto" and not q.is_cuda:
        return _log_once("sdpa", "tensors are not on CUDA")
    why = _triton_refusal(q)
    if wanted == "triton":
        if why:
            raise ValueError(f"attention backend 'triton' was forced but {why}")
        return _log_once("triton", "forced (KNOTSTREAM_ATTENTION or backend=)")
    if why:
        return _log_once("sdpa", why)
    return _log_once("triton", "CUDA tensors and the fused kernels import")


def _triton_refusal(q: Tensor) -> str:
    """Why the fused kernels cannot run on tensors like `q` ("" when they can)."""
    try:
        from kernels import tiles, triton_block, triton_window  # noqa: F401  (optional: needs triton)
    except ImportError as exc:
        return f"the triton kernels do not import ({exc})"
    if q.dtype not in _TRITON_DTYPES:
        return f"the fused kernels take float32/float16/bfloat16, not {q.dtype}"
    if not q.is_cuda and not tiles.interpreted():
        return "CPU tensors need TRITON_INTERPRET=1 set before the kernel modules are first imported"
    return ""


def _log_once(name: str, reason: str) -> str:
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        log.debug("attention backend %s: %s", name, reason)
    return name


def window_attention(q: Tensor, ref_k: Tensor, ref_v: Tensor, ring_k: Tensor, ring_v: Tensor, ring_start: int,
                     ring_len: int, chunk_k: Tensor, chunk_v: Tensor, *, backend: str | None = None) -> Tensor:
    """Streaming inference attention.

    q, chunk_k, chunk_v: (B, H, Lq, D); ref_k/ref_v: (B, H, R, D); ring_k/ring_v: (B, H, C, D)
    physical ring buffer whose valid tokens are (ring_start + i) % C for i < ring_len.
    Every query sees all reference, valid ring and chunk tokens. Returns (B, H, Lq, D).
    """
    if ring_len < 0 or ring_len > ring_k.shape[2] or (ring_k.shape[2] and not 0 <= ring_start < ring_k.shape[2]):
        raise ValueError(f"ring range start={ring_start} len={ring_len} does not fit capacity {ring_k.shape[2]}")
    if choose_backend(q, backend) == "triton":
        from kernels import triton_window
        return triton_window.window_attention(q, ref_k, ref_v, ring_k, ring_v, ring_start, ring_len, chunk_k, chunk_v)
    return sdpa.window_attention(q, ref_k, ref_v, ring_k, ring_v, ring_start, ring_len, chunk_k, chunk_v)


def block_window_attention(q: Tensor, k: Tensor, v: Tensor, *, prefix_len: int, chunk_len: int,
                           window_len: int | None, backend: str | None = None) -> Tensor:
    """Full-sequence attention under the block-causal sliding-window mask (differentiable).

    q, k, v: (B, H, L, D). Prefix queries see only the prefix; a frame token in chunk
    [cs, ce) sees the prefix, [max(prefix_len, cs - window_len), ce) (all earlier
    tokens when window_len is None). Returns (B, H, L, D).
    """
    if chunk_len < 1 or prefix_len < 0 or (window_len is not None and window_len < 0):
        raise ValueError(f"bad mask geometry prefix={prefix_len} chunk={chunk_len} window={window_len}")
    if choose_backend(q, backend) == "triton":
        from kernels import triton_block
        return triton_block.block_window_attention(q, k, v, prefix_len=prefix_len, chunk_len=chunk_len,
                                                    window_len=window_len)
    return sdpa.block_window_attention(q, k, v, prefix_len=prefix_len, chunk_len=chunk_len, window_len=window_len)
