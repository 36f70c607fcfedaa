"""What the GPU benchmark scripts share: one timed run's numbers, and a failed run's note."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Timed:
    """One timed run: `sessions` streams stepped together; None where the run failed."""

    run: str
    sessions: int
    first_ms: float | None = None    # stream start to the first frames
    chunk_ms: float | None = None    # one step of all sessions, median
    fps: float | None = None         # frames per second over all sessions
    realtime: float | None = None    # fps per session / the model's fps
    mem_gib: float | None = None     # peak GPU memory
    note: str = ""


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def failure_note(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of GPU memory: fewer sessions, or free the GPU"
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
