"""SpeechTape (integrations/tape.py): pushed speech at the caller's rate on the frame timeline.

Placed as the adapter places it (driving copy at 16 kHz, output at 24 kHz, 25 fps), read
frame by frame: every sample out once and in order, a piece that landed later leaves
silent frames before it, a barge-in ends every open segment at the position played, a
segment with no audio still finishes, and a continuation that arrives after its frames
have played plays from the next frame, never lost.
"""

import numpy as np

from integrations.tape import SpeechTape

FPS, RATE, DRIVE = 25, 24000, 16000
PER_FRAME, DRIVE_PER_FRAME = RATE // FPS, DRIVE // FPS


def pcm(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 30000, n).astype(np.int16)


def play(tape, frames):
    audio, events = [], []
    for g in frames:
        a, ev = tape.take(g)
        audio.append(a)
        events += ev
    return audio, events


def test_contiguous_pieces_come_out_exactly_with_one_start_and_one_finish():
    tape, speech = SpeechTape(FPS, RATE, DRIVE), pcm(RATE * 2 + 300)
    drive_at = 5 * DRIVE_PER_FRAME
    for i in range(0, len(speech), 480):  # 20 ms pieces; the driving copy follows contiguously
        piece = speech[i:i + 480]
        n = len(piece) * DRIVE // RATE
        tape.place("s", piece, drive_at, n)
        drive_at += n
    tape.end("s")
    audio, events = play(tape, range(0, 70))
    assert all(a is None for a in audio[:5])
    out = np.concatenate([a for a in audio if a is not None])
    assert np.array_equal(out, speech)
    assert [(e.type, e.segment) for e in events] == [("started", "s"), ("finished", "s")]
    assert events[1].position_s == len(speech) / RATE and not events[1].interrupted
    last = max(i for i, a in enumerate(audio) if a is not None)
    assert len(audio[last]) == len(speech) - (last - 5) * PER_FRAME  # ends at its last sample


def test_a_piece_that_landed_later_leaves_silent_frames_and_still_plays_whole():
    tape, a, b = SpeechTape(FPS, RATE, DRIVE), pcm(PER_FRAME * 3, 1), pcm(PER_FRAME * 2, 2)
    tape.place("s", a, 0, DRIVE_PER_FRAME * 3)
    tape.place("s", b, DRIVE_PER_FRAME * 10, DRIVE_PER_FRAME * 2)  # the TTS fell behind
    tape.end("s")
    audio, events = play(tape, range(13))
    assert [x is not None for x in audio] == [True] * 3 + [False] * 7 + [True] * 2 + [False]
    assert np.array_equal(np.concatenate([x for x in audio if x is not None]), np.concatenate([a, b]))
    assert events[-1].type == "finished" and events[-1].position_s == (len(a) + len(b)) / RATE


def test_barge_in_finishes_open_segments_at_the_played_position_and_new_speech_follows():
    tape = SpeechTape(FPS, RATE, DRIVE)
    tape.place("old", pcm(RATE * 2, 3), 0, DRIVE * 2)
    tape.place("queued", pcm(RATE, 4), DRIVE * 2, DRIVE)
    audio, _ = play(tape, range(10))
    cut = tape.cut(10)
    assert [(e.segment, e.position_s, e.interrupted) for e in cut] == [("old", 0.4, True), ("queued", 0.0, True)]
    assert play(tape, range(10, 20))[0] == [None] * 10
    new = pcm(PER_FRAME * 4, 5)
    tape.place("new", new, DRIVE_PER_FRAME * 22, DRIVE_PER_FRAME * 4)
    tape.end("new")
    audio, events = play(tape, range(20, 30))
    assert np.array_equal(np.concatenate([x for x in audio if x is not None]), new)
    assert [(e.type, e.segment, e.interrupted) for e in events] == [("started", "new", False),
                                                                     ("finished", "new", False)]


def test_a_segment_without_audio_finishes_and_a_late_continuation_plays_from_the_next_frame():
    tape = SpeechTape(FPS, RATE, DRIVE)
    tape.end("empty")
    _, events = play(tape, [0])
    assert [(e.type, e.segment, e.position_s) for e in events] == [("finished", "empty", 0.0)]
    first, late = pcm(PER_FRAME, 6), pcm(PER_FRAME * 2, 7)
    tape.place("late", first, DRIVE_PER_FRAME, DRIVE_PER_FRAME)
    play(tape, range(1, 6))
    # Continues the segment right after `first` (frame 2), but frames up to 5 have played.
    tape.place("late", late, 2 * DRIVE_PER_FRAME, 2 * DRIVE_PER_FRAME)
    tape.end("late")
    audio, events = play(tape, [6, 7, 8])
    assert np.array_equal(np.concatenate([x for x in audio if x is not None]), late) and audio[2] is None
    assert events[-1].type == "finished" and events[-1].position_s == (len(first) + len(late)) / RATE
