"""An in-memory stand-in for the LiveKit server, for the integration tests.

No LiveKit server binary is installable here, and `rtc.Room` needs one to connect. What
livekit-agents' avatar classes use of a room is small: participants by identity, RPC
(`register_rpc_method` / `perform_rpc`), byte streams (`stream_bytes` /
`register_byte_stream_handler`), track publication and a few events. `MemoryRoom` gives
exactly that, and `link()` joins two rooms as the two participants' views of one room, so
the framework's own sender (`DataStreamAudioOutput`), receiver (`DataStreamAudioReceiver`)
and runner (`AvatarRunner`, with its real A/V synchroniser and native audio/video sources)
run unchanged against each other. Media is not carried between the rooms.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from types import SimpleNamespace

from livekit import rtc

_ids = itertools.count(1)


class _Reader:
    def __init__(self, name: str, attributes: dict):
        self.info = SimpleNamespace(stream_id=name, attributes=dict(attributes), name=name)
        self._queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._queue.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _Writer:
    def __init__(self, reader: _Reader):
        self._reader = reader

    async def write(self, data: bytes) -> None:
        self._reader._queue.put_nowait(bytes(data))

    async def aclose(self, **_) -> None:
        self._reader._queue.put_nowait(None)


class _Participant:
    def __init__(self, room: "MemoryRoom", identity: str):
        self.room = room
        self.identity = identity
        self.sid = f"PA_{identity}"
        self.kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.attributes: dict = {}
        self.track_publications: dict = {}
        self._rpc_handlers: dict = {}
        self.rpc_calls: list[tuple[str, str]] = []   # (method, payload) performed, for tests

    def register_rpc_method(self, method: str, handler=None):
        self._rpc_handlers[method] = handler
        return handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None) -> str:
        self.rpc_calls.append((method, payload))
        peer = self.room.peers[destination_identity]
        handler = peer.local_participant._rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, f"no handler for {method}")
        data = rtc.RpcInvocationData(f"rpc-{next(_ids)}", self.identity, payload, response_timeout or 15.0, method)
        result = handler(data)
        return await result if inspect.isawaitable(result) else result

    async def stream_bytes(self, *, name: str, topic: str, destination_identities: list[str] | None = None,
                           attributes: dict | None = None, **_) -> _Writer:
        reader = _Reader(name, attributes or {})
        for identity in destination_identities or list(self.room.peers):
            handler = self.room.peers[identity].stream_handlers.get(topic)
            if handler is not None:
                handler(reader, self.identity)
        return _Writer(reader)

    async def publish_track(self, track, options=None):
        async def subscribed():
            return None

        pub = SimpleNamespace(sid=f"TR_{next(_ids)}", kind=track.kind, track=track, subscribed=True,
                              name=track.name, wait_for_subscription=subscribed)
        self.track_publications[pub.sid] = pub
        self.room.emit("local_track_published", pub, track)
        for peer in self.room.peers.values():
            remote = peer.remote_participants[self.identity]
            remote.track_publications[pub.sid] = pub
            peer.emit("track_published", pub, remote)
        return pub


class MemoryRoom(rtc.EventEmitter):
    """One participant's view of an in-memory room (see the module docstring)."""

    def __init__(self, identity: str, name: str = "memory-room"):
        super().__init__()
        self.name = name
        self.local_participant = _Participant(self, identity)
        self.remote_participants: dict[str, _Participant] = {}
        self.peers: dict[str, "MemoryRoom"] = {}
        self.stream_handlers: dict = {}

    def isconnected(self) -> bool:
        return True

    def register_byte_stream_handler(self, topic: str, handler) -> None:
        self.stream_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self.stream_handlers.pop(topic, None)


def link(a: MemoryRoom, b: MemoryRoom) -> None:
    """Make `a` and `b` the two participants of one room."""
    for x, y in ((a, b), (b, a)):
        x.peers[y.local_participant.identity] = y
        x.remote_participants[y.local_participant.identity] = _Participant(x, y.local_participant.identity)
