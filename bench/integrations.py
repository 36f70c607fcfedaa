"""End-to-end latency of the Pipecat integration: TTS frame in -> video frame out.

    .venv/bin/python bench/integrations.py --utterances 20                 # engine in process
    .venv/bin/python bench/integrations.py --utterances 20 --mode remote   # live server, WebRTC

A real Pipecat pipeline `marker -> KnotstreamVideoService -> recorder` gets utterances of
speech as TTS frames. `marker` notes when each TTS audio frame enters the service;
`recorder` notes when each video frame and each re-timed audio frame leaves it. The video
frame that plays a TTS frame is the one pushed right before the audio holding its first
sample (in process the audio out is the audio in, sample for sample, so the match is
exact; remote, the speech comes back Opus-coded and only an utterance's start is matched:
the first audio frame out above the noise floor).

- `first`: an utterance's first TTS frame in -> the video frame that plays it out, with the
  TTS 5x faster than real time (what a user waits for once the TTS starts talking);
- `steady` (in process): every TTS frame in -> its video frame out, with the TTS at real
  time (the pipeline's standing latency: generation lead + one step).
- `generated_share` (in process): the share of output frames the engine had ready in time.
  Below 1 the engine is slower than real time on this machine: frames are shown again,
  the timeline waits, and every latency above grows by the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RATE, CHUNK = 24000, 480


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(utterances: int, seconds: float, mode: str, gap: float) -> dict:
    from pipecat.frames.frames import (OutputAudioRawFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame,
                                       TTSStoppedFrame)
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.tests.utils import SleepFrame, run_test

    from integrations.pipecat_service import KnotstreamVideoService

    class Tap(FrameProcessor):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[float, object]] = []

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if direction == FrameDirection.DOWNSTREAM and isinstance(frame, (OutputAudioRawFrame, OutputImageRawFrame,
                                                                             TTSStartedFrame)):
                self.seen.append((time.monotonic(), frame))
            await self.push_frame(frame, direction)

    rng = np.random.default_rng(0)
    frames, plan = [], []
    for u in range(utterances):
        speed = 1.0 if (mode == "local" and u % 2) else 5.0
        pcm = (rng.choice([-1, 1]) * rng.integers(2000, 20000, int(seconds * RATE))).astype(np.int16)
        frames.append(TTSStartedFrame(context_id=f"u{u}"))
        for i in range(0, len(pcm), CHUNK):
            frames += [TTSAudioRawFrame(audio=pcm[i:i + CHUNK].tobytes(), sample_rate=RATE, num_channels=1,
                                        context_id=f"u{u}"), SleepFrame(sleep=CHUNK / RATE / speed)]
        frames += [TTSStoppedFrame(context_id=f"u{u}"), SleepFrame(sleep=seconds * (1 - 1 / speed) + gap)]
        plan.append(speed)

    server = None
    if mode == "local":
        from integrations.avatar import AvatarHost
        from server.avatars import avatar_image

        host = AvatarHost.load("tiny")
        service = KnotstreamVideoService.in_process(host, avatar_image("ada"), audio_rate=RATE)
    else:
        from model.engine import Engine
        from server.settings import Settings
        from server.testing import LiveServer
        from streaming.ice import allow_loopback, has_non_loopback_ipv4

        if not has_non_loopback_ipv4():
            allow_loopback()
        server = LiveServer(Settings(max_sessions=1), Engine.from_pretrained("tiny")).__enter__()
        service = KnotstreamVideoService.remote(server.url, avatar="ada")
    marker, recorder = Tap(), Tap()
    try:
        await run_test(Pipeline([marker, service, recorder]), frames_to_send=[SleepFrame(sleep=2.0)] + frames)
    finally:
        if server is not None:
            server.__exit__(None)
        else:
            host.close()
    result = measure(marker.seen, recorder.seen, plan, mode)
    if mode == "local":  # how much of the time the engine kept up (held frames: it did not)
        st = service.avatar.status()
        result["generated_share"] = round(st["released_frames"] / max(1, st["released_frames"] + st["held_frames"]), 3)
    return result


def measure(seen_in, seen_out, plan, mode) -> dict:
    from pipecat.frames.frames import OutputAudioRawFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame

    # Input: (arrival, utterance, first sample of the frame within all speech in).
    inputs, offset, utt = [], 0, -1
    for t, f in seen_in:
        if isinstance(f, TTSStartedFrame):
            utt += 1
        elif isinstance(f, TTSAudioRawFrame):
            inputs.append((t, utt, offset))
            offset += len(f.audio) // 2
    # Output: for each audio frame out, the time of the video frame pushed right before it.
    outputs, offset, last_video = [], 0, None
    for t, f in seen_out:
        if isinstance(f, OutputImageRawFrame):
            last_video = t
        elif isinstance(f, OutputAudioRawFrame) and last_video is not None:
            n = len(f.audio) // 2
            loud = np.abs(np.frombuffer(f.audio, np.int16)).max() > 1000
            outputs.append((last_video, offset, n, loud))
            offset += n
    first, steady, first_offset = [], [], {}
    for _, u, off in inputs:
        first_offset.setdefault(u, off)
    if mode == "local":
        starts = np.array([o for _, o, _, _ in outputs])
        for t_in, u, off in inputs:
            j = int(np.searchsorted(starts, off, side="right")) - 1
            if j < 0 or not (outputs[j][1] <= off < outputs[j][1] + outputs[j][2]):
                continue
            latency = outputs[j][0] - t_in
            if plan[u] == 1.0:
                steady.append(latency)
            elif off == first_offset[u]:
                first.append(latency)
    else:
        firsts = {}
        for t_in, u, _ in inputs:
            firsts.setdefault(u, t_in)
        loud_times = [t for t, _, _, loud in outputs if loud]
        for u, t_in in firsts.items():
            after = [t for t in loud_times if t >= t_in]
            if after:
                first.append(after[0] - t_in)
    ms = lambda xs, q: round(1000 * pct(xs, q), 1)  # noqa: E731
    return {"mode": mode, "first_n": len(first), "first_p50_ms": ms(first, 50), "first_p95_ms": ms(first, 95),
            "steady_n": len(steady), "steady_p50_ms": ms(steady, 50), "steady_p95_ms": ms(steady, 95)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--utterances", type=int, default=20)
    p.add_argument("--seconds", type=float, default=2.0, help="length of each utterance")
    p.add_argument("--mode", choices=("local", "remote"), default="local")
    p.add_argument("--gap", type=float, default=3.0, help="seconds between one utterance's end and the next")
    args = p.parse_args(argv)
    print(asyncio.run(run(args.utterances, args.seconds, args.mode, args.gap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
