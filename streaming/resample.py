"""Streaming resampling of pushed audio (any rate -> the model's driving rate).

Apps push TTS audio in many small pieces; resampling each piece on its own would put a
click at every piece border (filters start from silence each time). `StreamResampler`
keeps the filter state between pieces (libswresample through PyAV), and `flush()`
returns the samples the filter still holds when a segment ends, so nothing is dropped.
"""

from __future__ import annotations

import av
import numpy as np


class StreamResampler:
    """float32 mono at `in_rate` -> float32 mono at `out_rate`, piece by piece."""

    def __init__(self, in_rate: int, out_rate: int):
        if not (1000 <= in_rate <= 384000 and 1000 <= out_rate <= 384000):
            raise ValueError(f"sample rates must be 1000..384000 Hz, got {in_rate} -> {out_rate}")
        self.in_rate, self.out_rate = in_rate, out_rate
        self._rs = None if in_rate == out_rate else av.AudioResampler(format="flt", layout="mono", rate=out_rate)
        self._pts = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._rs is None or len(samples) == 0:
            return samples.copy()
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = self.in_rate
        frame.pts = self._pts
        self._pts += len(samples)
        return self._collect(self._rs.resample(frame))

    def flush(self) -> np.ndarray:
        """The filter's remaining output (call once, at the end of the audio)."""
        if self._rs is None:
            return np.zeros(0, np.float32)
        out = self._collect(self._rs.resample(None))
        self._rs = av.AudioResampler(format="flt", layout="mono", rate=self.out_rate)
        self._pts = 0
        return out

    @staticmethod
    def _collect(frames) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1).astype(np.float32) for f in frames]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
