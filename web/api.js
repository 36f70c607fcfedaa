// HTTP side of the demo: the sessions API (server/app.py). Every failure becomes an
// Error whose message is the server's JSON `message` (with its `code`), so the page
// can show it as is.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(`${message} (${code}, HTTP ${status})`);
    this.status = status;
    this.code = code;
  }
}

async function check(response) {
  if (response.ok) return response;
  let code = "http_error", message = response.statusText || "request failed";
  try {
    const body = await response.json();
    code = body.code ?? body.error?.code ?? code;
    message = body.message ?? body.error?.message ?? body.detail ?? message;
  } catch { /* not JSON: keep the status text */ }
  throw new ApiError(response.status, code, typeof message === "string" ? message : JSON.stringify(message));
}

export async function listAvatars() {
  const r = await check(await fetch("/v1/avatars"));
  return (await r.json()).avatars;
}

export const avatarUrl = (name) => `/v1/avatars/${encodeURIComponent(name)}.png`;

/** Start fitting a personal avatar to a video (server/fitjobs.py); returns the job. */
export async function createAvatar(file, name) {
  const key = apiKey();
  const r = await check(await fetch(`/v1/avatars?name=${encodeURIComponent(name)}`, {
    method: "POST", body: file,
    headers: { "Content-Type": file.type || "application/octet-stream", ...(key ? { "X-API-Key": key } : {}) },
  }));
  return r.json();
}

/** A fit job as it is now: state, stage, step/total, loss, progress (0-1), error. */
export async function fitJob(location) {
  const r = await check(await fetch(location));
  return r.json();
}

/**
 * Create a session (the offer follows with `sendOffer`, once the page knows the session's ICE
 * servers: TURN credentials are minted per session). `portrait` (a File) wins over `avatar`.
 */
export async function createSession({ avatar, portrait, options = {} }) {
  const form = new FormData();
  if (portrait) form.append("image", portrait);
  else form.append("avatar", avatar);
  form.append("options", JSON.stringify(options));
  // Servers reachable beyond loopback need an API key to create sessions (README: auth).
  const key = apiKey();
  const headers = key ? { "X-API-Key": key } : {};
  const r = await check(await fetch("/v1/sessions", { method: "POST", body: form, headers }));
  return r.json();
}

/** Send the SDP offer of a session made without one; returns the answer {type, sdp}. */
export async function sendOffer(session, offerSdp) {
  const r = await check(await fetch(`${session.location}/offer`, {
    method: "POST", body: JSON.stringify({ type: "offer", sdp: offerSdp }),
    headers: { ...auth(session), "Content-Type": "application/json" },
  }));
  return (await r.json()).answer;
}

const KEY_STORE = "knotstream.apiKey";
export const apiKey = () => localStorage.getItem(KEY_STORE) || "";
export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

function auth(session) {
  return { Authorization: `Bearer ${session.token}` };
}

/** Push an audio file (wav/ogg/mp3/flac) as one speech segment. */
export async function pushAudio(session, file) {
  const r = await check(await fetch(`${session.location}/audio`, {
    method: "POST", body: file, headers: { ...auth(session), "Content-Type": file.type || "audio/wav" },
  }));
  return r.json();
}

export async function speak(session, text) {
  const r = await check(await fetch(`${session.location}/speak`, {
    method: "POST", body: JSON.stringify({ text }),
    headers: { ...auth(session), "Content-Type": "application/json" },
  }));
  return r.json();
}

export async function interrupt(session) {
  const r = await check(await fetch(`${session.location}/interrupt`, { method: "POST", headers: auth(session) }));
  return r.json();
}

export async function status(session) {
  const r = await check(await fetch(session.location, { headers: auth(session) }));
  return r.json();
}

export async function endSession(session) {
  await fetch(session.location, { method: "DELETE", headers: auth(session) }).catch(() => {});
}
