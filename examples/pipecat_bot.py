"""A Pipecat bot with a knotstream avatar, on Pipecat's own WebRTC transport (SmallWebRTC).

    .venv/bin/pip install -e '.[pipecat]'
    .venv/bin/python examples/pipecat_bot.py                    # engine in this process
    .venv/bin/python examples/pipecat_bot.py --remote http://gpu-host:8000   # a knotstream server

Open http://127.0.0.1:7860/, press Connect: the avatar greets you; type a line and press
Say. The pipeline is `transport.input() -> TTS -> KnotstreamVideoService ->
transport.output()`; a real agent puts STT and an LLM before the TTS. The TTS here is
espeak-ng (offline, from Debian), wrapped as a Pipecat TTSService, so the example runs
without any account or download.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from pipecat.frames.frames import TTSSpeakFrame  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.services.tts_service import TTSService, TTSSettings  # noqa: E402
from pipecat.transports.base_transport import TransportParams  # noqa: E402
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from integrations.pipecat_service import KnotstreamVideoService, avatar_transport_params  # noqa: E402

GREETING = "Hello! I am a knotstream avatar, speaking through Pipecat."

PAGE = """<!doctype html>
<meta charset="utf-8"><title>knotstream + Pipecat</title>
<style>body{font:16px sans-serif;margin:2em} video{width:384px;height:384px;background:#222}</style>
<h1>knotstream + Pipecat</h1>
<video id="video" autoplay playsinline></video><br>
<button id="connect">Connect</button>
<input id="text" size="40" value="Nice to meet you."><button id="say" disabled>Say</button>
<pre id="log"></pre>
<script type="module">
const log = m => document.getElementById('log').textContent += m + '\\n';
window.bot = {};
document.getElementById('connect').onclick = async () => {
  const pc = new RTCPeerConnection();
  window.bot.pc = pc;
  // SmallWebRTC sends its audio on the first transceiver and its video on the second.
  pc.addTransceiver('audio', {direction: 'recvonly'});
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.ontrack = e => { const v = document.getElementById('video');
    v.srcObject = v.srcObject || new MediaStream(); v.srcObject.addTrack(e.track); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
    else pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); });
  const res = await fetch('/api/offer', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: 'offer'})});
  const answer = await res.json();
  window.bot.pcId = answer.pc_id;
  await pc.setRemoteDescription(answer);
  document.getElementById('say').disabled = false;
  log('connected');
};
document.getElementById('say').onclick = () => fetch('/api/say', {method: 'POST',
  headers: {'Content-Type': 'application/json'},
  body: JSON.stringify({pc_id: window.bot.pcId, text: document.getElementById('text').value})});
</script>
"""


class EspeakTTSService(TTSService):
    """espeak-ng as a Pipecat TTS service (streaming.tts): synthesised whole, sent in 20 ms frames."""

    def __init__(self, **kwargs):
        super().__init__(push_start_frame=True, push_stop_frames=True,
                         settings=TTSSettings(model=None, voice=None, language=None), **kwargs)

    def can_generate_metrics(self) -> bool:
        return False

    async def run_tts(self, text: str, context_id: str):
        from streaming.tts import synthesize

        pcm = (np.clip(await synthesize(text, self.sample_rate), -1, 1) * 32767).astype(np.int16).tobytes()

        async def chunks():
            step = self.sample_rate // 50 * 2
            for i in range(0, len(pcm), step):
                yield pcm[i:i + step]

        async for frame in self._stream_audio_frames_from_iterator(chunks(), in_sample_rate=self.sample_rate,
                                                                   context_id=context_id):
            yield frame


def create_app(make_avatar, width: int, height: int, fps: int):
    """The page, the SmallWebRTC signalling route and a 'say' route; one bot per connection."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler

    app = FastAPI()
    handler = SmallWebRTCRequestHandler()
    bots: dict[str, PipelineWorker] = {}
    tasks: set[asyncio.Task] = set()

    async def run_bot(connection) -> None:
        params = TransportParams(**avatar_transport_params(width, height, fps, audio_out_sample_rate=24000))
        transport = SmallWebRTCTransport(webrtc_connection=connection, params=params)
        pipeline = Pipeline([transport.input(), EspeakTTSService(), make_avatar(), transport.output()])
        worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=24000))
        bots[connection.pc_id] = worker

        @transport.event_handler("on_client_connected")
        async def greet(_, __):
            await worker.queue_frame(TTSSpeakFrame(GREETING))

        @transport.event_handler("on_client_disconnected")
        async def bye(_, __):
            bots.pop(connection.pc_id, None)
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        task = asyncio.create_task(runner.run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE)

    @app.post("/api/offer")
    async def offer(body: dict):
        return await handler.handle_web_request(SmallWebRTCRequest.from_dict(body), run_bot)

    @app.post("/api/say")
    async def say(body: dict):
        worker = bots.get(str(body.get("pc_id")))
        text = str(body.get("text", "")).strip()[:500]
        if worker is None or not text:
            return JSONResponse({"error": {"code": "bad_request", "message": "unknown pc_id or empty text"}}, 400)
        await worker.queue_frame(TTSSpeakFrame(text))
        return {"queued": text}

    app.state.bots = bots
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--remote", help="a knotstream server URL (default: the engine in this process)")
    p.add_argument("--avatar", default="ada")
    args = p.parse_args(argv)
    import uvicorn

    from server.avatars import avatar_image

    if args.remote:
        def make_avatar():
            return KnotstreamVideoService.remote(args.remote, avatar=args.avatar)
        size = (128, 128, 25)  # the bundled model's; the transport scales other sizes
    else:
        from integrations.avatar import AvatarHost

        host = AvatarHost.load("tiny")

        def make_avatar():
            return KnotstreamVideoService.in_process(host, avatar_image(args.avatar))
        size = (host.width, host.height, host.fps)
    uvicorn.run(create_app(make_avatar, *size), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
