"""LiveKit Agents, the agent's side: a knotstream avatar joins the agent's room.

    avatar = KnotstreamAvatarSession(service_url="http://gpu-host:8100", avatar="ada")
    await avatar.start(session, room=ctx.room)
    await session.start(agent=MyAgent(), room=ctx.room)

`start` mints a LiveKit token for the avatar (kind agent, allowed to publish on behalf of
this agent through `lk.publish_on_behalf`), asks the avatar service
(integrations/livekit_dispatch.py) to send an avatar into the room, and routes the
session's speech to it: `DataStreamAudioOutput` sends each utterance as an `lk.audio_stream`
byte stream, asks `lk.clear_buffer` on interruption (and stops waiting after
`clear_buffer_timeout` should the avatar never answer), and hears `lk.playback_started` /
`lk.playback_finished` back. LiveKit credentials come from the arguments or `LIVEKIT_URL`,
`LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET`.
"""

from __future__ import annotations

import os

from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import AvatarSession, DataStreamAudioOutput


class KnotstreamAvatarSession(AvatarSession):
    """A knotstream avatar for an AgentSession (see the module docstring)."""

    def __init__(self, *, service_url: str | None = None, api_key: str | None = None, avatar: str = "ada",
                 avatar_identity: str = "knotstream-avatar", audio_rate: int = 24000,
                 clear_buffer_timeout: float = 2.0, http_client=None):
        super().__init__()
        self._service_url = service_url or os.environ.get("KNOTSTREAM_AVATAR_URL", "http://127.0.0.1:8100")
        self._api_key = api_key or os.environ.get("KNOTSTREAM_API_KEY")
        self._avatar = avatar
        self._identity = avatar_identity
        self._audio_rate = audio_rate
        self._clear_buffer_timeout = clear_buffer_timeout
        self._http = http_client
        self.avatar_id: str | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "knotstream"

    def mint_token(self, room_name: str, agent_identity: str, api_key: str, api_secret: str) -> str:
        """The avatar's room token: kind agent, publishing on behalf of `agent_identity`."""
        return (api.AccessToken(api_key=api_key, api_secret=api_secret)
                .with_kind("agent")
                .with_identity(self._identity)
                .with_name(self._identity)
                .with_grants(api.VideoGrants(room_join=True, room=room_name))
                .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
                .to_jwt())

    async def start(self, agent_session, room: rtc.Room, *, livekit_url: str | None = None,
                    livekit_api_key: str | None = None, livekit_api_secret: str | None = None) -> None:
        url = livekit_url or os.environ.get("LIVEKIT_URL")
        key = livekit_api_key or os.environ.get("LIVEKIT_API_KEY")
        secret = livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET")
        if not (url and key and secret):
            raise ValueError("livekit_url, livekit_api_key and livekit_api_secret are needed "
                             "(arguments or LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET)")
        agent_identity = room.local_participant.identity
        body = {"livekit_url": url, "livekit_token": self.mint_token(room.name, agent_identity, key, secret),
                "agent_identity": agent_identity, "avatar": self._avatar, "audio_rate": self._audio_rate}
        r = await self._request("POST", "/v1/livekit/avatars", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"the knotstream avatar service refused ({r.status_code}): {r.text[:300]}")
        self.avatar_id = r.json()["id"]
        await super().start(agent_session, room)
        agent_session.output.replace_audio_tail(DataStreamAudioOutput(
            room, destination_identity=self._identity, sample_rate=self._audio_rate,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO, clear_buffer_timeout=self._clear_buffer_timeout,
            wait_playback_start=True))

    async def aclose(self) -> None:
        if self.avatar_id is not None:
            try:
                await self._request("DELETE", f"/v1/livekit/avatars/{self.avatar_id}")
            finally:
                self.avatar_id = None
        await super().aclose()

    async def _request(self, method: str, path: str, **kwargs):
        import httpx

        headers = {"X-API-Key": self._api_key} if self._api_key else {}
        if self._http is not None:
            return await self._http.request(method, self._service_url + path, headers=headers, **kwargs)
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.request(method, self._service_url + path, headers=headers, **kwargs)
