"""Shared pieces of the Triton kernels: tile configurations and per-call compile-time flags.

Importing this module imports triton. On CPU tensors the kernels only run under the
Triton interpreter, which must be switched on (`TRITON_INTERPRET=1`) before the kernel
modules are imported (triton picks the interpreter when it decorates a function);
`interpreted()` says which mode the kernels were built in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tiles:
    """One kernel launch configuration. BLOCK_M: query rows per program; BLOCK_N: keys per step."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _probe():
    """Decorated at import like the kernels, so its type tells how they were built."""
    pass


def interpreted() -> bool:
    """True when this module's kernels run in triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_probe, InterpretedFunction)


def check_tensors(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor can be read by a kernel here (same device, dtype, 4-D)."""
    first = tensors[0]
    if first.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"triton attention supports float32/float16/bfloat16, got {first.dtype}; "
                         "use backend='sdpa' for other dtypes")
    for t in tensors:
        if t.dim() != 4:
            raise ValueError(f"attention tensors must be (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"attention tensors must share dtype and device: {t.dtype}@{t.device} vs "
                             f"{first.dtype}@{first.device}")
    if not first.is_cuda and not interpreted():
        raise ValueError("triton attention on CPU tensors needs TRITON_INTERPRET=1 set before the "
                         "kernel modules are first imported; use backend='sdpa' or CUDA tensors")


def dot_flags(dtype: torch.dtype) -> dict:
    """Compile-time flags for tl.dot.

    UPCAST: load tiles as float32 before every dot. Needed in the interpreter for bf16
    (its bf16 dot multiplies bit patterns) and harmless there for the others.
    PRECISION: float32 inputs use exact IEEE dots on GPUs (TF32 would cost ~1e-3 relative).
    """
    return {"UPCAST": interpreted(), "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two (at least 16, tl.dot's minimum); padding is masked."""
    return max(16, triton.next_power_of_2(head_dim))


# Shared memory a launch may plan for: under every recent NVIDIA GPU's per-block limit
# (A100 163 KB, H100/H200 227 KB), leaving room for the compiler's own buffers.
SMEM_BUDGET = 144 * 1024


def smem_bytes(t: Tiles, head_dim: int, element_size: int, kv_tiles: int = 2) -> int:
    """Shared memory of a forward launch, roughly: the Q tile plus `num_stages` buffered K and V tiles."""
    bd = block_d(head_dim)
    return (t.block_m * bd + t.num_stages * kv_tiles * t.block_n * bd) * element_size


def fit_tiles(t: Tiles, head_dim: int, element_size: int, kv_tiles: int = 2) -> Tiles:
    """`t`, made smaller until it fits SMEM_BUDGET: fewer pipeline stages first, then
    narrower key tiles, then fewer query rows (float32 at head dim 128 needs this)."""
    while smem_bytes(t, head_dim, element_size, kv_tiles) > SMEM_BUDGET:
        if t.num_stages > 2:
            t = Tiles(t.block_m, t.block_n, t.num_warps, t.num_stages - 1)
        elif t.block_n > 32:
            t = Tiles(t.block_m, t.block_n // 2, t.num_warps, t.num_stages)
        elif t.block_m > 32:
            t = Tiles(t.block_m // 2, t.block_n, t.num_warps, t.num_stages)
        else:
            break
    return t


def forward_tiles(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> Tiles:
    """Forward tiles: small in the interpreter (numpy per tile), FA2-like on GPUs, shrunk to
    the shared-memory budget for wide elements (float32)."""
    if interpreted():
        return Tiles(32, 32)
    size = torch.tensor([], dtype=dtype).element_size()
    if head_dim <= 64:
        return fit_tiles(Tiles(128, 64, num_warps=4, num_stages=3), head_dim, size)
    return fit_tiles(Tiles(128, 64, num_warps=8, num_stages=3), head_dim, size)


def backward_tiles(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> Tiles:
    """Backward tiles (both the dQ and the dK/dV kernel); they hold more tiles at once (K, V,
    dK, dV accumulators and Q, dO per step), so the budget counts four key-sized tiles."""
    if interpreted():
        return Tiles(32, 32)
    size = torch.tensor([], dtype=dtype).element_size()
    return fit_tiles(Tiles(64, 64, num_warps=4 if head_dim <= 64 else 8, num_stages=2), head_dim, size, kv_tiles=4)


def strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) element strides of a (B, H, L, D) tensor (0 for expanded dims)."""
    return tuple(t.stride())  # type: ignore[return-value]
