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
  worker_unavailable (503), session_failed (410), draining (503), forward_queue_full (409),
  invalid_knob (422, with `field`), audio_bad_rate (422, with `field`), bad_form (400),
  bad_text (400), too_many_segments (409), too_many_candidates (409), sdpfrag_too_large (413),
  speak_in_progress (429, Retry-After), quota_exceeded (429, Retry-After), tts_busy (503,
  Retry-After), tts_failed (502), forbidden_host / forbidden_origin (403: no API keys and a
  foreign Host or Origin), forwarded_refused (403), invalid_name (422), avatar_exists (409),
  fit_busy (409, Retry-After), video_too_large (413), video_too_long / video_too_short /
  video_unreadable (422), job_not_found (404), fitting_disabled (403). A 500 internal_error carries an `id`
  that the server log has next to the exception; never the exception's text.
"""

from __future__ import annotations

import logging
import math
import secrets
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("knotstream.server")

MEDIA_STATUS = {"image_too_large": 413, "audio_too_large": 413, "image_unreadable": 415, "audio_unreadable": 415}
# Driving requests a session refuses (streaming/session.py, streaming/tts.py): code -> status.
# Codes not listed are 409 (the session cannot take it in its current state).
REFUSAL_STATUS = {"rate_limited": 429, "speak_in_progress": 429, "tts_busy": 503, "tts_unavailable": 501,
                  "tts_failed": 502, "bad_text": 400, "audio_bad_rate": 422, "session_closed": 410}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra or {}   # more members of the error object (`field` of a refused knob)


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def media_error(exc) -> ApiError:
    """model.media.MediaError -> ApiError with the media code and a fitting status."""
    return ApiError(MEDIA_STATUS.get(exc.code, 400), exc.code, str(exc))


@contextmanager
def refusals():
    """Turn what a session or the TTS refuses (ValueErrors and TTS errors with a `code`, media
    errors) into ApiErrors; a `retry_after_s` becomes Retry-After."""
    from model.media import MediaError

    try:
        yield
    except MediaError as exc:
        raise media_error(exc) from None
    except (ValueError, RuntimeError) as exc:
        code = getattr(exc, "code", None)
        if code is None and not isinstance(exc, ValueError):
            raise
        wait = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(max(1, math.ceil(wait)))} if wait else None
        raise ApiError(REFUSAL_STATUS.get(code, 409), code or "bad_audio", str(exc), headers=headers) from None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message, **exc.extra), status_code=exc.status,
                            headers=exc.headers)

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
        # The client gets an id to quote, never the exception: its text can name files,
        # addresses or sizes of this server. The log line with the same id has it all.
        error_id = secrets.token_hex(6)
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.url.path)
        return JSONResponse(error_body("internal_error", f"internal error {error_id}; the server log has the details",
                                       id=error_id), status_code=500)
