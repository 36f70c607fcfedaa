"""Fused training attention: block-causal sliding window with an always-visible prefix.

Mask (see `kernels.reference.block_window_mask`): tokens [0, P) are the prefix and see
only the prefix; a frame token in chunk [cs, ce) sees the prefix and [lo, ce) with
lo = max(P, cs - W). Kernels visit only key tiles that can be visible:
- forward and dQ (one program per query tile): the prefix [0, P), then the frame range
  [lo(first frame query of the tile), ce(last query of the tile));
- dK/dV (one program per key tile): all queries when the tile holds prefix keys, else
  the queries of the key's own chunk up to the last chunk whose window still reaches it.
Inside those ranges the element mask is recomputed per tile; no dense mask exists.
Forward stores the row log-sum-exp (log2 units) for the backward (FlashAttention-2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.tiles import Tiles, backward_tiles, block_d, check_tensors, dot_flags, forward_tiles, strides

_LOG2E = 1.4426950408889634


@triton.jit
def _chunk_bounds(o_i, P, CL, W, L):
    """Per query index (>= P): start of its visible frame keys lo and the end of its chunk ce."""
    cs = P + (tl.maximum(o_i - P, 0) // CL) * CL  # non-negative division: triton ints truncate
    ce = tl.minimum(cs + CL, L)
    lo = tl.maximum(cs - W, P)
    return lo, ce


@triton.jit
def _visible(o_m, o_n, P, CL, W, L):
    """(BLOCK_M, BLOCK_N) bool: query o_m may attend key o_n (both inside [0, L))."""
    lo, ce = _chunk_bounds(o_m, P, CL, W, L)
    frame = (o_m[:, None] >= P) & (o_n[None, :] >= lo[:, None]) & (o_n[None, :] < ce[:, None])
    return ((o_n[None, :] < P) | frame) & (o_m[:, None] < L)


@triton.jit
def _query_tile_ranges(i_m, P, CL, W, L, BLOCK_M: tl.constexpr):
    """Key ranges a query tile can see: the prefix [0, P) and frames [f_lo, f_hi) (maybe empty)."""
    first = tl.maximum(i_m * BLOCK_M, P)
    last = tl.minimum(i_m * BLOCK_M + BLOCK_M, L) - 1
    f_lo, _unused = _chunk_bounds(first, P, CL, W, L)
    _unused2, f_hi = _chunk_bounds(last, P, CL, W, L)
    f_hi = tl.where(last >= P, f_hi, f_lo)  # a tile of prefix queries only sees no frames
    return f_lo, f_hi


@triton.jit
def _fwd(p_q, p_k, p_v, p_o, p_lse, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
         s_ob, s_oh, s_on, s_od, H, L, D, P, CL, W, qk_scale,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < L, o_d < D
    p_k += i_b * s_kb + i_h * s_kh
    p_v += i_b * s_vb + i_h * s_vh
    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qn + o_d[None, :] * s_qd,
                  mask=m_m[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    f_lo, f_hi = _query_tile_ranges(i_m, P, CL, W, L, BLOCK_M)
    n_prefix = tl.cdiv(P, BLOCK_N)
    n_frames = tl.cdiv(f_hi - f_lo, BLOCK_N)
    for it in range(0, n_prefix + n_frames):
        # 1. prefix tiles, then 2. the frame range of this query tile
        start = tl.where(it < n_prefix, it * BLOCK_N, f_lo + (it - n_prefix) * BLOCK_N)
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = tl.where(it < n_prefix, o_n < P, o_n < f_hi)
        m_kv = m_n[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_n[:, None] * s_kn + o_d[None, :] * s_kd, mask=m_kv, other=0.0)
        b_v = tl.load(p_v + o_n[:, None] * s_vn + o_d[None, :] * s_vd, mask=m_kv, other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_s = tl.where(_visible(o_m, o_n, P, CL, W, L) & m_n[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        b_p = tl.exp2(b_s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(p_o + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_on + o_d[None, :] * s_od,
             (acc / l_safe[:, None]).to(p_o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(p_lse + i_bh * L + o_m, m_i + tl.log2(l_safe), mask=m_m)


@triton.jit
def _bwd_dq(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
            s_vb, s_vh, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd, s_dqb, s_dqh, s_dqn, s_dqd,
            H, L, D, P, CL, W, qk_scale, sm_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dQ = sm_scale * sum_j dS_ij K_j over the visible key tiles of one query tile."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < L, o_d < D
    m_qd = m_m[:, None] & m_d[None, :]
    p_k += i_b * s_kb + i_h * s_kh
    p_v += i_b * s_vb + i_h * s_vh
    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qn + o_d[None, :] * s_qd, mask=m_qd, other=0.0)
    b_do = tl.load(p_do + i_b * s_gb + i_h * s_gh + o_m[:, None] * s_gn + o_d[None, :] * s_gd, mask=m_qd, other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_lse = tl.load(p_lse + i_bh * L + o_m, mask=m_m, other=0.0)
    b_delta = tl.load(p_delta + i_bh * L + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    f_lo, f_hi = _query_tile_ranges(i_m, P, CL, W, L, BLOCK_M)
    n_prefix = tl.cdiv(P, BLOCK_N)
    n_frames = tl.cdiv(f_hi - f_lo, BLOCK_N)
    for it in range(0, n_prefix + n_frames):
        start = tl.where(it < n_prefix, it * BLOCK_N, f_lo + (it - n_prefix) * BLOCK_N)
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = tl.where(it < n_prefix, o_n < P, o_n < f_hi)
        m_kv = m_n[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_n[:, None] * s_kn + o_d[None, :] * s_kd, mask=m_kv, other=0.0)
        b_v = tl.load(p_v + o_n[:, None] * s_vn + o_d[None, :] * s_vd, mask=m_kv, other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_p = tl.exp2(b_s - b_lse[:, None])
        b_p = tl.where(_visible(o_m, o_n, P, CL, W, L) & m_n[None, :], b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    tl.store(p_dq + i_b * s_dqb + i_h * s_dqh + o_m[:, None] * s_dqn + o_d[None, :] * s_dqd,
             (b_dq * sm_scale).to(p_dq.dtype.element_ty), mask=m_qd)


@triton.jit
def _bwd_dkdv(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
              s_vb, s_vh, s_vn, s_vd, s_gb, s_gh, s_gn, s_gd, s_dkb, s_dkh, s_dkn, s_dkd,
              s_dvb, s_dvh, s_dvn, s_dvd, H, L, D, P, CL, W, qk_scale, sm_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dV = sum_i P_ij dO_i and dK = sm_scale * sum_i dS_ij Q_i for one key tile."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < L, o_d < D
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(p_k + i_b * s_kb + i_h * s_kh + o_n[:, None] * s_kn + o_d[None, :] * s_kd, mask=m_kv, other=0.0)
    b_v = tl.load(p_v + i_b * s_vb + i_h * s_vh + o_n[:, None] * s_vn + o_d[None, :] * s_vd, mask=m_kv, other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    p_q += i_b * s_qb + i_h * s_qh
    p_do += i_b * s_gb + i_h * s_gh
    # Queries that can see this key tile: everyone when it holds prefix keys; otherwise the
    # chunk of its first key up to the last chunk c with cs(c) - W <= its last key.
    n_first = i_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, L) - 1
    _unused, q_hi0 = _chunk_bounds(tl.minimum(n_last + W, L - 1), P, CL, W, L)
    q_lo = tl.where(n_first < P, 0, P + ((n_first - P) // CL) * CL)
    q_hi = tl.where(n_first < P, L, q_hi0)
    b_dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    b_dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(q_lo, q_hi, BLOCK_M):
        o_m = start + tl.arange(0, BLOCK_M)
        m_m = o_m < q_hi
        m_qd = m_m[:, None] & m_d[None, :]
        b_q = tl.load(p_q + o_m[:, None] * s_qn + o_d[None, :] * s_qd, mask=m_qd, other=0.0)
        b_do = tl.load(p_do + o_m[:, None] * s_gn + o_d[None, :] * s_gd, mask=m_qd, other=0.0)
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_do = b_do.to(tl.float32)
        b_lse = tl.load(p_lse + i_bh * L + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(p_delta + i_bh * L + o_m, mask=m_m, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # (M, N)
        b_p = tl.exp2(b_s - b_lse[:, None])
        b_p = tl.where(_visible(o_m, o_n, P, CL, W, L) & m_m[:, None] & m_n[None, :], b_p, 0.0)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PRECISION)
    tl.store(p_dk + i_b * s_dkb + i_h * s_dkh + o_n[:, None] * s_dkn + o_d[None, :] * s_dkd,
             (b_dk * sm_scale).to(p_dk.dtype.element_ty), mask=m_kv)
    tl.store(p_dv + i_b * s_dvb + i_h * s_dvh + o_n[:, None] * s_dvn + o_d[None, :] * s_dvd,
             b_dv.to(p_dv.dtype.element_ty), mask=m_kv)


def _geometry(L: int, prefix_len: int, chunk_len: int, window_len: int | None) -> tuple[int, int, int]:
    """(P, CL, W) kernel arguments; an unlimited window becomes one longer than the sequence."""
    if prefix_len > L:
        raise ValueError(f"prefix_len {prefix_len} exceeds the sequence length {L}")
    return prefix_len, chunk_len, L + chunk_len if window_len is None else min(window_len, L + chunk_len)


def forward(q: Tensor, k: Tensor, v: Tensor, prefix_len: int, chunk_len: int, window_len: int | None, *,
            out: Tensor | None = None, tiles: Tiles | None = None) -> tuple[Tensor, Tensor]:
    """Forward only: (out (B, H, L, D) in q's dtype, lse (B*H, L) fp32 in log2 units)."""
    check_tensors(q, k, v)
    B, H, L, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    P, CL, W = _geometry(L, prefix_len, chunk_len, window_len)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    tiles = tiles or forward_tiles(D, q.dtype)
    _fwd[(triton.cdiv(L, tiles.block_m), B * H)](
        q, k, v, out, lse, *strides(q), *strides(k), *strides(v), *strides(out), H, L, D, P, CL, W,
        D ** -0.5 * _LOG2E, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d(D),
        **dot_flags(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out, lse


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, prefix_len: int,
             chunk_len: int, window_len: int | None, tiles: Tiles | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes, given dO (B, H, L, D) and the forward's out / lse."""
    B, H, L, D = q.shape
    P, CL, W = _geometry(L, prefix_len, chunk_len, window_len)
    do = do.to(q.dtype)
    delta = (do.float() * out.float()).sum(-1).reshape(B * H, L)  # rowsum(dO * O), fp32
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tiles = tiles or backward_tiles(D, q.dtype)
    common = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d(D), **dot_flags(q.dtype),
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    scales = (D ** -0.5 * _LOG2E, D ** -0.5)
    _bwd_dq[(triton.cdiv(L, tiles.block_m), B * H)](
        q, k, v, do, lse, delta, dq, *strides(q), *strides(k), *strides(v), *strides(do), *strides(dq),
        H, L, D, P, CL, W, *scales, **common)
    _bwd_dkdv[(triton.cdiv(L, tiles.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk),
        *strides(dv), H, L, D, P, CL, W, *scales, **common)
    return dq, dk, dv


class _BlockWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_len, chunk_len, window_len):
        out, lse = forward(q, k, v, prefix_len, chunk_len, window_len)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geometry = (prefix_len, chunk_len, window_len)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, out, lse, *ctx.geometry)
        return dq, dk, dv, None, None, None


def block_window_attention(q: Tensor, k: Tensor, v: Tensor, *, prefix_len: int, chunk_len: int,
                           window_len: int | None) -> Tensor:
    """Differentiable fused block-causal sliding-window attention; shapes as `kernels.block_window_attention`."""
    return _BlockWindowAttention.apply(q, k, v, prefix_len, chunk_len, window_len)
