"""The photoreal families' DiTs: `model.dit.DiT` plus each family's condition and audio path.

Parameter names are the families' own checkpoint names wherever our DiT's match Wan's
(all of them, for LiveTalk), so a LiveTalk file loads without renaming.

LiveTalk (OmniAvatar-1.3B, LoRA merged), Wan2.1-T2V-1.3B with:
- 33 input channels: noisy latent (16), the reference latent repeated on every frame (16),
  one mask channel that is 0 on the stream's first latent frame (given) and 1 after;
- text cross-attention to a umT5 prompt embedding (keys/values cacheable per session,
  `DiT.text_kv`);
- an additive audio path: `audio_proj` (an AudioPack: Linear + LayerNorm) packs each
  latent frame's 4 video frames of wav2vec2 features into 32 numbers, and
  `audio_cond_projs.{i}` (Linear 32 -> dim) adds the result to every token of that latent
  frame before block i + 2 (blocks 2 .. num_layers // 2).

FlashHead (Pro), Wan2.1-1.3B geometry with:
- 32 input channels: noisy latent and the reference latent repeated (no mask);
- no text: each block's cross-attention (`cross_attn`, `norm3` in its files; our
  `drive_attn`, `norm_drive`) attends from each latent frame's tokens to that frame's 32
  audio tokens, made by `audio_proj` from 5-frame (first latent) / 8-frame (later) windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import DiTConfig
from model.dit import DiT


def livetalk_condition(reference: Tensor, n_frames: int, start_frame: int) -> Tensor:
    """LiveTalk's 17 condition channels for latent frames [start_frame, start_frame + n_frames).

    reference: (B, 16, 1, h, w) normalised latent of the portrait -> (B, 17, n_frames, h, w):
    the reference latent on every frame, then the mask (0 = given on the stream's frame 0)."""
    B, C, _, h, w = reference.shape
    mask = reference.new_ones(B, 1, n_frames, h, w)
    if start_frame == 0:
        mask[:, :, 0] = 0
    return torch.cat([reference.expand(B, C, n_frames, h, w), mask], dim=1)


def flashhead_condition(reference: Tensor, n_frames: int) -> Tensor:
    """FlashHead's 16 condition channels: the reference latent (B, 16, 1, h, w) on every frame."""
    B, C, _, h, w = reference.shape
    return reference.expand(B, C, n_frames, h, w)


class AudioPack(nn.Module):
    """LiveTalk's `audio_proj`: 4 video frames of features per latent frame -> `hidden`."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.norm_out = nn.LayerNorm(hidden)

    def forward(self, groups: Tensor) -> Tensor:
        """groups (B, F, in_dim) from `livetalk_audio_groups` -> (B, F, hidden)."""
        return self.norm_out(self.proj(groups))


class LiveTalkDiT(DiT):
    """Wan DiT with LiveTalk's additive audio path (see the module docstring)."""

    FIRST_AUDIO_BLOCK = 2

    def __init__(self, cfg: DiTConfig, audio_in: int, audio_hidden: int = 32):
        super().__init__(cfg)
        if cfg.cond_mask_channels != 1 or not cfg.text_dim or cfg.drive_dim:
            raise ValueError("LiveTalk's DiT has 1 mask channel, text cross-attention and no drive_attn")
        self.audio_proj = AudioPack(audio_in, audio_hidden)
        n = cfg.num_layers // 2 - 1
        self.audio_cond_projs = nn.ModuleList(nn.Linear(audio_hidden, cfg.dim) for _ in range(n))

    def audio_adds(self, groups: Tensor) -> list[Tensor | None]:
        """groups (B, F, in_dim) -> per block, None or the (B, F, 1, dim) term added to its
        input tokens. Fixed for a chunk: compute once, reuse at every denoising step."""
        packed = self.audio_proj(groups)  # (B, F, hidden)
        adds: list[Tensor | None] = [None] * len(self.blocks)
        for i, proj in enumerate(self.audio_cond_projs):
            adds[self.FIRST_AUDIO_BLOCK + i] = proj(packed).unsqueeze(2)
        return adds

    def forward(self, x: Tensor, t: Tensor, frame_pos: Tensor, ctx, cond: Tensor | None = None,
                audio: Tensor | list[Tensor | None] | None = None, text=None) -> Tensor:
        """As `DiT.forward`; cond: `livetalk_condition(...)` (B, 17, F, h, w); audio: the
        chunk's `livetalk_audio_groups` (B, F, in_dim) or their precomputed `audio_adds`."""
        adds = self.audio_adds(audio) if isinstance(audio, Tensor) else audio
        return super().forward(x, t, frame_pos, ctx, cond=cond, text=text, token_adds=adds)


class FlashHeadAudioProj(nn.Module):
    """FlashHead's `audio_proj`: windows of wav2vec2 features -> `tokens` audio tokens per latent frame."""

    def __init__(self, layers: int, hidden: int, out_dim: int, intermediate: int = 512, tokens: int = 32,
                 first_window: int = 5, later_window: int = 8):
        super().__init__()
        self.tokens, self.out_dim = tokens, out_dim
        self.proj1 = nn.Linear(first_window * layers * hidden, intermediate)
        self.proj1_vf = nn.Linear(later_window * layers * hidden, intermediate)
        self.proj2 = nn.Linear(intermediate, intermediate)
        self.proj3 = nn.Linear(intermediate, tokens * out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, first: Tensor, later: Tensor) -> Tensor:
        """first (B, 1, 5, L, H), later (B, k, 8, L, H) from `flashhead_audio_windows` ->
        tokens (B, 1 + k, tokens, out_dim)."""
        h = torch.cat([F.relu(self.proj1(first.flatten(2))), F.relu(self.proj1_vf(later.flatten(2)))], dim=1)
        out = self.proj3(F.relu(self.proj2(h)))
        out = out.view(*out.shape[:2], self.tokens, self.out_dim)
        # FlashHead normalises in float32 whatever the model's dtype.
        return F.layer_norm(out.float(), (self.out_dim,), self.norm.weight.float(), self.norm.bias.float(),
                            self.norm.eps).to(out.dtype)


class FlashHeadDiT(DiT):
    """Wan DiT whose per-frame cross-attention reads FlashHead's audio tokens."""

    def __init__(self, cfg: DiTConfig, audio_layers: int, audio_hidden: int, audio_tokens: int = 32,
                 audio_intermediate: int = 512):
        super().__init__(cfg)
        if cfg.cond_mask_channels != 0 or cfg.text_dim or cfg.cross_attn_norm or cfg.drive_dim != cfg.dim:
            raise ValueError("FlashHead's DiT has no mask channel, no text (nor its norm3) and drive_dim == dim")
        self.audio_proj = FlashHeadAudioProj(audio_layers, audio_hidden, cfg.dim, audio_intermediate, audio_tokens)

    def forward(self, x: Tensor, t: Tensor, frame_pos: Tensor, ctx, cond: Tensor | None = None,
                audio: tuple[Tensor, Tensor] | Tensor | None = None) -> Tensor:
        """As `DiT.forward`; cond: `flashhead_condition(...)`; audio: the chunk's
        `flashhead_audio_windows` (first, later), or their precomputed `audio_proj` tokens
        (B, F, tokens, dim), one set per latent frame."""
        tokens = self.audio_proj(*audio) if isinstance(audio, tuple) else audio
        return super().forward(x, t, frame_pos, ctx, cond=cond, drive=tokens)
