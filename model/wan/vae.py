"""The Wan2.1 video VAE (LiveTalk, FlashHead Pro), with a streaming decoder.

Own implementation rather than a wrapper of diffusers' `AutoencoderKLWan`: serving needs a
decoder that keeps its feature cache between calls and can snapshot/restore it (rewinds),
which diffusers only reaches through private internals (`_feat_map`, the decoder's
`feat_cache`/`first_chunk` arguments, changed between releases); diffusers also stays a
test-only dependency. Parameter names are Wan2.1's own, so `Wan2.1_VAE.pth` is a plain
load; `model.wan.vae_names` converts diffusers names. Tests check parity with diffusers.

Geometry: video (B, 3, 1 + 4k, H, W) in [-1, 1] <-> latent (B, z, 1 + k, H/8, W/8); video
frame 0 alone makes latent 0, each later latent covers 4 frames. Activations are
channel-first (B, C, T, H, W). Every temporal conv is causal: it sees the last kt - 1
frames before its input, from the `FeatureCache` (zeros at the start of a stream), so a
clip decoded one latent at a time equals the clip decoded whole. As in Wan, the temporal
resamplers treat the stream's first frame alone: the decoder's x2 time upsample passes
it through unchanged (1 frame) and starts its own causal conv at the next frame; the
encoder's x2 time downsample keeps it and starts its stride-2 windows on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.vae import denormalize_latent, normalize_latent

# Per-channel statistics of Wan2.1 latents (Wan's `WanVAE.mean` / `.std`): the DiT sees
# (mu - mean) / std.
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class WanVAEConfig:
    """Wan2.1 VAE geometry (defaults: the released `Wan2.1_VAE.pth`)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Per encoder level transition: does it also halve time? (the decoder mirrors it)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] | None = WAN21_LATENT_MEAN
    latents_std: tuple[float, ...] | None = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        self.dim_mult = tuple(self.dim_mult)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per level "
                             f"transition), got {len(self.temporal_downsample)}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"{name} has {len(v)} entries, expected z_dim = {self.z_dim}")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)


# --------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------


class FeatureCache:
    """Per-stream past frames of every causal conv of one network (Wan's feature cache).

    Slot i holds the last input frames the i-th causal conv needs, (B, C, n, H, W).
    Stored tensors are replaced, never written in place, so `snapshot()` is a tuple of
    references (no copy) and `restore()` puts them back: a held snapshot keeps at most one
    older set of cache tensors alive. `first` is True until the first call has passed.
    keep=False is a one-shot pass over a whole clip: nothing is stored.
    """

    def __init__(self, n_slots: int, keep: bool = True):
        self.keep = keep
        self.slots: list[Tensor | None] = [None] * n_slots
        self.first = True

    def past(self, slot: int) -> Tensor | None:
        return self.slots[slot]

    def put(self, slot: int, frames: Tensor) -> None:
        if self.keep:
            self.slots[slot] = frames.clone()  # own storage: a view would pin the whole activation

    def snapshot(self) -> tuple[tuple[Tensor | None, ...], bool]:
        return tuple(self.slots), self.first

    def restore(self, snap: tuple[tuple[Tensor | None, ...], bool]) -> None:
        slots, self.first = snap
        self.slots = list(slots)

    def reset(self) -> None:
        self.slots = [None] * len(self.slots)
        self.first = True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots if t is not None)


def _number_slots(module: nn.Module) -> int:
    """Give every cached temporal conv inside `module` its own cache slot; returns the count."""
    n = 0
    for m in module.modules():
        if isinstance(m, CausalConv3d) and m.kernel_size[0] > 1:
            m.slot = n
            n += 1
    return n


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """3D conv that pads only the past in time (kt - 1 frames: cached, or zeros at the
    start of a stream) and 'same' in space. x (B, Cin, T, H, W) -> (B, Cout, T, H, W)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int]):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(cin, cout, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))
        self.slot = -1

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        keep = self.kernel_size[0] - 1
        if keep:
            past = cache.past(self.slot)
            if past is None:
                past = x.new_zeros(*x.shape[:2], keep, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            cache.put(self.slot, x[:, :, -keep:])
        return super().forward(x)


class RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(C) and a per-channel gain."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _per_frame(fn, x: Tensor) -> Tensor:
    """Apply a 2D op to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    B, C, T, H, W = x.shape
    y = fn(x.transpose(1, 2).reshape(B * T, C, H, W))
    return y.view(B, T, *y.shape[1:]).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        # Wan's layout and names: residual.{0: norm, 2: conv, 3: norm, 6: conv}, shortcut.
        self.residual = nn.Sequential(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3),
                                      RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x)), cache)
        h = r[6](F.silu(r[3](h)), cache)
        return h + (x if self.shortcut is None else self.shortcut(x, cache))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (causal: no time mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        def attend(f: Tensor) -> Tensor:  # (N, C, H, W)
            N, C, H, W = f.shape
            qkv = self.to_qkv(self.norm(f)).view(N, 3 * C, H * W).transpose(1, 2)  # (N, HW, 3C)
            q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # (N, 1, HW, C) each
            out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, HW, C)
            return self.proj(out.transpose(1, 2).reshape(N, C, H, W))

        return x + _per_frame(attend, x)


class Resample(nn.Module):
    """x2 spatial resample per frame, optionally x2 in time (first stream frame alone).

    up: nearest x2 then a 3x3 conv to dim // 2 channels; with time, a causal (3, 1, 1)
    conv first makes two frames' worth of channels per frame. down: a 3x3 stride-2 conv
    (zero pad right/bottom); with time, then a stride-2 (3, 1, 1) conv over the frames.
    """

    def __init__(self, dim: int, up: bool, temporal: bool):
        super().__init__()
        self.up = up
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            # Not a CausalConv3d: it never pads; its one past frame lives in `past_slot`.
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.past_slot = -1

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if self.up and self.time_conv is not None:
            x = self._time_up(x, cache)
        x = _per_frame(self.resample, x)
        if not self.up and self.time_conv is not None:
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x: Tensor, cache: FeatureCache) -> Tensor:
        head, rest = (x[:, :, :1], x[:, :, 1:]) if cache.first else (None, x)
        parts = [] if head is None else [head]
        if rest.shape[2]:
            B, C, n, H, W = rest.shape
            y = self.time_conv(rest, cache).view(B, 2, C, n, H, W)
            parts.append(y.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * n, H, W))  # channel half i -> frame 2t + i
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _time_down(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if cache.first:
            head, frames = x[:, :, :1], x
        else:
            head, frames = None, torch.cat([cache.past(self.past_slot), x], dim=2)
        cache.put(self.past_slot, x[:, :, -1:])
        if (frames.shape[2] - 1) % 2:
            raise ValueError(f"a chunk of {x.shape[2]} frames does not fill whole stride-2 time windows")
        parts = [] if head is None else [head]
        if frames.shape[2] >= 3:
            parts.append(self.time_conv(frames))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class _Stack(nn.Sequential):
    """Wan's flat module lists; every entry is called as entry(x, cache)."""

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        for layer in self:
            x = layer(x, cache)
        return x


class _Head(nn.Sequential):
    """norm, SiLU, causal 3x3x3 conv (Wan's `head.{0,2}` names)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        return self[2](F.silu(self[0](x)), cache)


def _middle(dim: int) -> _Stack:
    return _Stack(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    """video (B, 3, 1 + 4k, H, W) -> moments (B, 2z, 1 + k, H/8, W/8)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1,) + cfg.dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, up=False, temporal=cfg.temporal_downsample[i]))
        self.downsamples = _Stack(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _Head(dims[-1], 2 * cfg.z_dim)
        self.n_slots = _assign_slots(self)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.head(self.middle(self.downsamples(self.conv1(x, cache), cache), cache), cache)
        cache.first = False
        return x


class Decoder3d(nn.Module):
    """latent (B, z, F, h, w) -> video (B, 3, 1 + 4(F - 1) on a stream's first call, else 4F, 8h, 8w)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1],) + mult[::-1]]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous level's upsample conv halved the width
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(mult) - 1:
                blocks.append(Resample(cout, up=True, temporal=temporal_up[i]))
        self.upsamples = _Stack(*blocks)
        self.head = _Head(dims[-1], 3)
        self.n_slots = _assign_slots(self)

    def forward(self, z: Tensor, cache: FeatureCache) -> Tensor:
        x = self.head(self.upsamples(self.middle(self.conv1(z, cache), cache), cache), cache)
        cache.first = False
        return x


def _assign_slots(module: nn.Module) -> int:
    """Slots for the causal convs, then one per temporal downsample (its past frame)."""
    n = _number_slots(module)
    for m in module.modules():
        if isinstance(m, Resample) and not m.up and m.time_conv is not None:
            m.past_slot = n
            n += 1
    return n


# --------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE. Latents given to / returned from `encode` / `decode` are normalised
    ((mu - mean) / std, what the DiT sees); `encode_moments` returns the raw posterior."""

    def __init__(self, cfg: WanVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or WanVAEConfig()
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def normalize(self, mu: Tensor) -> Tensor:
        return normalize_latent(mu, self.cfg.latents_mean, self.cfg.latents_std)

    def denormalize(self, z: Tensor) -> Tensor:
        return denormalize_latent(z, self.cfg.latents_mean, self.cfg.latents_std)

    def _check_video(self, video: Tensor) -> None:
        s, ts = self.cfg.spatial_stride, self.cfg.temporal_stride
        if video.dim() != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % ts \
                or video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"video must be (B, 3, 1 + {ts}k, H, W) with H, W multiples of {s}, "
                             f"got {tuple(video.shape)}")

    def encode_moments(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> raw (mu, logvar), each (B, z, 1 + k, H/8, W/8)."""
        self._check_video(video)
        moments = self.conv1(self.encoder(video, FeatureCache(self.encoder.n_slots, keep=False)), None)
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, video: Tensor) -> Tensor:
        """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> normalised posterior mean (B, z, 1 + k, H/8, W/8).

        A portrait is the one-frame clip (B, 3, 1, H, W)."""
        return self.normalize(self.encode_moments(video)[0])

    def decode(self, latent: Tensor, clamp: bool = True) -> Tensor:
        """normalised latent (B, z, F, h, w) -> video (B, 3, 1 + 4(F - 1), 8h, 8w), in one pass
        (memory grows with F: streams use `stream_decoder()`)."""
        self._check_latent(latent)
        x = self.decoder(self.conv2(self.denormalize(latent), None), FeatureCache(self.decoder.n_slots, keep=False))
        return x.clamp(-1, 1) if clamp else x

    def _check_latent(self, latent: Tensor) -> None:
        if latent.dim() != 5 or latent.shape[1] != self.cfg.z_dim or latent.shape[2] < 1:
            raise ValueError(f"latent must be (B, {self.cfg.z_dim}, F >= 1, h, w), got {tuple(latent.shape)}")

    def stream_decoder(self, reference: Tensor | None = None) -> "StreamingWanDecoder":
        """A streaming decoder for one stream (`reference`, the portrait, is not read: Wan's
        decoder sees only latents; the argument is the engine's decoder interface)."""
        return StreamingWanDecoder(self)


@dataclass(frozen=True)
class DecoderSnapshot:
    """A streaming decoder's state between two calls (cheap: references, no copies)."""

    cache: tuple
    latents_in: int
    frames_out: int


class StreamingWanDecoder:
    """Decodes one stream a few latent frames at a time (typically one); the frames equal
    decoding the whole clip at once. The stream's first latent gives 1 frame, every later
    latent 4. `snapshot()` / `restore()` rewind the stream to an earlier call boundary."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.cache = FeatureCache(vae.decoder.n_slots)
        self.latents_in = 0
        self.frames_out = 0

    def decode(self, latent_chunk: Tensor, clamp: bool = True) -> Tensor:
        """normalised latent_chunk (B, z, f, h, w) -> frames (B, 3, n, 8h, 8w), n = 4f
        (1 + 4(f - 1) for the stream's first chunk)."""
        vae = self.vae
        vae._check_latent(latent_chunk)
        x = vae.decoder(vae.conv2(vae.denormalize(latent_chunk), None), self.cache)
        self.latents_in += latent_chunk.shape[2]
        self.frames_out += x.shape[2]
        return x.clamp(-1, 1) if clamp else x

    def snapshot(self) -> DecoderSnapshot:
        return DecoderSnapshot(self.cache.snapshot(), self.latents_in, self.frames_out)

    def restore(self, snap: DecoderSnapshot) -> None:
        self.cache.restore(snap.cache)
        self.latents_in, self.frames_out = snap.latents_in, snap.frames_out

    def reset(self) -> None:
        self.cache.reset()
        self.latents_in = self.frames_out = 0

    def cache_nbytes(self) -> int:
        return self.cache.nbytes()
