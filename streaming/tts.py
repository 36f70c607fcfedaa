"""Offline text-to-speech with Debian's espeak-ng or flite, when installed.

No TTS ships with knotstream; this shells out to whichever engine is on PATH (espeak-ng
preferred) and decodes its wav with `model.media.load_audio`. `TTSUnavailable` says
neither is installed (the server answers 501).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import numpy as np

MAX_TEXT_CHARS = 2000


class TTSUnavailable(RuntimeError):
    code = "tts_unavailable"


def available_engine() -> str | None:
    """'espeak-ng', 'flite' or None."""
    for name in ("espeak-ng", "flite"):
        if shutil.which(name):
            return name
    return None


async def synthesize(text: str, sample_rate: int = 16000, timeout_s: float = 30.0) -> np.ndarray:
    """text -> (n,) float32 mono speech at `sample_rate`. ValueError for empty or over-long text."""
    from model.media import load_audio

    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text is {len(text)} characters, limit {MAX_TEXT_CHARS}")
    engine = available_engine()
    if engine is None:
        raise TTSUnavailable("no offline TTS engine installed (apt-get install espeak-ng or flite)")
    with tempfile.TemporaryDirectory(prefix="knotstream-tts-") as tmp:
        out = Path(tmp) / "speech.wav"
        if engine == "espeak-ng":
            # "--" so text starting with "-" is never read as an option.
            cmd = ["espeak-ng", "-w", str(out), "--", text]
        else:
            cmd = ["flite", "-t", text, "-o", str(out)]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{engine} took longer than {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{engine} failed ({proc.returncode}): {err.decode(errors='replace')[:200]}")
        return load_audio(out, sample_rate=sample_rate)
