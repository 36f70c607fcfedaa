"""Where a model comes from: the names `--model` and `Engine.from_pretrained` take.

    tiny, wan-1.3b                    a preset: its bundled weights when shipped, seeded random ones otherwise
    PATH.safetensors                  a model file written by `model.weights.save_model`
    livetalk:DIR, flashhead:DIR       a photoreal family's downloaded files (model/wan/photoreal.py)
    livetalk-random, flashhead-random those families' layouts scaled down, random weights (CPU tests)
    livetalk-1.3b, flashhead-1.3b     their released geometry, random weights (speed runs)

Nothing is ever downloaded. `check_model` raises what `open_model` would for a name that
cannot load (unknown name, missing files each named), without reading weights, so a
command can refuse it before it starts anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from model.config import PRESETS, from_name

log = logging.getLogger("knotstream.engine")

ASSETS = Path(__file__).parent / "assets"


def _photoreal(name: str) -> bool:
    from model.wan.photoreal import is_photoreal

    return is_photoreal(name)


def check_model(name: str) -> None:
    """ValueError / FileNotFoundError / ImportError with a message when `name` cannot load."""
    if name in PRESETS:
        return
    if _photoreal(name):
        from model.wan.photoreal import check_photoreal

        check_photoreal(name)
        return
    if not Path(name).is_file():
        from model.wan.families import PRESETS as FAMILY_PRESETS

        raise FileNotFoundError(
            f"model {name!r} is neither a preset ({', '.join(sorted(PRESETS) + sorted(FAMILY_PRESETS))}), "
            "livetalk:DIR, flashhead:DIR, nor an existing file")


def open_model(name: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, bool]:
    """(model, trained) for a name (see the module docstring), on `device` in `dtype`."""
    from model.avatar import AvatarModel
    from model.weights import load_model

    check_model(name)
    if name in PRESETS:
        bundled = ASSETS / f"{name}.safetensors"
        if bundled.exists():
            return load_model(bundled, device=device), True
        log.warning("no bundled weights for preset %r: using seeded random weights (untrained)", name)
        return AvatarModel.random(from_name(name)), False
    if _photoreal(name):
        from model.wan.photoreal import load_photoreal

        return load_photoreal(name, device, dtype)
    return load_model(Path(name), device=device), True
