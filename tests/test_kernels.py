"""Attention kernels against the float64 reference: PyTorch path, fused Triton kernels, dispatch.

The Triton kernels run on CPU tensors in triton's interpreter, which must be switched on
before the kernel modules are imported (triton decides when it decorates a kernel): hence the environment line above the imports. The
interpreter is slow (numpy per tile), so the default subset uses toy sizes; the full
sweep is marked `slow`.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules decorate their kernels

import itertools  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.reference import (block_window_attention_reference, block_window_mask,  # noqa: E402
                               window_attention_reference)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error over the reference's max magnitude (float64)."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def triton_modules():
    """The fused kernel modules, built in interpreter mode (skip if triton was imported earlier without it)."""
    pytest.importorskip("triton")
    from kernels import tiles, triton_block, triton_window
    if not tiles.interpreted():
        pytest.skip("the kernels were imported before TRITON_INTERPRET=1 was set; run this module on its own")
    return triton_window, triton_block


# --------------------------------------------------------------------------------------
# 1. Reference sanity: the dense mask is the documented rule.
# --------------------------------------------------------------------------------------


def test_reference_mask_follows_the_rule():
    L, P, CL, W = 23, 3, 4, 5
    mask = block_window_mask(L, P, CL, W)
    for i, j in itertools.product(range(L), range(L)):
        if i < P:
            want = j < P
        else:
            cs = P + (i - P) // CL * CL
            want = j < P or max(P, cs - W) <= j < min(cs + CL, L)
        assert mask[i, j].item() == want, (i, j)


# --------------------------------------------------------------------------------------
# 2. PyTorch (SDPA) path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("L, prefix, chunk, window", [
    (63, 7, 8, None), (63, 7, 8, 16), (500, 64, 96, 200), (40, 0, 40, None), (45, 5, 10, 0), (33, 3, 5, 7)])
@pytest.mark.parametrize("D", [32, 60])
def test_sdpa_block_window_matches_reference(L, prefix, chunk, window, D):
    q, k, v = (rand(2, 3, L, D, seed=s) for s in range(3))
    got = kernels.block_window_attention(q, k, v, prefix_len=prefix, chunk_len=chunk, window_len=window, backend="sdpa")
    ref = block_window_attention_reference(q, k, v, prefix_len=prefix, chunk_len=chunk, window_len=window)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 1e-10


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    (out.double() * g).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def test_sdpa_block_window_gradients_match_reference():
    q, k, v = (rand(1, 2, 50, 16, seed=s) for s in range(3))
    args = dict(prefix_len=6, chunk_len=11, window_len=15)
    g = rand(1, 2, 50, 16, seed=9)
    got = _grads(lambda *t: kernels.block_window_attention(*t, backend="sdpa", **args), q, k, v, g)
    ref = _grads(lambda *t: block_window_attention_reference(*t, **args), q, k, v, g)
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() < 1e-10


RING_CASES = [(0, 0, 0), (48, 0, 0), (48, 0, 20), (48, 40, 20), (48, 30, 48), (48, 0, 48), (64, 63, 1)]


def _window_inputs(B, H, R, Lq, cap, D, dtype):
    q, rk, rv, ck, cv = (rand(B, H, n, D, dtype=dtype, seed=s) for s, n in enumerate((Lq, R, R, Lq, Lq)))
    ring_k, ring_v = rand(B, H, cap, D, dtype=dtype, seed=7), rand(B, H, cap, D, dtype=dtype, seed=8)
    return q, rk, rv, ring_k, ring_v, ck, cv


def _window_ref(q, rk, rv, ring_k, ring_v, start, length, ck, cv):
    return window_attention_reference(*(t.double() for t in (q, rk, rv, ring_k, ring_v)), start, length,
                                      ck.double(), cv.double())


@pytest.mark.parametrize("cap, start, length", RING_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sdpa_window_attention_matches_reference(cap, start, length, dtype):
    q, rk, rv, ring_k, ring_v, ck, cv = _window_inputs(2, 3, 16, 24, cap, 64, dtype)
    got = kernels.window_attention(q, rk, rv, ring_k, ring_v, start, length, ck, cv, backend="sdpa")
    ref = _window_ref(q, rk, rv, ring_k, ring_v, start, length, ck, cv)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_invalid_tokens_of_the_ring_are_ignored(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_modules")
    q, rk, rv, ck, cv = (rand(1, 2, 8, 16, dtype=torch.float32, seed=s) for s in range(5))
    ring = rand(1, 2, 32, 16, dtype=torch.float32, seed=6)
    for start, length in ((10, 12), (25, 15)):  # in one range, and wrapped
        a = kernels.window_attention(q, rk, rv, ring, ring, start, length, ck, cv, backend=backend)
        valid = (start + torch.arange(length)) % 32
        poisoned = torch.full_like(ring, float("nan"))
        poisoned[:, :, valid] = ring[:, :, valid]
        b = kernels.window_attention(q, rk, rv, poisoned, poisoned, start, length, ck, cv, backend=backend)
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# 3. Fused inference kernel
# --------------------------------------------------------------------------------------


def _check_window_kernel(triton_window, B, H, R, Lq, cap, start, length, D, dtype, tiles=None, layout="bhld"):
    q, rk, rv, ring_k, ring_v, ck, cv = _window_inputs(B, H, R, Lq, cap, D, dtype)
    if layout == "blhd":  # the DiT's layout: (B, L, H, D) storage seen as (B, H, L, D)
        q, rk, rv, ring_k, ring_v, ck, cv = (t.transpose(1, 2).contiguous().transpose(1, 2)
                                             for t in (q, rk, rv, ring_k, ring_v, ck, cv))
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    triton_window.window_attention(q, rk, rv, ring_k, ring_v, start, length, ck, cv, out=out, tiles=tiles)
    ref = _window_ref(q, rk, rv, ring_k, ring_v, start, length, ck, cv)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} for {dtype} D={D} ring=({cap},{start},{length})"


@pytest.mark.parametrize("cap, start, length", RING_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_window_matches_reference(triton_modules, cap, start, length, dtype):
    _check_window_kernel(triton_modules[0], 1, 2, 17, 37, cap, start, length, 64, dtype)


@pytest.mark.parametrize("D, dtype", [(32, torch.float16), (60, torch.float32), (128, torch.bfloat16),
                                      (16, torch.float32)])
def test_triton_window_head_dims_and_dtypes(triton_modules, D, dtype):
    _check_window_kernel(triton_modules[0], 2, 3, 9, 21, 40, 33, 30, D, dtype)


def test_triton_window_strided_layout_and_tiles(triton_modules):
    from kernels.tiles import Tiles
    for tiles in (Tiles(16, 16), Tiles(16, 64), Tiles(64, 16)):
        _check_window_kernel(triton_modules[0], 1, 3, 5, 63, 30, 29, 30, 32, torch.float32, tiles=tiles,
                             layout="blhd")


def test_triton_window_through_dispatch_and_empty_reference(triton_modules):
    q, _, _, ring_k, ring_v, ck, cv = _window_inputs(1, 2, 0, 12, 20, 32, torch.float32)
    empty = q[:, :, :0]
    got = kernels.window_attention(q, empty, empty, ring_k, ring_v, 15, 9, ck, cv, backend="triton")
    assert rel_err(got, _window_ref(q, empty, empty, ring_k, ring_v, 15, 9, ck, cv)) < 1e-5


# --------------------------------------------------------------------------------------
# 4. Fused training kernel: forward and backward
# --------------------------------------------------------------------------------------


def _check_block_kernel(triton_block, B, H, L, P, CL, W, D, dtype, grads=True):
    q, k, v = (rand(B, H, L, D, dtype=dtype, seed=s) for s in range(3))
    geometry = dict(prefix_len=P, chunk_len=CL, window_len=W)
    out = torch.full_like(q, float("nan"))
    triton_block.forward(q, k, v, P, CL, W, out=out)
    ref = block_window_attention_reference(q.double(), k.double(), v.double(), **geometry)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], f"forward {dtype} L={L} P={P} CL={CL} W={W} D={D}"
    if not grads:
        return
    g = rand(B, H, L, D, seed=5)
    got = _grads(lambda *t: triton_block.block_window_attention(*t, **geometry), q, k, v, g)
    want = _grads(lambda *t: block_window_attention_reference(*t, **geometry), q.double(), k.double(), v.double(), g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err = rel_err(a, b)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} ({dtype} L={L} P={P} CL={CL} W={W} D={D})"


@pytest.mark.parametrize("L, P, CL, W, D", [
    (63, 7, 8, None, 32), (63, 7, 8, 16, 60), (45, 5, 10, 0, 16), (70, 20, 13, 5, 32), (20, 20, 5, None, 32),
    (40, 0, 40, None, 64), (37, 0, 6, 12, 16)])
def test_triton_block_matches_reference_fp32(triton_modules, L, P, CL, W, D):
    _check_block_kernel(triton_modules[1], 1, 2, L, P, CL, W, D, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_block_half_precision(triton_modules, dtype):
    _check_block_kernel(triton_modules[1], 1, 2, 50, 6, 11, 15, 32, dtype)


def test_triton_block_long_sequence_forward(triton_modules):
    _check_block_kernel(triton_modules[1], 1, 1, 500, 64, 96, 200, 32, torch.float32, grads=False)


def test_triton_block_through_dispatch_matches_sdpa(triton_modules):
    q, k, v = (rand(2, 2, 41, 32, dtype=torch.float32, seed=s) for s in range(3))
    args = dict(prefix_len=5, chunk_len=9, window_len=9)
    a = kernels.block_window_attention(q, k, v, backend="triton", **args)
    b = kernels.block_window_attention(q, k, v, backend="sdpa", **args)
    assert (a - b).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------
# 5. Dispatch
# --------------------------------------------------------------------------------------


def test_backend_choice_and_errors(monkeypatch, caplog):
    q = torch.zeros(1, 1, 4, 8)
    monkeypatch.delenv("KNOTSTREAM_ATTENTION", raising=False)
    kernels._logged.clear()
    with caplog.at_level(logging.DEBUG, logger="knotstream.kernels"):
        assert kernels.choose_backend(q) == "sdpa"  # CPU tensors under auto
        assert kernels.choose_backend(q) == "sdpa"
    assert [r.getMessage() for r in caplog.records] == ["attention backend sdpa: tensors are not on CUDA"]
    monkeypatch.setenv("KNOTSTREAM_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.choose_backend(q)
    monkeypatch.setenv("KNOTSTREAM_ATTENTION", "triton")
    with pytest.raises(ValueError, match="float64"):
        kernels.choose_backend(q.double())
    assert kernels.choose_backend(q, backend="sdpa") == "sdpa"  # the argument wins over the environment
    with pytest.raises(ValueError, match="does not fit"):
        kernels.window_attention(q, q, q, q, q, 0, 9, q, q, backend="sdpa")
    with pytest.raises(ValueError, match="bad mask geometry"):
        kernels.block_window_attention(q, q, q, prefix_len=0, chunk_len=0, window_len=None, backend="sdpa")


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    pytest.importorskip("triton")
    code = ("import torch, kernels\n"
            "try:\n"
            "    kernels.choose_backend(torch.zeros(1, 1, 2, 16), backend='triton')\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert "refused:" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------------------
# 6. Full sweep (slow): every combination of the swept parameters.
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_sweep_window(triton_modules, dtype):
    for (Lq, R), (cap, start, length), D in itertools.product(
            [(63, 0), (24, 17), (100, 40)], RING_CASES + [(96, 50, 90), (96, 95, 96), (7, 3, 5)], [32, 60, 64, 128]):
        _check_window_kernel(triton_modules[0], 1, 2, R, Lq, cap, start, length, D, dtype)
        assert torch.isfinite(kernels.window_attention(
            *_window_inputs(1, 2, R, Lq, cap, D, dtype)[:5], start, length,
            *_window_inputs(1, 2, R, Lq, cap, D, dtype)[5:], backend="sdpa")).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_sweep_block(triton_modules, dtype):
    cases = [(L, P, CL, W) for L, P in [(63, 0), (63, 9), (130, 33)] for CL in (8, 21, 64)
             for W in (None, 0, 5, 2 * CL)]
    for (L, P, CL, W), D in itertools.product(cases, [32, 60, 128]):
        _check_block_kernel(triton_modules[1], 1, 2, L, P, CL, W, D, dtype, grads=D != 128)
    _check_block_kernel(triton_modules[1], 1, 2, 500, 40, 60, 120, 64, dtype)


# --------------------------------------------------------------------------------------
# 7. The DiT's cache equivalence (streaming == one masked pass) with the fused kernels forced
# --------------------------------------------------------------------------------------


def test_dit_streaming_equals_full_pass_with_triton_forced(triton_modules, monkeypatch):
    """tests/test_dit.py checks this in float64 (SDPA path); here both sides run the fused kernels in fp32."""
    from model.dit import FullSequence
    from tests.test_dit import small_dit, stream_chunks
    monkeypatch.setenv("KNOTSTREAM_ATTENTION", "triton")
    model = small_dit().float()
    B, C, N, h, w, chunk, window = 1, 4, 5, 6, 8, 2, 2
    T = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(1)
    ref, frames = torch.randn(B, C, 1, h, w, generator=g), torch.randn(B, C, N, h, w, generator=g)
    t = torch.rand(B, N, generator=g) * 1000
    drive = torch.randn(B, N, 5, 16, generator=g)
    with torch.no_grad():
        full = model(torch.cat([ref, frames], 2), torch.cat([torch.zeros(B, 1), t], 1),
                     torch.cat([torch.tensor([9.0]), torch.arange(N, dtype=torch.float64) + 1]),
                     FullSequence(prefix_len=T, chunk_len=chunk * T, window_len=window * T), drive=drive)[:, :, 1:]
        streamed = stream_chunks(model, ref, 9.0, frames, t, drive, chunk, window)
        wrong = stream_chunks(model, ref, 9.0, frames, t, drive, chunk, window + 1)
        monkeypatch.setenv("KNOTSTREAM_ATTENTION", "sdpa")
        streamed_sdpa = stream_chunks(model, ref, 9.0, frames, t, drive, chunk, window)
    assert (streamed - full).abs().max().item() <= 1e-4
    assert (streamed - streamed_sdpa).abs().max().item() <= 1e-4
    assert (wrong - full).abs().max().item() > 1e-3  # the comparison can fail: a wrong window shows



def test_attention_bench_cpu_smoke_runs():
    """bench/attention.py --cpu-smoke: every row ran or says why not, and the correctness gate passed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "bench/attention.py", "--cpu-smoke"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| inference") or line.startswith("| training")]
    assert len(rows) == 20
    ours = [r for r in rows if "| ours" in r]
    assert len(ours) == 4 and all("n/a" not in r for r in ours)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_tiles_fit_the_shared_memory_budget(head_dim, dtype):
    """float32 at head dim 128 with FA2-like tiles (128x64, 3 stages) would need ~256 KB of
    shared memory, more than any GPU block has: the tiles shrink to the budget."""
    from kernels.tiles import SMEM_BUDGET, Tiles, fit_tiles, smem_bytes

    size = torch.tensor([], dtype=dtype).element_size()
    fwd = fit_tiles(Tiles(128, 64, 8, 3), head_dim, size)
    bwd = fit_tiles(Tiles(64, 64, 8, 2), head_dim, size, kv_tiles=4)
    assert smem_bytes(fwd, head_dim, size) <= SMEM_BUDGET
    assert smem_bytes(bwd, head_dim, size, kv_tiles=4) <= SMEM_BUDGET
    assert min(fwd.block_m, fwd.block_n, bwd.block_m, bwd.block_n) >= 16  # tl.dot's minimum
    if dtype != torch.float32:
        assert fwd == Tiles(128, 64, 8, 3)  # 16-bit inputs keep the full tiles
