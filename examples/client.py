"""A Python client of knotstream: create a session, speak a wav, record the avatar to MP4.

    python examples/client.py --url http://127.0.0.1:8000 --avatar ada speech.wav out.mp4
    python examples/client.py --image me.jpg --via push speech.wav out.mp4

`--via mic` (default) sends the wav as the microphone track, paced in real time, as a
browser would; `--via push` uploads it to `POST /v1/sessions/{id}/audio` instead and
sends no microphone. In mic mode the session is created with `echo_mic` so the avatar's
audio track plays the speech back (it carries only pushed speech otherwise), and the MP4
has sound either way. The returned video and audio tracks are recorded with
aiortc's MediaRecorder until the speech has played (plus `--tail` seconds), then the
session is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import wave
from pathlib import Path


def wav_seconds(path: Path) -> float:
    """Duration of a PCM wav in seconds (for other formats pass --seconds)."""
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


async def run(url: str, wav: Path, out: Path, avatar: str | None = "ada", image: Path | None = None,
              via: str = "mic", seconds: float | None = None, tail_s: float = 1.5,
              timeout_s: float = 60.0, api_key: str | None = None) -> dict:
    """Create a session, send `wav` (`via` "mic" or "push"), record to `out` (MP4).

    Returns the session JSON with `recorded_seconds` added. Raises RuntimeError with
    the server's error message when the session is refused.
    """
    import httpx
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaPlayer, MediaRecorder

    if via not in ("mic", "push"):
        raise ValueError(f"via must be 'mic' or 'push', got {via!r}")
    duration = seconds if seconds is not None else wav_seconds(wav)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    recorder = MediaRecorder(str(out))
    player = MediaPlayer(str(wav)) if via == "mic" else None
    if player is not None:
        pc.addTransceiver(player.audio, direction="sendrecv")
    else:
        pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("driving")
    opened = asyncio.Event()
    channel.on("open", opened.set)
    channel.on("message", lambda m: print("server:", m, file=sys.stderr)
               if json.loads(m).get("type") in ("error", "closed", "playback_started", "playback_finished")
               else None)
    pc.on("track", recorder.addTrack)

    # Non-trickle: aiortc gathers every candidate inside setLocalDescription.
    await pc.setLocalDescription(await pc.createOffer())
    options = {"echo_mic": via == "mic"}
    offer = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"})
    key = {"X-API-Key": api_key} if api_key else {}  # servers beyond loopback need one to create sessions
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:
        if image is not None:
            files = {"image": (image.name, image.read_bytes())}
            r = await http.post("/v1/sessions", files=files, headers=key,
                                data={"offer": offer, "options": json.dumps(options)})
        else:
            r = await http.post("/v1/sessions", headers=key, json={"avatar": avatar, "options": options,
                                                                   "offer": json.loads(offer)})
        if r.status_code != 201:
            await pc.close()
            raise RuntimeError(f"session refused ({r.status_code}): {_message(r)}")
        session = r.json()
        auth = {"Authorization": f"Bearer {session['token']}"}
        try:
            await pc.setRemoteDescription(RTCSessionDescription(**session["answer"]))
            await asyncio.wait_for(opened.wait(), timeout_s)
            await recorder.start()
            if via == "push":
                r = await http.post(f"{session['location']}/audio", content=wav.read_bytes(),
                                    headers={**auth, "Content-Type": "audio/wav"})
                if r.status_code != 202:
                    raise RuntimeError(f"audio refused ({r.status_code}): {_message(r)}")
            # The answer's audio plays the speech delayed to match the lips; wait it out.
            recorded = duration + tail_s
            await asyncio.sleep(recorded)
        finally:
            await recorder.stop()
            await http.delete(session["location"], headers=auth)
            await pc.close()
    return {**session, "recorded_seconds": recorded}


def _message(r) -> str:
    try:
        err = r.json()["error"]
        return f"{err['message']} ({err['code']})"
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wav", type=Path, help="speech to send (wav; other formats need --seconds)")
    p.add_argument("out", type=Path, help="MP4 to record the avatar's video and audio into")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--avatar", default="ada", help="bundled avatar name (GET /v1/avatars)")
    p.add_argument("--image", type=Path, help="upload this portrait instead of a bundled avatar")
    p.add_argument("--via", choices=("mic", "push"), default="mic")
    p.add_argument("--seconds", type=float, help="how long the speech is (default: the wav's length)")
    p.add_argument("--tail", type=float, default=1.5, help="seconds to keep recording after the speech")
    p.add_argument("--api-key", default=os.environ.get("KNOTSTREAM_API_KEY"),
                   help="API key for creating sessions (default: $KNOTSTREAM_API_KEY; not needed on loopback)")
    p.add_argument("--loopback-ice", action="store_true",
                   help="offer 127.0.0.1 candidates (machines with only a loopback interface)")
    args = p.parse_args(argv)
    if args.loopback_ice:
        from streaming.ice import allow_loopback
        allow_loopback()
    try:
        info = asyncio.run(run(args.url, args.wav, args.out, avatar=args.avatar, image=args.image,
                               via=args.via, seconds=args.seconds, tail_s=args.tail, api_key=args.api_key))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"session {info['id']}: recorded {info['recorded_seconds']:.1f} s to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
