"""Pipecat: `KnotstreamVideoService`, a frame processor that turns TTS audio into a talking avatar.

Put it right after the TTS service:

    avatar = KnotstreamVideoService.in_process(AvatarHost.load("tiny"), portrait)
    # or: KnotstreamVideoService.remote("http://gpu-host:8000", avatar="ada")
    pipeline = Pipeline([transport.input(), stt, llm, tts, avatar, transport.output()])

and give the output transport `video_out_enabled=True, video_out_is_live=True` with the
avatar's size and frame rate (`avatar_transport_params`).

What it does with each frame (the contract of Pipecat's avatar services):

- `TTSAudioRawFrame`: consumed and pushed into the avatar as one speech segment per TTS
  context; TTS may run as far ahead of real time as it likes.
- `TTSStoppedFrame`: ends the segment; the frame itself is held and pushed downstream after
  the segment's last audio, so the output transport sees the bot stop speaking when it
  really stops (not when the TTS finished, seconds earlier).
- `InterruptionFrame`: barge-in, answered at once without waiting for the avatar; the held
  stop frames of the cut segments are dropped (the interruption already stops the bot).
- everything else passes through.

Downstream it pushes, paced in real time at the model's fps, `OutputImageRawFrame` (RGB) for
every frame and the re-timed speech as `TTSAudioRawFrame`s that play with those frames. Each
frame's `pts` is on the pipeline clock: the time the frame is due. Events
`on_playback_started(service, segment)` and `on_playback_finished(service, segment,
position_s, interrupted)` fire exactly once per segment.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Awaitable, Callable

import numpy as np
from loguru import logger
from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputAudioRawFrame,
                                   OutputImageRawFrame, StartFrame, TTSAudioRawFrame, TTSStoppedFrame)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from integrations.avatar import AudioOut, VideoOut
from integrations.tape import PlaybackEvent

AvatarFactory = Callable[[], Awaitable[object]]


def avatar_transport_params(width: int, height: int, fps: int, **overrides) -> dict:
    """The output-transport settings an avatar of that size and frame rate needs (pass as
    TransportParams(**...)); frames of another size are scaled by the transport."""
    params = dict(audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True,
                  video_out_width=width, video_out_height=height, video_out_framerate=fps)
    params.update(overrides)
    return params


class KnotstreamVideoService(AIService):
    """A knotstream avatar as a Pipecat frame processor (see the module docstring). `open_avatar`
    is awaited at pipeline start and returns the avatar (integrations.avatar.LocalAvatar or
    integrations.remote.RemoteAvatar)."""

    def __init__(self, open_avatar: AvatarFactory, *, drain_timeout_s: float = 30.0, **kwargs):
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._open_avatar = open_avatar
        self._drain_timeout_s = drain_timeout_s
        self._avatar = None
        self._forward_task: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._open: tuple[str | None, str] | None = None   # (TTS context id, our segment id)
        self._held_stops: dict[str, TTSStoppedFrame] = {}
        self._t0_ns: int | None = None
        self._register_event_handler("on_playback_started")
        self._register_event_handler("on_playback_finished")

    @classmethod
    def in_process(cls, host, portrait: np.ndarray, *, audio_rate: int | None = None, seed: int = 0,
                   **kwargs) -> "KnotstreamVideoService":
        """The engine in this process (host: integrations.avatar.AvatarHost)."""
        return cls(lambda: host.open(portrait, audio_rate=audio_rate, seed=seed), **kwargs)

    @classmethod
    def remote(cls, url: str, *, avatar: str | None = "ada", image: bytes | None = None,
               api_key: str | None = None, options: dict | None = None, **kwargs) -> "KnotstreamVideoService":
        """A knotstream server over its HTTP/WebSocket/WebRTC API (the GPU elsewhere)."""
        from integrations.remote import RemoteAvatar

        return cls(lambda: RemoteAvatar.connect(url, avatar=avatar, image=image, api_key=api_key,
                                                options=options), **kwargs)

    @property
    def avatar(self):
        return self._avatar

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self, frame: StartFrame):
        await super().start(frame)
        try:
            self._avatar = await self._open_avatar()
        except Exception as exc:
            await self.push_error(error_msg=f"knotstream avatar did not start: {exc}", exception=exc, fatal=True)
            return
        self._forward_task = self.create_task(self._forward(), name="knotstream-forward")

    async def stop(self, frame: EndFrame):
        """Let the segments already pushed play out (up to drain_timeout_s), then close."""
        await super().stop(frame)
        self._end_open_segment()
        if self._avatar is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._drain_timeout_s
            while self._avatar.pending_segments() and not self._avatar.closed and loop.time() < deadline:
                await asyncio.sleep(0.02)
        await self._close()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._close()

    async def _close(self) -> None:
        if self._forward_task is not None:
            await self.cancel_task(self._forward_task)
            self._forward_task = None
        if self._avatar is not None:
            await self._avatar.aclose()

    # ----- input -------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._push_speech(frame)
        elif isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            segment = self._end_open_segment(frame.context_id)
            if segment is not None:
                self._held_stops[segment] = frame
            else:
                await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            if self._avatar is not None:
                self._avatar.interrupt()
            self._open = None
            self._held_stops.clear()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _push_speech(self, frame: TTSAudioRawFrame) -> None:
        if self._avatar is None:
            await self.push_error(error_msg="TTS audio arrived before the knotstream avatar started")
            return
        if self._open is None or self._open[0] != frame.context_id:
            self._end_open_segment()
            self._open = (frame.context_id, f"tts-{next(self._ids)}")
        pcm = np.frombuffer(frame.audio, np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        try:
            self._avatar.push(pcm, frame.sample_rate, self._open[1])
        except (ValueError, RuntimeError) as exc:  # BufferFull is a ValueError
            await self.push_error(error_msg=f"knotstream avatar refused speech: {exc}", exception=exc)

    def _end_open_segment(self, context_id: str | None = None) -> str | None:
        """End the open segment (of `context_id` when given); returns its id."""
        if self._open is None or (context_id is not None and self._open[0] not in (None, context_id)):
            return None
        segment, self._open = self._open[1], None
        if self._avatar is not None:
            self._avatar.end(segment)
        return segment

    # ----- output ------------------------------------------------------------------------

    async def _forward(self) -> None:
        avatar = self._avatar
        async for item in avatar.frames():
            if isinstance(item, VideoOut):
                h, w = item.image.shape[:2]
                out = OutputImageRawFrame(image=item.image.tobytes(), size=(w, h), format="RGB")
                out.pts = self._pts(item.time_s)
                await self.push_frame(out)
            elif isinstance(item, AudioOut):
                cls = TTSAudioRawFrame if item.speech else OutputAudioRawFrame
                out = cls(audio=item.pcm.tobytes(), sample_rate=item.rate, num_channels=1)
                out.pts = self._pts(item.index / avatar.fps)
                await self.push_frame(out)
            elif isinstance(item, PlaybackEvent):
                await self._on_event(item)
        if avatar.error:
            await self.push_error(error_msg=f"knotstream avatar stopped: {avatar.error}", fatal=True)
        else:
            logger.debug(f"{self}: avatar stream ended")

    async def _on_event(self, event: PlaybackEvent) -> None:
        if event.type == "started":
            await self._call_event_handler("on_playback_started", event.segment)
            return
        stop = self._held_stops.pop(event.segment, None)
        if stop is not None and not event.interrupted:
            await self.push_frame(stop)
        await self._call_event_handler("on_playback_finished", event.segment, event.position_s, event.interrupted)

    def _pts(self, media_s: float) -> int:
        """Pipeline-clock time (ns) at which the frame at media time `media_s` is due."""
        if self._t0_ns is None:
            self._t0_ns = self.get_clock().get_time() - int(media_s * 1e9)
        return self._t0_ns + int(round(media_s * 1e9))
