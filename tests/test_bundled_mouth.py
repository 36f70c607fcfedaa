"""The bundled weights follow the mouth fields a client sends (issue 19's mouth-field training):
with the audio silent, a held-out cartoon driven by a slow mouth_open wave (1.5 Hz, 0..0.9)
opens and closes its mouth with it, at most 80 ms late. Weights that ignore the fields (those before
2026-12-02) do not (r 0.0 measured) and fail."""

import numpy as np
import pytest

from model.config import MOTION_FIELDS
from model.sources import ASSETS

pytestmark = pytest.mark.skipif(not (ASSETS / "tiny.safetensors").is_file(), reason="no bundled weights")

SECONDS = 3.0


def mouth_signal(n: int, fps: int) -> np.ndarray:
    t = np.arange(n) / fps
    return (0.45 * (1 - np.cos(2 * np.pi * 1.5 * t))).astype(np.float32)


def silent_stream(engine, portrait, mouth: np.ndarray) -> np.ndarray:
    """Frames of a stream with silent audio, the face held still (every field given, neutral)
    and the mouth driven per frame."""
    from model.driving import motion_vector
    from model.timeline import StepInput

    still = {name: 0.0 for name in MOTION_FIELDS}
    rows = np.stack([motion_vector({**still, "mouth_open": float(m), "mouth_wide": 0.3}) for m in mouth])
    tail = np.repeat(rows[-1:], engine.config.fps, 0)   # driving a little past the last frame
    rows = np.concatenate([rows, tail])
    stream = engine.start(portrait, seed=3)
    frames = []
    try:
        while stream.frame_index < len(mouth):
            span = stream.next_span()
            frames.append(stream.step(StepInput.from_clip(span, None, rows)))
    finally:
        stream.close()
    return np.concatenate(frames)[:len(mouth)]


def test_the_bundled_model_follows_the_mouth_it_is_sent():
    from model.engine import Engine
    from model.train import world
    from model.train.data import HELD_OUT_IDENTITY_SEED
    from model.train.metrics import correlation

    engine = Engine.from_pretrained("tiny")
    size, fps = engine.config.height, engine.config.fps
    ident = world.identity_from_seed(HELD_OUT_IDENTITY_SEED + 7)
    still = np.zeros(len(MOTION_FIELDS), np.float32)
    wide = still.copy()
    wide[MOTION_FIELDS.index("mouth_open")] = 1.0
    box = world.mouth_box(ident, wide, size)

    mouth = mouth_signal(int(SECONDS * fps), fps)
    frames = silent_stream(engine, world.render_frame(ident, still, size), mouth)
    measured = world.measure_mouth_open(frames, box)
    skip = fps // 2   # the first half second: the stream settles
    # The generated mouth may trail the field by a frame or two (measured: 1 frame).
    r = {lag: correlation(measured[skip + lag:], mouth[skip:len(mouth) - lag]) for lag in (0, 1, 2)}
    assert max(r.values()) > 0.6, f"the mouth does not follow mouth_open (r by lag in frames: {r})"
