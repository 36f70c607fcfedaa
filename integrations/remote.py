"""A knotstream server session behind the same surface as the in-process avatar.

Only the public API is used (README "Talking to the avatar from an app"): the session is
created with an aiortc offer (`POST /v1/sessions`), speech goes up the WebSocket
`/v1/sessions/{id}/audio/ws` as PCM16 at the caller's rate (`{"type": "segment"}` starts
a segment, `{"type": "end"}` ends it, `{"type": "interrupt"}` is barge-in), and the
session's events come back on the same socket. Video and the lip-synced speech come back
over WebRTC, already paced by the server; `frames()` hands them out as they arrive:
`VideoOut`, `AudioOut` (48 kHz, what the server's audio track plays: Opus-coded, so not
sample-exact, and silence between segments, marked `speech=False`) and `PlaybackEvent`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator
from urllib.parse import urlsplit

import numpy as np

from integrations.avatar import AudioOut, Output, VideoOut, to_int16
from integrations.tape import PlaybackEvent

log = logging.getLogger("knotstream.integrations.remote")

OUT_QUEUE = 2000   # frames + audio + events waiting for the consumer (~20 s)
SEND_QUEUE = 5000  # WebSocket messages waiting to be sent (~100 s of 20 ms TTS frames)


class RemoteAvatar:
    """Use `await RemoteAvatar.connect(url, ...)`. Methods as integrations.avatar.LocalAvatar."""

    def __init__(self, base_url: str, session: dict, pc, ws, fps: int):
        self.base_url = base_url
        self.session = session
        self.fps = fps
        self.width = self.height = None   # known from the first frame
        self.errors: list[str] = []
        self.error: str | None = None
        self._pc, self._ws = pc, ws
        self._out: asyncio.Queue = asyncio.Queue(OUT_QUEUE)
        self._send: asyncio.Queue = asyncio.Queue(SEND_QUEUE)
        self._segment: tuple[str, int] | None = None   # (segment, rate) binary audio goes to
        self._pending: set[str] = set()                 # pushed, not finished
        self._playing: set[str] = set()                 # started, not finished
        self._video_index = self._audio_index = 0
        self._closed = False
        self.dropped = 0
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def connect(cls, url: str, *, avatar: str | None = "ada", image: bytes | None = None,
                      api_key: str | None = None, options: dict | None = None,
                      timeout_s: float = 60.0) -> "RemoteAvatar":
        """Create a session on the server at `url` (bundled `avatar`, or an uploaded portrait
        `image`) and connect its media and WebSocket. RuntimeError with the server's message
        when it refuses."""
        import httpx
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from websockets.asyncio.client import connect as ws_connect

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        tracks: list = []
        pc.on("track", tracks.append)
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        key = {"X-API-Key": api_key} if api_key else {}
        try:
            async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:
                if image is not None:
                    r = await http.post("/v1/sessions", headers=key, files={"image": ("portrait", image)},
                                        data={"offer": json.dumps(offer), "options": json.dumps(options or {})})
                else:
                    r = await http.post("/v1/sessions", headers=key,
                                        json={"avatar": avatar, "options": options or {}, "offer": offer})
                if r.status_code != 201:
                    raise RuntimeError(f"knotstream refused the session ({r.status_code}): {r.text[:300]}")
                session = r.json()
                for notice in session.get("notices", []):   # what to expect, e.g. a photo on a cartoon model
                    log.warning("knotstream session %s: %s (%s)", session["id"], notice["message"], notice["code"])
                auth = {"Authorization": f"Bearer {session['token']}"}
                status = (await http.get(f"/v1/sessions/{session['id']}", headers=auth)).json()
            await pc.setRemoteDescription(RTCSessionDescription(**session["answer"]))
            parts = urlsplit(url)
            scheme = "wss" if parts.scheme == "https" else "ws"
            ws = await ws_connect(f"{scheme}://{parts.netloc}/v1/sessions/{session['id']}/audio/ws",
                                  additional_headers=auth, open_timeout=timeout_s, max_size=1 << 20)
        except BaseException:
            await pc.close()
            raise
        self = cls(url, session, pc, ws, int(status.get("fps", 25)))
        for track in tracks:
            self._read_track(track)
        pc.on("track", self._read_track)
        self._tasks += [asyncio.ensure_future(self._receive()), asyncio.ensure_future(self._sender())]
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    # ----- input (never blocks: messages go out in order through one sender task) ----------

    def push(self, pcm: np.ndarray, rate: int, segment: str) -> None:
        if self._closed:
            raise RuntimeError(f"remote avatar is closed ({self.error or 'closed'})")
        if (segment, rate) != self._segment:
            self._enqueue(json.dumps({"type": "segment", "segment": segment, "rate": int(rate)}))
            self._segment = (segment, rate)
        self._pending.add(segment)
        self._enqueue(to_int16(pcm).astype("<i2").tobytes())

    def end(self, segment: str) -> None:
        if segment not in self._pending:  # nothing was sent for it: nothing will play
            self._put(PlaybackEvent("finished", segment))
            return
        self._enqueue(json.dumps({"type": "end", "segment": segment}))
        if self._segment is not None and self._segment[0] == segment:
            self._segment = None

    def interrupt(self) -> list[PlaybackEvent]:
        """Barge-in; the server answers with the cut segments' finished events."""
        if not self._closed:
            self._enqueue(json.dumps({"type": "interrupt"}))
        self._segment = None
        return []

    def pending_segments(self) -> list[str]:
        return sorted(self._pending)

    def _enqueue(self, message) -> None:
        try:
            self._send.put_nowait(message)
        except asyncio.QueueFull:
            raise ValueError(f"more than {SEND_QUEUE} messages waiting for the knotstream server") from None

    async def _sender(self) -> None:
        while True:
            message = await self._send.get()
            try:
                await self._ws.send(message)
            except Exception as exc:
                await self._fail(f"WebSocket send failed: {exc}")
                return

    # ----- output ------------------------------------------------------------------------

    async def frames(self) -> AsyncIterator[Output]:
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item

    def _put(self, item) -> None:
        try:
            self._out.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1  # the consumer stopped reading: keep the newest

    def _read_track(self, track) -> None:
        self._tasks.append(asyncio.ensure_future(self._read_video(track) if track.kind == "video"
                                                 else self._read_audio(track)))

    async def _read_video(self, track) -> None:
        from streaming.tracks import frames_of

        async for frame in frames_of(track):
            image = frame.to_ndarray(format="rgb24")
            self.height, self.width = image.shape[:2]
            self._put(VideoOut(image, self._video_index, self._video_index / self.fps))
            self._video_index += 1

    async def _read_audio(self, track) -> None:
        import av

        from streaming.tracks import frames_of

        to_mono = av.AudioResampler(format="s16", layout="mono", rate=48000)
        async for frame in frames_of(track):
            for out in to_mono.resample(frame):
                pcm = out.to_ndarray().reshape(-1).astype(np.int16)
                self._put(AudioOut(pcm, 48000, max(0, self._video_index - 1), speech=bool(self._playing)))

    async def _receive(self) -> None:
        try:
            async for raw in self._ws:
                if isinstance(raw, str):
                    self._on_message(json.loads(raw))
        except Exception as exc:
            if not self._closed:
                log.warning("knotstream WebSocket ended: %s", exc)
        await self._fail(None)

    def _on_message(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind in ("playback_started", "playback_finished"):
            segment = str(msg.get("segment"))
            if kind == "playback_started":
                self._playing.add(segment)
                self._put(PlaybackEvent("started", segment))
            else:
                self._playing.discard(segment)
                self._pending.discard(segment)
                self._put(PlaybackEvent("finished", segment, msg.get("position_ms", 0) / 1000.0,
                                        bool(msg.get("interrupted"))))
        elif kind == "error":
            self.errors.append(f"{msg.get('code')}: {msg.get('message')}")
            log.warning("knotstream server: %s", self.errors[-1])
        elif kind == "closed":
            self.error = self.error or f"session closed by the server: {msg.get('reason')}"

    async def _fail(self, reason: str | None) -> None:
        if reason and not self.error:
            self.error = reason
        if not self._closed:
            self._closed = True
            if self._out.full():  # the end marker must get through
                self._out.get_nowait()
            self._out.put_nowait(None)

    async def aclose(self) -> None:
        """End the session on the server and close the connections."""
        import httpx

        was_closed, self._closed = self._closed, True
        for task in self._tasks:
            task.cancel()
        try:
            if not was_closed:
                async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as http:
                    await http.delete(f"/v1/sessions/{self.session['id']}",
                                      headers={"Authorization": f"Bearer {self.session['token']}"})
        except Exception as exc:
            log.info("deleting the remote session failed: %s", exc)
        await self._ws.close()
        await self._pc.close()
