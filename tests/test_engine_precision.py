"""The chunk loop's precision: bfloat16 autocast on a CPU that has it natively (what
`Engine.from_pretrained` and the server choose by default), float32 on request, and what
the autocast costs in picture against float32 on the same stream."""

import numpy as np
import torch

from model.config import StreamKnobs
from model.engine import Engine, native_cpu_bf16
from model.timeline import StepInput
from server.avatars import avatar_image
from server.settings import Settings


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-12)))


def _video(engine: Engine, knobs: StreamKnobs | None = None, chunks: int = 12) -> np.ndarray:
    """A stream of the bundled avatar driven by the same noisy audio every time."""
    rng = np.random.default_rng(0)
    s = engine.start(avatar_image("ada"), knobs, seed=0)
    out = []
    for _ in range(chunks):
        span = s.next_span()
        out.append(s.step(StepInput(span, rng.standard_normal(span.samples).astype(np.float32) * 0.3)))
    return np.concatenate(out)


def test_auto_precision_follows_the_cpu_and_an_explicit_dtype_is_kept():
    auto = Engine.from_pretrained("tiny")
    assert auto.dtype == torch.float32
    assert auto.autocast == (torch.bfloat16 if native_cpu_bf16() else None)
    exact = Engine.from_pretrained("tiny", dtype=torch.float32)
    assert exact.autocast is None and exact.precision == "float32"
    assert Settings().torch_dtype() is None  # auto: the engine decides
    assert Settings(dtype="float32").torch_dtype() is torch.float32


def test_bf16_autocast_frames_stay_within_45_db_of_float32():
    """Any CPU can run the autocast (slowly where it is emulated), so this runs everywhere.
    Measured 58-62 dB on the development VM; a model pass that lost precision (a cache kept
    in bfloat16 and read back as the wrong thing, a norm computed in bfloat16) falls far below."""
    exact = Engine.from_pretrained("tiny", dtype=torch.float32)
    fast = Engine(exact.model, autocast=torch.bfloat16)
    assert fast.precision == "float32 weights, bfloat16 autocast"
    a, b = _video(exact), _video(fast)
    assert a.shape == b.shape
    assert not np.array_equal(a, b), "the autocast changed nothing: it did not run"
    assert _psnr(a, b) > 45


def test_bf16_autocast_survives_rebasing():
    """Positions rebased mid-stream: float32 gives the same video to within a level; the
    autocast stays within 45 dB of the stream that never rebased."""
    exact = Engine.from_pretrained("tiny", dtype=torch.float32)
    fast = Engine(exact.model, autocast=torch.bfloat16)
    knobs = StreamKnobs(chunk_frames=2, window_frames=4, knot_frames=1, ahead_frames=4, denoise_steps=2)
    a = _video(fast, knobs.replace(rebase_every=10_000), chunks=14)
    b = _video(fast, knobs.replace(rebase_every=16), chunks=14)
    assert _psnr(a, b) > 45
