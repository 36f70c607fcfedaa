"""LiveKit Agents: the knotstream `VideoGenerator` and the avatar worker that serves a room.

In-process (the agent and the engine in one process), as livekit-agents' own examples wire
a generator:

    avatar = await host.open(portrait, audio_rate=24000)
    audio = QueueAudioOutput(sample_rate=24000)
    session.output.audio = audio
    runner = AvatarRunner(room, audio_recv=audio, video_gen=KnotstreamVideoGenerator(avatar),
                          options=avatar_options(avatar))
    await runner.start()

Remote (the engine on a GPU host): `serve_room(room, host, portrait)` runs in a process that
joined the agent's room (integrations/livekit_dispatch.py starts one per request); it
speaks livekit-agents' data-stream avatar protocol through the framework's own classes:
`DataStreamAudioReceiver` takes the `lk.audio_stream` byte streams and the `lk.clear_buffer`
RPC, `AvatarRunner` publishes the tracks through its A/V synchroniser and answers with
`lk.playback_started` / `lk.playback_finished` (position, interrupted). The agent side is
integrations/livekit_plugin.py.

The generator's contract (`livekit.agents.voice.avatar.VideoGenerator`): `push_audio` takes
audio frames and `AudioSegmentEnd`; `clear_buffer()` returns at once (the runner reports the
interrupted playback itself once the frame it is forwarding is counted, so no
`AudioSegmentEnd` follows for a cut segment); iteration
yields a video frame per output frame at the model's fps, the pushed audio re-timed to
those frames (only while speech plays), and `AudioSegmentEnd` right after a segment's last
audio frame, so the runner's playback_finished comes after the last frame with the
played position.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import AsyncIterator

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarOptions, AvatarRunner, DataStreamAudioReceiver,
                                         VideoGenerator)

from integrations.avatar import AudioOut, VideoOut
from integrations.tape import PlaybackEvent

log = logging.getLogger("knotstream.integrations.livekit")


def avatar_options(avatar) -> AvatarOptions:
    """AvatarRunner options for an in-process avatar opened with a fixed `audio_rate`."""
    if not avatar.audio_rate:
        raise ValueError("open the avatar with audio_rate=... (the runner's audio track needs its rate up front)")
    return AvatarOptions(video_width=avatar.width, video_height=avatar.height, video_fps=avatar.fps,
                         audio_sample_rate=avatar.audio_rate, audio_channels=1)


class KnotstreamVideoGenerator(VideoGenerator):
    """A knotstream avatar (integrations.avatar.LocalAvatar) as a LiveKit VideoGenerator."""

    def __init__(self, avatar, settle_timeout_s: float = 0.5):
        self._avatar = avatar
        self._ids = itertools.count(1)
        self._segment: str | None = None
        self._settle_timeout_s = settle_timeout_s
        self._pulled = asyncio.Event()   # the runner asked for the next item

    @property
    def avatar(self):
        return self._avatar

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            if self._segment is not None:
                self._avatar.end(self._segment)
                self._segment = None
            return
        if self._segment is None:
            self._segment = f"lk-{next(self._ids)}"
        pcm = np.frombuffer(frame.data, np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        self._avatar.push(pcm, frame.sample_rate, self._segment)

    def clear_buffer(self):
        """Cut the speech now; the returned coroutine (the runner awaits it before reporting
        the interrupted playback) ends once the runner has finished with the frame it was
        forwarding. The runner adds a frame's duration to the playback position only after
        its push returns, so reporting earlier would count that frame into the next segment."""
        self._avatar.interrupt()
        self._segment = None
        self._pulled.clear()
        return self._settle()

    async def _settle(self) -> None:
        try:
            await asyncio.wait_for(self._pulled.wait(), self._settle_timeout_s)
        except asyncio.TimeoutError:
            pass  # the runner is stalled: report what it has counted

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        async for item in self._avatar.frames():
            if isinstance(item, VideoOut):
                h, w = item.image.shape[:2]
                yield rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(item.image).tobytes())
            elif isinstance(item, AudioOut) and item.speech:
                yield rtc.AudioFrame(item.pcm.tobytes(), item.rate, 1, len(item.pcm))
            elif isinstance(item, PlaybackEvent) and item.type == "finished" and not item.interrupted:
                yield AudioSegmentEnd()
            else:
                continue
            self._pulled.set()

    async def aclose(self) -> None:
        await self._avatar.aclose()


async def serve_room(room: rtc.Room, host, portrait: np.ndarray, *, audio_rate: int = 24000,
                     sender_identity: str | None = None, seed: int = 0) -> None:
    """Be the avatar of the agent in `room` (already connected) until the room or the agent
    goes away: the data-stream protocol in, synchronised tracks out (module docstring)."""
    avatar = await host.open(portrait, audio_rate=audio_rate, seed=seed)
    generator = KnotstreamVideoGenerator(avatar)
    receiver = DataStreamAudioReceiver(room, sender_identity=sender_identity)
    runner = AvatarRunner(room, audio_recv=receiver, video_gen=generator, options=avatar_options(avatar))
    left = asyncio.Event()
    room.on("disconnected", lambda *_: left.set())
    try:
        await runner.start()
        done = asyncio.ensure_future(runner.wait_for_complete())
        gone = asyncio.ensure_future(left.wait())
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        for t in (done, gone):
            t.cancel()
    finally:
        await runner.aclose()
        await generator.aclose()
