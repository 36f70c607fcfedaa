"""A LiveKit Agents voice agent with a knotstream avatar (needs a LiveKit server).

Remote avatar (the engine on a GPU host, which joins the agent's room):

    # on the GPU host
    KNOTSTREAM_API_KEYS=change-me-long-key knotstream-livekit-avatars --host 0.0.0.0 --port 8100
    # beside the agent
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export KNOTSTREAM_AVATAR_URL=http://gpu-host:8100 KNOTSTREAM_API_KEY=change-me-long-key
    python examples/livekit_agent.py dev

In-process avatar (engine and agent in one process): `python examples/livekit_agent.py dev
--in-process`; the agent then publishes the avatar's tracks itself (AvatarRunner on the
agent's own room), as livekit-agents' in-process avatar examples do.

The agent below only greets; `session.say` needs a TTS plugin in `AgentSession(tts=...)`
(and a real agent adds STT, an LLM and VAD). The avatar part is the three lines marked.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from livekit.agents import Agent, AgentSession, JobContext, WorkerOptions, cli  # noqa: E402

IN_PROCESS = "--in-process" in sys.argv
if IN_PROCESS:
    sys.argv.remove("--in-process")


async def remote_avatar(ctx: JobContext, session: AgentSession) -> None:
    from integrations.livekit_plugin import KnotstreamAvatarSession

    avatar = KnotstreamAvatarSession(avatar="ada")          # (1) the avatar service, from the env
    await avatar.start(session, room=ctx.room)               # (2) joins the room, takes the speech


async def in_process_avatar(ctx: JobContext, session: AgentSession) -> None:
    from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

    from integrations.avatar import AvatarHost
    from integrations.livekit_avatar import KnotstreamVideoGenerator, avatar_options
    from server.avatars import avatar_image

    host = AvatarHost.load("tiny")
    avatar = await host.open(avatar_image("ada"), audio_rate=24000)
    audio = QueueAudioOutput(sample_rate=24000)
    session.output.audio = audio
    runner = AvatarRunner(ctx.room, audio_recv=audio, video_gen=KnotstreamVideoGenerator(avatar),
                          options=avatar_options(avatar))
    await runner.start()
    ctx.add_shutdown_callback(runner.aclose)
    ctx.add_shutdown_callback(avatar.aclose)


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = AgentSession()  # add stt=..., llm=..., tts=..., vad=... for a real agent
    await (in_process_avatar if IN_PROCESS else remote_avatar)(ctx, session)
    await session.start(agent=Agent(instructions="You are a friendly avatar."), room=ctx.room)  # (3)
    session.say("Hello! I am a knotstream avatar in a LiveKit room.")


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
