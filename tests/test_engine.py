"""Engine / Stream: constant cost over long streams, determinism, knobs, rebasing, driving input."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.config import StreamKnobs
from model.engine import Engine
from model.timeline import StepInput


@pytest.fixture(scope="module")
def engine():
    """float32 throughout: these tests check exact equalities (rebasing, rewinds, batching);
    the bfloat16 autocast a CPU server may run has its own tests (test_engine_precision.py)."""
    torch.manual_seed(0)
    return Engine.from_pretrained("tiny", dtype=torch.float32)


def portrait(seed=0, size=160):
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    img[40:120, 50:110] = rng.integers(0, 255, 3)
    return img


class OpRecorder(TorchDispatchMode):
    """Records (op, input shapes) of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def test_first_chunk_and_later_chunks_have_the_documented_sizes(engine):
    s = engine.start(portrait(), seed=1)
    c = s.knobs.chunk_frames
    assert (s.frame_index, s.next_frames) == (0, 4 * c - 3)
    first = s.step()
    assert first.shape == (4 * c - 3, 128, 128, 3) and first.dtype == np.uint8
    assert (s.frame_index, s.next_frames) == (4 * c - 3, 4 * c)
    assert s.step().shape == (4 * c, 128, 128, 3)


def test_same_seed_same_video_other_seed_differs(engine):
    a = [engine.start(portrait(), seed=5).step() for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    b = engine.start(portrait(), seed=6).step()
    assert not np.array_equal(a[0], b)


def test_constant_cost_over_300_chunks():
    """Cache storage and the shapes of every op a chunk runs are the same at chunk 10 and 300.
    The tiny architecture at 32x32 with random weights: what grows or not with the stream
    does not depend on the frame size or the weights, and 300 chunks at 128x128 took
    minutes on a loaded CI machine."""
    from model.avatar import AvatarModel
    from model.config import from_name

    engine = Engine(AvatarModel.random(dataclasses.replace(from_name("tiny"), height=32, width=32)), trained=False)
    s = engine.start(portrait(), StreamKnobs(chunk_frames=2, window_frames=4, knot_frames=1, ahead_frames=4,
                                             denoise_steps=2, rebase_every=64), seed=0)
    recorded, storage = {}, {}
    for i in range(1, 301):
        if i in (10, 300):
            storage[i] = (s.cache_nbytes(), s.state.reference.k.shape, s.state.window.k.shape,
                          s.state.window.ring_range())
            with OpRecorder() as rec:
                s.step()
            recorded[i] = rec.ops
        else:
            s.step()
    assert storage[10] == storage[300]
    assert len(recorded[10]) == len(recorded[300])
    assert recorded[10] == recorded[300]
    assert s.state.offset > 0  # rebasing happened along the way
    assert abs(s.state.reference.position) < 64 + 16  # positions stay small


def test_rebasing_does_not_change_the_video(engine):
    knobs = StreamKnobs(chunk_frames=2, window_frames=4, knot_frames=1, ahead_frames=4, denoise_steps=2)
    a = engine.start(portrait(), knobs.replace(rebase_every=10_000), seed=3)
    b = engine.start(portrait(), knobs.replace(rebase_every=16), seed=3)
    for _ in range(14):
        fa, fb = a.step(), b.step()
    assert b.state.offset > 0 and a.state.offset == 0
    # Rotations in float32 differ in the last bits; decoded uint8 frames may differ by 1 level.
    assert np.abs(fa.astype(int) - fb.astype(int)).max() <= 1


@pytest.mark.parametrize("knobs", [
    dict(knot_frames=0), dict(ahead_frames=0), dict(window_frames=0), dict(chunk_frames=1, knot_frames=1),
    dict(chunk_frames=3, window_frames=9), dict(denoise_steps=1),
])
def test_every_knob_variant_streams(engine, knobs):
    s = engine.start(portrait(), engine.config.stream.replace(**knobs), seed=0)
    for _ in range(3):
        out = s.step()
        assert np.isfinite(out).all() and out.shape[1:] == (128, 128, 3)


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="knot_frames"):
        StreamKnobs(chunk_frames=2, knot_frames=3)
    with pytest.raises(ValueError, match="denoise_steps"):
        StreamKnobs(denoise_steps=0)


def test_driving_input_is_validated(engine):
    s = engine.start(portrait(), seed=0)
    with pytest.raises(ValueError, match="NaN"):
        s.step(StepInput(s.next_span(), np.array([0.0, np.nan], np.float32)))
    with pytest.raises(ValueError, match="motion"):
        s.step(StepInput(s.next_span(), None, np.zeros((3, 5), np.float32)))
    with pytest.raises(ValueError, match="next step"):  # driving taken for another span
        s.step(StepInput(dataclasses.replace(s.next_span(), frame=4)))
    # Audio longer than the span is cut, shorter reads as silence after it.
    s.step(StepInput(s.next_span(), np.zeros(10 * s.next_span().samples, np.float32)))
    s.step(StepInput(s.next_span(), np.zeros(5, np.float32)))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        Engine.from_pretrained("no-such-model")


def _driving(engine, stream, rng):
    """Random speech-like audio (its context included) and motion for the next step of `stream`."""
    span = stream.next_span()
    audio = rng.standard_normal(span.samples).astype(np.float32) * 0.3
    motion = np.zeros((span.driving_frames, engine.config.driving.motion_dim), np.float32)
    motion[:, 0] = rng.uniform(-0.5, 0.5)
    return StepInput(span, audio, motion)


@pytest.mark.parametrize("rebase_every", [16, 1000])
def test_rewind_regenerates_exactly_what_the_undone_steps_made(engine, rebase_every):
    """Barge-in support: rewinding over k steps and stepping again with the same driving gives
    the same frames (caches, positions, knot, RNG, decoder state all put back); with different
    driving it goes on from the same state. rebase_every=16 puts a rebase inside the undone steps."""
    knobs = StreamKnobs(chunk_frames=2, window_frames=3, knot_frames=1, ahead_frames=2, denoise_steps=2,
                        rewind_denoise_steps=0, rebase_every=rebase_every, seam_blend=0.5)
    s = engine.start(portrait(), knobs, seed=3)
    s.keep_history(4)
    rng = np.random.default_rng(0)
    inputs, outputs, starts = [], [], []
    for _ in range(10):
        inputs.append(_driving(engine, s, rng))
        starts.append(s.frame_index)
        outputs.append(s.step(inputs[-1]))
    # A frame inside the 8th chunk: the stream goes back to that chunk's first frame.
    target = starts[7] + 3
    snap = s.rewind_point(target)
    assert snap.frame == starts[7]
    s.restore(snap)
    assert s.frame_index == starts[7]
    for i in range(7, 10):
        again = s.step(inputs[i])
        assert np.abs(again.astype(int) - outputs[i].astype(int)).max() <= 1, i
    # Not further back than the history: no rewind point, and a snapshot restored once is
    # not kept any more (a clear error, the stream untouched).
    assert s.rewind_point(0) is None
    with pytest.raises(ValueError, match="not a kept snapshot"):
        s.restore(snap)
    assert s.frame_index == starts[9] + len(outputs[9])


def test_the_chunk_remade_after_a_rewind_is_faster_and_drops_the_interrupted_knot(engine):
    """Barge-in latency: the one step after a rewind with `remake_from` runs
    `rewind_denoise_steps` Euler steps (DiT calls: denoising passes + the cache-writing
    pass), later steps `denoise_steps` again; a knot predicted for frames after the cut
    (while the speech went on) is dropped, one for frames before it is kept. (The muted
    audio context is the timeline's part: tests/test_streaming.py.)"""
    knobs = StreamKnobs(denoise_steps=4, rewind_denoise_steps=2)
    s = engine.start(portrait(), knobs, seed=2)
    s.keep_history(3)
    calls = []
    real = engine.model.dit.forward
    engine.model.dit.forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        rng = np.random.default_rng(5)

        def loud():
            span = s.next_span()
            return StepInput(span, (0.5 * rng.standard_normal(span.samples)).astype(np.float32))

        for _ in range(3):
            calls.clear()
            s.step(loud())
            assert len(calls) == 4 + 1
        cut = s.frame_index - 6  # inside the last chunk's knot frames (its first latent)
        snap = s.rewind_point(cut)
        assert snap.frame < cut
        s.restore(snap, remake_from=cut)
        assert s.denoise_steps_now == 2
        assert s.state.knot is None  # predicted while the speech went on: dropped
        calls.clear()
        s.step(loud())
        assert len(calls) == 2 + 1 and s.denoise_steps_now == 4
        calls.clear()
        s.step()
        assert len(calls) == 4 + 1
    finally:
        engine.model.dit.forward = real
    # A cut past the knot frames keeps the knot (its frames were shown as predicted).
    s.step()
    knot_end = s.frame_index + 4 * s.state.knot.shape[2]
    s.step()
    s.restore(s.rewind_point(knot_end + 1), remake_from=knot_end + 1)
    assert s.state.knot is not None and s.denoise_steps_now == 2
    # A restore without remake_from (an aborted step) is no remake.
    s.step()
    s.step()
    s.restore(s.rewind_point(s.frame_index - 1))
    assert s.state.knot is not None and s.denoise_steps_now == 4
    with pytest.raises(ValueError, match="rewind_denoise_steps"):
        StreamKnobs(rewind_denoise_steps=-1)


def test_without_history_rewind_is_refused(engine):
    s = engine.start(portrait(), seed=0)
    s.step()
    s.step()
    assert s.rewind_point(1) is None
    other = engine.start(portrait(), seed=0)
    other.keep_history(2)
    other.step()
    with pytest.raises(ValueError, match="not a kept snapshot"):
        s.restore(other.rewind_point(1))
    assert s.rewind_point(s.frame_index + 5) is None  # nothing to undo
    assert s.frame_index == 13


def test_bf16_engine_keeps_timesteps_exact():
    """The DiT gets float32 timesteps whatever the engine's dtype (bf16 would round 999 to 1000)."""
    seen = []
    eng = Engine.from_pretrained("tiny", dtype=torch.bfloat16)
    real = eng.model.dit.forward
    eng.model.dit.forward = lambda x, t, *a, **k: (seen.append(t), real(x, t, *a, **k))[1]
    s = eng.start(portrait(), StreamKnobs(denoise_steps=3), seed=0)
    frames = s.step()
    assert frames.dtype == np.uint8 and np.isfinite(frames.astype(float)).all()
    steps = [t for t in seen if t.numel() and float(t.max()) > 0]
    assert steps and all(t.dtype == torch.float32 for t in steps)
    assert any(float(t.flatten()[0]) % 4 != 0 for t in steps)  # not snapped to bf16's grid


def test_an_aborted_step_leaves_the_stream_as_before(engine):
    """request_abort() from another thread stops a step before it commits anything: the next
    step makes exactly what it would have made had the aborted step never started."""
    from model.engine import StepAborted

    knobs = StreamKnobs(chunk_frames=2, window_frames=3, knot_frames=1, ahead_frames=2, denoise_steps=3)
    rng = np.random.default_rng(4)
    a, b = engine.start(portrait(), knobs, seed=9), engine.start(portrait(), knobs, seed=9)
    a.keep_history(2)
    assert engine.start(portrait(), knobs, seed=9).request_abort() is False  # no history: no abort
    for _ in range(3):
        d = _driving(engine, a, rng)
        assert np.array_equal(a.step(d), b.step(d))
    calls = []
    real = engine.model.dit.forward

    def abort_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            a.request_abort()
        return real(*args, **kwargs)

    d = _driving(engine, a, rng)
    engine.model.dit.forward = abort_on_second_call
    try:
        with pytest.raises(StepAborted):
            a.step(StepInput(d.span, np.zeros_like(d.audio)))  # other driving: it must leave no trace
    finally:
        engine.model.dit.forward = real
    assert len(calls) == 2 and a.frame_index == b.frame_index
    for _ in range(2):
        assert np.array_equal(a.step(d), b.step(d))
        d = _driving(engine, a, rng)


def test_batched_step_many_equals_stepping_each_stream_alone(engine):
    """Streams at different points (a fresh one, one past a rebase, different portraits, seeds
    and driving) stepped together in one batched forward give the frames they give alone."""
    knobs = StreamKnobs(chunk_frames=2, window_frames=3, knot_frames=1, ahead_frames=2, denoise_steps=2,
                        rebase_every=16)
    specs = [(0, 1), (1, 2), (2, 3)]  # (portrait seed, stream seed)
    alone = [engine.start(portrait(p), knobs, seed=s) for p, s in specs]
    batch = [engine.start(portrait(p), knobs, seed=s) for p, s in specs]
    rng = np.random.default_rng(7)
    for _ in range(9):  # the third pair runs ahead: past a rebase before the batch starts
        d = _driving(engine, alone[2], rng)
        assert np.array_equal(alone[2].step(d), batch[2].step(d))
    for rnd in range(5):
        if rnd == 2:  # a new stream joins the batch with its first chunk
            alone.append(engine.start(portrait(3), knobs, seed=4))
            batch.append(engine.start(portrait(3), knobs, seed=4))
        drives = [_driving(engine, s, rng) for s in alone]
        want = [s.step(d) for s, d in zip(alone, drives)]
        got = engine.step_many(batch, drives)
        for w, g in zip(want, got):
            assert g.shape == w.shape and np.abs(g.astype(int) - w.astype(int)).max() <= 1, rnd
    assert [s.frame_index for s in batch] == [s.frame_index for s in alone]
    assert batch[2].state.offset > 0  # the rebase really happened


def test_a_bad_input_in_a_batch_changes_no_stream(engine):
    a, b = engine.start(portrait(0), seed=1), engine.start(portrait(1), seed=2)
    before = (a.frame_index, b.frame_index)
    bad = np.full(b.next_span().samples, np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        engine.step_many([a, b], [None, StepInput(b.next_span(), bad)])
    fresh = engine.start(portrait(0), seed=1)
    assert (a.frame_index, b.frame_index) == before
    assert a.state.reference.position == fresh.state.reference.position


def test_frames_are_handed_out_before_the_cache_write(engine):
    """step_many(on_frames=...) gives each stream's frames as soon as they are decoded: after
    the denoising passes, before the cache-writing pass, and the same frames it returns; the
    stream goes on exactly as without the callback."""
    knobs = StreamKnobs(denoise_steps=3)
    a, b = engine.start(portrait(), knobs, seed=4), engine.start(portrait(), knobs, seed=4)
    calls, seen = [], []
    real = engine.model.dit.forward
    engine.model.dit.forward = lambda *x, **k: (calls.append(1), real(*x, **k))[1]
    try:
        for _ in range(3):
            calls.clear()
            out = engine.step_many([a], [None], on_frames=lambda i, f: seen.append((i, len(calls), f)))
            assert len(calls) == 3 + 1
            i, dit_calls_then, frames = seen[-1]
            assert i == 0 and dit_calls_then == 3 and np.array_equal(frames, out[0])
    finally:
        engine.model.dit.forward = real
    for i in range(3):
        assert np.array_equal(b.step(), seen[i][2])


def test_an_abort_after_the_decode_still_undoes_the_whole_step(engine):
    """An interrupt landing while the frames are handed out (before the cache write) aborts the
    step: step_many gives None, and the stream goes on as if the step never ran."""
    knobs = StreamKnobs(denoise_steps=2, seam_blend=0.5)  # the blend's past frame is undone too
    a, b = engine.start(portrait(), knobs, seed=6), engine.start(portrait(), knobs, seed=6)
    a.keep_history(2)
    for _ in range(2):
        assert np.array_equal(engine.step_many([a], [None])[0], b.step())
    handed = []
    out = engine.step_many([a], [None], on_frames=lambda i, f: (handed.append(f), a.request_abort()))
    assert out == [None] and len(handed) == 1
    for _ in range(2):
        assert np.array_equal(a.step(), b.step())


def test_seam_blend_is_the_seams_filter_over_the_decoded_stream(engine):
    """seam_blend spreads each latent-border jump (model/seams.py) across chunk borders too:
    the stream equals the filter applied to the same stream without it, whole."""
    import torch

    from model.seams import spread_latent_steps

    knobs = StreamKnobs(denoise_steps=2)
    plain, blended = engine.start(portrait(), knobs, seed=5), engine.start(portrait(), knobs.replace(seam_blend=0.6), seed=5)
    rng = np.random.default_rng(2)
    a, b = [], []
    for _ in range(4):
        d = _driving(engine, plain, rng)
        a.append(plain.step(d))
        b.append(blended.step(d))
    video = torch.from_numpy(np.concatenate(a)).permute(3, 0, 1, 2)[None].float()  # (1, 3, T, H, W)
    want = spread_latent_steps(video, 0, None, 0.6).round().clamp(0, 255)[0].permute(1, 2, 3, 0).numpy()
    got = np.concatenate(b).astype(np.float64)
    assert np.abs(got - want).max() <= 2  # the engine filters before rounding to 8 bits
    assert not np.array_equal(np.concatenate(a), np.concatenate(b))
    with pytest.raises(ValueError, match="seam_blend"):
        StreamKnobs(seam_blend=1.5)
