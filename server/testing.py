"""A live in-process server and an aiortc client, for end-to-end tests and bench/gateway.py.

`RedisServer` starts a private `redis-server` (free port, temporary directory, no
persistence) for the Redis store tests. `LiveServer` runs uvicorn with `create_app(settings, engine)` on a free port in a
background thread (its own event loop). `AvatarClient` is a minimal aiortc client: it
creates a session with its offer (recvonly video, audio sendrecv or recvonly, a
`driving` data channel), records every received frame with its pts and arrival time,
and collects data-channel messages.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import AudioStreamTrack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`with RedisServer() as r: r.url` -- a throwaway redis-server on a free port (never 6379)."""

    def __init__(self, start_timeout_s: float = 10.0):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed (scripts/setup.sh installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "RedisServer":
        self._dir = tempfile.TemporaryDirectory(prefix="knotstream-redis-")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir.name,
             "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + self.start_timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                self.__exit__()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class LiveServer:
    """`with LiveServer(settings, engine) as srv: srv.url ...` (uvicorn in a thread)."""

    def __init__(self, settings=None, engine=None, start_timeout_s: float = 120.0, store=None):
        import uvicorn

        from server.app import create_app
        from server.serve import KEEP_ALIVE_S
        from server.settings import Settings

        self.settings = (settings or Settings()).model_copy(update={"port": free_port()})
        self.app = create_app(self.settings, engine=engine, store=store)
        # As `knotstream serve`: a connection that never finishes cannot hold up the shutdown.
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.settings.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=10,
                                timeout_keep_alive=KEEP_ALIVE_S)
        self.server = uvicorn.Server(config)
        self.start_timeout_s = start_timeout_s
        self.thread = threading.Thread(target=self.server.run, name="knotstream-test-server", daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        end = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.thread.is_alive() and exc_type is None:
            # Say so here, with where the server's tasks are, rather than let its leftovers
            # (a registered worker, heartbeats) fail the next test.
            raise RuntimeError("test server did not shut down within 30 s; its tasks:\n" + self._task_stacks())

    def _task_stacks(self) -> str:
        import io

        loop = getattr(self.app.state, "loop", None)
        if loop is None:
            return "(no event loop)"
        out = io.StringIO()
        for task in list(asyncio.all_tasks(loop)):  # read from another thread: diagnostics only
            task.print_stack(limit=8, file=out)
        return out.getvalue() or "(none)"

    @property
    def manager(self):
        return self.app.state.manager

    def call(self, coro, timeout_s: float = 30.0):
        """Run a coroutine on the server's event loop (from another thread) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.app.state.loop).result(timeout_s)


class ToneTrack(AudioStreamTrack):
    """An aiortc audio source: a sine in 20 ms frames of 960 samples at 48 kHz, paced in real time."""

    def __init__(self, freq: float = 220.0, amplitude: float = 0.3):
        super().__init__()
        self.freq, self.amplitude, self.n = freq, amplitude, 0

    async def recv(self):
        frame = await super().recv()  # aiortc's paced silence frame: we keep its pts
        t = (self.n * 960 + np.arange(960)) / 48000
        pcm = (self.amplitude * 32767 * np.sin(2 * np.pi * self.freq * t)).astype(np.int16)
        out = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        out.sample_rate, out.pts, out.time_base = 48000, frame.pts, fractions.Fraction(1, 48000)
        self.n += 1
        return out


@dataclass
class Received:
    video: list = field(default_factory=list)   # (pts, arrival, image or None)
    audio: list = field(default_factory=list)   # (pts, arrival, samples or None)
    messages: list = field(default_factory=list)


class AvatarClient:
    """Minimal aiortc client of the sessions API (see the module docstring)."""

    def __init__(self, base_url: str, keep_images: bool = False, keep_audio: bool = False):
        self.base_url = base_url
        self.keep_images = keep_images
        self.keep_audio = keep_audio
        self.got = Received()
        self.pc = None
        self.channel = None
        self.session: dict | None = None
        self._tasks: list[asyncio.Task] = []
        self._opened = asyncio.Event()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.session['token']}"}

    async def connect(self, avatar: str = "ada", options: dict | None = None, mic=None,
                      timeout_s: float = 60.0, ice_servers: list[dict] | None = None,
                      relay_only: bool = False) -> dict:
        """ice_servers / relay_only: the client's own ICE configuration (relay_only = TURN only)."""
        import httpx
        from aiortc import (RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection,
                            RTCSessionDescription)

        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**x) for x in ice_servers or []],
                                                iceTransportPolicy=policy))
        self.pc = pc
        pc.addTransceiver("video", direction="recvonly")
        if mic is not None:
            pc.addTrack(mic)
        else:
            pc.addTransceiver("audio", direction="recvonly")
        self.channel = pc.createDataChannel("driving")
        self.channel.on("open", self._opened.set)
        self.channel.on("message", lambda m: self.got.messages.append((time.monotonic(), json.loads(m))))

        @pc.on("track")
        def on_track(track):
            self._tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s) as http:
            r = await http.post("/v1/sessions", json={"avatar": avatar, "options": options or {},
                                                     "offer": {"sdp": pc.localDescription.sdp, "type": "offer"}})
        if r.status_code != 201:
            raise RuntimeError(f"session refused: {r.status_code} {r.text}")
        self.session = r.json()
        self.response_headers = dict(r.headers)
        await pc.setRemoteDescription(RTCSessionDescription(self.session["answer"]["sdp"], "answer"))
        await asyncio.wait_for(self._opened.wait(), timeout_s)
        return self.session

    async def _read(self, track) -> None:
        from streaming.tracks import frames_of

        async for frame in frames_of(track):
            now = time.monotonic()
            if track.kind == "video":
                img = frame.to_ndarray(format="rgb24") if self.keep_images else None
                self.got.video.append((frame.pts, now, img))
            else:
                pcm = frame.to_ndarray().reshape(-1) if self.keep_audio else None
                self.got.audio.append((frame.pts, now, pcm))

    def send(self, message) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def wait_message(self, pred, timeout_s: float = 10.0) -> dict:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for _, m in self.got.messages:
                if pred(m):
                    return m
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no matching data-channel message; got {[m for _, m in self.got.messages][-5:]}")

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        for t in self._tasks:
            t.cancel()
