"""Notices in a new session's response: what the client should expect from what it sent.

Decided from the model file's metadata (`ModelConfig.domain`: what the weights were
trained on) and where the portrait came from, never by guessing at the image. A bundled
avatar is what the model was made for and gets none; an uploaded photo on a model trained
only on the procedural cartoon heads gets `cartoon_model`, because a real face comes out as
a caricature and the client should hear that from us, with the way to a personal avatar.

Each notice is `{"code", "message", ...}`; `code` is stable, `message` is for people.
"""

from __future__ import annotations

from model.config import ModelConfig

PERSONAL_AVATAR_COMMAND = "knotstream avatar create --video me.mp4 -o me.safetensors"
PERSONAL_AVATAR_DOCS = "docs/personal-avatars.md"


def session_notices(config: ModelConfig, uploaded: bool) -> list[dict]:
    """The notices of a session on a model with `config`; `uploaded`: the portrait is an
    upload (not a bundled avatar)."""
    if uploaded and config.domain == "cartoon":
        return [{
            "code": "cartoon_model",
            "message": (f"The model {config.name!r} was trained only on drawn cartoon heads: an uploaded photo "
                        f"of a real person comes out as a cartoon-like caricature, not a likeness. To animate a "
                        f"real face, make a personal avatar from a minute or two of video of the person: "
                        f"`{PERSONAL_AVATAR_COMMAND}` (see {PERSONAL_AVATAR_DOCS})."),
            "model_domain": config.domain,
            "command": PERSONAL_AVATAR_COMMAND,
            "docs": PERSONAL_AVATAR_DOCS,
        }]
    return []
