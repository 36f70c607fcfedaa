"""Bundled avatars: a few seeded portraits from the procedural renderer the model was
trained on (model.train.world). Rendered on first use, never at import time."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# name -> identity seed
AVATARS = {"ada": 1, "ben": 2, "cleo": 3, "dev": 4}
SIZE = 256


def list_avatars() -> list[str]:
    """Names of the bundled avatars; empty when the renderer is unavailable (uploads only)."""
    try:
        import model.train.world  # noqa: F401
    except ImportError:
        return []
    return sorted(AVATARS)


@lru_cache(maxsize=len(AVATARS))
def avatar_image(name: str) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 portrait of a bundled avatar. KeyError for unknown names."""
    if name not in AVATARS or name not in list_avatars():
        raise KeyError(name)
    from model.train.world import identity_from_seed, neutral_motion, render_frame

    image = render_frame(identity_from_seed(AVATARS[name]), neutral_motion(), SIZE)
    image.setflags(write=False)
    return image
