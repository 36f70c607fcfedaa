"""One live session: peer connection, tracks, mic, data channel, driving and playout.

The generator contract is small (as LiveKit's avatar workers): push driving input
(`push_audio`, `set_motion`, the mic track, the data channel), `interrupt()` flushes
speech, events go to subscribers (`on_event`). The stream itself is stepped only by the
shared `GenerationWorker`. No HTTP here: the server validates requests and delegates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any, Callable

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from streaming import channel as proto
from streaming import messages
from streaming.channel import SessionLimits
from streaming.clock import MediaClock
from streaming.driving import DrivingBuffer, Segment
from streaming.encode import EncodedVideoTrack, EncoderError, choose_video_encoder, encoder_status
from streaming.options import SessionOptions, SessionRefused
from streaming.peer import CandidateError, OfferError, attach_track, check_offer, parse_candidates
from streaming.playout import Playout
from streaming.tracks import (AvatarAudioTrack, AvatarVideoTrack, Pacer, consume_audio, consume_blackhole,
                              track_task)
from streaming.worker import Generation, GenerationWorker, SessionStream

log = logging.getLogger("knotstream.session")

__all__ = ["LiveSession", "OfferError", "SessionOptions", "SessionRefused", "check_offer"]


class LiveSession:
    """Everything of one live avatar session except HTTP. Create on the event loop."""

    def __init__(self, session_id: str, worker: GenerationWorker, stream: SessionStream, fps: int, sample_rate: int,
                 placeholder: np.ndarray, options: SessionOptions | None = None,
                 tts: Callable[[str, int], Any] | None = None,
                 on_latency: Callable[[float, str], None] | None = None,
                 on_chunk: Callable[[float, int], None] | None = None,
                 limits: SessionLimits | None = None):
        """`limits`: the session's request and interrupt rates, spent by every path (HTTP,
        data channel, WebSocket); None: unlimited (unit tests)."""
        self.id = session_id
        self.worker = worker
        self.stream = stream
        self.options = options or SessionOptions()
        self.tts = tts
        self.on_latency = on_latency
        self.loop = asyncio.get_running_loop()
        self.created = time.time()
        self.clock = MediaClock(fps)
        step = stream.timeline.frames_for_latents(stream.knobs.chunk_frames, first=False)
        self.lead_frames = self.options.lead_frames or (3 * step) // 2
        # Mic audio is placed this many frames after the frame on screen: beyond the lead already
        # generated and the driving span a step reads ahead, so it is never late for its frames.
        self.mic_latency_frames = self.lead_frames + stream.driving_frames + 2
        max_frames = self.lead_frames + 2 * step
        # History to regenerate everything the playout can hold, plus the chunk being shown.
        rewind_chunks = -(-max_frames // step) + 2
        self.driving = DrivingBuffer(stream.timeline, max_speech_seconds=self.options.max_speech_seconds,
                                     echo_mic=self.options.echo_mic, history_frames=(rewind_chunks + 1) * step)
        self.playout = Playout(self.clock, sample_rate, placeholder, max_frames=max_frames, on_slot=self._on_slot)
        self.pacer = Pacer(self.clock, self.playout, self.options.prebuffer_timeout_s)
        self.video = AvatarVideoTrack(self.pacer)
        self.audio = AvatarAudioTrack(self.pacer, sample_rate)
        self.sample_rate = sample_rate
        self.pc: RTCPeerConnection | None = None
        self.channel = None
        self.state = "new"           # new -> connecting -> live -> closed
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self.error: str | None = None
        self.mic_samples = 0
        self.messages = {"received": 0, "errors": 0}
        self._listeners: list[Callable[[dict], None]] = []
        self._close_listeners: list[Callable[["LiveSession"], None]] = []
        self._tasks: set[asyncio.Task] = set()
        self._last_gen = -1
        self.channel_limit = proto.RateLimit()  # JSON messages per session (data channel + WebSocket)
        self.limits = limits
        self._resamplers: dict[str, object] = {}  # segment id -> StreamResampler of pushed audio
        self._resampling = asyncio.Lock()  # pieces of pushed audio are resampled one at a time, in order
        self._speaking = False             # a TTS synthesis of this session is running
        self._rewind: asyncio.Future | None = None  # the interrupt regeneration not yet done
        self.candidates = 0                # trickled ICE candidates added
        self.rewinds: deque[dict] = deque(maxlen=64)  # recent interrupt regenerations (status, tests)
        self.gen = Generation(session_id, stream, self.driving, self.playout, self.lead_frames,
                              on_error=self._on_worker_error, on_chunk=on_chunk, rewind_chunks=rewind_chunks)
        worker.add(self.gen)

    # ----- signalling -----------------------------------------------------------------

    async def answer(self, sdp: str, kind: str = "offer") -> str:
        """Answer the client's SDP offer (non-trickle: the answer carries our candidates)."""
        if self.state == "closed":
            raise OfferError("session_closed", "session is closed")
        if self.pc is not None:
            raise OfferError("offer_exists", "this session already has a peer connection")
        if kind != "offer":
            raise OfferError("bad_offer", f"expected an SDP of type 'offer', got {kind!r}")
        check_offer(sdp)
        ice = [RTCIceServer(**s) for s in self.options.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        self.pc = pc
        self.state = "connecting"

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                self._spawn(consume_audio(track, self._on_mic, self.sample_rate), "mic")
            else:
                self._spawn(consume_blackhole(track), "blackhole")

        @pc.on("datachannel")
        def on_datachannel(ch):
            if ch.label != "driving":
                log.info("session %s: ignoring data channel %r", self.id, ch.label)
                return
            self.channel = ch
            ch.on("message", lambda raw: self._spawn(self._on_message(raw), "message"))

        @pc.on("connectionstatechange")
        async def on_state():
            st = pc.connectionState
            log.info("session %s: connection %s", self.id, st)
            if st == "connected":
                self.state = "live"
            elif st in ("failed", "closed"):
                await self.close(f"connection {st}")
            elif st == "disconnected":
                self._spawn(self._close_if_still_disconnected(), "disconnect-watch")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            self._attach(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc's parser raises many kinds of errors on garbage
            # Refused: drop this peer so a corrected offer can be sent to the same session
            # (its handlers first: closing it must not close the session).
            pc.remove_all_listeners()
            await pc.close()
            self.pc = None
            self.state = "new"
            if isinstance(exc, OfferError):
                raise
            raise OfferError("bad_offer", f"cannot answer the offer: {type(exc).__name__}: {exc}") from None
        if self.options.ice_connect_timeout_s is not None:
            self._spawn(self._close_unless_connected(self.options.ice_connect_timeout_s), "ice-deadline")
        return pc.localDescription.sdp

    async def _close_unless_connected(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        if self.state == "connecting":
            await self.close(f"ICE did not connect within {timeout_s:g} s of the answer")

    async def add_ice_candidates(self, sdpfrag: str) -> int:
        """Trickle ICE: add the client's candidates from an RFC 8840 SDP fragment. Returns the
        count. CandidateError (code bad_sdpfrag / no_peer / too_many_candidates) when refused."""
        if self.pc is None or self.state == "closed":
            raise CandidateError("no_peer", "the session has no peer connection yet: send the offer first")
        cands = parse_candidates(self.pc, sdpfrag, self.options.max_ice_candidates - self.candidates)
        self.candidates += len(cands)
        for cand in cands:
            await self.pc.addIceCandidate(cand)
        return len(cands)

    encoded_video: EncodedVideoTrack | None = None  # the sent track on the pre-encoded paths (_attach)

    def video_encoder(self):
        """The session's VideoEncoder (cached per codec, preference and frame size)."""
        cfg = self.stream.cfg
        return choose_video_encoder(self.options.codec, self.options.encoder, (cfg.width, cfg.height))

    def _attach(self, pc: RTCPeerConnection) -> None:
        try:
            enc = self.video_encoder()
        except EncoderError as exc:
            raise OfferError(exc.code, str(exc)) from None
        self.encoded_video = attach_track(pc, "video", self.video, self.options.codec, enc, self.clock.fps,
                                          self.options.bitrate)
        attach_track(pc, "audio", self.audio)

    async def _close_if_still_disconnected(self) -> None:
        await asyncio.sleep(self.options.disconnect_grace_s)
        if self.pc is not None and self.pc.connectionState in ("disconnected", "failed"):
            await self.close("peer disconnected")

    # ----- driving --------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray, segment_id: str | None = None, end: bool = False) -> Segment:
        """Speech at the driving rate into segment `segment_id` (a new one when unknown).
        SessionRefused `too_many_segments` when it would open one more than the session keeps open."""
        opens_one = not end and (segment_id is None or not any(
            s.id == segment_id and not s.ended and not s.interrupted for s in self.driving.segments()))
        if opens_one and self.open_segments() >= self.options.max_open_segments:
            raise SessionRefused("too_many_segments",
                                 f"{self.options.max_open_segments} speech segments are open on this session; "
                                 f"end one (end=true, or an `end` message) before starting another")
        seg = self.driving.push_speech(samples, segment_id, end)
        self.worker.wake()
        return seg

    def open_segments(self) -> int:
        return sum(1 for s in self.driving.segments() if not s.ended and not s.interrupted)

    async def push_pcm(self, samples: np.ndarray, rate: int, segment_id: str | None, end: bool) -> Segment:
        """Pushed audio at a rate of `streaming.resample.RATES`, resampled off the event loop
        with state kept per segment across pieces (no clicks at piece borders); the filter's
        tail is added when the segment ends. ValueError (code audio_bad_rate) for other rates."""
        from streaming.resample import StreamResampler, check_rate

        check_rate(rate)
        if rate == self.sample_rate:
            return self.push_audio(samples, segment_id, end)
        async with self._resampling:   # one piece at a time: a segment's pieces stay in order
            key = segment_id
            rs = self._resamplers.pop(key, None) if key is not None else None
            if rs is None or rs.in_rate != rate:
                rs = StreamResampler(rate, self.sample_rate)
            out = await asyncio.to_thread(rs.push, samples, end or key is None)
            if not (end or key is None) and len(self._resamplers) < self.options.max_open_segments:
                self._resamplers[key] = rs
            return self.push_audio(out, segment_id, end)

    async def end_segment(self, segment_id: str, end: bool = True) -> Segment | None:
        """Add the resampler's tail to the segment and end it (`end=False`: keep it open; None
        when there is no such segment then). KeyError for an unknown segment to end."""
        async with self._resampling:
            rs = self._resamplers.pop(segment_id, None)
            tail = rs.flush() if rs is not None else ()
            if len(tail):
                self.push_audio(tail, segment_id, end=False)
            return self.driving.end_segment(segment_id) if end else None

    def set_motion(self, fields: dict, client_ms: float | None = None) -> int:
        return self.driving.set_motion(fields, client_ms)

    def spend(self, kind: str) -> None:
        """Spend one of the session's `requests` (audio pushes, speak) or `interrupts`;
        SessionRefused `rate_limited` (with the wait) when none is left."""
        limit = getattr(self.limits, kind, None) if self.limits is not None else None
        wait = limit.take() if limit is not None else 0.0
        if wait > 0:
            what = "interrupts" if kind == "interrupts" else "audio/speak requests"
            raise SessionRefused("rate_limited", f"more than {limit.rate:g} {what} per second on this session "
                                                 f"(burst {limit.burst:g}); retry in {wait:.2f} s", wait)

    async def speak(self, text: str) -> Segment:
        """Synthesize `text` and queue it as one segment. One synthesis per session at a time
        (SessionRefused `speak_in_progress`); the TTS has its own process-wide cap."""
        if self.tts is None:
            from streaming.tts import TTSUnavailable
            raise TTSUnavailable("text-to-speech is not configured")
        if self._speaking:
            raise SessionRefused("speak_in_progress", "this session is already synthesizing speech; "
                                                      "send the next text when its ack arrives", 1.0)
        self._speaking = True
        try:
            samples = await self.tts(text, self.sample_rate)
        finally:
            self._speaking = False
        if self.state == "closed":
            raise SessionRefused("session_closed", "the session closed while its speech was synthesized")
        return self.push_audio(samples, end=True)

    def interrupt(self) -> dict:
        """Barge-in: drop speech not yet generated and silence frames generated but not played
        at once; then (worker thread, between steps) discard those frames and regenerate
        from the last frame shown with the speech gone (`GenerationWorker.rewind_unplayed`).
        While a regeneration is still pending, another interrupt only drops speech and mutes:
        the pending one regenerates from the first unplayed frame with the speech gone, which
        covers both (`coalesced`). Callers spend the session's interrupt budget first."""
        cut = self.driving.interrupt()
        muted = self.playout.mute_queued()
        coalesced = self._rewind is not None and not self._rewind.done()
        if not coalesced:
            # Stop the step in progress (its frames would be discarded anyway), then rewind.
            self.stream.request_abort()
            self._rewind = fut = self.worker.rewind_unplayed(self.id)
            fut.add_done_callback(self._on_rewound)
        played = self.driving.sample_of(self._last_gen + 1) if self._last_gen >= 0 else 0
        for seg in cut:
            if not seg.finished_event:
                seg.finished_event = True
                pos = seg.audio_before(min(played, seg.end))
                self._emit({"type": "playback_finished", "segment": seg.id, "interrupted": True,
                            "position_ms": round(1000 * pos / self.sample_rate)})
        return {"interrupted_segments": [s.id for s in cut], "muted_frames": muted, "coalesced": coalesced}

    def _on_rewound(self, fut) -> None:
        """Worker thread: the regeneration was set up (or fell back); note it, never raise."""
        try:
            result = fut.result()
        except Exception as exc:  # the session goes on; the muted frames still play
            log.warning("session %s: regenerating after interrupt failed: %s", self.id, exc)
            result = {"fallback": f"{type(exc).__name__}: {exc}"}
        self.rewinds.append(result)
        if "fallback" in result:
            log.info("session %s: interrupt fallback (muted frames play out): %s", self.id, result["fallback"])

    def _on_mic(self, samples: np.ndarray) -> None:
        self.mic_samples += len(samples)
        # The generated frame on screen now: slots minus the held ones (the timeline slips on
        # underrun), so mic audio keeps its latency relative to what is shown even in overload.
        shown = self.clock.slot_at() - self.playout.stats.held
        self.driving.push_mic(samples, max(0, shown), self.mic_latency_frames)

    # ----- data channel ---------------------------------------------------------------

    async def _on_message(self, raw) -> None:
        reply = await self.handle_message(raw)
        if reply is not None:
            self.send(reply)

    async def handle_message(self, raw) -> dict | None:
        """One protocol message from the data channel or the WebSocket (streaming/messages.py);
        returns the reply (ack, pong or error), never raises."""
        return await messages.handle(self, raw)

    def send(self, message: dict) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            try:
                ch.send(json.dumps(message))
            except Exception:
                log.debug("session %s: data channel send failed", self.id, exc_info=True)

    # ----- events ---------------------------------------------------------------------

    def on_event(self, fn: Callable[[dict], None]) -> None:
        """Call `fn(event)` on the event loop for every event (playback, error, closed)."""
        self._listeners.append(fn)

    def off_event(self, fn: Callable[[dict], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def on_close(self, fn: Callable[["LiveSession"], None]) -> None:
        self._close_listeners.append(fn)

    def _emit(self, event: dict) -> None:
        self.send(event)
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:
                log.exception("session %s: event listener failed", self.id)

    def _on_slot(self, slot: int, gen: int | None) -> None:
        """Playout assigned a slot (called under the playout lock: only note things here)."""
        if gen is None:
            return
        self._last_gen = gen
        now = time.monotonic()
        for m in self.driving.pop_markers(gen):
            if self.on_latency is not None:
                self.on_latency(now - m.arrival, m.kind)
        lo, hi = self.driving.sample_of(gen), self.driving.sample_of(gen + 1)
        for seg in self.driving.segment_audio_span(lo, hi):
            if not seg.started_event and not seg.interrupted and hi > seg.start:
                seg.started_event = True
                self.loop.call_soon(self._emit, {"type": "playback_started", "segment": seg.id, "position_ms": 0})
            if seg.ended and not seg.finished_event and hi >= seg.end:
                seg.finished_event = True
                self.loop.call_soon(self._emit, {
                    "type": "playback_finished", "segment": seg.id, "interrupted": False,
                    "position_ms": round(1000 * seg.audio_before(seg.end) / self.sample_rate)})
        if slot % 250 == 0:
            self.driving.forget_segments(lo)

    def _on_worker_error(self, exc: BaseException) -> None:
        """Called on the worker thread: hop to the loop, tell the client, close."""
        def fail():
            self.error = f"{type(exc).__name__}: {exc}"
            self._emit({"type": "error", "code": "generation_failed", "message": self.error, "ref": None})
            self._spawn(self.close("generation failed"), "close")
        self.loop.call_soon_threadsafe(fail)

    # ----- status and lifecycle -------------------------------------------------------

    def status(self) -> dict:
        pc = self.pc
        return {
            "id": self.id,
            "state": self.state,
            "connection": pc.connectionState if pc is not None else None,
            "created": self.created,
            "fps": self.clock.fps,
            "frame_index": self.gen.frames,
            "chunks": self.gen.chunks,
            "last_step_ms": round(1000 * self.gen.last_step_s, 2),
            "lead_frames": self.lead_frames,
            "buffered_frames": self.playout.queued_frames(),
            "released_frames": self.playout.stats.released,
            "held_frames": self.playout.stats.held,
            "dropped_frames": self.video.dropped + self.playout.stats.dropped,
            "regenerated_frames": self.playout.stats.flushed,
            "speech_pending": self.driving.speech_pending,
            "mic_seconds": round(self.mic_samples / self.sample_rate, 3),
            "messages": dict(self.messages),
            "driving": dict(self.driving.stats),
            "error": self.error,
            "close_reason": self.close_reason,
            "encoder": encoder_status(self.video_encoder, self.encoded_video, self.options.bitrate),
        }

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = track_task(coro, f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, reason: str = "closed") -> None:
        """Idempotent: stop tracks and tasks, close the peer, free the worker's stream."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.close_reason = reason
        self._emit({"type": "closed", "reason": reason})
        self.worker.remove(self.id)
        self.video.stop()
        self.audio.stop()
        current = asyncio.current_task()
        for t in list(self._tasks):
            if t is not current:
                t.cancel()
        if self.pc is not None:
            try:
                await self.pc.close()
            except Exception:
                log.exception("session %s: closing the peer connection failed", self.id)
        self.playout.close()
        self.closed.set()
        for fn in list(self._close_listeners):
            try:
                fn(self)
            except Exception:
                log.exception("session %s: close listener failed", self.id)
