"""Fit jobs: a personal avatar made from a clip uploaded to the server (the web demo's flow).

`POST /v1/avatars?name=NAME` with the video as the body starts a job; `GET
/v1/avatar-jobs/{id}` reports its stage, progress and loss; when it is done the avatar is
in `/v1/avatars` and sessions can open on it. Bounded: one job at a time (409 fit_busy),
the upload's size (`fit_max_upload_bytes`, 413) and length (`fit_max_video_s`, 422), the
fit's time (`fit_max_minutes`: the avatar is written as fitted by then), the jobs kept in
memory (the last `KEEP_JOBS`).

The fit runs in its own process (`knotstream avatar create`, niced, `fit_threads` torch
threads): hours of CPU work that must neither hold the event loop nor take the sessions'
process down; it reports through its `--progress` file, its last error line becomes the
job's error. The finished file goes to `avatar_dir` and is loaded into the server's
personal avatars (server/personal.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ApiError

log = logging.getLogger("knotstream.fitjobs")

KEEP_JOBS = 8
MIN_VIDEO_S = 2.0        # a shorter clip holds too few training clips to fit anything
POLL_S = 1.0
# Share of the whole job each stage stands for in `progress` (a rough guide for a bar).
# "calibrate" includes choosing the DiT snapshot (model/personal/snapshots.py).
STAGE_SHARES = (("prepare", 0.15), ("decoder", 0.22), ("encode", 0.0), ("dit", 0.5), ("calibrate", 0.13))


@dataclass
class FitJob:
    id: str
    name: str
    state: str = "uploading"   # uploading, running, loading, done, failed, cancelled
    stage: str | None = None
    step: int = 0
    total: int = 0
    loss: float | None = None
    error: str | None = None
    complete: bool | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    folder: Path | None = None
    process: asyncio.subprocess.Process | None = None

    @property
    def active(self) -> bool:
        return self.state in ("uploading", "running", "loading")

    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        done = 0.0
        for stage, share in STAGE_SHARES:
            if stage == self.stage:
                return round(done + share * (self.step / self.total if self.total else 0.0), 3)
            done += share
        return 0.0

    def view(self) -> dict:
        return {"id": self.id, "name": self.name, "state": self.state, "stage": self.stage, "step": self.step,
                "total": self.total, "loss": self.loss, "progress": self.progress(), "error": self.error,
                "complete": self.complete, "location": f"/v1/avatar-jobs/{self.id}",
                "seconds": round((self.finished or time.time()) - self.created, 1)}


class FitJobs:
    def __init__(self, settings, registry):
        self.settings = settings
        self.registry = registry          # server/personal.py PersonalAvatars
        self.jobs: OrderedDict[str, FitJob] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    def get(self, job_id: str) -> FitJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no fit job {job_id!r}")
        return job

    def reserve(self, name: str) -> FitJob:
        """A new job for avatar `name`, before its upload is read: 422 invalid name, 409
        avatar_exists, 409 fit_busy (one job at a time)."""
        from model.personal.avatar_file import NAME_RE

        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(422, "invalid_name", "name: 1-32 of a-z, 0-9, '-', '_', starting with a letter or digit")
        if self.registry.taken(name):
            raise ApiError(409, "avatar_exists", f"an avatar named {name!r} exists already: choose another name")
        busy = next((j for j in self.jobs.values() if j.active), None)
        if busy is not None:
            raise ApiError(409, "fit_busy", f"this server fits one avatar at a time; job {busy.id} ({busy.name!r}) "
                                            f"is {busy.state}", headers={"Retry-After": "60"})
        job = FitJob(secrets.token_hex(8), name)
        finished = [j for j in self.jobs.values() if not j.active]  # oldest first
        for old in finished[:max(0, len(self.jobs) + 1 - KEEP_JOBS)]:
            self.jobs.pop(old.id)
        self.jobs[job.id] = job
        return job

    async def start(self, job: FitJob, chunks) -> None:
        """Read the upload (`chunks`: the request body, bounded by the caller) into the job's
        folder, check the clip, and start the fit. A refusal fails the job and raises."""
        job.folder = Path(tempfile.mkdtemp(prefix=f"knotstream-fit-{job.id}-"))
        video = job.folder / "upload.video"
        try:
            with video.open("wb") as f:
                async for chunk in chunks:
                    f.write(chunk)
            await asyncio.to_thread(self._check_video, video)
        except BaseException as exc:
            self._fail(job, getattr(exc, "message", None) or str(exc) or type(exc).__name__)
            shutil.rmtree(job.folder, ignore_errors=True)
            raise
        job.state = "running"
        task = asyncio.ensure_future(self._run(job, video))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_video(self, path: Path) -> None:
        from model.media import MediaError
        from model.personal import video

        try:
            info = video.probe(path)
        except MediaError as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        limit = self.settings.fit_max_video_s
        if info["seconds"] > limit:
            raise ApiError(422, "video_too_long", f"the clip is {info['seconds']:.0f} s; the server fits clips of "
                                                  f"at most {limit:g} s")
        if info["seconds"] < MIN_VIDEO_S:
            raise ApiError(422, "video_too_short", f"the clip is {info['seconds']:.1f} s; record at least "
                                                   f"{MIN_VIDEO_S:g} s (a minute or two is best)")

    def command(self, job: FitJob, video: Path) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "server.cli", "avatar", "create", "--video", str(video),
               "-o", str(job.folder / f"{job.name}.safetensors"), "--name", job.name,
               "--max-minutes", str(s.fit_max_minutes), "--threads", str(s.fit_threads),
               "--progress", str(job.folder / "progress.json")]
        if s.fit_decoder_steps is not None:
            cmd += ["--decoder-steps", str(s.fit_decoder_steps)]
        if s.fit_dit_steps is not None:
            cmd += ["--dit-steps", str(s.fit_dit_steps)]
        return cmd

    async def _run(self, job: FitJob, video: Path) -> None:
        errors = job.folder / "stderr.log"
        try:
            with errors.open("wb") as err:
                job.process = await asyncio.create_subprocess_exec(
                    *self.command(job, video), stdout=asyncio.subprocess.DEVNULL, stderr=err,
                    preexec_fn=lambda: os.nice(10))  # the sessions' own process keeps the CPU first
                while True:
                    try:
                        await asyncio.wait_for(job.process.wait(), POLL_S)
                        break
                    except asyncio.TimeoutError:
                        self._read_progress(job)
            self._read_progress(job)
            if job.state == "cancelled":
                return
            if job.process.returncode != 0:
                self._fail(job, _last_error(errors) or f"the fit exited with code {job.process.returncode}")
                return
            await self._install(job)
        except Exception as exc:  # the job fails; the server goes on
            log.exception("fit job %s failed", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}")
        finally:
            job.process = None
            shutil.rmtree(job.folder, ignore_errors=True)

    def _read_progress(self, job: FitJob) -> None:
        try:
            state = json.loads((job.folder / "progress.json").read_text())
        except (OSError, ValueError):
            return  # not written yet, or being replaced
        job.stage, job.step, job.total = state.get("stage"), int(state.get("step", 0)), int(state.get("total", 0))
        job.loss, job.complete = state.get("loss"), state.get("complete", job.complete)

    async def _install(self, job: FitJob) -> None:
        job.state = "loading"
        folder = Path(self.settings.avatar_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{job.name}.safetensors"
        shutil.move(str(job.folder / f"{job.name}.safetensors"), str(target))
        await asyncio.to_thread(self.registry.add, target)
        job.state, job.stage, job.finished = "done", "done", time.time()
        log.info("fit job %s: avatar %r ready (%s)", job.id, job.name, target)

    def _fail(self, job: FitJob, message: str) -> None:
        if job.state != "cancelled":
            job.state, job.error, job.finished = "failed", message, time.time()
            log.warning("fit job %s (%r) failed: %s", job.id, job.name, message)

    async def cancel(self, job: FitJob) -> None:
        if not job.active:
            return
        job.state, job.finished = "cancelled", time.time()
        if job.process is not None and job.process.returncode is None:
            job.process.kill()

    async def close(self) -> None:
        """Shutdown: stop a running fit (its checkpoints go with its folder)."""
        for job in list(self.jobs.values()):
            await self.cancel(job)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)


def _last_error(path: Path) -> str | None:
    """The command's error line (`knotstream avatar: error: ...`) from its stderr."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return None
    errors = [ln for ln in lines if ": error: " in ln]
    return errors[-1].split(": error: ", 1)[1] if errors else None
