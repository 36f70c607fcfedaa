"""Weights: safetensors save/load of an `AvatarModel`, and Wan2.1 / diffusers conversion.

A saved model is one safetensors file whose metadata holds the `ModelConfig` as JSON, so
a file is self-describing. Loading builds the model on the meta device and assigns the
stored tensors (no random initialisation of billions of parameters first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import LEGACY_MOTION_FIELDS, MOTION_FIELDS, DiTConfig, ModelConfig
from model.dit import DiT

FORMAT = "knotstream-avatar-v1"
# Tensors stored beside the model's own, not parameters of it (a personal avatar's
# portrait): named with this prefix, skipped by `load_model`, read by `read_aux`.
AUX_PREFIX = "aux."


def save_model(model: "AvatarModel", path: str | Path, extra: dict | None = None,
               dtype: torch.dtype | None = None, aux: dict[str, Tensor] | None = None) -> None:
    """Write all parameters and persistent buffers plus the config to `path`.

    dtype (e.g. torch.float16) stores floating tensors in that type: the bundled model
    ships in fp16 (half the size); the engine casts to its compute dtype on load.
    aux: further tensors kept in the file as they are (see AUX_PREFIX)."""
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    if extra:
        meta["extra"] = json.dumps(extra)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state.update({AUX_PREFIX + k: v.detach().contiguous().cpu() for k, v in (aux or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a knotstream model file (format {meta.get('format')!r})")
    out = {"config": ModelConfig.from_dict(json.loads(meta["config"]))}
    if "extra" in meta:
        out["extra"] = json.loads(meta["extra"])
    return out


def read_aux(path: str | Path) -> dict[str, Tensor]:
    """The auxiliary tensors of a model file (names without AUX_PREFIX); {} when it has none."""
    with safe_open(str(path), framework="pt") as f:
        return {k[len(AUX_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(AUX_PREFIX)}


def _spread(t: Tensor, dim: int, size: int, targets: list[int]) -> Tensor:
    """The stored positions of `t` along `dim`, in order, placed at `targets` of a zero tensor."""
    shape = list(t.shape)
    shape[dim] = size
    return t.new_zeros(shape).index_copy_(dim, torch.tensor(targets, device=t.device), t)


def _legacy_columns() -> list[int]:
    """Where a legacy motion encoder's input columns (values, then "given" flags) go today."""
    new = len(MOTION_FIELDS)
    keep = [MOTION_FIELDS.index(f) for f in LEGACY_MOTION_FIELDS]
    return keep + [new + i for i in keep]


def widen_motion_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a model written before the head fields (`LEGACY_MOTION_FIELDS`, 10 of
    them) laid out for today's MOTION_FIELDS: the motion encoder's input columns (values,
    then "given" flags) and a portrait warp's regression rows (1, fields, squares) and rest
    motion get zeros for the new fields, so such a model does exactly what it did. A state of
    today's layout is returned as it is."""
    old, new = len(LEGACY_MOTION_FIELDS), len(MOTION_FIELDS)
    keep = [MOTION_FIELDS.index(f) for f in LEGACY_MOTION_FIELDS]
    out = dict(state)
    for k, t in state.items():
        if k.endswith("motion_mlp.0.weight") and t.shape[1] == 2 * old:
            out[k] = _spread(t, 1, 2 * new, _legacy_columns())
        elif k.endswith("warp.landmark_map") and t.shape[0] == 1 + 2 * old:
            out[k] = _spread(t, 0, 1 + 2 * new, [0] + [1 + i for i in keep] + [1 + new + i for i in keep])
        elif k.endswith("warp.rest") and t.shape[0] == old:
            out[k] = _spread(t, 0, new, keep)
    return out


def widen_optimizer_state(opt: torch.optim.Optimizer, checkpoint: str | Path) -> None:
    """After `opt.load_state_dict` of a checkpoint written before the head fields: the
    per-parameter state (Adam's moments) of the motion encoder's input layer widened as
    `widen_motion_state` widens its weight (zeros for the new fields: as if they had had no
    gradient yet), so the resumed fit steps instead of failing on a shape mismatch. A state
    that fits its parameter in any other way is a checkpoint of another model: ValueError."""
    legacy = 2 * len(LEGACY_MOTION_FIELDS)
    for group in opt.param_groups:
        for p in group["params"]:
            for name, t in opt.state.get(p, {}).items():
                if not torch.is_tensor(t) or t.dim() == 0 or t.shape == p.shape:
                    continue
                if t.dim() == 2 and p.dim() == 2 and t.shape == (p.shape[0], legacy) \
                        and p.shape[1] == 2 * len(MOTION_FIELDS):
                    opt.state[p][name] = _spread(t, 1, p.shape[1], _legacy_columns())
                else:
                    raise ValueError(f"{checkpoint}: its optimiser state {name} {tuple(t.shape)} does not fit a "
                                     f"parameter {tuple(p.shape)}: the checkpoint is of another model; delete it "
                                     "to start this stage again")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "AvatarModel":
    """Build on the meta device, then assign the stored tensors (cast to `dtype`)."""
    from model.avatar import AvatarModel  # the converter below does not need the VAE/driving parts

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    config = read_metadata(path)["config"]
    state = {k: v for k, v in load_file(str(path), device=str(device)).items() if not k.startswith(AUX_PREFIX)}
    state = widen_motion_state(state)
    with torch.device("meta"):
        model = AvatarModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"{path}: tensors not in the file and not derivable: {missing[:5]}")
    return model.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# Wan2.1 checkpoints (original names) and diffusers `WanTransformer3DModel` state dicts
# --------------------------------------------------------------------------------------

# diffusers name -> original Wan2.1 name (our DiT uses the original names).
_DIFFUSERS_RULES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"\.attn1\.to_q\.", ".self_attn.q."),
    (r"\.attn1\.to_k\.", ".self_attn.k."),
    (r"\.attn1\.to_v\.", ".self_attn.v."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.norm_(q|k)\.", r".self_attn.norm_\1."),
    (r"\.attn2\.to_q\.", ".cross_attn.q."),
    (r"\.attn2\.to_k\.", ".cross_attn.k."),
    (r"\.attn2\.to_v\.", ".cross_attn.v."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.norm_(q|k)\.", r".cross_attn.norm_\1."),
    # diffusers' norm2 is the cross-attention norm, Wan's norm3 (they are swapped).
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]

_UNSUPPORTED = ("add_k_proj", "add_v_proj", "norm_added_k", "image_embedder", "img_emb")


def _diffusers_to_wan_name(name: str) -> str:
    for pattern, repl in _DIFFUSERS_RULES:
        name = re.sub(pattern, repl, name)
    return name


def convert_wan_state_dict(state: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    """Map a diffusers or original Wan2.1 transformer state dict onto our `DiT(cfg)`.

    Layers Wan does not have are initialised to be inert: the driving cross-attention
    (zero output projection) and the image-to-video input channels of the patch
    embedding (zero weights) when the checkpoint has fewer input channels (T2V: 16).
    The converted model therefore reproduces the original when those inputs are zero.
    """
    state = {k.removeprefix("model."): v for k, v in state.items()}
    bad = sorted({k for k in state if any(u in k for u in _UNSUPPORTED)})
    if bad:
        raise ValueError(f"image-embedding (CLIP) branches of Wan I2V are not supported: {bad[:3]} ...")
    is_diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in state)
    converted = {(_diffusers_to_wan_name(k) if is_diffusers else k): v for k, v in state.items()}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = DiT(cfg).state_dict()
    unknown = sorted(set(converted) - set(fresh))
    if unknown:
        raise ValueError(f"checkpoint keys with no place in DiT({cfg.dim}x{cfg.num_layers}): {unknown[:5]}")

    w = converted.get("patch_embedding.weight")
    if w is not None and w.shape[1] < cfg.in_channels:
        padded = torch.zeros(w.shape[0], cfg.in_channels, *w.shape[2:], dtype=w.dtype)
        padded[:, : w.shape[1]] = w
        converted["patch_embedding.weight"] = padded

    out = {}
    for name, init in fresh.items():
        if name in converted:
            if converted[name].shape != init.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(converted[name].shape)} != {tuple(init.shape)}")
            out[name] = converted[name]
        elif name.split(".")[2:3] in (["drive_attn"], ["norm_drive"]):
            out[name] = init  # new layer: inert initialisation from DiT.__init__
        else:
            raise ValueError(f"checkpoint lacks {name}")
    return out
