"""Parameter names of the Wan2.1 VAE: Wan's originals (`Wan2.1_VAE.pth`, `model.wan.vae`)
<-> diffusers' `AutoencoderKLWan`, one rule table read both ways.

The decoder is the one non-local rename: Wan keeps one flat list `decoder.upsamples.{j}`
(per level: num_res_blocks + 1 residual blocks, then a resample), diffusers groups it as
`decoder.up_blocks.{level}.resnets.{k}` / `.upsamplers.0`.
"""

from __future__ import annotations

import re

from torch import Tensor

# (Wan, diffusers) name prefixes, one table read both ways.
_PREFIXES = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."),
             ("encoder.downsamples.", "encoder.down_blocks.")] + [
    (f"{net}.{wan}", f"{net}.{diffusers}") for net in ("encoder", "decoder") for wan, diffusers in (
        ("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."),
        ("middle.0.", "mid_block.resnets.0."), ("middle.1.", "mid_block.attentions.0."),
        ("middle.2.", "mid_block.resnets.1."))]
# (Wan, diffusers) names inside a residual block, wherever it sits.
_INNER = [(".residual.0.", ".norm1."), (".residual.2.", ".conv1."), (".residual.3.", ".norm2."),
          (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut.")]


def _rename(name: str, to_diffusers: bool) -> str:
    src, dst = (0, 1) if to_diffusers else (1, 0)

    def prefix(n: str) -> str:
        for pair in _PREFIXES:
            if n.startswith(pair[src]):
                return pair[dst] + n[len(pair[src]):]
        return n

    def inner(n: str) -> str:
        for pair in _INNER:
            n = n.replace(pair[src], pair[dst])
        return n

    # Inner names first when reading diffusers' (its `conv1` inside a block is Wan's
    # `residual.2`, while `encoder.conv_in` becomes Wan's `encoder.conv1`).
    return inner(prefix(name)) if to_diffusers else prefix(inner(name))


def wan_to_diffusers(name: str, num_res_blocks: int) -> str:
    """One Wan2.1 VAE parameter name -> its diffusers `AutoencoderKLWan` name."""
    per_level = num_res_blocks + 2  # residual blocks + the resample
    m = re.match(r"^decoder\.upsamples\.(\d+)\.(.*)$", name)
    if m:
        level, k = divmod(int(m.group(1)), per_level)
        inner = _rename("." + m.group(2), to_diffusers=True)[1:]
        where = "upsamplers.0" if k == per_level - 1 else f"resnets.{k}"
        return f"decoder.up_blocks.{level}.{where}.{inner}"
    return _rename(name, to_diffusers=True)


def diffusers_to_wan(name: str, num_res_blocks: int) -> str:
    """One diffusers `AutoencoderKLWan` parameter name -> its Wan2.1 name."""
    per_level = num_res_blocks + 2
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", name)
    if m:
        k = per_level - 1 if m.group(3) is None else int(m.group(3))
        inner = _rename("." + m.group(4), to_diffusers=False)[1:]
        return f"decoder.upsamples.{int(m.group(1)) * per_level + k}.{inner}"
    return _rename(name, to_diffusers=False)


def is_diffusers_state(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(("quant_conv.", "encoder.conv_in.", "decoder.up_blocks.")) for k in state)


def to_wan_names(state: dict[str, Tensor], num_res_blocks: int) -> dict[str, Tensor]:
    """A VAE state dict under either naming -> Wan's names (unchanged if already Wan's)."""
    if not is_diffusers_state(state):
        return dict(state)
    return {diffusers_to_wan(k, num_res_blocks): v for k, v in state.items()}
