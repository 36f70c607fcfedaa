"""Reading the families' downloaded files: state dicts, the Wan2.1 VAE, clear errors.

Nothing is fetched: every path is a local file the user downloaded. A model is built on
the meta device and the stored tensors are assigned (`load_state_dict(assign=True)`), so
no random initialisation of a billion parameters happens first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from model.wan.vae import WanVAE, WanVAEConfig
from model.wan.vae_names import to_wan_names


@dataclass(frozen=True)
class Needed:
    """One file (or folder) a family needs: where it lies under the user's folder, what it
    is, and where the user gets it."""

    path: str
    what: str
    source: str


class MissingWeights(FileNotFoundError):
    """Raised with one line per missing file: its path, what it is, where to get it."""

    def __init__(self, root: Path, missing: list[Needed]):
        lines = [f"  {root / n.path}: {n.what} (get it from {n.source})" for n in missing]
        super().__init__(f"{len(missing)} file(s) missing under {root}:\n" + "\n".join(lines))
        self.missing = missing


def check_files(root: str | Path, needed: list[Needed]) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    missing = [n for n in needed if not (root / n.path).exists()]
    if missing:
        raise MissingWeights(root, missing)
    return root


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors / .pth / .pt file, or of a folder of (sharded) safetensors."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors file in this folder")
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # weights_only: a .pth is a pickle; refuse anything but tensors and plain containers.
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def assign_weights(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """Load `state` into a meta-built `model` by assignment; every parameter must be given."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(f"{source}: {len(missing)} tensors missing (e.g. {missing[:3]}), "
                         f"{len(unknown)} unknown (e.g. {unknown[:3]})")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors of the wrong shape, e.g. {bad[:3]} (file, model)")
    model.load_state_dict(state, strict=True, assign=True)


def fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
    """md5 of a checkpoint's names and shapes, computed as LiveTalk's / DiffSynth's loader
    does (`hash_state_dict_keys`): every "name:d0_d1_..." and every bare "name", sorted,
    joined by ","."""
    items = [f"{k}:{'_'.join(str(d) for d in s)}" for k, s in shapes.items()] + list(shapes)
    return hashlib.md5(",".join(sorted(items)).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------
# The Wan2.1 VAE
# --------------------------------------------------------------------------------------


def _diffusers_vae_config(folder: Path) -> WanVAEConfig:
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("is_residual") or raw.get("patch_size"):
        raise ValueError(f"{folder}: a Wan2.2 VAE (is_residual/patch_size); the families use Wan2.1's")
    if raw.get("attn_scales"):
        raise ValueError(f"{folder}: attn_scales {raw['attn_scales']} are not part of the Wan2.1 VAE")
    return WanVAEConfig(base_dim=raw.get("base_dim", 96), z_dim=raw.get("z_dim", 16),
                        dim_mult=tuple(raw.get("dim_mult", (1, 2, 4, 4))),
                        num_res_blocks=raw.get("num_res_blocks", 2),
                        temporal_downsample=tuple(raw.get("temperal_downsample", (False, True, True))),
                        latents_mean=tuple(raw["latents_mean"]) if raw.get("latents_mean") else None,
                        latents_std=tuple(raw["latents_std"]) if raw.get("latents_std") else None)


def load_wan_vae(path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, cfg: WanVAEConfig | None = None) -> WanVAE:
    """`Wan2.1_VAE.pth` (Wan's names, Wan2.1 geometry unless `cfg`), or a diffusers
    `AutoencoderKLWan` folder (config.json + safetensors) -> WanVAE in eval mode."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a diffusers VAE folder needs config.json")
        cfg = cfg or _diffusers_vae_config(path)
    cfg = cfg or WanVAEConfig()
    state = to_wan_names(read_state_dict(path), cfg.num_res_blocks)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    assign_weights(vae, state, path)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
