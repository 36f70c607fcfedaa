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
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from streaming import channel as proto
from streaming.clock import MediaClock
from streaming.driving import DrivingBuffer, Segment
from streaming.encode import EncodedVideoTrack, EncoderError, check_bitrate, choose_video_encoder, encoder_status
from streaming.playout import Playout
from streaming.tracks import (AvatarAudioTrack, AvatarVideoTrack, Pacer, consume_audio, consume_blackhole,
                              track_task)
from streaming.worker import Generation, GenerationWorker

log = logging.getLogger("knotstream.session")

CODECS = {"vp8": "video/VP8", "h264": "video/H264"}


class OfferError(ValueError):
    """The SDP offer cannot be answered; `code` is stable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class SessionOptions:
    """Per-session gateway options (model knobs are the engine's business)."""

    codec: str = "vp8"
    lead_frames: int | None = None          # generation lead; None = 1.5 chunks
    mic_latency_frames: int | None = None   # None = lead + one step's driving span + 2
    prebuffer_timeout_s: float = 2.0
    max_speech_seconds: float = 300.0
    disconnect_grace_s: float = 5.0         # "disconnected" this long -> the session closes
    echo_mic: bool = False                  # play the mic back on the audio track (puppet demos)
    # Interrupt regenerates the frames generated but not yet played (closed mouth within about
    # one step) instead of only muting them; costs a few cache copies per step.
    regenerate_on_interrupt: bool = True
    ice_servers: list[dict] = field(default_factory=list)  # [{"urls": [...], "username", "credential"}]
    # Video encoder (streaming/encode.py): auto | software | nvenc | x264. auto = NVENC when the
    # codec is h264 and NVENC opens, else aiortc's software encoder.
    encoder: str = "auto"
    # Target bps of the pre-encoded paths (nvenc, x264); None = 1 Mbps. aiortc's software encoder
    # ignores it and follows the receiver's REMB estimate instead.
    bitrate: int | None = None

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.encoder not in ("auto", "software", "nvenc", "x264"):
            raise ValueError(f"encoder must be auto, software, nvenc or x264, got {self.encoder!r}")
        check_bitrate(self.bitrate)
        for name in ("lead_frames", "mic_latency_frames"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_offer(sdp: str) -> None:
    """Refuse offers aiortc cannot answer as we need: the answer cannot add m-lines, so the
    offer must carry a video and an audio section that can receive (sendrecv or recvonly)."""
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise OfferError("bad_offer", "offer is not an SDP session description (it must start with v=0)")
    directions: dict[str, str] = {}  # first m-section of each kind -> its direction
    kind, first = None, False
    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            first = kind not in directions
            if first:
                directions[kind] = "sendrecv"  # the SDP default
        elif first and line in ("a=sendonly", "a=inactive", "a=recvonly", "a=sendrecv"):
            directions[kind] = line[2:]
    for kind in ("video", "audio"):
        if kind not in directions:
            raise OfferError(f"offer_missing_{kind}",
                             f"offer has no {kind} m-line; offer a {kind} transceiver (recvonly is enough) "
                             f"so the answer can carry the avatar's {kind}")
        if directions[kind] in ("sendonly", "inactive"):
            raise OfferError(f"offer_{kind}_not_receiving",
                             f"the offer's {kind} m-line is {directions[kind]}; it must be sendrecv or recvonly")


class LiveSession:
    """Everything of one live avatar session except HTTP. Create on the event loop."""

    def __init__(self, session_id: str, worker: GenerationWorker, stream, fps: int, sample_rate: int,
                 placeholder: np.ndarray, options: SessionOptions | None = None,
                 tts: Callable[[str, int], Any] | None = None,
                 on_latency: Callable[[float, str], None] | None = None,
                 on_chunk: Callable[[float, int], None] | None = None):
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
        self.mic_latency_frames = self.options.mic_latency_frames or (
            self.lead_frames + stream.driving_frames + 2)
        max_frames = self.lead_frames + 2 * step
        # History to regenerate everything the playout can hold, plus the chunk being shown.
        rewind_chunks = -(-max_frames // step) + 2 if self.options.regenerate_on_interrupt else 0
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
        self._resamplers: dict[str, object] = {}  # segment id -> StreamResampler of pushed audio
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
            self._attach(pc, "video", self.video)
            self._attach(pc, "audio", self.audio)
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
        return pc.localDescription.sdp

    async def add_ice_candidates(self, sdpfrag: str) -> int:
        """Trickle ICE: add the client's candidates from an RFC 8840 SDP fragment (the `a=mid`
        before a candidate says which section; the first section otherwise). Returns the count.
        ValueError (code bad_sdpfrag / no_peer) when nothing can be added."""
        from aiortc.sdp import candidate_from_sdp

        if self.pc is None or self.state == "closed":
            err = ValueError("the session has no peer connection yet: send the offer first")
            err.code = "no_peer"
            raise err
        mids = [t.mid for t in self.pc.getTransceivers() if t.mid is not None]
        mid, added = (mids[0] if mids else "0"), 0
        for line in sdpfrag.splitlines():
            line = line.strip()
            if line.startswith("a=mid:"):
                mid = line[len("a=mid:"):]
            elif line.startswith("a=candidate:"):
                try:
                    cand = candidate_from_sdp(line[len("a=candidate:"):])
                except Exception as exc:
                    err = ValueError(f"cannot parse ICE candidate {line[:80]!r}: {exc}")
                    err.code = "bad_sdpfrag"
                    raise err from None
                cand.sdpMid = mid
                await self.pc.addIceCandidate(cand)
                added += 1
        if not added and "a=end-of-candidates" not in sdpfrag:
            err = ValueError("the fragment has no a=candidate lines")
            err.code = "bad_sdpfrag"
            raise err
        return added

    encoded_video: EncodedVideoTrack | None = None  # the sent track on the pre-encoded paths (_attach)

    def video_encoder(self):
        """The session's VideoEncoder (cached per codec, preference and frame size)."""
        cfg = getattr(self.stream, "cfg", None)
        size = (cfg.width, cfg.height) if cfg is not None else None
        return choose_video_encoder(self.options.codec, self.options.encoder, size)

    def _attach(self, pc: RTCPeerConnection, kind: str, track) -> None:
        """Put our track on the offer's transceiver of that kind (an answer cannot add m-lines)."""
        tr = next((t for t in pc.getTransceivers() if t.kind == kind and t.sender.track is None), None)
        if tr is None:
            raise OfferError(f"offer_missing_{kind}", f"offer has no usable {kind} m-line")
        if kind == "video":
            try:
                enc = self.video_encoder()
            except EncoderError as exc:
                raise OfferError(exc.code, str(exc)) from None
            # setRemoteDescription already negotiated the codecs in the offer's order, and
            # aiortc ignores setCodecPreferences after it: reorder the negotiated list itself
            # (the answer and the sender use its first codec). Packets of the pre-encoded
            # paths are H264 and can go out as nothing else.
            want = CODECS[self.options.codec]
            codecs = [c for c in tr._codecs if c.mimeType.lower() == want.lower()]
            if not codecs and enc.pre_encoded:
                raise OfferError("offer_codec_unsupported",
                                 f"the offer has no {want} for the {enc.kind} encoder; offer {want} or choose "
                                 f"encoder 'software'")
            if codecs:
                pts = {c.payloadType for c in codecs}
                rtx = [c for c in tr._codecs if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") in pts]
                rest = [] if enc.pre_encoded else [c for c in tr._codecs if c not in codecs and c not in rtx]
                tr._codecs = codecs + rtx + rest
            if enc.pre_encoded:
                track = self.encoded_video = EncodedVideoTrack(track, enc, self.clock.fps, self.options.bitrate)
        tr.sender.replaceTrack(track)
        tr.direction = "sendrecv"  # aiortc intersects it with the offer's direction

    async def _close_if_still_disconnected(self) -> None:
        await asyncio.sleep(self.options.disconnect_grace_s)
        if self.pc is not None and self.pc.connectionState in ("disconnected", "failed"):
            await self.close("peer disconnected")

    # ----- driving --------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray, segment_id: str | None = None, end: bool = False) -> Segment:
        seg = self.driving.push_speech(samples, segment_id, end)
        self.worker.wake()
        return seg

    def push_pcm(self, samples: np.ndarray, rate: int, segment_id: str | None, end: bool) -> Segment:
        """Pushed audio at any rate, resampled with state kept per segment across pieces (no
        clicks at piece borders); the filter's tail is added when the segment ends."""
        from streaming.resample import StreamResampler

        if rate == self.sample_rate:
            return self.push_audio(samples, segment_id, end)
        key = segment_id
        rs = self._resamplers.pop(key, None) if key is not None else None
        if rs is None or rs.in_rate != rate:
            rs = StreamResampler(rate, self.sample_rate)
        out = rs.push(samples)
        if end or key is None:
            out = np.concatenate([out, rs.flush()])
        elif len(self._resamplers) < 16:  # open segments at other rates: bounded
            self._resamplers[key] = rs
        return self.push_audio(out, segment_id, end)

    def end_segment(self, segment_id: str) -> Segment:
        rs = self._resamplers.pop(segment_id, None)
        if rs is not None:
            tail = rs.flush()
            if len(tail):
                self.push_audio(tail, segment_id, end=False)
        return self.driving.end_segment(segment_id)

    def set_motion(self, fields: dict, client_ms: float | None = None) -> int:
        return self.driving.set_motion(fields, client_ms)

    async def speak(self, text: str) -> Segment:
        if self.tts is None:
            from streaming.tts import TTSUnavailable
            raise TTSUnavailable("text-to-speech is not configured")
        samples = await self.tts(text, self.sample_rate)
        return self.push_audio(samples, end=True)

    def interrupt(self) -> dict:
        """Barge-in: drop speech not yet generated and silence frames generated but not played
        at once; then (worker thread, between steps) discard those frames and regenerate
        from the last frame shown with the speech gone (`GenerationWorker.rewind_unplayed`)."""
        cut = self.driving.interrupt()
        muted = self.playout.mute_queued()
        if self.options.regenerate_on_interrupt:
            # Stop the step in progress (its frames would be discarded anyway), then rewind.
            if hasattr(self.stream, "request_abort"):
                self.stream.request_abort()
            fut = self.worker.rewind_unplayed(self.id)
            fut.add_done_callback(self._on_rewound)
        played = self.driving.sample_of(self._last_gen + 1) if self._last_gen >= 0 else 0
        for seg in cut:
            if not seg.finished_event:
                seg.finished_event = True
                pos = max(0, min(played, seg.end) - seg.start)
                self._emit({"type": "playback_finished", "segment": seg.id, "interrupted": True,
                            "position_ms": round(1000 * pos / self.sample_rate)})
        return {"interrupted_segments": [s.id for s in cut], "muted_frames": muted}

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
        """One protocol message (streaming/channel.py) from the data channel or the WebSocket;
        returns the reply (ack, pong or error), never raises."""
        self.messages["received"] += 1
        try:
            msg = proto.parse(raw, self.channel_limit)
            return await self._handle(msg)
        except proto.ChannelError as exc:
            self.messages["errors"] += 1
            return exc.reply()
        except Exception as exc:  # a bad value (ValueError/MediaError): tell the client, carry on
            self.messages["errors"] += 1
            code = getattr(exc, "code", "bad_value" if isinstance(exc, ValueError) else "internal_error")
            if not isinstance(exc, ValueError) and not hasattr(exc, "code"):
                log.exception("session %s: message failed", self.id)
            return {"type": "error", "code": code, "message": str(exc), "ref": None}

    async def _handle(self, msg: proto.Message) -> dict | None:
        b = msg.body
        if msg.type in ("motion", "expression"):
            try:
                frame = self.set_motion(b["fields"], b.get("t"))
            except ValueError as exc:
                raise proto.ChannelError("bad_motion", str(exc), msg.type) from None
            return {"type": "ack", "ref": msg.type, "frame": frame}
        if msg.type == "audio":
            from model.media import pcm16_to_float
            seg = self.push_pcm(pcm16_to_float(b["pcm16"]), b.get("rate", self.sample_rate), b.get("segment"),
                                bool(b.get("end", False)))
            return {"type": "ack", "ref": "audio", "segment": seg.id}
        if msg.type == "end":
            try:
                seg = self.end_segment(b["segment"])
            except KeyError:
                raise proto.ChannelError("unknown_segment", f"no segment {b['segment']!r}", "end") from None
            return {"type": "ack", "ref": "end", "segment": seg.id}
        if msg.type == "speak":
            seg = await self.speak(b["text"])
            return {"type": "ack", "ref": "speak", "segment": seg.id}
        if msg.type == "interrupt":
            return {"type": "ack", "ref": "interrupt", **self.interrupt()}
        if msg.type == "ping":
            return {"type": "pong", "id": b.get("id"), "t": round(time.time() * 1000, 3)}
        return None

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
                    "position_ms": round(1000 * (seg.end - seg.start) / self.sample_rate)})
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
