// "Your own avatar": upload a clip, follow the fit job's progress (server/fitjobs.py), and
// show the avatar in the list once it is ready.

import * as api from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

function describe(job) {
  const loss = job.loss == null ? "" : `, loss ${job.loss.toFixed(4)}`;
  const step = job.total ? ` ${job.step}/${job.total}` : "";
  return `${job.name}: ${job.state}${job.stage ? ` (${job.stage}${step}${loss})` : ""}`;
}

async function follow(job, { log, showError, onAvatar }) {
  const bar = $("fit-progress");
  bar.hidden = false;
  while (["uploading", "running", "loading"].includes(job.state)) {
    bar.value = job.progress;
    $("fit-status").textContent = describe(job);
    await new Promise((r) => setTimeout(r, POLL_MS));
    job = await api.fitJob(job.location);
  }
  bar.value = job.progress;
  $("fit-status").textContent = describe(job);
  if (job.state === "done") {
    log(`avatar ${job.name} is ready${job.complete ? "" : " (the time limit cut its fit short)"}`);
    onAvatar(job.name);
  } else if (job.state === "failed") {
    showError(`fitting ${job.name} failed: ${job.error}`);
  }
}

export function initFit(hooks) {
  $("fit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = $("fit-video").files[0];
    const name = $("fit-name").value.trim();
    if (!file || !name) return;
    $("fit-start").disabled = true;
    $("fit-status").textContent = `uploading ${(file.size / 1e6).toFixed(1)} MB...`;
    try {
      await follow(await api.createAvatar(file, name), hooks);
    } catch (err) {
      hooks.showError(err);
      $("fit-status").textContent = "";
    } finally {
      $("fit-start").disabled = false;
    }
  });
}
