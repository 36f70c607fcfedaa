"""Loading a photoreal family from the user's download folder (no hub, no re-download).

    livetalk:DIR   DIR as LiveTalk's README lays it out (`pretrained_checkpoints/`):
                   LiveTalk-1.3B-V0.1/model.safetensors, Wan2.1-T2V-1.3B/Wan2.1_VAE.pth,
                   wav2vec2/ (wav2vec2-base-960h), and prompt_embedding.safetensors
    flashhead:DIR  DIR as FlashHead's README lays it out (`models/`):
                   SoulX-FlashHead-1_3B/Model_Pro/ (config.json + safetensors),
                   SoulX-FlashHead-1_3B/VAE_Wan/Wan2.1_VAE.pth, wav2vec2-base-960h/

LiveTalk's DiT file uses Wan's own names: it loads as is, after checking LiveTalk's own
fingerprint of its names and shapes. FlashHead's uses Wan's names too, except that its
blocks' cross-attention (`cross_attn`, `norm3`) is our per-frame `drive_attn`,
`norm_drive`; two modules its model defines but never calls (`text_embedding`,
`audio_emb`) are skipped by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import DiTConfig
from model.wan.audio import Wav2VecDriving
from model.wan.checkpoints import Needed, assign_weights, check_files, fingerprint, load_wan_vae, read_state_dict
from model.wan.families import FamilyConfig, FamilyModel, build_dit, family_config

# md5 of the names and shapes of LiveTalk-1.3B-V0.1's model.safetensors, as LiveTalk's
# loader checks it (model/wan_video_dit_omniavatar_helper.py there).
LIVETALK_FINGERPRINT = "2bf9513c7a3e908015f11a800fc9b820"
PROMPT_FILE = "prompt_embedding.safetensors"

LIVETALK_FILES = [
    Needed("LiveTalk-1.3B-V0.1/model.safetensors", "LiveTalk DiT (LoRA merged)",
           "huggingface.co/GAIR/LiveTalk-1.3B-V0.1"),
    Needed("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", "Wan2.1 VAE", "huggingface.co/Wan-AI/Wan2.1-T2V-1.3B"),
    Needed("wav2vec2/config.json", "wav2vec2-base-960h (the whole folder)",
           "huggingface.co/facebook/wav2vec2-base-960h"),
    Needed(PROMPT_FILE, "the umT5 embedding of the speaking prompt, (tokens, 4096)",
           "`python -m model.wan.prompt DIR`, once: it runs Wan2.1-T2V-1.3B's umT5 encoder on LiveTalk's prompt"),
]
FLASHHEAD_FILES = [
    Needed("SoulX-FlashHead-1_3B/Model_Pro/config.json", "FlashHead Pro DiT (config.json + safetensors)",
           "huggingface.co/Soul-AILab/SoulX-FlashHead-1_3B"),
    Needed("SoulX-FlashHead-1_3B/VAE_Wan/Wan2.1_VAE.pth", "Wan2.1 VAE",
           "huggingface.co/Soul-AILab/SoulX-FlashHead-1_3B"),
    Needed("wav2vec2-base-960h/config.json", "wav2vec2-base-960h (the whole folder)",
           "huggingface.co/facebook/wav2vec2-base-960h"),
]

FLASHHEAD_UNUSED = ("text_embedding.", "audio_emb.")  # defined in its model, never called in its forward
_FLASHHEAD_RENAMES = [(r"^(blocks\.\d+)\.cross_attn\.", r"\1.drive_attn."),
                      (r"^(blocks\.\d+)\.norm3\.", r"\1.norm_drive.")]


def flashhead_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """FlashHead's DiT state dict -> our FlashHeadDiT names (its unused modules dropped)."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(FLASHHEAD_UNUSED):
            continue
        for pattern, repl in _FLASHHEAD_RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = tensor
    return out


def ours_to_flashhead(name: str) -> str:
    """Our FlashHeadDiT parameter name -> FlashHead's."""
    name = re.sub(r"^(blocks\.\d+)\.drive_attn\.", r"\1.cross_attn.", name)
    return re.sub(r"^(blocks\.\d+)\.norm_drive\.", r"\1.norm3.", name)


def flashhead_dit_config(folder: str | Path) -> DiTConfig:
    """Our DiTConfig from FlashHead's diffusers-style config.json (WanModelAudioProject's arguments)."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    if raw.get("has_image_input"):
        raise ValueError(f"{folder}: has_image_input (a CLIP image branch) is not part of FlashHead Pro")
    if raw["in_dim"] != 2 * raw["out_dim"]:
        raise ValueError(f"{folder}: in_dim {raw['in_dim']} != noisy + reference latent channels {2 * raw['out_dim']}")
    return DiTConfig(dim=raw["dim"], ffn_dim=raw["ffn_dim"], num_heads=raw["num_heads"], num_layers=raw["num_layers"],
                     freq_dim=raw["freq_dim"], eps=raw["eps"], patch_size=tuple(raw["patch_size"]),
                     latent_channels=raw["out_dim"], cond_mask_channels=0, text_dim=0, drive_dim=raw["dim"],
                     cross_attn_norm=False)


def _wav2vec_geometry(folder: Path) -> dict:
    raw = json.loads((folder / "config.json").read_text())
    return {"hidden_size": raw["hidden_size"], "num_hidden_layers": raw["num_hidden_layers"]}


def load_family(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                preset: str | None = None) -> FamilyModel:
    """`livetalk:DIR` or `flashhead:DIR` -> the family's model bundle, weights from DIR.

    preset: the geometry (default the released `<family>-1.3b`; tests load files written
    from `<family>-random`). FlashHead's geometry comes from its own config.json."""
    family, _, root = spec.partition(":")
    if family not in ("livetalk", "flashhead") or not root:
        raise ValueError(f"model spec {spec!r}: expected livetalk:DIR or flashhead:DIR")
    cfg = family_config(preset or f"{family}-1.3b")
    if cfg.family != family:
        raise ValueError(f"preset {cfg.name!r} is not a {family} geometry")
    if family == "livetalk":
        return _load_livetalk(Path(root), cfg, device, dtype)
    return _load_flashhead(Path(root), cfg, device, dtype)


def _bundle(cfg: FamilyConfig, state: dict[str, Tensor], source: Path, vae_path: Path, wav2vec: Path,
            device, dtype, prompt: Tensor | None = None) -> FamilyModel:
    with torch.device("meta"):
        dit = build_dit(cfg)
    assign_weights(dit, state, source)
    to = dict(device=device, dtype=dtype)
    return FamilyModel(cfg, dit.to(**to).eval().requires_grad_(False), load_wan_vae(vae_path, device, dtype, cfg.vae),
                       Wav2VecDriving.from_pretrained(wav2vec, cfg.audio_layout, device, cfg.wav2vec_dtype(dtype)),
                       None if prompt is None else prompt.to(**to))


def _load_livetalk(root: Path, cfg: FamilyConfig, device, dtype) -> FamilyModel:
    check_files(root, LIVETALK_FILES)
    cfg = cfg.replace(wav2vec=_wav2vec_geometry(root / "wav2vec2"))
    dit_file = root / LIVETALK_FILES[0].path
    state = read_state_dict(dit_file)
    got = fingerprint({k: tuple(v.shape) for k, v in state.items()})
    if cfg.name == "livetalk-1.3b" and got != LIVETALK_FINGERPRINT:
        raise ValueError(f"{dit_file}: not LiveTalk-1.3B-V0.1 (names/shapes fingerprint {got}, "
                         f"expected {LIVETALK_FINGERPRINT})")
    prompt = load_prompt_embedding(root / PROMPT_FILE, cfg.text_len, cfg.dit.text_dim)
    return _bundle(cfg, state, dit_file, root / LIVETALK_FILES[1].path, root / "wav2vec2", device, dtype, prompt)


def _load_flashhead(root: Path, cfg: FamilyConfig, device, dtype) -> FamilyModel:
    check_files(root, FLASHHEAD_FILES)
    dit_dir = root / "SoulX-FlashHead-1_3B/Model_Pro"
    wav2vec = root / "wav2vec2-base-960h"
    cfg = cfg.replace(dit=flashhead_dit_config(dit_dir), wav2vec=_wav2vec_geometry(wav2vec))
    state = flashhead_to_ours(read_state_dict(dit_dir))
    return _bundle(cfg, state, dit_dir, root / FLASHHEAD_FILES[1].path, wav2vec, device, dtype)


# --------------------------------------------------------------------------------------
# LiveTalk's prompt: one precomputed umT5 embedding
# --------------------------------------------------------------------------------------


def save_prompt_embedding(path: str | Path, embedding: Tensor) -> None:
    """Store a prompt's umT5 output for its real tokens, (tokens, text_dim) or (1, tokens, text_dim)."""
    emb = embedding[0] if embedding.dim() == 3 else embedding
    if emb.dim() != 2:
        raise ValueError(f"prompt embedding must be (tokens, dim), got {tuple(embedding.shape)}")
    save_file({"prompt": emb.detach().contiguous().cpu()}, str(path))


def load_prompt_embedding(path: str | Path, text_len: int, text_dim: int) -> Tensor:
    """A stored prompt embedding -> (1, text_len, text_dim), zero-padded after its tokens as
    Wan pads umT5's output (the padding tokens still pass the DiT's text embedding)."""
    tensors = load_file(str(path))
    if set(tensors) != {"prompt"}:
        raise ValueError(f"{path}: expected one tensor named 'prompt', found {sorted(tensors)}")
    emb = tensors["prompt"]
    if emb.dim() != 2 or emb.shape[1] != text_dim or not 1 <= emb.shape[0] <= text_len:
        raise ValueError(f"{path}: prompt must be (1..{text_len}, {text_dim}), got {tuple(emb.shape)}")
    out = emb.new_zeros(1, text_len, text_dim)
    out[0, : emb.shape[0]] = emb
    return out
