"""Attention dispatch: the PyTorch path against the float64 reference, and backend choice."""

import itertools

import pytest
import torch

import kernels
from kernels.reference import block_window_attention_reference, window_attention_reference


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("L, prefix, chunk, window", [
    (63, 7, 8, None), (63, 7, 8, 16), (500, 64, 96, 200), (40, 0, 40, None), (45, 5, 10, 0), (33, 3, 5, 7)])
@pytest.mark.parametrize("D", [32, 60])
def test_block_window_matches_reference(L, prefix, chunk, window, D):
    q, k, v = (rand(2, 3, L, D, seed=s) for s in range(3))
    got = kernels.block_window_attention(q, k, v, prefix_len=prefix, chunk_len=chunk, window_len=window, backend="sdpa")
    ref = block_window_attention_reference(q, k, v, prefix_len=prefix, chunk_len=chunk, window_len=window)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 1e-10


def test_block_window_gradients_match_reference():
    q, k, v = (rand(1, 2, 50, 16, seed=s).requires_grad_() for s in range(3))
    args = dict(prefix_len=6, chunk_len=11, window_len=15)
    g = rand(1, 2, 50, 16, seed=9)
    (kernels.block_window_attention(q, k, v, backend="sdpa", **args) * g).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (block_window_attention_reference(q, k, v, **args) * g).sum().backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("cap, start, length", [(0, 0, 0), (48, 0, 0), (48, 0, 20), (48, 40, 20), (48, 30, 48),
                                                 (48, 0, 48), (64, 63, 1)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_window_attention_matches_reference(cap, start, length, dtype, tol):
    B, H, R, Lq, D = 2, 3, 16, 24, 64
    q, rk, rv, ck, cv = (rand(B, H, n, D, dtype=dtype, seed=s) for s, n in enumerate((Lq, R, R, Lq, Lq)))
    ring_k, ring_v = rand(B, H, cap, D, dtype=dtype, seed=7), rand(B, H, cap, D, dtype=dtype, seed=8)
    got = kernels.window_attention(q, rk, rv, ring_k, ring_v, start, length, ck, cv, backend="sdpa")
    ref = window_attention_reference(*(t.double() for t in (q, rk, rv, ring_k, ring_v)), start, length,
                                     ck.double(), cv.double())
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_invalid_tokens_of_the_ring_are_ignored():
    q, rk, rv, ck, cv = (rand(1, 1, 8, 16, seed=s) for s in range(5))
    ring = rand(1, 1, 32, 16, seed=6)
    a = kernels.window_attention(q, rk, rv, ring, ring, 10, 12, ck, cv)
    poisoned = ring.clone()
    poisoned[:, :, :10] = 1e6
    poisoned[:, :, 22:] = float("nan")
    b = kernels.window_attention(q, rk, rv, poisoned, poisoned, 10, 12, ck, cv)
    assert torch.equal(a, b)


def test_backend_choice_and_errors(monkeypatch):
    q = torch.zeros(1, 1, 4, 8)
    assert kernels.choose_backend(q) == "sdpa"  # CPU tensors
    monkeypatch.setenv("KNOTSTREAM_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.choose_backend(q)
    monkeypatch.setenv("KNOTSTREAM_ATTENTION", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton"):
        kernels.choose_backend(q)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.window_attention(q, q, q, q, q, 0, 9, q, q, backend="sdpa")
