"""The peer-connection side of a session: offer checks, the answer's transceivers, trickled
ICE candidates. No session state here; `streaming/session.py` calls these.

What the server sends and receives is fixed by the answer, whatever the offer asks for:
video goes out only (`sendonly`: a client's camera is never received, so never decoded),
audio both ways (the microphone drives the avatar).
"""

from __future__ import annotations

from aiortc import RTCPeerConnection

from streaming.codecs import mime_type
from streaming.encode import EncodedVideoTrack

DIRECTIONS = {"video": "sendonly", "audio": "sendrecv"}   # ours; aiortc intersects with the offer's


class OfferError(ValueError):
    """The SDP offer cannot be answered; `code` is stable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class CandidateError(ValueError):
    """A trickled ICE fragment is refused; `code` is stable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_offer(sdp: str) -> None:
    """Refuse offers aiortc cannot answer as we need: the answer cannot add m-lines, so the
    offer must carry a video and an audio section that can receive (sendrecv or recvonly)."""
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise OfferError("bad_offer", "offer is not an SDP session description (it must start with v=0)")
    directions: dict[str, str] = {}  # first m-section of each kind -> its direction
    kind, first = None, False
    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            first = kind not in directions
            if first:
                directions[kind] = "sendrecv"  # the SDP default
        elif first and line in ("a=sendonly", "a=inactive", "a=recvonly", "a=sendrecv"):
            directions[kind] = line[2:]
    for kind in ("video", "audio"):
        if kind not in directions:
            raise OfferError(f"offer_missing_{kind}",
                             f"offer has no {kind} m-line; offer a {kind} transceiver (recvonly is enough) "
                             f"so the answer can carry the avatar's {kind}")
        if directions[kind] in ("sendonly", "inactive"):
            raise OfferError(f"offer_{kind}_not_receiving",
                             f"the offer's {kind} m-line is {directions[kind]}; it must be sendrecv or recvonly")


def attach_track(pc: RTCPeerConnection, kind: str, track, codec: str | None = None, encoder=None,
                 fps: int = 25, bitrate: int | None = None) -> EncodedVideoTrack | None:
    """Put our track on the offer's transceiver of that kind (an answer cannot add m-lines).
    Video: `codec` first among the negotiated codecs; with a pre-encoded `encoder` the sent
    track is an EncodedVideoTrack (returned)."""
    tr = next((t for t in pc.getTransceivers() if t.kind == kind and t.sender.track is None), None)
    if tr is None:
        raise OfferError(f"offer_missing_{kind}", f"offer has no usable {kind} m-line")
    encoded = None
    if kind == "video":
        # setRemoteDescription already negotiated the codecs in the offer's order, and
        # aiortc ignores setCodecPreferences after it: reorder the negotiated list itself
        # (the answer and the sender use its first codec). Packets of the pre-encoded
        # paths are H264 and can go out as nothing else.
        want = mime_type(codec)
        codecs = [c for c in tr._codecs if c.mimeType.lower() == want.lower()]
        if not codecs and encoder.pre_encoded:
            raise OfferError("offer_codec_unsupported",
                             f"the offer has no {want} for the {encoder.kind} encoder; offer {want} or choose "
                             f"encoder 'software'")
        if codecs:
            pts = {c.payloadType for c in codecs}
            rtx = [c for c in tr._codecs if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") in pts]
            rest = [] if encoder.pre_encoded else [c for c in tr._codecs if c not in codecs and c not in rtx]
            tr._codecs = codecs + rtx + rest
        if encoder.pre_encoded:
            track = encoded = EncodedVideoTrack(track, encoder, fps, bitrate)
    tr.sender.replaceTrack(track)
    tr.direction = DIRECTIONS[kind]
    return encoded


def parse_candidates(pc: RTCPeerConnection, sdpfrag: str, room: int) -> list:
    """The RTCIceCandidates of an RFC 8840 SDP fragment (the `a=mid` before a candidate says
    which section; the first section otherwise). At most `room` candidates: more is a
    CandidateError `too_many_candidates`, so nothing of that fragment is added."""
    from aiortc.sdp import candidate_from_sdp

    mids = [t.mid for t in pc.getTransceivers() if t.mid is not None]
    mid, out = (mids[0] if mids else "0"), []
    for line in sdpfrag.splitlines():
        line = line.strip()
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        elif line.startswith("a=candidate:"):
            if len(out) >= room:
                raise CandidateError("too_many_candidates",
                                     f"more ICE candidates than this session takes (at most {room} more)")
            try:
                cand = candidate_from_sdp(line[len("a=candidate:"):])
            except Exception as exc:
                raise CandidateError("bad_sdpfrag", f"cannot parse ICE candidate {line[:80]!r}: {exc}") from None
            cand.sdpMid = mid
            out.append(cand)
    if not out and "a=end-of-candidates" not in sdpfrag:
        raise CandidateError("bad_sdpfrag", "the fragment has no a=candidate lines")
    return out
