"""Streaming resampling of pushed audio (any rate -> the model's driving rate).

Apps push TTS audio in many small pieces; resampling each piece on its own would put a
click at every piece border (filters start from silence each time). `StreamResampler`
keeps the filter state between pieces (libswresample through PyAV), and `flush()`
returns the samples the filter still holds when a segment ends, so nothing is dropped.
"""

from __future__ import annotations

import av
import numpy as np

# Sample rates pushed audio may have (what TTS engines and devices produce). Others are
# refused: libswresample's cost grows with the rates' least common multiple.
RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


class RateError(ValueError):
    code = "audio_bad_rate"


def check_rate(rate) -> int:
    """`rate` when it is one of RATES, else RateError (code audio_bad_rate)."""
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in RATES:
        raise RateError(f"sample rate must be one of {', '.join(map(str, RATES))} Hz, got {rate!r}")
    return rate


class StreamResampler:
    """float32 mono at `in_rate` -> float32 mono at `out_rate`, piece by piece."""

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate, self.out_rate = check_rate(in_rate), check_rate(out_rate)
        self._rs = None if in_rate == out_rate else av.AudioResampler(format="flt", layout="mono", rate=out_rate)
        self._pts = 0

    def push(self, samples: np.ndarray, flush: bool = False) -> np.ndarray:
        """The resampled samples of this piece (with `flush`: and the filter's tail: the last piece)."""
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._rs is None or len(samples) == 0:
            out = samples.copy()
        else:
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
            frame.sample_rate = self.in_rate
            frame.pts = self._pts
            self._pts += len(samples)
            out = self._collect(self._rs.resample(frame))
        return np.concatenate([out, self.flush()]) if flush else out

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
