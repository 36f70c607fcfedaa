"""Driving an avatar offline as a live session would: the engine's chunk loop, step by step,
fed from whole arrays of motion and speech (`knotstream eval --personal`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def cpu_engine(model):
    """The engine a CPU session streams an in-memory `model` with: float32 weights, computed
    in bfloat16 where the CPU has it natively, as `Engine.from_pretrained` chooses for a file."""
    import torch

    from model.engine import Engine, native_cpu_bf16

    return Engine(model, autocast=torch.bfloat16 if native_cpu_bf16() else None)


def chunks(engine, portrait: np.ndarray, motion: np.ndarray | None, audio: np.ndarray | None, n_frames: int,
           seed: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame index, (n, H, W, 3) uint8) per step until `n_frames` frames were made (the
    last step cut there). motion: (T, motion_dim) driving vectors from frame 0 (None: not
    given); audio: samples from frame 0 at the model's rate (None: silence)."""
    from model.timeline import StepInput

    stream = engine.start(portrait, seed=seed)
    try:
        while stream.frame_index < n_frames:
            span = stream.next_span()
            frames = stream.step(StepInput.from_clip(span, audio, motion))
            yield span.frame, frames[: n_frames - span.frame]
    finally:
        stream.close()


def generate(engine, portrait, motion, audio, n_frames: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """All frames (n_frames, H, W, 3) and the frame index where each step began."""
    parts = list(chunks(engine, portrait, motion, audio, n_frames, seed))
    return np.concatenate([f for _, f in parts]), [f0 for f0, _ in parts]


def looped(rows: np.ndarray, n: int) -> np.ndarray:
    """`rows` repeated end to end to n rows (a short held-out stretch driving a long run)."""
    reps = -(-n // len(rows))
    return np.concatenate([rows] * reps)[:n]
