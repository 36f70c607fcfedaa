"""Offline text-to-speech with Debian's espeak-ng or flite, when installed.

No TTS ships with knotstream; this shells out to whichever engine is on PATH (espeak-ng
preferred) and decodes its wav with `model.media.load_audio` (off the event loop).
`TTSUnavailable` says neither is installed (the server answers 501). A `Synthesizer`
runs at most `max_concurrent` syntheses at once in the process; a request that finds
every slot taken for `wait_s` gets `TTSBusy` (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import unicodedata
from pathlib import Path

import numpy as np

MAX_TEXT_CHARS = 2000
ALLOWED_CONTROLS = "\t\n\r"


class TTSUnavailable(RuntimeError):
    code = "tts_unavailable"


class TTSBusy(RuntimeError):
    code = "tts_busy"
    retry_after_s = 1.0


class TTSFailed(RuntimeError):
    code = "tts_failed"


class BadText(ValueError):
    code = "bad_text"


def available_engine() -> str | None:
    """'espeak-ng', 'flite' or None."""
    for name in ("espeak-ng", "flite"):
        if shutil.which(name):
            return name
    return None


def check_text(text: str) -> str:
    """`text` when it can be spoken: non-empty, at most MAX_TEXT_CHARS, no control characters
    but tab and line breaks (a NUL cannot even be passed to a process). BadText otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise BadText("text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise BadText(f"text is {len(text)} characters, limit {MAX_TEXT_CHARS}")
    for i, ch in enumerate(text):
        if ch not in ALLOWED_CONTROLS and unicodedata.category(ch) in ("Cc", "Cs"):
            raise BadText(f"text has a control character U+{ord(ch):04X} at position {i}")
    return text


async def synthesize(text: str, sample_rate: int = 16000, timeout_s: float = 30.0) -> np.ndarray:
    """text -> (n,) float32 mono speech at `sample_rate`. BadText for text that cannot be spoken."""
    from model.media import load_audio

    check_text(text)
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
            raise TTSFailed(f"{engine} took longer than {timeout_s:.0f} s") from None
        finally:
            if proc.returncode is None:   # timed out or cancelled: no orphan process
                proc.kill()
                await proc.wait()
        if proc.returncode != 0 or not out.exists():
            raise TTSFailed(f"{engine} failed ({proc.returncode}): {err.decode(errors='replace')[:200]}")
        return await asyncio.to_thread(load_audio, out, sample_rate=sample_rate)


class Synthesizer:
    """`synthesize` with a per-process cap on syntheses at once (each is a process and a decode)."""

    def __init__(self, max_concurrent: int = 2, wait_s: float = 5.0):
        self.max_concurrent = max_concurrent
        self.wait_s = wait_s
        self._slots = asyncio.Semaphore(max_concurrent)

    async def __call__(self, text: str, sample_rate: int = 16000) -> np.ndarray:
        check_text(text)   # refused before it waits for a slot
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            raise TTSBusy(f"all {self.max_concurrent} speech syntheses of this server are busy; "
                          f"retry in a second") from None
        try:
            return await synthesize(text, sample_rate)
        finally:
            self._slots.release()
