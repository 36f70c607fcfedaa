"""Parameter names of the Wan2.1 VAE: Wan's originals (`Wan2.1_VAE.pth`, `model.wan.vae`)
<-> diffusers' `AutoencoderKLWan`, one rule table read both ways.

The decoder is the one non-local rename: Wan keeps one flat list `decoder.upsamples.{j}`
(per level: num_res_blocks + 1 residual blocks, then a resample), diffusers groups it as
`decoder.up_blocks.{level}.resnets.{k}` / `.upsamplers.0`.
"""

from __future__ import annotations

import re

from torch import Tensor

# (Wan pattern, diffusers pattern) applied to whole dotted names, either way.
_RULES = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.residual\.0\.gamma$", ".norm1.gamma"),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.gamma$", ".norm2.gamma"),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]

# The same renames read diffusers -> Wan. The residual-block renames run first: after
# `encoder.conv_in` -> `encoder.conv1`, a later `.conv1.` rule would catch it.
_INVERSE = [
    (r"\.norm1\.gamma$", ".residual.0.gamma"),
    (r"\.conv1\.", ".residual.2."),
    (r"\.norm2\.gamma$", ".residual.3.gamma"),
    (r"\.conv2\.", ".residual.6."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
]


def _apply(rules: list[tuple[str, str]], name: str) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def wan_to_diffusers(name: str, num_res_blocks: int) -> str:
    """One Wan2.1 VAE parameter name -> its diffusers `AutoencoderKLWan` name."""
    per_level = num_res_blocks + 2  # residual blocks + the resample
    m = re.match(r"^decoder\.upsamples\.(\d+)\.(.*)$", name)
    if m:
        level, k = divmod(int(m.group(1)), per_level)
        inner = _apply(_RULES, "." + m.group(2))[1:]
        where = "upsamplers.0" if k == per_level - 1 else f"resnets.{k}"
        return f"decoder.up_blocks.{level}.{where}.{inner}"
    return _apply(_RULES, name)


def diffusers_to_wan(name: str, num_res_blocks: int) -> str:
    """One diffusers `AutoencoderKLWan` parameter name -> its Wan2.1 name."""
    per_level = num_res_blocks + 2
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", name)
    if m:
        k = per_level - 1 if m.group(3) is None else int(m.group(3))
        inner = _apply(_INVERSE, "." + m.group(4))[1:]
        return f"decoder.upsamples.{int(m.group(1)) * per_level + k}.{inner}"
    return _apply(_INVERSE, name)


def is_diffusers_state(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("quant_conv.", "encoder.conv_in.", "decoder.up_blocks.")) for k in state)


def to_wan_names(state: dict[str, Tensor], num_res_blocks: int) -> dict[str, Tensor]:
    """A VAE state dict under either naming -> Wan's names (unchanged if already Wan's)."""
    if not is_diffusers_state(state):
        return dict(state)
    return {diffusers_to_wan(k, num_res_blocks): v for k, v in state.items()}
