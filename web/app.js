// The demo page: wires the avatar picker, connection, speech inputs, motion sliders and
// live stats together. `window.knot` exposes the live connection for the browser test.

import * as api from "./api.js";
import { connect, openMic } from "./rtc.js";
import { initFit } from "./fit.js";

const $ = (id) => document.getElementById(id);
const SLIDERS = [  // field, min, max (model/driving.py MOTION_RANGES)
  ["yaw", -1.2, 1.2], ["pitch", -1, 1], ["roll", -1, 1],
  ["smile", 0, 1], ["brow", 0, 1], ["blink", 0, 1],
];
const MOTION_SEND_MS = 40;  // at most one motion message per frame at 25 fps

const state = { conn: null, fps: 25, pings: new Map(), pingId: 0, lastStats: null, statsTimer: null };
window.knot = state;

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 50) $("log").lastChild.remove();
}

function showError(err) {
  const text = err instanceof Error ? err.message : String(err);
  $("error").textContent = text;
  $("error").hidden = false;
  log(`error: ${text}`);
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

/** The session's notices (server/notices.py): what to expect from what was sent. */
function showNotices(notices) {
  const box = $("notices");
  box.replaceChildren(...notices.map((n) => {
    const p = document.createElement("p");
    p.className = "notice";
    p.dataset.code = n.code;
    p.textContent = n.message;
    return p;
  }));
  box.hidden = notices.length === 0;
  for (const n of notices) log(`notice (${n.code}): ${n.message}`);
}

function setConnected(on) {
  $("connect").disabled = on;
  $("disconnect").disabled = !on;
  for (const id of ["wav", "text", "speak", "interrupt"]) $(id).disabled = !on;
  $("mic").disabled = !(on && state.conn?.micTrack);
}

// ----- avatar picker ------------------------------------------------------------------

/** The avatar list (bundled and personal); `select` is checked, else the first. */
async function loadAvatars(select) {
  try {
    const names = await api.listAvatars();
    $("avatars").replaceChildren();
    names.forEach((name, i) => {
      const label = document.createElement("label");
      const checked = select ? name === select : i === 0;
      label.innerHTML = `<input type="radio" name="avatar" value="${name}"${checked ? " checked" : ""}>` +
        `<img alt="${name}" src="${api.avatarUrl(name)}"><span>${name}</span>`;
      $("avatars").append(label);
    });
    if (!names.length) log("no bundled avatars: upload a portrait");
  } catch (err) { showError(err); }
}

function chosenAvatar() {
  return document.querySelector('input[name="avatar"]:checked')?.value;
}

// ----- connection ---------------------------------------------------------------------

function onMessage(msg) {
  if (msg.type === "pong") {
    const p = state.pings.get(msg.id);
    if (p) {
      state.pings.delete(msg.id);
      const rtt = performance.now() - p.sent;
      $("stat-rtt").textContent = `${rtt.toFixed(1)} ms`;
      p.resolve({ ...msg, rtt });
    }
  } else if (msg.type === "ack" && msg.ref === "motion") {
    state.lastMotionAck = { frame: msg.frame, at: performance.now() };
  } else if (msg.type === "error") {
    showError(`${msg.message} (${msg.code})`);
  } else if (msg.type === "closed") {
    log(`session closed: ${msg.reason}`);
  } else if (msg.type === "playback_started" || msg.type === "playback_finished") {
    log(`${msg.type} ${msg.segment}${msg.interrupted ? " (interrupted)" : ""}`);
  }
}

/** Ping over the data channel; resolves with the pong (and its round-trip time in ms). */
state.ping = function ping(timeoutMs = 5000) {
  const id = ++state.pingId;
  return new Promise((resolve, reject) => {
    state.pings.set(id, { sent: performance.now(), resolve });
    state.conn.channel.send(JSON.stringify({ type: "ping", id }));
    setTimeout(() => { if (state.pings.delete(id)) reject(new Error(`no pong for ping ${id}`)); }, timeoutMs);
  });
};

async function doConnect() {
  clearError();
  showNotices([]);
  $("connect").disabled = true;
  $("stat-state").textContent = "connecting";
  try {
    let mic = null;
    if ($("use-mic").checked) {
      try { mic = await openMic(); } catch (err) { log(`no microphone (${err.message}); connecting without`); }
    }
    const portrait = $("portrait").files[0];
    state.conn = await connect({
      avatar: chosenAvatar(), portrait, mic, onMessage,
      onTrack: (stream) => { $("video").srcObject = stream; },
      onState: (s) => {
        $("stat-state").textContent = s;
        if (s === "failed") showError("WebRTC connection failed (no ICE path to the server?)");
      },
    });
    state.conn.mic = mic;
    const { session } = state.conn;
    state.fps = session.video.fps;
    $("stat-model").textContent = `${session.model.name} ${session.video.width}x${session.video.height} ` +
      `${session.video.fps} fps ${session.video.codec}${session.model.trained ? "" : " (untrained)"}`;
    showFrameSize(session.video);
    log(`session ${session.id}`);
    showNotices(session.notices ?? []);
    await state.conn.opened;
    setConnected(true);
    state.statsTimer = setInterval(updateStats, 1000);
  } catch (err) {
    showError(err);
    $("stat-state").textContent = "idle";
    state.conn = null;
    setConnected(false);
    if (err instanceof api.ApiError && err.status === 401) {
      const key = window.prompt("This server needs an API key to create sessions (ask its operator):", api.apiKey());
      if (key !== null) {
        api.setApiKey(key.trim());
        log("API key saved in this browser; press Connect again");
      }
    }
  }
}

async function doDisconnect() {
  const conn = state.conn;
  if (!conn) return;
  clearInterval(state.statsTimer);
  state.conn = null;
  await api.endSession(conn.session);
  conn.pc.close();
  conn.mic?.getTracks().forEach((t) => t.stop());
  $("video").srcObject = null;
  $("stat-state").textContent = "closed";
  setConnected(false);
}

// ----- stats --------------------------------------------------------------------------

async function updateStats() {
  const conn = state.conn;
  if (!conn) return;
  const report = await conn.pc.getStats();
  let video = null;
  report.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") video = s; });
  if (video) {
    const prev = state.lastStats;
    const fps = video.framesPerSecond ??
      (prev ? (video.framesDecoded - prev.framesDecoded) / ((video.timestamp - prev.timestamp) / 1000) : NaN);
    $("stat-fps").textContent = Number.isFinite(fps) ? fps.toFixed(1) : "-";
    $("stat-frames").textContent = String(video.framesDecoded ?? 0);
    if (video.jitterBufferEmittedCount) {
      const ms = 1000 * video.jitterBufferDelay / video.jitterBufferEmittedCount;
      $("stat-jitter").textContent = `${ms.toFixed(0)} ms`;
    }
    state.lastStats = video;
  }
  if (conn.channel.readyState === "open") state.ping().catch(() => {});
  // Motion-to-frame latency, estimated: frames between the acked target frame and the
  // frame the server is releasing now, plus half the data-channel round trip.
  if (state.lastMotionAck) {
    try {
      const st = await api.status(conn.session);
      const ahead = state.lastMotionAck.frame - (st.released_frames ?? NaN);
      const rtt = parseFloat($("stat-rtt").textContent) || 0;
      const ms = Math.max(0, ahead) * 1000 / state.fps + rtt / 2;
      if (Number.isFinite(ms)) $("stat-latency").textContent = `~${ms.toFixed(0)} ms (estimate)`;
    } catch { /* status is best effort */ }
  }
}

// ----- speech and motion --------------------------------------------------------------

async function uploadWav() {
  const file = $("wav").files[0];
  if (!file || !state.conn) return;
  clearError();
  try {
    const r = await api.pushAudio(state.conn.session, file);
    log(`queued ${r.seconds} s of speech (${r.segment})`);
  } catch (err) { showError(err); }
  $("wav").value = "";
}

async function speakText(ev) {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text || !state.conn) return;
  clearError();
  try {
    const r = await api.speak(state.conn.session, text);
    log(`speaking ${r.seconds} s (${r.segment})`);
    $("text").value = "";
  } catch (err) { showError(err); }
}

const pendingMotion = {};
let motionTimer = null;

function sendMotion(fields) {
  Object.assign(pendingMotion, fields);
  if (motionTimer) return;
  // Coalesce slider drags into at most one message per frame.
  motionTimer = setTimeout(() => {
    motionTimer = null;
    const conn = state.conn;
    if (conn?.channel.readyState !== "open") return;
    conn.channel.send(JSON.stringify({ type: "motion", fields: { ...pendingMotion }, t: Date.now() }));
    for (const k of Object.keys(pendingMotion)) delete pendingMotion[k];
  }, MOTION_SEND_MS);
}

function buildSliders() {
  for (const [field, min, max] of SLIDERS) {
    const label = document.createElement("label");
    label.innerHTML = `<span>${field}</span><input type="range" min="${min}" max="${max}" step="0.01" ` +
      `value="${Math.max(min, 0)}" data-field="${field}"><output>-</output>`;
    const input = label.querySelector("input");
    input.addEventListener("input", () => {
      label.querySelector("output").textContent = Number(input.value).toFixed(2);
      sendMotion({ [field]: Number(input.value) });
    });
    $("sliders").append(label);
  }
  $("reset-motion").addEventListener("click", () => {
    const cleared = {};
    for (const input of $("sliders").querySelectorAll("input")) {
      input.value = Math.max(Number(input.min), 0);
      input.nextElementSibling.textContent = "-";
      cleared[input.dataset.field] = null;  // null clears the field: back to the model's own motion
    }
    sendMotion(cleared);
  });
}

// ----- wiring -------------------------------------------------------------------------

$("connect").addEventListener("click", doConnect);
$("disconnect").addEventListener("click", doDisconnect);
$("mute").addEventListener("click", () => {
  const v = $("video");
  v.muted = !v.muted;
  $("mute").textContent = v.muted ? "Unmute" : "Mute";
});
$("mic").addEventListener("click", () => {
  const t = state.conn?.micTrack;
  if (!t) return;
  t.enabled = !t.enabled;
  $("mic").textContent = t.enabled ? "Mic off" : "Mic on";
});
$("interrupt").addEventListener("click", async () => {
  try { await api.interrupt(state.conn.session); log("interrupted"); } catch (err) { showError(err); }
});
$("wav").addEventListener("change", uploadWav);
$("speak-form").addEventListener("submit", speakText);
window.addEventListener("beforeunload", () => { if (state.conn) api.endSession(state.conn.session); });
buildSliders();
loadAvatars();
initFit({ log, showError, onAvatar: (name) => loadAvatars(name) });

// The video element takes the model's frame size and aspect: a 512x512 photoreal model
// shows pixel for pixel, a small one is scaled up to the same width, 832x480 is not squared.
function showFrameSize({ width, height }) {
  const video = $("video");
  video.width = width;
  video.height = height;
  video.style.aspectRatio = `${width} / ${height}`;
  video.style.maxWidth = `${Math.max(width, 512)}px`;
  video.title = `${width}x${height}`;
}
