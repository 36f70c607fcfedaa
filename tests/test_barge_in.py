"""Barge-in on the real engine: an interrupt discards the frames generated but not yet
played and regenerates them without the speech, continuing from the last frame shown.

Reference: a second stream of the same seed driven directly with the speech cut where the
interrupt cut it (full recomputation): the regenerated frames must be the same frames.
No wall clock: the playout is consumed by hand (the media clock is never started).
Every recipe: the bundled model (Knot Forcing; its shipped defaults and with a knot, which
it ships off), LiveTalk and FlashHead (random presets)."""

import time

import numpy as np
import pytest

from model.engine import Engine
from model.timeline import StepInput
from streaming.clock import MediaClock
from streaming.driving import DrivingBuffer
from streaming.playout import Playout
from streaming.worker import Generation, GenerationWorker

SR, LEAD = 16000, 20


@pytest.fixture(scope="module", params=["tiny", "tiny+knot", "livetalk-random", "flashhead-random"])
def engine(request):
    if not request.param.startswith("tiny"):
        pytest.importorskip("transformers")
    engine = Engine.from_pretrained(request.param.removesuffix("+knot"))
    if request.param.endswith("+knot"):  # a rewind into a chunk's knot, which the shipped defaults leave out
        engine.config.stream = engine.config.stream.replace(knot_frames=1)
    return engine


def portrait():
    from server.avatars import avatar_image
    return avatar_image("ada")


def speech(seconds=4.0):
    t = np.arange(int(SR * seconds)) / SR
    rng = np.random.default_rng(1)
    voiced = np.sin(2 * np.pi * 140 * t) + 0.3 * rng.standard_normal(len(t))
    return (0.4 * voiced * (np.sin(2 * np.pi * 3 * t) > -0.2)).astype(np.float32)


def sample_of(frame, fps):
    return -((-frame * SR) // fps)


def wait(cond, timeout=120):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.005)


class Rig:
    """Worker + driving + playout of one session, consumed slot by slot."""

    def __init__(self, engine, rewind_chunks, pcm):
        step = 4 * engine.config.stream.chunk_frames
        self.stream = engine.start(portrait(), seed=7)
        self.driving = DrivingBuffer(self.stream.timeline, history_frames=(rewind_chunks + 1) * step)
        self.fps = engine.config.fps
        self.playout = Playout(MediaClock(self.fps), SR, portrait()[:128, :128], max_frames=LEAD + 2 * step)
        self.worker = GenerationWorker(engine)
        self.gen = Generation("s", self.stream, self.driving, self.playout, LEAD, rewind_chunks=rewind_chunks)
        self.driving.push_speech(pcm, "s1", end=True)  # before the first step
        self.worker.add(self.gen)
        self.worker.start()
        self.slot = 0
        self.shown = []  # (generated frame index, image, audio)

    def play(self, n):
        for _ in range(n):
            wait(lambda: self.playout.queued_frames() > 0)
            image, gen = self.playout.video(self.slot)
            lo, hi = sample_of(self.slot, self.fps), sample_of(self.slot + 1, self.fps)
            audio = self.playout.audio(lo, hi - lo)
            self.shown.append((gen, image, audio))
            self.slot += 1

    def interrupt(self):
        """What LiveSession.interrupt does, without the peer connection."""
        self.driving.interrupt()
        self.playout.mute_queued()
        return self.worker.rewind_unplayed("s").result(timeout=120)

    def close(self):
        self.worker.stop()


def reference_frames(engine, pcm, cut_frame, rewound_to, n_frames, rewound=True):
    """Frames of a fresh stream (same seed) whose steps from `rewound_to` on get the speech cut
    at `cut_frame`, and whose earlier steps get the whole speech (as the worker's did). As the
    worker does after a rewind: the model's audio context before `cut_frame` is muted, the
    knot predicted for frames from `cut_frame` on is dropped, and the first step from
    `rewound_to` denoises with `rewind_denoise_steps` (here by setting denoise_steps for
    that one step). rewound=False: a stream never rewound."""
    s = engine.start(portrait(), seed=7)
    cut = pcm.copy()
    cut[sample_of(cut_frame, engine.config.fps):] = 0
    lo, hi = s.timeline.context_before(cut_frame)
    cut[lo:hi] = 0
    knobs = s.knobs
    frames = []
    while len(frames) < n_frames:
        src = cut if s.frame_index >= rewound_to else pcm
        if rewound and s.frame_index == rewound_to:
            engine.recipe.forget_from(s.state, cut_frame)
            s.knobs = knobs.replace(denoise_steps=knobs.rewind_denoise_steps or knobs.denoise_steps)
        frames.extend(s.step(StepInput.from_clip(s.next_span(), src, None)))
        s.knobs = knobs
    return frames


def test_interrupt_regenerates_unplayed_frames_as_if_the_speech_had_stopped_there(engine):
    pcm = speech()
    rig = Rig(engine, 6, pcm)
    try:
        wait(lambda: rig.playout.queued_frames() >= LEAD)
        rig.play(10)
        first_unplayed = rig.playout.first_queued()
        assert first_unplayed == 10
        result = rig.interrupt()
        assert result["flushed_frames"] >= LEAD - 10, result
        start = result["rewound_to"]
        assert start <= first_unplayed and first_unplayed - start < 4 * engine.config.stream.chunk_frames
        # New speech pushed now lands right after what was shown, not after the discarded frames.
        assert result["driving_from"] == start
        rig.play(30)
    finally:
        rig.close()
    shown_idx = [g for g, _, _ in rig.shown]
    # No frame shown twice, none skipped: the picture goes on from the last frame seen.
    assert shown_idx == list(range(40)), shown_idx
    # Speech audio before the interrupt, silence from the first discarded frame on.
    assert np.abs(np.concatenate([a for _, _, a in rig.shown[:10]])).max() > 0.1
    assert np.abs(np.concatenate([a for _, _, a in rig.shown[10:]])).max() == 0.0
    # Frames shown before the interrupt come from the whole speech, the rest from the cut speech.
    whole = reference_frames(engine, pcm, len(pcm), 0, 40, rewound=False)
    ref = whole[:first_unplayed] + reference_frames(engine, pcm, first_unplayed, start, 40)[first_unplayed:]
    for i in range(40):
        diff = np.abs(rig.shown[i][1].astype(int) - ref[i].astype(int)).max()
        assert diff <= 1, (i, diff)


def test_without_history_the_fallback_keeps_the_muted_frames(engine):
    rig = Rig(engine, 0, speech(2.0))
    try:
        wait(lambda: rig.playout.queued_frames() >= LEAD)
        rig.play(5)
        queued = rig.playout.queued_frames()
        result = rig.interrupt()
        assert "fallback" in result and "history" in result["fallback"]
        assert rig.playout.queued_frames() >= queued  # nothing discarded
        rig.play(queued)
    finally:
        rig.close()
    assert [g for g, _, _ in rig.shown] == list(range(5 + queued))
    assert np.abs(np.concatenate([a for _, _, a in rig.shown[5:]])).max() == 0.0  # muted


def test_an_aborted_step_is_simply_made_again(engine):
    """A step aborted by request_abort() (an interrupt arriving mid-step) yields nothing; the
    worker steps again from the same frame and the video is as if it never happened."""
    pcm = speech()
    rig = Rig(engine, 6, pcm)
    try:
        wait(lambda: rig.playout.queued_frames() >= LEAD)
        assert rig.stream.request_abort()  # the next step stops at its first denoising pass
        rig.play(40)
    finally:
        rig.close()
    assert not rig.stream._abort.is_set()  # the abort was served by a step
    assert [g for g, _, _ in rig.shown] == list(range(40))
    ref = reference_frames(engine, pcm, len(pcm), 0, 40, rewound=False)
    for i in range(40):
        assert np.abs(rig.shown[i][1].astype(int) - ref[i].astype(int)).max() <= 1, i
