"""A personal avatar file: the fitted model in the bundled model's format, plus its portrait.

The file is a complete model file (`model.weights.save_model`, fp16, the size of the
bundled weights): the engine loads it as any model file, and it stays valid whatever
happens to the bundled weights later. Beside the model's tensors it holds the portrait the
avatar was fitted with (`aux.portrait`, uint8), and in its metadata ("extra" -> "personal")
the avatar's name and what the fit did. The config says `domain="personal"`, the stream
defaults it was fitted for, and the speech -> mouth gains (`speech_mouth`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def name_from_path(path: str | Path) -> str:
    """An avatar name from a file name: its stem, lower-cased, other characters as '-'."""
    name = re.sub(r"[^a-z0-9_-]+", "-", Path(path).stem.lower()).strip("-_")[:32]
    if not name or not NAME_RE.match(name):
        raise ValueError(f"cannot make an avatar name from {Path(path).name!r}: use letters and digits")
    return name


@dataclass
class PersonalAvatar:
    """What a server needs to list and open an avatar (the weights load separately)."""

    name: str
    path: Path
    portrait: np.ndarray      # (S, S, 3) uint8
    info: dict = field(default_factory=dict)


def save(model, portrait: np.ndarray, path: str | Path, name: str, info: dict) -> None:
    """Write the avatar file (atomically: a temporary file renamed)."""
    import torch

    from model.weights import save_model

    if not NAME_RE.match(name):
        raise ValueError(f"avatar name {name!r}: 1-32 of a-z, 0-9, '-', '_', starting with a letter or digit")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, tmp, extra={"personal": {"name": name, **info}}, dtype=torch.float16,
               aux={"portrait": torch.from_numpy(np.ascontiguousarray(portrait))})
    tmp.replace(path)


def read(path: str | Path) -> PersonalAvatar:
    """The avatar's name, portrait and fit record; ValueError when the file is a model file
    but not a personal avatar, FileNotFoundError when it is missing."""
    from model.weights import read_aux, read_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"avatar file not found: {path}")
    meta = read_metadata(path)
    personal = meta.get("extra", {}).get("personal")
    portrait = read_aux(path).get("portrait")
    if meta["config"].domain != "personal" or personal is None or portrait is None:
        raise ValueError(f"{path} is a model file but not a personal avatar (make one with `knotstream avatar create`)")
    info = {k: v for k, v in personal.items() if k != "name"}
    return PersonalAvatar(str(personal["name"]), path, portrait.numpy(), info)
