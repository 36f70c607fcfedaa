"""Avatar routes: the bundled and personal avatars, their portraits, and fit jobs.

GET  /v1/avatars                 {"avatars": [every name], "personal": [{name, portrait, fit}]}
GET  /v1/avatars/{name}.png      the portrait of a bundled or personal avatar
POST /v1/avatars?name=NAME       body: a video of the person (any container FFmpeg reads);
                                 202 {job}: a fit job (server/fitjobs.py); API key as for sessions
GET  /v1/avatar-jobs/{id}        the job: state, stage, step/total, loss, progress, error
DELETE /v1/avatar-jobs/{id}      cancel it (API key)
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse

from server import avatars, bodies
from server.errors import ApiError


def install(app: FastAPI) -> None:
    settings, api_keys = app.state.settings, app.state.api_keys

    def personal(request: Request):
        return getattr(request.app.state, "personal", None)

    def jobs(request: Request):
        if getattr(request.app.state, "personal", None) is None:
            raise ApiError(503, "not_ready", "the server is still starting")
        fitjobs = getattr(request.app.state, "fitjobs", None)
        if fitjobs is None:
            raise ApiError(403, "fitting_disabled", "this server does not fit avatars (fit_jobs is off); make one "
                                                    "with `knotstream avatar create` and serve it with --avatar")
        return fitjobs

    @app.get("/v1/avatars", summary="Bundled and personal avatars")
    async def list_avatars(request: Request):
        mine = personal(request)
        described = mine.describe() if mine is not None else []
        return {"avatars": avatars.list_avatars() + [a["name"] for a in described], "personal": described}

    @app.get("/v1/avatars/{name}.png", summary="An avatar's portrait (PNG)")
    async def avatar_png(name: str, request: Request):
        import io

        from PIL import Image

        mine = personal(request)
        loaded = mine.get(name) if mine is not None else None
        try:
            image = loaded.portrait if loaded is not None else await asyncio.to_thread(avatars.avatar_image, name)
        except KeyError:
            raise ApiError(404, "avatar_not_found", f"no avatar {name!r}") from None
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/avatars", status_code=202, summary="Fit a personal avatar to an uploaded video")
    async def create_avatar(request: Request, name: str | None = None, authorization: str | None = Header(None),
                            x_api_key: str | None = Header(None)):
        """Body: the video itself (not a form). Returns 202 with the job and `Location`."""
        api_keys.check(authorization, x_api_key)   # before the body is read
        fitjobs = jobs(request)
        job = fitjobs.reserve(name)
        await fitjobs.start(job, bodies.limited(request, settings.fit_max_upload_bytes, "video"))
        return JSONResponse(job.view(), status_code=202, headers={"Location": job.view()["location"]})

    @app.get("/v1/avatar-jobs/{job_id}", summary="A fit job's progress")
    async def get_job(job_id: str, request: Request):
        return jobs(request).get(job_id).view()

    @app.delete("/v1/avatar-jobs/{job_id}", summary="Cancel a fit job")
    async def cancel_job(job_id: str, request: Request, authorization: str | None = Header(None),
                         x_api_key: str | None = Header(None)):
        api_keys.check(authorization, x_api_key)
        fitjobs = jobs(request)
        job = fitjobs.get(job_id)
        await fitjobs.cancel(job)
        return job.view()
