"""streaming/: clock, driving buffers, playout, upsampler, worker, tracks and the data-channel
protocol, on virtual time and a fake engine (no wall-clock dependence, no model)."""

import asyncio
import base64
import json
import threading
import time

import numpy as np
import pytest

from model.config import MOTION_FIELDS
from model.timeline import StepSpan, Timeline
from streaming import channel as proto
from streaming.clock import MediaClock
from streaming.driving import BufferFull, DrivingBuffer
from streaming.playout import Chunk, Playout
from streaming.session import OfferError, check_offer
from streaming.tracks import AvatarAudioTrack, AvatarVideoTrack, Pacer, Upsampler
from streaming.worker import Generation, GenerationWorker

SR, FPS = 16000, 25
SPF = SR // FPS  # 640 driving samples per frame
TL = Timeline(FPS, SR)


class VirtualClock(MediaClock):
    """Media clock on virtual time: sleeping advances time instantly."""

    def __init__(self, fps=FPS):
        self.t = 100.0
        super().__init__(fps, now=lambda: self.t)

    async def sleep_until(self, t):
        self.t = max(self.t, t)
        await asyncio.sleep(0)


# ----- clock ------------------------------------------------------------------------------

def test_clock_pts_and_release_times_come_from_one_start():
    c = VirtualClock()
    with pytest.raises(RuntimeError):
        c.video_time(0)
    assert c.slot_at() == 0
    c.start()
    assert c.start(5.0) == 100.0  # t0 is fixed once
    assert [c.video_pts(n) for n in range(3)] == [0, 3600, 7200]
    assert c.video_time(25) == pytest.approx(101.0)
    assert c.audio_pts(50) == 48000 and c.audio_time(50) == pytest.approx(101.0)
    c.t = 101.03
    assert c.slot_at() == 25
    with pytest.raises(ValueError, match="fps"):
        MediaClock(7)  # 90000 / 7 is not an integer pts step


# ----- driving ----------------------------------------------------------------------------

def tone(n, value):
    return np.full(n, value, np.float32)


def take(d, frame, n_frames, own_frames):
    """(model audio, motion, playback) of a step whose audio starts at its first frame (no
    context), reads `n_frames` frames of driving and makes `own_frames`."""
    st = d.take(StepSpan(frame, own_frames, n_frames, frame * SPF, (frame + n_frames) * SPF))
    return st.input.audio, st.input.motion, st.playback


def test_pushed_speech_lands_at_the_first_frame_not_yet_generated():
    d = DrivingBuffer(TL)
    a, m, _ = take(d, 0, 10, 5)  # frames 0-4 generated in silence
    assert not a.any() and m is None
    seg = d.push_speech(tone(3 * SPF, 0.5), "s1", end=True)
    assert (seg.start, seg.end) == (5 * SPF, 8 * SPF)
    seg2 = d.push_speech(tone(SPF, 0.25))  # queued right after s1
    assert seg2.start == 8 * SPF and seg2.id != "s1"
    a, _, _ = take(d, 5, 13, 8)
    ref = np.zeros(13 * SPF, np.float32)
    ref[: 3 * SPF] = 0.5
    ref[3 * SPF: 4 * SPF] = 0.25
    np.testing.assert_array_equal(a, ref)
    assert not d.speech_pending


def test_open_segment_grows_and_buffer_limit_refuses():
    d = DrivingBuffer(TL, max_speech_seconds=1.0)
    s = d.push_speech(tone(SPF, 0.1), "a")
    s2 = d.push_speech(tone(SPF, 0.2), "a", end=True)
    assert s2 is s and s.end == 2 * SPF and s.ended
    with pytest.raises(BufferFull):
        d.push_speech(tone(SR, 0.1))
    with pytest.raises(ValueError, match="NaN"):
        d.push_speech(np.array([np.nan], np.float32))


def test_a_segment_whose_audio_came_late_counts_only_its_own_samples():
    """Audio that arrives after its frames were generated goes on at the next frame: the
    segment spans a gap of silence that the client never sent, and the positions reported
    back (playback_finished, the push response) count the client's samples only. A CI run
    under load saw a 1.5 s segment reported as 1.7 s."""
    d = DrivingBuffer(TL)
    seg = d.push_speech(tone(2 * SPF, 0.5), "a")           # frames 0-1
    take(d, 0, 6, 4)                                         # generation runs ahead to frame 4
    assert d.push_speech(tone(SPF, 0.5), "a") is seg        # late: lands at frame 4
    assert (seg.start, seg.end) == (0, 5 * SPF)
    assert seg.pieces == [(0, 2 * SPF), (4 * SPF, SPF)]
    assert seg.audio_before(seg.end) == 3 * SPF             # not 5 frames' worth
    assert seg.audio_before(3 * SPF) == 2 * SPF and seg.audio_before(SPF) == SPF
    assert d.push_speech(tone(SPF, 0.5), "a") is seg and seg.pieces[-1] == (4 * SPF, 2 * SPF)  # contiguous: merged
    cut = d.interrupt()                                      # the pieces' samples before the cut still count
    assert cut == [seg] and seg.audio_before(seg.end) == 2 * SPF


def test_a_segment_keeps_a_bounded_number_of_pieces():
    """A client pushing late chunk after chunk into one open segment: the pieces stay
    bounded, the oldest fold together (their gap then counts), the newest stay exact."""
    from streaming.driving import Segment

    seg = Segment("s", 0, 0)
    for i in range(Segment.MAX_PIECES + 10):
        seg.add_piece(i * 2 * SPF, SPF)   # one frame of audio, one frame of gap
    assert len(seg.pieces) == Segment.MAX_PIECES
    assert seg.pieces[0] == (0, 21 * SPF)  # 11 pieces and their 10 gaps folded
    last = (Segment.MAX_PIECES + 9) * 2 * SPF
    assert seg.audio_before(last + SPF) - seg.audio_before(last) == SPF  # recent pieces exact


def test_interrupt_drops_only_speech_not_yet_generated():
    d = DrivingBuffer(TL)
    d.push_speech(tone(20 * SPF, 0.5), "long")
    take(d, 0, 10, 5)
    cut = d.interrupt()
    assert [s.id for s in cut] == ["long"] and cut[0].interrupted and cut[0].end == 5 * SPF
    a, _, _ = take(d, 5, 13, 8)
    assert not a.any()
    seg = d.push_speech(tone(SPF, 0.3))  # new speech after an interrupt starts at the next frame
    assert seg.start == 13 * SPF


def test_speech_pushed_between_a_barge_in_and_its_rewind_plays_from_the_first_regenerated_frame():
    """A client answers a barge-in with new speech before the worker has rewound: the rewind
    (interrupt from the first unplayed frame) drops the old speech only, and the new speech
    moves to that frame, whole, its segment neither cut nor reported as interrupted."""
    d = DrivingBuffer(TL, history_frames=40)
    d.push_speech(tone(40 * SPF, 0.5), "old")
    take(d, 0, 10, 5)
    take(d, 5, 18, 13)                               # frames 0-17 generated, 0-6 played
    assert [s.id for s in d.interrupt()] == ["old"]  # the user's barge-in: speech from frame 18 on goes
    new = d.push_speech(tone(6 * SPF, 0.25), "new", end=True)
    assert new.start == 18 * SPF
    d.interrupt(from_frame=7)                        # the worker's rewind: frames 7-17 are regenerated
    d.rewind(5, cut=7)
    assert (new.start, new.end) == (7 * SPF, 13 * SPF) and not new.interrupted
    old = d.segments()[0]
    assert old.interrupted and old.end == 7 * SPF
    _, _, playback = take(d, 5, 18, 13)
    np.testing.assert_array_equal(playback, np.concatenate([tone(2 * SPF, 0.5), tone(6 * SPF, 0.25),
                                                            tone(5 * SPF, 0.0)]))
    later = d.push_speech(tone(SPF, 0.1))            # as usual: the first frame not yet generated
    assert later.start == 18 * SPF and not later.interrupted


def test_a_rewind_without_a_barge_in_drops_everything_from_its_frame():
    d = DrivingBuffer(TL, history_frames=40)
    d.push_speech(tone(40 * SPF, 0.5), "s")
    take(d, 0, 10, 5)
    d.interrupt(from_frame=3)
    d.rewind(0, cut=3)
    _, _, playback = take(d, 0, 10, 5)
    assert playback[:3 * SPF].all() and not playback[3 * SPF:].any()
    assert d.push_speech(tone(SPF, 0.1)).start == 5 * SPF   # the next frame not generated


def test_mic_audio_lands_at_slot_plus_latency_and_stays_contiguous():
    d = DrivingBuffer(TL)
    d.push_mic(tone(SPF, 0.125), slot_now=0, latency_frames=20)
    d.push_mic(tone(SPF, 0.25), slot_now=1, latency_frames=20)  # contiguous, not re-anchored
    a, _, _ = take(d, 0, 30, 5)
    np.testing.assert_array_equal(a[20 * SPF: 21 * SPF], 0.125)
    np.testing.assert_array_equal(a[21 * SPF: 22 * SPF], 0.25)
    assert not a[: 20 * SPF].any() and not a[22 * SPF:].any()
    # Generation passed the cursor: the next samples re-anchor at slot + latency.
    take(d, 5, 30, 40)
    d.push_mic(tone(SPF, 0.375), slot_now=30, latency_frames=20)
    assert d.stats["mic_reanchors"] == 1 and d.stats["mic_late_samples"] == 45 * SPF - 22 * SPF
    a, _, _ = take(d, 45, 10, 8)
    np.testing.assert_array_equal(a[5 * SPF: 6 * SPF], 0.375)  # frame 50 = slot 30 + 20


def test_playback_audio_is_speech_only_unless_the_mic_is_echoed():
    for echo in (False, True):
        d = DrivingBuffer(TL, echo_mic=echo)
        d.push_speech(tone(SPF, 0.25))
        d.push_mic(tone(SPF, 0.5), slot_now=0, latency_frames=2)
        audio, _, playback = take(d, 0, 10, 5)
        np.testing.assert_array_equal(audio[:SPF], 0.25)
        np.testing.assert_array_equal(audio[2 * SPF: 3 * SPF], 0.5)
        assert len(playback) == 5 * SPF  # the step's own frames
        np.testing.assert_array_equal(playback[2 * SPF: 3 * SPF], 0.5 if echo else 0.0)
        np.testing.assert_array_equal(playback[:SPF], 0.25)


def test_motion_with_client_timestamps_lands_on_frames_and_merges_fields():
    d = DrivingBuffer(TL)
    yaw, smile = MOTION_FIELDS.index("yaw"), MOTION_FIELDS.index("smile")
    n = len(MOTION_FIELDS)
    assert d.set_motion({"yaw": 0.2}, client_ms=1000.0) == 0      # anchors client time 1000 ms -> frame 0
    assert d.set_motion({"smile": 0.5}, client_ms=1200.0) == 5    # +200 ms = +5 frames
    assert d.set_motion({"yaw": None}, client_ms=1400.0) == 10    # null clears yaw
    _, m, _ = take(d, 0, 13, 5)
    assert m.shape == (13, 2 * n)
    assert m[0, yaw] == pytest.approx(0.2) and m[0, n + yaw] == 1 and m[0, n + smile] == 0
    assert m[5, yaw] == pytest.approx(0.2) and m[5, smile] == pytest.approx(0.5) and m[5, n + smile] == 1
    assert m[10, n + yaw] == 0 and m[10, smile] == pytest.approx(0.5)
    # Late message (frame 2 already generated): clamped to the next frame, counted.
    assert d.set_motion({"blink": 1.0}, client_ms=1080.0) == 5
    assert d.stats["motion_late"] == 1
    # Far ahead of generation (the output is holding frames): re-anchored to the next frame.
    assert d.set_motion({"blink": 0.0}, client_ms=1000.0 + 5000) == 5
    assert d.stats["motion_reanchors"] == 1
    assert d.set_motion({"blink": 0.5}, client_ms=1000.0 + 5040) == 6
    with pytest.raises(ValueError, match="unknown motion field"):
        d.set_motion({"nose": 1.0})
    with pytest.raises(ValueError, match="outside"):
        d.set_motion({"blink": 7.0})


def test_markers_report_when_their_frame_is_released():
    d = DrivingBuffer(TL, now=lambda: 5.0)
    take(d, 0, 10, 5)
    d.set_motion({"yaw": 0.1})
    assert d.pop_markers(4) == []
    (mk,) = d.pop_markers(5)
    assert (mk.frame, mk.arrival, mk.kind) == (5, 5.0, "motion")


def test_a_step_reads_its_audio_context_and_a_cut_silences_it_for_the_model_only():
    """take(span) gives the model the audio of the span's context before its first frame
    (kept even without rewind history); rewind(frame, cut=...) makes the model hear silence
    in the context of `cut` in that take and in every later one, while the playback keeps
    the speech (those frames were shown with it)."""
    d = DrivingBuffer(TL, history_frames=20)
    speech = np.linspace(0.1, 0.9, 40 * SPF).astype(np.float32)
    d.push_speech(speech)
    d.take(TL.span(0, 2, 3))                       # frames 0-4
    span = TL.span(2, 2, 3)                        # frames 5-12, context from sample 0
    second = d.take(span)
    assert span.audio_from == 0 and span.frame == 5
    np.testing.assert_array_equal(second.input.audio, speech[span.audio_from:span.audio_to])
    np.testing.assert_array_equal(second.playback, speech[5 * SPF:13 * SPF])
    d.rewind(5, cut=7)
    again = d.take(span)
    lo, hi = TL.context_before(7)
    a = again.input.audio
    assert not a[lo:hi].any() and a[hi:hi + 100].all() and a[lo - 100:lo].all()
    np.testing.assert_array_equal(again.playback, second.playback)  # what plays is unchanged
    later = d.take(TL.span(4, 2, 3))               # frames 13-20 re-read that context
    off = later.input.span.audio_from
    assert off < lo and not later.input.audio[lo - off:hi - off].any()
    assert later.input.audio[hi - off:].all()
    with pytest.raises(ValueError, match="cannot rewind"):
        d.rewind(0)  # before the kept history (20 frames back from 21)


# ----- playout ----------------------------------------------------------------------------

def chunk(first, n, size=4):
    """Frames whose pixels and audio both carry their generated frame index (to check pairing)."""
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        frames[i] = first + i + 1
    audio = np.concatenate([tone(SPF, (first + i + 1) / 1000) for i in range(n)])
    return Chunk(first, frames, audio)


def test_playout_holds_the_last_frame_on_underrun_and_audio_follows_its_frame():
    clock = VirtualClock()
    slots = []
    p = Playout(clock, SR, np.zeros((4, 4, 3), np.uint8), max_frames=16, on_slot=lambda s, g: slots.append((s, g)))
    p.put(chunk(0, 5))
    images = [p.video(s)[0][0, 0, 0] for s in range(7)]
    assert images == [1, 2, 3, 4, 5, 5, 5]  # slots 5, 6 hold frame 4
    assert p.stats.held == 2 and p.stats.released == 5
    p.put(chunk(5, 8))
    img, gen = p.video(7)
    assert (img[0, 0, 0], gen) == (6, 5)  # the timeline slipped by the two held slots
    # Audio of slot 7 is frame 5's audio; held slots are silent.
    np.testing.assert_allclose(p.audio(7 * SPF, SPF), 6 / 1000)
    np.testing.assert_array_equal(p.audio(5 * SPF, 2 * SPF), 0)
    np.testing.assert_allclose(p.audio(4 * SPF, SPF), 5 / 1000)
    assert slots[:8] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, None), (6, None), (7, 5)]


def test_playout_is_bounded_and_checks_chunk_audio():
    p = Playout(VirtualClock(), SR, np.zeros((4, 4, 3), np.uint8), max_frames=10)
    p.put(chunk(0, 8))
    with pytest.raises(OverflowError):
        p.put(chunk(8, 8))
    bad = chunk(8, 2)
    bad.audio = bad.audio[:-1]
    with pytest.raises(ValueError, match="samples"):
        p.put(bad)


def test_buffered_frames_counts_slots_already_due():
    clock = VirtualClock()
    p = Playout(clock, SR, np.zeros((4, 4, 3), np.uint8), max_frames=32)
    p.put(chunk(0, 13))
    assert p.buffered_frames() == 13
    clock.start()
    clock.t += 0.2  # 5 slots due, none taken yet
    assert p.buffered_frames() == 8


def test_mute_queued_silences_generated_but_unplayed_audio():
    p = Playout(VirtualClock(), SR, np.zeros((4, 4, 3), np.uint8), max_frames=16)
    p.put(chunk(0, 8))
    p.video(1)
    assert p.mute_queued() == 6
    np.testing.assert_array_equal(p.audio(2 * SPF, 6 * SPF), 0)
    np.testing.assert_allclose(p.audio(0, SPF), 1 / 1000)


def test_a_chunk_read_before_an_interrupt_and_queued_after_it_is_silent():
    """The worker reads a chunk's audio, an interrupt mutes the queue, then the chunk arrives:
    its (cut-off) speech must not play. A chunk read after the interrupt keeps its audio."""
    p = Playout(VirtualClock(), SR, np.zeros((4, 4, 3), np.uint8), max_frames=32)
    seen = p.mutes
    p.mute_queued()
    p.put(chunk(0, 8), seen)
    np.testing.assert_array_equal(p.audio(0, 8 * SPF), 0)
    p.put(chunk(8, 8), p.mutes)
    assert np.abs(p.audio(8 * SPF, 8 * SPF)).max() > 0


# ----- upsampler --------------------------------------------------------------------------

def test_upsampler_matches_the_analytic_tone_and_is_seamless_across_blocks():
    up = Upsampler(3)
    t16 = np.arange(16000) / 16000
    x = np.sin(2 * np.pi * 440 * t16)
    y = np.concatenate([up(x[i: i + 320]) for i in range(0, len(x), 320)])
    assert len(y) == 48000
    delay = (len(up.taps) - 1) / 2
    t48 = (np.arange(48000) - delay) / 48000
    ref = np.sin(2 * np.pi * 440 * t48)
    err = np.abs(y[200:-200] - ref[200:-200]).max()
    assert err < 0.01, err


# ----- tracks on virtual time -------------------------------------------------------------

async def test_tracks_share_one_clock_and_audio_is_the_shown_frames_speech():
    clock = VirtualClock()
    p = Playout(clock, SR, np.zeros((4, 4, 3), np.uint8), max_frames=64)
    p.put(chunk(0, 5))
    p.put(chunk(5, 8))
    pacer = Pacer(clock, p, prebuffer_timeout_s=0.0)
    video, audio = AvatarVideoTrack(pacer), AvatarAudioTrack(pacer, SR)
    vframes, aframes = [], []
    for _ in range(20):  # interleaved as aiortc would: one video frame per two audio frames
        vframes.append(await video.recv())
        aframes.append(await audio.recv())
        aframes.append(await audio.recv())
    assert [f.pts for f in vframes] == [3600 * n for n in range(20)]
    assert [f.pts for f in aframes] == [960 * m for m in range(40)]
    assert all(f.samples == 960 and f.sample_rate == 48000 for f in aframes)
    shown = [int(f.to_ndarray(format="rgb24")[0, 0, 0]) for f in vframes]
    assert shown == list(range(1, 14)) + [13] * 7  # frames 0-12, then held
    # Slot n's audio (two 20 ms frames) carries the level of the frame shown in slot n.
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in aframes]).astype(np.float64) / 32767
    for n in range(1, 13):
        mid = pcm[n * 1920 + 200: (n + 1) * 1920 - 200]
        assert mid == pytest.approx(np.full(len(mid), shown[n] / 1000), abs=2e-4), n
    assert not pcm[14 * 1920:].any()


async def test_video_track_skips_late_slots_instead_of_bursting():
    clock = VirtualClock()
    p = Playout(clock, SR, np.zeros((4, 4, 3), np.uint8), max_frames=64)
    video = AvatarVideoTrack(Pacer(clock, p, prebuffer_timeout_s=0.0), max_late_slots=3)
    await video.recv()
    clock.t += 1.0  # the encoder stalled for a second
    f = await video.recv()
    assert f.pts == 3600 * 25 and video.dropped == 24


# ----- worker -----------------------------------------------------------------------------

class FakeStream:
    """Engine stream geometry of tiny (first step 5 frames, then 8; 13 driving frames)."""

    def __init__(self, fail_at=None):
        self.next_latent, self.fail_at, self.closed, self.audios = 0, fail_at, False, []
        self.thread = None

    def next_span(self):
        return TL.span(self.next_latent, 2, 3)

    def keep_history(self, steps):
        pass

    def rewind_point(self, frame):
        return None

    def restore(self, snapshot, remake_from=None):
        raise AssertionError("nothing to restore")

    def clear_abort(self):
        pass

    def step(self, inp):
        self.thread = threading.get_ident()
        if self.fail_at is not None and self.next_latent >= self.fail_at:
            raise RuntimeError("boom")
        assert inp.span == self.next_span() and inp.audio.shape == (inp.span.samples,)
        self.audios.append(inp.audio)
        span = self.next_span()
        self.next_latent += 2
        return np.stack([np.full((4, 4, 3), (span.frame + i + 1) % 256, np.uint8) for i in range(span.frames)])

    def close(self):
        self.closed = True


class FakeEngine:
    def __init__(self):
        self.calls = []

    def step_many(self, streams, inputs, on_frames=None):  # never calls on_frames: the fallback path
        self.calls.append(len(streams))
        return [s.step(inp) for s, inp in zip(streams, inputs)]


def make_gen(sid, stream, lead=12, errors=None):
    p = Playout(VirtualClock(), SR, np.zeros((4, 4, 3), np.uint8), max_frames=lead + 16)
    return Generation(sid, stream, DrivingBuffer(TL), p, lead,
                      on_error=(lambda e: errors.append((sid, e))) if errors is not None else (lambda e: None))


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_worker_fills_each_session_to_its_lead_and_isolates_a_failure():
    eng = FakeEngine()
    w = GenerationWorker(eng)
    w.start()
    try:
        errors = []
        good, bad = FakeStream(), FakeStream(fail_at=2)
        g1, g2 = make_gen("good", good, errors=errors), make_gen("bad", bad, errors=errors)
        g1.driving.push_speech(tone(3 * SPF, 0.5))
        w.add(g1)
        w.add(g2)
        assert wait_for(lambda: errors and g1.playout.queued_frames() >= 12)
        assert [e[0] for e in errors] == ["bad"] and bad.closed and not good.closed
        # The lead bound holds: clock not started, so the playout stays at lead + < one chunk.
        time.sleep(0.1)
        assert 12 <= g1.playout.queued_frames() < 12 + 8
        assert {s.id for s in w.sessions()} == {"good"}
        np.testing.assert_array_equal(good.audios[0][: 3 * SPF], 0.5)  # speech reached the engine
        assert good.thread == w._thread.ident  # model work on the worker thread
        # call() runs on the worker thread too; remove() closes the stream there.
        assert w.call(threading.get_ident).result(10) == w._thread.ident
        w.remove("good").result(10)
        assert good.closed and w.sessions() == []
    finally:
        w.stop()


def test_worker_serves_the_most_urgent_session_first():
    eng = FakeEngine()
    w = GenerationWorker(eng)
    ga, gb = make_gen("a", FakeStream()), make_gen("b", FakeStream())
    gb.playout.put(chunk(0, 4))  # b has 4 frames buffered: a is more urgent
    gb.stream.next_latent = 1    # (b's stream continues after those frames)
    w._sessions = {"b": gb, "a": ga}
    assert [g.id for g in w._pick()] == ["a"]
    w.max_batch = 2
    assert [g.id for g in w._pick()] == ["a", "b"]
    w._step(w._pick())
    assert eng.calls == [2]  # one step_many call for the batch


# ----- protocol ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw,code", [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "motion"}', "bad_message"),
    ('{"type": "motion", "fields": {}, "t": "noon"}', "bad_message"),
    ('{"type": "audio", "pcm16": "###"}', "bad_message"),
    ('{"type": "end"}', "bad_message"),
    ('{"type": "speak", "text": "  "}', "bad_message"),
    (b"\x00\x01", "bad_message"),
    ("x" * (proto.MAX_MESSAGE_BYTES + 1), "message_too_large"),
])
def test_malformed_channel_messages_get_stable_codes(raw, code):
    with pytest.raises(proto.ChannelError) as e:
        proto.parse(raw)
    assert e.value.code == code
    assert e.value.reply()["type"] == "error"


def test_channel_audio_message_is_decoded():
    pcm = np.array([0, 16384, -32768], "<i2").tobytes()
    msg = proto.parse(json.dumps({"type": "audio", "pcm16": base64.b64encode(pcm).decode(), "segment": "x"}))
    assert msg.body["pcm16"] == pcm


def test_offer_checks():
    video_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n"
    with pytest.raises(OfferError) as e:
        check_offer(video_only)
    assert e.value.code == "offer_missing_audio"
    with pytest.raises(OfferError) as e:
        check_offer(video_only + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\n")
    assert e.value.code == "offer_audio_not_receiving"
    with pytest.raises(OfferError) as e:
        check_offer("hello")
    assert e.value.code == "bad_offer"
    check_offer(video_only + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n")
