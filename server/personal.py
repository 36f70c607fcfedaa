"""Personal avatars this server streams: `knotstream serve --avatar me.safetensors` (repeatable),
the files in `avatar_dir`, and the ones its fit jobs make (server/fitjobs.py).

Each avatar is its own fitted model (model/personal/avatar_file.py), loaded into its own
`Engine` beside the server's model; the generation worker steps every session whatever
its engine (streams batch with the streams of the same engine). An avatar must match the
server's model in frame size, frame rate and audio rate: one session's driving timeline
and WebRTC tracks are set up the same way for all. Names are unique across the bundled
avatars and the personal ones.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server import avatars as bundled
from server.knobs import KnobPolicy

log = logging.getLogger("knotstream.personal")


@dataclass
class LoadedAvatar:
    name: str
    path: Path
    portrait: np.ndarray
    engine: object            # model.engine.Engine
    knobs: KnobPolicy
    info: dict


def check_compatible(config, base) -> None:
    """ValueError when a model of `config` cannot serve beside the server's model `base`."""
    mine = (config.width, config.height, config.fps, config.driving.sample_rate)
    theirs = (base.width, base.height, base.fps, base.driving.sample_rate)
    if mine != theirs:
        raise ValueError(f"the avatar's model is {mine[0]}x{mine[1]} at {mine[2]} fps / {mine[3]} Hz, the server's "
                         f"{theirs[0]}x{theirs[1]} at {theirs[2]} fps / {theirs[3]} Hz: fit it to the server's model")


class PersonalAvatars:
    """name -> loaded avatar. `add` loads a model (seconds): call it off the event loop."""

    def __init__(self, base_engine, max_lead_frames: int, device: str = "cpu", dtype=None):
        self.base = base_engine
        self.max_lead_frames = max_lead_frames
        self.device, self.dtype = device, dtype
        self._avatars: dict[str, LoadedAvatar] = {}
        self._lock = threading.Lock()

    def add(self, path: str | Path, replace: bool = False) -> LoadedAvatar:
        """Load the avatar file at `path`. ValueError for a file that is not a personal avatar,
        does not fit the server's model, or whose name is taken (unless `replace`)."""
        from model.engine import Engine
        from model.personal.avatar_file import read
        from model.weights import read_metadata

        found = read(path)
        self._check_name(found.name, replace)
        check_compatible(read_metadata(found.path)["config"], self.base.config)
        engine = Engine.from_pretrained(str(found.path), self.device, self.dtype)
        loaded = LoadedAvatar(found.name, found.path, found.portrait, engine,
                              KnobPolicy(engine.config, self.max_lead_frames), found.info)
        with self._lock:
            self._check_name(found.name, replace)
            self._avatars[found.name] = loaded
        log.info("personal avatar %r loaded from %s", found.name, found.path)
        return loaded

    def _check_name(self, name: str, replace: bool) -> None:
        if name in bundled.AVATARS:
            raise ValueError(f"avatar name {name!r} is a bundled avatar's: choose another (--name)")
        if name in self._avatars and not replace:
            raise ValueError(f"an avatar named {name!r} is loaded already ({self._avatars[name].path})")

    def taken(self, name: str) -> bool:
        return name in bundled.AVATARS or name in self._avatars

    def get(self, name: str) -> LoadedAvatar | None:
        return self._avatars.get(name)

    def names(self) -> list[str]:
        return sorted(self._avatars)

    def describe(self) -> list[dict]:
        """What /v1/avatars says about each: name, portrait URL, what its fit did."""
        return [{"name": a.name, "portrait": f"/v1/avatars/{a.name}.png", "domain": "personal",
                 "fit": {k: a.info.get(k) for k in ("decoder_steps", "dit_steps", "complete", "source")}}
                for a in (self._avatars[n] for n in self.names())]


def load_configured(registry: PersonalAvatars, paths: list[str], folder: Path | None) -> None:
    """The avatars named on the command line (an error stops the server: they were asked
    for), then the files in `folder` (one that fails is logged and skipped: a half-written
    file must not keep the server down)."""
    for p in paths:
        registry.add(p)
    if folder is None or not folder.is_dir():
        return
    named = {Path(p).resolve() for p in paths}
    for p in sorted(folder.glob("*.safetensors")):
        if p.resolve() in named:
            continue
        try:
            registry.add(p)
        except (ValueError, OSError, RuntimeError) as exc:
            log.warning("skipping %s: %s", p, exc)
