"""JSON errors with stable codes: `{"error": {"code": ..., "message": ...}}`.

Codes used by the API (stable; clients and tests match on them):
  invalid_request (422), bad_offer, offer_missing_video, offer_missing_audio,
  offer_video_not_receiving, offer_audio_not_receiving, offer_exists (409),
  unauthorized (401: missing/wrong API key, missing session token),
  session_not_found (404: unknown id, malformed id or another session's token -- one
  answer, so existence does not leak), session_on_other_worker (421), not_found (404),
  method_not_allowed (405), avatar_not_found (404), reference_required,
  image_* / audio_* (model.media codes; too large -> 413, unreadable -> 415),
  audio_buffer_full (409), rate_limited (429, Retry-After), tts_unavailable (501),
  too_many_sessions (503, Retry-After), store_unavailable (503, Retry-After),
  not_ready (503), session_closed (410), internal_error (500),
  encoder_unavailable (422), encoder_codec_mismatch (422), offer_codec_unsupported (400),
  worker_unavailable (503), session_failed (410), draining (503), forward_queue_full (409).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("knotstream.server")

MEDIA_STATUS = {"image_too_large": 413, "audio_too_large": 413, "image_unreadable": 415, "audio_unreadable": 415}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def media_error(exc) -> ApiError:
    """model.media.MediaError -> ApiError with the media code and a fitting status."""
    return ApiError(MEDIA_STATUS.get(exc.code, 400), exc.code, str(exc))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        msg = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details) or "invalid request"
        return JSONResponse(error_body("invalid_request", msg, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", f"{type(exc).__name__}: {exc}"), status_code=500)
