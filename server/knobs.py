"""What a client may set per session: a short allowlist of stream knobs, each with a type and
bounds taken from the model and the server's settings.

Everything else in `StreamKnobs` (chunk geometry, window and cache sizes, running ahead,
rebasing, the timestep shift) sizes allocations or loops of the engine, so it stays with
the operator (the model file, `knotstream render --knob`). A client value is checked here,
in the request and before anything is allocated for the session; a refusal names the field
(`422 invalid_knob`, `{"field": "options.knobs.window_frames"}`).

Types are strict: an integer knob takes a JSON integer (2.5, 2.0, "2", true, NaN and
"inf" are refused); a fraction takes a finite JSON number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import ModelConfig, StreamKnobs
from server.errors import ApiError


@dataclass(frozen=True)
class KnobRule:
    name: str
    kind: type          # int or float
    low: float
    high: float
    meaning: str

    def check(self, value, field: str):
        if self.kind is int:
            ok_type = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        else:
            ok_type = (isinstance(value, (int, float)) and not isinstance(value, bool)
                       and math.isfinite(value))
            want = "a finite number"
        if not ok_type or not self.low <= value <= self.high:
            raise invalid(field, f"{field} ({self.meaning}) must be {want} in [{self.low:g}, {self.high:g}], "
                                 f"got {value!r:.40}")
        return self.kind(value)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_knob", message, extra={"field": field})


class KnobPolicy:
    """The client knob allowlist of one server (one model, one settings object)."""

    def __init__(self, config: ModelConfig, max_lead_frames: int):
        # The model file's default steps are what its sampler was made for; more costs time
        # and buys nothing, fewer than 1 is no image.
        steps = config.stream.denoise_steps
        self.rules = {r.name: r for r in (
            KnobRule("denoise_steps", int, 1, steps, "Euler steps per chunk (the model's trained range)"),
            KnobRule("rewind_denoise_steps", int, 0, steps, "steps of the chunk remade after a barge-in "
                                                            "(0 = denoise_steps)"),
            KnobRule("seam_blend", float, 0.0, 1.0, "share of each latent frame's jump spread over its "
                                                    "4 video frames"),
            KnobRule("knot_fusion", float, 0.0, 1.0, "weight of the previous chunk's knot prediction"),
        )}
        self.lead = KnobRule("lead_frames", int, 1, max_lead_frames,
                             "video frames generated ahead of the output (server setting MAX_LEAD_FRAMES)")
        self.defaults = config.stream

    def stream_knobs(self, raw) -> StreamKnobs:
        """The session's StreamKnobs: the model's defaults with the client's allowed overrides."""
        if raw is None:
            return self.defaults
        if not isinstance(raw, dict):
            raise invalid("options.knobs", f"options.knobs must be an object of knob -> value, got {raw!r:.80}")
        changes = {}
        for name, value in raw.items():
            field = f"options.knobs.{name}"
            rule = self.rules.get(name)
            if rule is None:
                allowed = ", ".join(self.rules)
                why = ("is set by the operator (the model file), not per session"
                       if name in StreamKnobs.__dataclass_fields__ else "is not a stream knob")
                raise invalid(field, f"{field} {why}; a session may set {allowed}")
            changes[name] = rule.check(value, field)
        return self.defaults.replace(**changes)

    def lead_frames(self, value) -> int | None:
        return None if value is None else self.lead.check(value, "options.lead_frames")
