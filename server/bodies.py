"""Reading and checking request bodies before anything is done with them: the create
request (JSON or multipart, the image counted while it arrives), options, offers, pushed
audio (PCM at an allowed rate, or a file of an allowed container format). Each refusal is
an ApiError with a stable code; nothing here allocates more than its limit says.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from server import avatars, errors
from server.errors import ApiError
from server.settings import IceServer, Settings
from streaming.codecs import EncoderPreference, VideoCodec
from streaming.peer import OfferError, check_offer

PCM_TYPES = ("audio/pcm", "audio/l16", "application/octet-stream")
AUDIO_FORMATS = ("wav", "ogg", "mp3", "flac")   # containers /audio decodes (model.media.sniff_audio_format)
FORM_SLACK = 300_000   # bytes of a create form besides the image (options, offer, part headers)


class CreateOptions(BaseModel):
    """Per-session options (the JSON `options` part of POST /v1/sessions)."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0, lt=2**63)
    knobs: dict[str, Any] = Field(default_factory=dict, max_length=16,
                                  description="stream knob overrides from the client allowlist (server/knobs.py): "
                                              "denoise_steps, rewind_denoise_steps, seam_blend, knot_fusion")
    codec: VideoCodec | None = None
    encoder: EncoderPreference | None = Field(
        None, description="video encoder (default: the server's setting): auto = NVENC for h264 where it opens, "
                          "else aiortc's software encoder; nvenc and x264 send pre-encoded H264 (codec defaults "
                          "to h264 with them)")
    bitrate: int | None = Field(None, ge=100_000, le=20_000_000,
                                description="target video bps of the nvenc/x264 encoders (default: the server's "
                                            "setting, else 1 Mbps); the software encoder adapts to REMB instead")
    lead_frames: StrictInt | None = Field(None, ge=1, description="video frames generated ahead of the output "
                                                                  "(at most the server's max_lead_frames)")
    echo_mic: bool = Field(False, description="play the microphone back on the avatar's audio track")
    ice_servers: list[IceServer] | None = Field(
        None, max_length=8, description="STUN/TURN servers the client should use (default: the server's); "
                                        "returned in the response and as Link rel=ice-server headers. The "
                                        "server's own peer connection only uses the server's ICE servers")


class Offer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sdp: str = Field(..., max_length=200_000)
    type: Literal["offer"] = "offer"


class SpeakRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., min_length=1, max_length=2000)


@dataclass(frozen=True)
class CreateRequest:
    """A create request, read and checked. The portrait is still undecoded (decoding is work,
    done once the knobs and the quota allow the session); `avatar` is the field as sent."""

    options: CreateOptions
    image: bytes | None
    avatar: Any
    offer: str | None    # a checked SDP offer, or None: it follows on POST /v1/sessions/{id}/offer


# ----- bodies -------------------------------------------------------------------------

def _too_large(what: str, limit: int, declared: str | None = None) -> ApiError:
    size = f"{declared} bytes" if declared else f"more than {limit} bytes"
    return ApiError(413, f"{what}_too_large", f"{what} is {size}, limit {limit}")


async def limited(request: Request, limit: int, what: str):
    """The request's body chunks; 413 `<what>_too_large` once more than `limit` bytes came
    (a declared Content-Length over the limit: before anything is read)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(what, limit, declared)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(what, limit)
        yield chunk


async def read_body(request: Request, limit: int, what: str) -> bytes:
    return b"".join([chunk async for chunk in limited(request, limit, what)])


async def read_create(request: Request, settings: Settings) -> tuple[bytes | None, dict]:
    """(image bytes or None, text fields) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await read_body(request, 1_000_000, "request")
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ApiError(422, "invalid_request", f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_request", "body must be a JSON object")
        unknown = set(body) - {"avatar", "options", "offer"}
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown fields {sorted(unknown)}; expected avatar, options, offer")
        return None, body
    if ctype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       "POST /v1/sessions takes multipart/form-data (image upload) or application/json")
    form = await _read_form(request, settings.max_upload_bytes)
    fields, image = {}, None
    for key, value in form.multi_items():
        if key not in ("image", "avatar", "options", "offer"):
            raise ApiError(422, "invalid_request", f"unknown form field {key!r}; expected image, avatar, options, offer")
        if key == "image":
            if isinstance(value, str):
                raise ApiError(422, "invalid_request", "image must be a file upload")
            image = await value.read(settings.max_upload_bytes + 1)
            if len(image) > settings.max_upload_bytes:
                raise ApiError(413, "image_too_large", f"image is more than {settings.max_upload_bytes} bytes")
        elif not isinstance(value, str):
            raise ApiError(422, "invalid_request", f"form field {key!r} must be text")
        else:
            fields[key] = value
    return image, fields


async def read_create_request(request: Request, settings: Settings) -> CreateRequest:
    image, fields = await read_create(request, settings)
    options = parse_options(fields.get("options"))
    offer = parse_offer_field(fields.get("offer"))
    return CreateRequest(options, image, fields.get("avatar"), None if offer is None else checked_offer(offer))


async def _read_form(request: Request, max_image_bytes: int):
    """The multipart form, its bytes counted as they arrive: starlette spools a file part to
    disk without a size limit, so the count (image + FORM_SLACK) is what stops a large upload."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    chunks = limited(request, max_image_bytes + FORM_SLACK, "image")
    try:
        return await MultiPartParser(request.headers, chunks, max_files=1, max_fields=8,
                                     max_part_size=FORM_SLACK).parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_form", f"cannot read the multipart form: {exc.message}") from None
    except (KeyError, ValueError) as exc:  # python-multipart's errors on malformed headers
        raise ApiError(400, "bad_form", f"cannot read the multipart form: {type(exc).__name__}") from None


def parse_options(raw) -> CreateOptions:
    try:
        if raw is None or raw == "":
            return CreateOptions()
        if isinstance(raw, str):
            return CreateOptions.model_validate_json(raw)
        return CreateOptions.model_validate(raw)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, "invalid_request", f"options: {msg}") from None


def parse_offer_field(raw) -> str | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ApiError(400, "bad_offer", f"offer is neither SDP nor valid JSON: {exc}") from None
    if isinstance(raw, dict):
        try:
            return Offer.model_validate(raw).sdp
        except ValidationError as exc:
            raise ApiError(400, "bad_offer", f"offer must be {{\"sdp\", \"type\": \"offer\"}}: "
                                             f"{exc.errors()[0]['msg']}") from None
    if not isinstance(raw, str):
        raise ApiError(400, "bad_offer", "offer must be SDP text or {\"sdp\", \"type\"}")
    return raw


def offer_json(raw: bytes) -> str:
    """The SDP of a JSON offer body {"sdp", "type": "offer"}."""
    try:
        return Offer.model_validate_json(raw).sdp
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", f"offer must be JSON {{\"sdp\", \"type\": \"offer\"}}: "
                                               f"{exc.errors()[0]['msg']}") from None


def checked_offer(sdp: str) -> str:
    try:
        check_offer(sdp)
    except OfferError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    return sdp


async def reference(image: bytes | None, avatar, max_pixels: int) -> tuple:
    """(portrait array, bundled avatar name or None) of a create request."""
    from model.media import MediaError, load_image

    if image is not None and avatar:
        raise ApiError(422, "invalid_request", "give either an image upload or an avatar name, not both")
    if image is not None:
        try:  # decoding a large image is CPU work: off the event loop
            return await asyncio.to_thread(load_image, image, max_pixels=max_pixels, max_bytes=len(image) + 1), None
        except MediaError as exc:
            raise errors.media_error(exc) from None
    if avatar:
        if not isinstance(avatar, str):
            raise ApiError(422, "invalid_request", "avatar must be a name")
        try:
            return avatars.avatar_image(avatar), avatar
        except KeyError:
            raise ApiError(404, "avatar_not_found",
                           f"no bundled avatar {avatar!r}; available: {', '.join(avatars.list_avatars()) or 'none'}"
                           ) from None
    raise ApiError(422, "reference_required", "send a portrait as `image` (multipart upload) or an `avatar` name")


# ----- pushed audio -------------------------------------------------------------------

def check_pcm_rate(rate: int) -> int:
    from streaming.resample import RateError, check_rate

    try:
        return check_rate(rate)
    except RateError as exc:
        raise ApiError(422, exc.code, f"rate: {exc}", extra={"field": "rate"}) from None


def pcm_samples(raw: bytes, rate: int, max_seconds: float):
    """Raw PCM16 body -> float32 samples at `rate` (the session resamples them)."""
    from model.media import MediaError, pcm16_to_float

    try:
        samples = pcm16_to_float(raw)
    except MediaError as exc:
        raise errors.media_error(exc) from None
    if len(samples) == 0:
        raise ApiError(400, "audio_empty", "audio has no samples")
    if len(samples) / rate > max_seconds:
        raise ApiError(400, "audio_too_long", f"audio is {len(samples) / rate:.1f} s, limit {max_seconds:.0f} s")
    return samples


async def decode_audio(raw: bytes, sample_rate: int, max_seconds: float):
    """An audio file of AUDIO_FORMATS -> float32 samples at `sample_rate` (off the event loop)."""
    from model.media import MediaError, load_audio

    try:
        return await asyncio.to_thread(load_audio, raw, sample_rate=sample_rate, max_seconds=max_seconds,
                                       formats=AUDIO_FORMATS)
    except MediaError as exc:
        raise errors.media_error(exc) from None
