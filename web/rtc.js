// WebRTC side: the session is created first (its answer carries the ICE servers to use,
// with TURN credentials minted for this session), then the client offers (audio sendrecv
// with a mic or recvonly without, video recvonly, a `driving` data channel), gathers ICE
// completely (non-trickle: the server answers once) and posts the offer.

import { createSession, endSession, sendOffer } from "./api.js";

const GATHER_TIMEOUT_MS = 5000;

function gatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    // Without any usable interface gathering can stall; offer what we have after a while.
    const timer = setTimeout(resolve, GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

/** Open the microphone with processing off (speech-like audio is distorted otherwise). */
export async function openMic() {
  return navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
}

/**
 * Connect: returns {pc, channel, session, micTrack}. `onTrack(stream)` gets the remote
 * MediaStream; `onMessage(obj)` every parsed data-channel message.
 */
export async function connect({ avatar, portrait, mic, options, onTrack, onMessage, onState }) {
  const session = await createSession({ avatar, portrait, options });
  const pc = new RTCPeerConnection({ iceServers: session.ice_servers ?? [] });
  pc.addEventListener("connectionstatechange", () => onState?.(pc.connectionState));
  pc.addEventListener("track", (ev) => onTrack?.(ev.streams[0] ?? new MediaStream([ev.track])));
  let micTrack = null;
  if (mic) {
    micTrack = mic.getAudioTracks()[0];
    pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [mic] });
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });
  }
  pc.addTransceiver("video", { direction: "recvonly" });
  const channel = pc.createDataChannel("driving");
  channel.addEventListener("message", (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    onMessage?.(msg);
  });
  const opened = new Promise((resolve, reject) => {
    channel.addEventListener("open", resolve, { once: true });
    channel.addEventListener("error", (ev) => reject(new Error(`data channel failed: ${ev.error?.message ?? "error"}`)), { once: true });
  });
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc);
    await pc.setRemoteDescription(await sendOffer(session, pc.localDescription.sdp));
    return { pc, channel, session, micTrack, opened };
  } catch (err) {
    pc.close();
    await endSession(session);
    throw err;
  }
}
