"""Client knobs (server/knobs.py): a short allowlist with strict types and bounds from the
model and the settings, refused with the field named before anything is allocated; and
the layers under it that must not trust a knob either (StreamKnobs types, a worker that
outlives one session's unreadable input)."""

import math
import threading
import time

import numpy as np
import pytest

from model.config import StreamKnobs, from_name
from model.timeline import StepSpan, Timeline
from server.errors import ApiError
from server.knobs import KnobPolicy
from streaming.driving import DrivingBuffer
from streaming.playout import Playout
from streaming.worker import Generation, GenerationWorker


@pytest.fixture(scope="module")
def policy():
    cfg = from_name("tiny")   # sampler trained for 4 steps
    return KnobPolicy(cfg, max_lead_frames=100)


def refused(fn, field):
    with pytest.raises(ApiError) as e:
        fn()
    assert e.value.status == 422 and e.value.code == "invalid_knob", e.value.message
    assert e.value.extra == {"field": field} and field in e.value.message
    return e.value.message


@pytest.mark.parametrize("value", [2.5, 2.0, "2", True, float("nan"), float("inf"), None, [2], {"v": 2}])
def test_integer_knobs_take_integers_only(policy, value):
    refused(lambda: policy.stream_knobs({"denoise_steps": value}), "options.knobs.denoise_steps")


@pytest.mark.parametrize("name,value", [
    ("window_frames", 2.5), ("window_frames", 10**6), ("window_frames", 6), ("chunk_frames", 400),
    ("ahead_frames", 10**9), ("knot_frames", 0.5), ("rebase_every", 16), ("shift", 3.0), ("warp", 1),
])
def test_geometry_and_unknown_knobs_are_operator_only(policy, name, value):
    msg = refused(lambda: policy.stream_knobs({name: value}), f"options.knobs.{name}")
    assert "denoise_steps" in msg   # the refusal says what a session may set


def test_bounds_come_from_the_model_and_the_settings(policy):
    assert policy.stream_knobs({"denoise_steps": 4}).denoise_steps == 4   # the trained range
    refused(lambda: policy.stream_knobs({"denoise_steps": 5}), "options.knobs.denoise_steps")
    refused(lambda: policy.stream_knobs({"denoise_steps": 0}), "options.knobs.denoise_steps")
    k = policy.stream_knobs({"seam_blend": 0.25, "knot_fusion": 1, "rewind_denoise_steps": 0})
    assert (k.seam_blend, k.knot_fusion, k.rewind_denoise_steps) == (0.25, 1.0, 0)
    assert k.window_frames == from_name("tiny").stream.window_frames
    for v in (1.5, -0.1, float("nan"), "0.5"):
        refused(lambda v=v: policy.stream_knobs({"seam_blend": v}), "options.knobs.seam_blend")
    assert policy.lead_frames(100) == 100 and policy.lead_frames(None) is None
    for v in (101, 0, 2.5, True):
        refused(lambda v=v: policy.lead_frames(v), "options.lead_frames")
    refused(lambda: policy.stream_knobs([1, 2]), "options.knobs")
    assert list(policy.rules) == ["denoise_steps", "rewind_denoise_steps", "seam_blend", "knot_fusion"]


@pytest.mark.parametrize("kw", [{"window_frames": 2.5}, {"knot_frames": True}, {"chunk_frames": 2.0},
                                {"shift": math.inf}, {"knot_fusion": math.nan}])
def test_stream_knobs_refuse_wrong_types(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        StreamKnobs(**kw)


# ----- the worker outlives a session whose input it cannot read -------------------------------

class FloatKnobStream:
    """A stream whose sizes came from a fractional knob (knot_frames 0.5 did this): reading its
    driving window raises TypeError inside DrivingBuffer.take."""

    closed = False

    def next_span(self):
        return StepSpan(0, 5, 10, 0, 5120.0)

    def close(self):
        self.closed = True


class GoodStream:
    def __init__(self):
        self.steps = 0

    def next_span(self):
        return StepSpan(5 * self.steps, 5, 10, 0, 6400)

    def step(self):
        self.steps += 1
        return np.zeros((5, 4, 4, 3), np.uint8)

    def close(self):
        pass


class Engine:
    def step_many(self, streams, inputs, on_frames=None):
        return [s.step() for s in streams]


class Clock:
    fps = 25
    started = False

    def slot_at(self, *_):
        return 0


def test_worker_survives_a_session_whose_driving_cannot_be_read():
    def gen(sid, stream, errors):
        playout = Playout(Clock(), 16000, np.zeros((4, 4, 3), np.uint8), max_frames=40)
        return Generation(sid, stream, DrivingBuffer(Timeline(25, 16000)), playout, 10, on_error=errors.append)

    worker = GenerationWorker(Engine())
    worker.start()
    try:
        errors, good_errors = [], []
        bad, good = FloatKnobStream(), GoodStream()
        worker.add(gen("bad", bad, errors))
        worker.add(gen("good", good, good_errors))
        end = time.monotonic() + 10
        while not (errors and good.steps) and time.monotonic() < end:
            time.sleep(0.01)
        assert len(errors) == 1 and isinstance(errors[0], TypeError) and bad.closed
        assert worker.alive and good.steps >= 1 and not good_errors
        assert worker.call(threading.get_ident).result(5) == worker._thread.ident   # still serving calls
        assert [g.id for g in worker.sessions()] == ["good"]
    finally:
        worker.stop()
