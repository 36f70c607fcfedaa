"""Fused streaming-inference attention: a chunk's queries over [reference | ring window | chunk].

One program per (query tile, batch x head). The K/V segments are read in place, without
concatenation: the reference cache [0, R), the ring buffer as at most two contiguous
physical ranges [s, min(s + n, C)) and [0, s + n - C), and the chunk [0, Lq). One
online-softmax state (running max, running sum, fp32 accumulator) spans all of them.
Nothing is masked inside a segment except its tail tile, and the chunk is
bidirectional. Reference: `kernels.reference.window_attention_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.tiles import Tiles, block_d, check_tensors, dot_flags, forward_tiles, strides

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_range(acc, m_i, l_i, b_q, p_k, p_v, s_kn, s_kd, s_vn, s_vd, lo, hi, qk_scale,
                  o_d, m_d, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys [lo, hi) of one contiguous segment into the online-softmax state.

    acc (BLOCK_M, BLOCK_D) fp32, m_i / l_i (BLOCK_M,) fp32 running max (log2 units) and
    sum; b_q (BLOCK_M, BLOCK_D); p_k / p_v point at token 0 of this (batch, head).
    """
    for start in range(lo, hi, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        m_kv = m_n[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_n[:, None] * s_kn + o_d[None, :] * s_kd, mask=m_kv, other=0.0)
        b_v = tl.load(p_v + o_n[:, None] * s_vn + o_d[None, :] * s_vd, mask=m_kv, other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # (M, N), log2 units
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _window_fwd(p_q, p_rk, p_rv, p_wk, p_wv, p_ck, p_cv, p_o,
                s_qb, s_qh, s_qn, s_qd, s_rkb, s_rkh, s_rkn, s_rkd, s_rvb, s_rvh, s_rvn, s_rvd,
                s_wkb, s_wkh, s_wkn, s_wkd, s_wvb, s_wvh, s_wvn, s_wvd,
                s_ckb, s_ckh, s_ckn, s_ckd, s_cvb, s_cvh, s_cvn, s_cvd, s_ob, s_oh, s_on, s_od,
                H, Lq, D, R, C, ring_start, ring_len, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < Lq
    m_d = o_d < D

    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qn + o_d[None, :] * s_qd,
                  mask=m_m[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # 1. reference cache [0, R)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, b_q, p_rk + i_b * s_rkb + i_h * s_rkh,
                                  p_rv + i_b * s_rvb + i_h * s_rvh, s_rkn, s_rkd, s_rvn, s_rvd,
                                  0, R, qk_scale, o_d, m_d, BLOCK_N, UPCAST, PRECISION)
    # 2. ring buffer: [start, min(start + len, C)) then the wrapped part [0, start + len - C)
    p_wk_bh = p_wk + i_b * s_wkb + i_h * s_wkh
    p_wv_bh = p_wv + i_b * s_wvb + i_h * s_wvh
    ring_end = ring_start + ring_len
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, b_q, p_wk_bh, p_wv_bh, s_wkn, s_wkd, s_wvn, s_wvd,
                                  ring_start, tl.minimum(ring_end, C), qk_scale, o_d, m_d,
                                  BLOCK_N, UPCAST, PRECISION)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, b_q, p_wk_bh, p_wv_bh, s_wkn, s_wkd, s_wvn, s_wvd,
                                  0, tl.maximum(ring_end - C, 0), qk_scale, o_d, m_d,
                                  BLOCK_N, UPCAST, PRECISION)
    # 3. the chunk itself [0, Lq), bidirectional
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, b_q, p_ck + i_b * s_ckb + i_h * s_ckh,
                                  p_cv + i_b * s_cvb + i_h * s_cvh, s_ckn, s_ckd, s_cvn, s_cvd,
                                  0, Lq, qk_scale, o_d, m_d, BLOCK_N, UPCAST, PRECISION)

    b_o = acc / l_i[:, None]  # l_i >= 1: every query sees at least the chunk
    tl.store(p_o + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_on + o_d[None, :] * s_od,
             b_o.to(p_o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


def window_attention(q: Tensor, ref_k: Tensor, ref_v: Tensor, ring_k: Tensor, ring_v: Tensor, ring_start: int,
                     ring_len: int, chunk_k: Tensor, chunk_v: Tensor, *, out: Tensor | None = None,
                     tiles: Tiles | None = None) -> Tensor:
    """Fused [reference | ring | chunk] attention; shapes as `kernels.window_attention`.

    `out` (B, H, Lq, D) in q's dtype, any strides, receives the result when given (tests
    poison it first); `tiles` overrides the launch configuration (benchmarks).
    """
    B, H, Lq, D = q.shape
    check_tensors(q, ref_k, ref_v, ring_k, ring_v, chunk_k, chunk_v)
    R, C = ref_k.shape[2], ring_k.shape[2]
    for name, t, n in (("ref_k", ref_k, R), ("ref_v", ref_v, R), ("ring_k", ring_k, C), ("ring_v", ring_v, C),
                       ("chunk_k", chunk_k, Lq), ("chunk_v", chunk_v, Lq)):
        if tuple(t.shape) != (B, H, n, D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, H, n, D)}")
    if Lq == 0:
        raise ValueError("window attention needs at least one chunk token (Lq >= 1)")
    # Empty segments are never read; point them at q so no null/foreign pointer reaches the kernel.
    if R == 0:
        ref_k = ref_v = q
    if C == 0:
        ring_k = ring_v = q
        ring_start = ring_len = 0
    if out is None:
        out = torch.empty_like(q)
    tiles = tiles or forward_tiles(D, q.dtype)
    grid = (triton.cdiv(Lq, tiles.block_m), B * H)
    _window_fwd[grid](
        q, ref_k, ref_v, ring_k, ring_v, chunk_k, chunk_v, out,
        *strides(q), *strides(ref_k), *strides(ref_v), *strides(ring_k), *strides(ring_v),
        *strides(chunk_k), *strides(chunk_v), *strides(out),
        H, Lq, D, R, C, ring_start, ring_len, D ** -0.5 * _LOG2E,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d(D), **dot_flags(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
