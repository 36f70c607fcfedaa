"""Wan2.1-compatible causal DiT: patch embedding, adaLN blocks, 3D RoPE, cross-attention.

Parameter names follow the original Wan2.1 checkpoints (`self_attn.q`, `cross_attn.o`,
`modulation`, `head.head`, ...), so loading an original checkpoint is a plain load and
diffusers names go through one converter in `model/weights.py`. Two additions, both
initialised to be inert on a converted checkpoint:

- `drive_attn` in every block: cross-attention from each latent frame's tokens to the
  driving tokens of that frame's own time span (zero-initialised output projection);
- the image-to-video condition channels (mask + condition latent) of the patch
  embedding (zero-initialised input weights when converting a 16-channel model).

Self-attention goes through one of three attention contexts (see `FullSequence`,
`Streaming`, `EncodeReference`), which call the single dispatch point in `kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from model.cache import ContextKV, ReferenceCache, WindowCache
from model.config import DiTConfig
from model.rope import Rope3D, apply_rope, cos_sin


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding, [cos | sin] as Wan. t: (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def layer_norm32(x: Tensor, norm: nn.LayerNorm | None = None, eps: float = 1e-6) -> Tensor:
    """LayerNorm computed in float32 (as Wan), optional affine from `norm`."""
    w = b = None
    if norm is not None:
        w, b, eps = norm.weight.float(), norm.bias.float(), norm.eps
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


# --------------------------------------------------------------------------------------
# Attention contexts: how a block's self-attention sees keys beyond its own tokens.
# --------------------------------------------------------------------------------------


@dataclass
class FullSequence:
    """One pass over [reference prefix | frames] with the block-causal sliding-window mask.

    prefix_len / chunk_len / window_len are in tokens; window_len None = unlimited.
    `FullSequence(0, L, None)` is plain bidirectional attention (Wan).
    """

    prefix_len: int
    chunk_len: int
    window_len: int | None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return kernels.block_window_attention(
            q, k, v, prefix_len=self.prefix_len, chunk_len=self.chunk_len, window_len=self.window_len)


@dataclass
class Streaming:
    """A chunk attending to [reference cache | window ring buffer | itself].

    With `write=True` the chunk's keys/values are staged into the window cache (the
    caller commits them once every layer has run).
    """

    reference: ReferenceCache
    window: WindowCache
    write: bool = False

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ref_k, ref_v = self.reference.view(layer)
        ring_k, ring_v, start, length = self.window.view(layer)
        out = kernels.window_attention(q, ref_k, ref_v, ring_k, ring_v, start, length, k, v)
        if self.write:
            self.window.write(layer, k, v)
        return out


@dataclass
class BatchedStreaming:
    """Several streams' chunks in one forward (the generation worker's batch): row i of the
    batch attends to its own stream's caches. Projections, FFN and cross-attention run
    batched; the attention core runs per row (each stream has its own ring position)."""

    parts: list[Streaming]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if len(self.parts) == 1:
            return self.parts[0].attend(layer, q, k, v)
        return torch.cat([p.attend(layer, q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i, p in enumerate(self.parts)])


@dataclass
class EncodeReference:
    """The reference frame alone (noise level 0); its keys/values go into the cache."""

    reference: ReferenceCache

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.reference.set(layer, k, v)
        return F.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = nn.RMSNorm(d, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(d, eps=cfg.eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx, layer: int) -> Tensor:
        """x: (B, L, dim) -> (B, L, dim)."""
        B, L, _ = x.shape
        q = _normed(self.norm_q, self.q(x)).view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, D)
        k = _normed(self.norm_k, self.k(x)).view(B, L, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(B, L, self.heads, -1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = ctx.attend(layer, q, k, v)  # (B, H, L, D)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


def _normed(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """`norm(x)` in the norm's own dtype: under CPU autocast the projections come out in
    bfloat16, and bfloat16 input with float32 weights takes RMSNorm's unfused path with a
    warning; the query/key norms stay in the weights' precision either way."""
    return norm(x.to(norm.weight.dtype))


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys/values from a context of width `ctx_dim`."""

    def __init__(self, cfg: DiTConfig, ctx_dim: int):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.num_heads
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(ctx_dim, d), nn.Linear(ctx_dim, d)
        self.norm_q = nn.RMSNorm(d, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(d, eps=cfg.eps)

    def kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of a context: ctx (N, M, ctx_dim) -> k, v (N, H, M, D)."""
        N, M, _ = ctx.shape
        k = _normed(self.norm_k, self.k(ctx)).view(N, M, self.heads, -1).transpose(1, 2)
        return k, self.v(ctx).view(N, M, self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, ctx: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """x: (N, L, dim), ctx: (N, M, ctx_dim) or its precomputed `kv(ctx)` -> (N, L, dim)."""
        N, L, _ = x.shape
        q = _normed(self.norm_q, self.q(x)).view(N, L, self.heads, -1).transpose(1, 2)
        k, v = ctx if isinstance(ctx, tuple) else self.kv(ctx)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(N, L, -1))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps) if cfg.cross_attn_norm else None  # Wan's name
        self.cross_attn = CrossAttention(cfg, d) if cfg.text_dim else None
        self.drive_attn = None
        if cfg.drive_dim:
            self.norm_drive = nn.LayerNorm(d, eps=cfg.eps)
            self.drive_attn = CrossAttention(cfg, cfg.drive_dim)
            # Inert until trained: a converted Wan checkpoint is reproduced exactly.
            nn.init.zeros_(self.drive_attn.o.weight)
            nn.init.zeros_(self.drive_attn.o.bias)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.eps = cfg.eps

    def forward(self, x: Tensor, e: Tensor, cos: Tensor, sin: Tensor, ctx, layer: int,
                text: Tensor | tuple[Tensor, Tensor] | None, drive: Tensor | None) -> Tensor:
        """x: (B, F, T, dim) tokens per frame; e: (B, F, 6, dim) per-frame modulation;
        text: embedded text context (B, Lt, dim) or this layer's cached (k, v);
        drive: (B, Fd, M, drive_dim) for the last Fd frames or None."""
        B, Fr, T, d = x.shape
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e.float()).unsqueeze(3).unbind(2)

        # 1. Self-attention, adaLN-modulated per frame.
        h = layer_norm32(x, eps=self.eps) * (1 + scale) + shift
        h = self.self_attn(h.type_as(x).reshape(B, Fr * T, d), cos, sin, ctx, layer)
        x = (x.float() + h.view(B, Fr, T, d) * gate).type_as(x)

        # 2. Text cross-attention (Wan's conditioning path; absent in the tiny preset).
        if self.cross_attn is not None and text is not None:
            h = layer_norm32(x, self.norm3).type_as(x) if self.norm3 is not None else x
            x = x + self.cross_attn(h.reshape(B, Fr * T, d), text).view(B, Fr, T, d)

        # 3. Driving cross-attention, each latent frame to its own time span's tokens.
        if self.drive_attn is not None and drive is not None:
            Fd = drive.shape[1]
            xd = x[:, Fr - Fd:]
            h = layer_norm32(xd, self.norm_drive).type_as(x)
            h = self.drive_attn(h.reshape(B * Fd, T, d), drive.reshape(B * Fd, drive.shape[2], -1))
            x = torch.cat([x[:, :Fr - Fd], xd + h.view(B, Fd, T, d)], dim=1) if Fd < Fr else x + h.view(B, Fd, T, d)

        # 4. Feed-forward, adaLN-modulated per frame.
        h = layer_norm32(x, eps=self.eps) * (1 + c_scale) + c_shift
        h = self.ffn(h.type_as(x))
        return (x.float() + h.float() * c_gate).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.head = nn.Linear(cfg.dim, cfg.latent_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.eps = cfg.eps

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, F, T, dim), temb: (B, F, dim) -> (B, F, T, out)."""
        shift, scale = (self.modulation.float() + temb.float().unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head((layer_norm32(x, eps=self.eps) * (1 + scale) + shift).type_as(x))


class DiT(nn.Module):
    """The denoiser. Predicts the flow velocity (noise - clean) as Wan."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_embedding = None
        if cfg.text_dim:
            self.text_embedding = nn.Sequential(
                nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_theta)

    @property
    def cond_channels(self) -> int:
        return self.cfg.in_channels - self.cfg.latent_channels

    def text_kv(self, text: Tensor) -> ContextKV:
        """A fixed text context (B, Lt, text_dim), e.g. a session's prompt embedding -> every
        layer's cross-attention keys/values, to pass as `text=` to every later forward."""
        ctx = self.text_embedding(text)
        pairs = [block.cross_attn.kv(ctx) for block in self.blocks]
        return ContextKV(torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs]))

    def forward(self, x: Tensor, t: Tensor, frame_pos: Tensor, ctx, cond: Tensor | None = None,
                drive: Tensor | None = None, text: Tensor | ContextKV | None = None,
                token_adds: list[Tensor | None] | None = None) -> Tensor:
        """Denoise a block of latent frames.

        x:         (B, C, F, h, w) noisy latents.
        t:         (B, F) timesteps in [0, num_train_timesteps], one per latent frame.
        frame_pos: (F,) temporal RoPE positions of the frames, or (B, F) one row per batch item.
        ctx:       attention context (`FullSequence`, `Streaming`, `EncodeReference`).
        cond:      (B, mask + C, F, h, w) image-to-video condition, or None (= no condition).
        drive:     (B, Fd, M, drive_dim) driving tokens of the last Fd frames (Fd <= F), or None.
        text:      (B, Lt, text_dim) text context, its cached `text_kv(...)`, or None (skips
                   text cross-attention).
        token_adds: per block, None or a tensor (B, F, 1 or T, dim) added to that block's
                   input tokens (an additive conditioning path, e.g. LiveTalk's audio).
        Returns    (B, C, F, h, w) velocity prediction.
        """
        B, C, Fr, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        if cond is None:
            cond = x.new_zeros(B, self.cond_channels, Fr, H, W)
        tokens = self.patch_embedding(torch.cat([x, cond], dim=1))  # (B, dim, F, hp, wp)
        hp, wp = tokens.shape[-2:]
        tokens = tokens.flatten(3).transpose(1, 2).transpose(2, 3)  # (B, F, T, dim)

        temb = self.time_embedding(timestep_embedding(t.reshape(-1), self.cfg.freq_dim).to(x.dtype))
        e = self.time_projection(temb).view(B, Fr, 6, -1)  # (B, F, 6, dim)
        temb = temb.view(B, Fr, -1)

        if frame_pos.dim() == 2:  # (B, F): each row its own positions (batched streams)
            angles = torch.stack([self.rope.grid_angles(p, hp, wp) for p in frame_pos])[:, None]
        else:
            angles = self.rope.grid_angles(frame_pos, hp, wp)
        cos, sin = cos_sin(angles, x.dtype, x.device)
        text_ctx = text
        if isinstance(text, Tensor):
            text_ctx = self.text_embedding(text) if self.text_embedding is not None else None

        for i, block in enumerate(self.blocks):
            if token_adds is not None and token_adds[i] is not None:
                tokens = tokens + token_adds[i]
            layer_text = text_ctx.view(i) if isinstance(text_ctx, ContextKV) else text_ctx
            tokens = block(tokens, e, cos, sin, ctx, i, layer_text, drive)

        out = self.head(tokens, temb)  # (B, F, T, pt*ph*pw*C)
        out = out.view(B, Fr, hp, wp, pt, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, C, Fr * pt, hp * ph, wp * pw)
