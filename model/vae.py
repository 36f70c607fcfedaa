"""Causal video VAE: temporal x4 with the first frame alone (as Wan), spatial x8, streaming.

T = 1 + 4k video frames <-> 1 + k latent frames; latent frame f covers video frames
[4f - 3, 4f] (frame 0 alone). All convolutions pad only the past in time, so the encoder
and decoder stream: `stream_decoder()` / `stream_encoder()` keep per-layer caches (the
last frames each causal conv needs) and give, chunk by chunk, the same output as one
pass over the whole clip.

Widths are `base_channels * channel_mults` from full resolution down; one level per
entry, a 2x spatial resample between levels (so spatial_stride = 2 ** (levels - 1)); the
time resamples sit at the deepest transitions (cheap there, as in Wan).

The encoder (runs once per reference image at inference, and in training) has RMS-normed
SiLU residual blocks with 3-frame temporal kernels at every level. The decoder is the
real-time part and is TAEHV-like: ReLU residual blocks without norms whose first conv
remembers the previous frame (temporal kernel 2), nothing at full resolution: the image
comes out of a sub-pixel conv at half resolution. Its widths are widths[1:] (widths[0]
is the encoder's full-resolution width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.config import VAEConfig
from model.timeline import frames_for_latents, latents_for_frames  # noqa: F401  (the VAE's frame rule, re-exported)
from model.vae_blocks import (CausalConv3d, CausalSnapshot, CausalState, ChannelRMSNorm, ReferenceBlend,
                              ReferenceFeatures, ReferenceInputs, ResBlock, SpatialUp, TimeUp, ToPixels, number_slots)

# Residual blocks per level. Encoder: at every level plus one at the bottom. Decoder:
# `_DEC_DEEP_BLOCKS` at the latent resolution, `_DEC_MID_BLOCKS` at each level in
# between, none at full resolution (the most expensive place for a conv).
_ENC_BLOCKS = 1
_DEC_DEEP_BLOCKS = 2
_DEC_MID_BLOCKS = 1
_LOGVAR_RANGE = (-30.0, 20.0)


def _latent_stats(z: Tensor, mean, std) -> tuple[Tensor, Tensor] | None:
    """Per-channel (mean, std) as (1, C, 1, 1, 1) tensors like `z`, or None when not set.

    Built from the config on each call (a few numbers) rather than kept as buffers, so a
    VAE's state dict is the same whether or not its statistics are known yet."""
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1) for v in (mean, std))


def normalize_latent(z: Tensor, mean, std) -> Tensor:
    """Raw latent -> (z - mean) / std per channel; `z` itself when the statistics are unset."""
    stats = _latent_stats(z, mean, std)
    return z if stats is None else (z - stats[0]) / stats[1]


def denormalize_latent(z: Tensor, mean, std) -> Tensor:
    """Inverse of `normalize_latent`."""
    stats = _latent_stats(z, mean, std)
    return z if stats is None else z * stats[1] + stats[0]


class _Chain(nn.ModuleList):
    """Blocks applied in order, each called as block(x, state)."""

    def forward(self, x: Tensor, state: CausalState) -> Tensor:
        for block in self:
            x = block(x, state)
        return x


def _geometry(cfg: VAEConfig) -> tuple[list[int], int]:
    """Widths per level (full resolution first) and the number of x2 time resamples."""
    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    levels = len(widths)
    if levels < 1 or min(widths) < 1 or cfg.z_channels < 1:
        raise ValueError(f"VAE needs positive widths and z_channels, got widths {widths}, z {cfg.z_channels}")
    if cfg.spatial_stride != 2 ** (levels - 1):
        raise ValueError(f"spatial_stride {cfg.spatial_stride} must be 2 ** (len(channel_mults) - 1) "
                         f"= {2 ** (levels - 1)}: one x2 resample between levels")
    n_time = int(math.log2(cfg.temporal_stride)) if cfg.temporal_stride >= 1 else -1
    if cfg.temporal_stride < 1 or 2 ** n_time != cfg.temporal_stride or n_time > levels - 1:
        raise ValueError(f"temporal_stride {cfg.temporal_stride} must be a power of two "
                         f"<= spatial_stride {cfg.spatial_stride}")
    return widths, n_time


class Encoder(nn.Module):
    """video (B, 3, T, H, W) -> moments (B, 2z, T', H/s, W/s): mean then logvar channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, n_time = _geometry(cfg)
        L = len(widths)
        self.conv_in = CausalConv3d(3, widths[0], (3, 3, 3))
        self.levels = nn.ModuleList()
        for i, c in enumerate(widths):
            level = _Chain(ResBlock(c, c, 3, True, nn.SiLU) for _ in range(_ENC_BLOCKS))
            if i < L - 1:
                # The last n_time transitions also halve time (kernel 3, stride 2: first frame alone).
                if i >= L - 1 - n_time:
                    level.append(CausalConv3d(c, widths[i + 1], (3, 3, 3), stride=(2, 2, 2)))
                else:
                    level.append(CausalConv3d(c, widths[i + 1], (1, 3, 3), stride=(1, 2, 2)))
            self.levels.append(level)
        self.mid = ResBlock(widths[-1], widths[-1], 3, True, nn.SiLU)
        self.norm_out = ChannelRMSNorm(widths[-1])
        self.act = nn.SiLU()
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.z_channels, (1, 3, 3))
        self.n_slots = number_slots(self)

    def forward(self, video: Tensor, state: CausalState) -> Tensor:
        """video (B, 3, T, H, W) -> moments (B, 2z, T', h, w), advancing `state` by one chunk."""
        x = self.conv_in(video.transpose(1, 2), state)  # frame-major (B, T, C, H, W) inside
        for level in self.levels:
            x = level(x, state)
        x = self.mid(x, state)
        out = self.conv_out(self.act(self.norm_out(x)), state)  # (B, T', 2z, h, w)
        state.first = False
        return out.transpose(1, 2).contiguous()


class Decoder(nn.Module):
    """latent (B, z, F, h, w), unnormalised -> video (B, 3, 1 + 4(F - 1) or 4F, H, W), unclamped.

    Widths from the bottom level up; level 0 (full resolution) has no conv of its own:
    the last stage is a sub-pixel conv from level 1 (`ToPixels`)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, n_time = _geometry(cfg)
        L = len(widths)
        self.conv_in = CausalConv3d(cfg.z_channels, widths[-1], (3, 3, 3))
        self.mid = _Chain(ResBlock(widths[-1], widths[-1], 2, False, nn.ReLU) for _ in range(_DEC_DEEP_BLOCKS))
        self.ups = nn.ModuleList()
        for i in range(L - 1, 0, -1):  # transition from level i up to level i - 1
            up = _Chain()
            if i > L - 1 - n_time:  # the first n_time transitions also double time
                up.append(TimeUp(widths[i]))
            if i > 1:
                up.append(SpatialUp(widths[i], widths[i - 1]))
                up.extend(ResBlock(widths[i - 1], widths[i - 1], 2, False, nn.ReLU) for _ in range(_DEC_MID_BLOCKS))
            else:
                up.append(ToPixels(widths[1], nn.ReLU))
            self.ups.append(up)
        # Spatial stride 1 (a single level): a plain output conv.
        self.conv_out = CausalConv3d(widths[0], 3, (1, 3, 3)) if L == 1 else None
        self.reference_features = self.reference_inject = self.reference_blend = None
        if cfg.reference_decoder:
            if L < 2 or n_time == L - 1:
                raise ValueError("reference_decoder needs spatial_stride >= 2 and no time upsample in the last stage")
            self.reference_features = ReferenceFeatures(widths[1:])
            # Added before each up stage (level L-1 down to 1); zero-initialised, so a trained
            # decoder given these modules starts out unchanged.
            self.reference_inject = nn.ModuleList(nn.Conv2d(widths[i], widths[i], 1) for i in range(L - 1, 0, -1))
            for conv in self.reference_inject:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
            self.reference_blend = ReferenceBlend(widths[1])
        self.n_slots = number_slots(self)

    def prepare_reference(self, image: Tensor) -> ReferenceInputs:
        """Portrait (B, 3, H, W) in [-1, 1] -> what `forward` needs of it (once per stream)."""
        if self.reference_features is None:
            raise ValueError("this decoder takes no reference (reference_decoder is off)")
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"reference must be (B, 3, H, W), got {tuple(image.shape)}")
        return ReferenceInputs(image, self.reference_features(image))

    def forward(self, z: Tensor, state: CausalState, blend: Tensor | None = None) -> Tensor:
        """z (B, z, F, h, w) -> video (B, 3, n, H, W), advancing `state` by one chunk.
        blend: what the reference blend copies from per output frame, (B, n, 3, H, W) in
        [-1, 1] (a personal avatar's warped portrait: model/motion_warp.py), with an optional
        4th channel added to the blend's logit (`ReferenceBlend`); default the reference image."""
        x = self.mid(self.conv_in(z.transpose(1, 2), state), state)  # frame-major (B, F, C, h, w) inside
        ref = state.reference
        if self.reference_features is not None and ref is None:
            raise ValueError("this decoder is reference-conditioned: pass the portrait (reference=...)")
        for k, up in enumerate(self.ups):
            if ref is not None:
                feat = ref.features[len(self.ups) - 1 - k]  # this level's resolution
                x = x + self.reference_inject[k](feat)[:, None]
                if k == len(self.ups) - 1:
                    x = self.reference_blend(x, up(x, state), ref.image if blend is None else blend, state)
                    break
            x = up(x, state)
        if self.conv_out is not None:
            x = self.conv_out(torch.relu(x), state)
        state.first = False
        return x.transpose(1, 2).contiguous()  # (B, 3, n, H, W)


class CausalVAE(nn.Module):
    """Causal video VAE for `VAEConfig`; see the module docstring for the geometry."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        _geometry(cfg)
        for name in ("latent_mean", "latent_std"):
            v = getattr(cfg, name)
            if v is not None and len(v) != cfg.z_channels:
                raise ValueError(f"{name} has {len(v)} entries, expected z_channels = {cfg.z_channels}")
        if (cfg.latent_mean is None) != (cfg.latent_std is None):
            raise ValueError("set both latent_mean and latent_std, or neither")
        if cfg.latent_std is not None and min(cfg.latent_std) <= 0:
            raise ValueError(f"latent_std must be positive, got {cfg.latent_std}")
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    # ----- geometry and normalisation ---------------------------------------------------

    def _check_video(self, video: Tensor, first: bool = True) -> None:
        s = self.cfg.spatial_stride
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        latents_for_frames(video.shape[2], first, self.cfg.temporal_stride)
        if video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"video height/width {tuple(video.shape[3:])} must be multiples of {s}")

    def _check_latent(self, latent: Tensor) -> None:
        if latent.dim() != 5 or latent.shape[1] != self.cfg.z_channels or latent.shape[2] < 1:
            raise ValueError(f"latent must be (B, {self.cfg.z_channels}, F >= 1, h, w), got {tuple(latent.shape)}")

    def normalize(self, z: Tensor) -> Tensor:
        """Raw posterior latent -> the normalised latent the DiT sees (identity when stats unset)."""
        return normalize_latent(z, self.cfg.latent_mean, self.cfg.latent_std)

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of `normalize`."""
        return denormalize_latent(z, self.cfg.latent_mean, self.cfg.latent_std)

    # ----- whole clips ----------------------------------------------------------------------

    def encode_dist(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> (mean, logvar), each (B, z, 1 + k, H/8, W/8),
        unnormalised (for the KL term in training)."""
        self._check_video(video)
        moments = self.encoder(video, CausalState(self.encoder.n_slots, keep=False))
        return _split_moments(moments)

    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> normalised latent (B, z, 1 + k, H/8, W/8).

        The posterior mean, or a sample from the posterior when `sample` (drawn with
        `generator`, on the generator's device)."""
        mean, logvar = self.encode_dist(video)
        if sample:
            dev = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype).to(mean.device)
            mean = mean + torch.exp(0.5 * logvar) * eps
        return self.normalize(mean)

    def decode(self, latent: Tensor, clamp: bool = True, reference: Tensor | None = None,
               blend: Tensor | None = None) -> Tensor:
        """normalised latent (B, z, F, h, w) -> video (B, 3, 1 + 4(F - 1), 8h, 8w) in [-1, 1].

        clamp=False returns the raw decoder output (for reconstruction losses: clamping
        would stop gradients outside [-1, 1]). reference: the portrait (B or 1, 3, 8h, 8w)
        in [-1, 1]; required by a reference-conditioned decoder, ignored otherwise.
        blend: per-frame images the decoder's blend copies from instead (Decoder.forward)."""
        self._check_latent(latent)
        state = CausalState(self.decoder.n_slots, keep=False)
        state.reference = self._reference_inputs(reference, latent)
        video = self.decoder(self.denormalize(latent), state, self._checked_blend(blend, state))
        return video.clamp(-1, 1) if clamp else video

    # ----- streams --------------------------------------------------------------------------

    def _reference_inputs(self, reference: Tensor | None, latent: Tensor) -> ReferenceInputs | None:
        if not self.cfg.reference_decoder:
            return None
        if reference is None:
            raise ValueError("this VAE's decoder is reference-conditioned: pass reference=(B, 3, H, W) in [-1, 1]")
        s = self.cfg.spatial_stride
        want = (latent.shape[-2] * s, latent.shape[-1] * s)
        if reference.dim() == 5:  # (B, 3, 1, H, W), as the encoder takes it
            reference = reference[:, :, 0]
        if reference.dim() != 4 or reference.shape[1] != 3 or tuple(reference.shape[-2:]) != want \
                or reference.shape[0] not in (1, latent.shape[0]):
            raise ValueError(f"reference must be (1 or {latent.shape[0]}, 3, {want[0]}, {want[1]}), "
                             f"got {tuple(reference.shape)}")
        return self.decoder.prepare_reference(reference.to(latent.dtype))

    def _checked_blend(self, blend: Tensor | None, state: CausalState) -> Tensor | None:
        if blend is not None and state.reference is None:
            raise ValueError("blend frames need a reference-conditioned decoder")
        return blend

    def stream_decoder(self, reference: Tensor | None = None) -> "StreamingDecoder":
        """reference: the stream's portrait, (1, 3, H, W) or (1, 3, 1, H, W) in [-1, 1]; needed
        by a reference-conditioned decoder (its features are computed once, here)."""
        return StreamingDecoder(self, reference)

    def stream_encoder(self) -> "StreamingEncoder":
        return StreamingEncoder(self)


def _split_moments(moments: Tensor) -> tuple[Tensor, Tensor]:
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(*_LOGVAR_RANGE)


class StreamingDecoder:
    """Decodes one stream chunk by chunk; output identical to decoding the whole clip.

    The first chunk's first latent gives 1 frame, every later latent 4 (see
    `frames_for_latents`). Holds the decoder's causal caches (fixed size); one per stream.
    """

    def __init__(self, vae: CausalVAE, reference: Tensor | None = None):
        self.vae = vae
        self.state = CausalState(vae.decoder.n_slots)
        if vae.cfg.reference_decoder:
            if reference is None:
                raise ValueError("this VAE's decoder is reference-conditioned: stream_decoder(reference=portrait)")
            p = next(vae.decoder.parameters())
            h, w = (n // vae.cfg.spatial_stride for n in reference.shape[-2:])
            like = p.new_zeros(reference.shape[0], vae.cfg.z_channels, 1, h, w)
            self.state.reference = vae._reference_inputs(reference.to(p.device), like)
        self.frames_out = 0   # video frames produced so far
        self.latents_in = 0   # latent frames consumed so far

    def decode(self, latent_chunk: Tensor, clamp: bool = True, blend: Tensor | None = None) -> Tensor:
        """normalised latent_chunk (B, z, f, h, w) -> frames (B, 3, n, H, W) in [-1, 1],
        n = frames_for_latents(f, first=this is the stream's first chunk). blend: per-frame
        images (B, n, 3, H, W) the decoder's blend copies from (CausalVAE.decode)."""
        self.vae._check_latent(latent_chunk)
        video = self.vae.decoder(self.vae.denormalize(latent_chunk), self.state,
                                 self.vae._checked_blend(blend, self.state))
        self.frames_out += video.shape[2]
        self.latents_in += latent_chunk.shape[2]
        return video.clamp(-1, 1) if clamp else video

    def reset(self) -> None:
        """Start a new stream: forget the caches (the next chunk is a first chunk)."""
        self.state.reset()
        self.frames_out = self.latents_in = 0

    def snapshot(self) -> "DecoderSnapshot":
        """The causal caches and counts as they are now (for rewinding a stream)."""
        return DecoderSnapshot(self.state.snapshot(), self.frames_out, self.latents_in)

    def restore(self, snap: "DecoderSnapshot") -> None:
        self.state.restore(snap.state)
        self.frames_out, self.latents_in = snap.frames_out, snap.latents_in

    def cache_shapes(self) -> list[tuple[int, ...] | None]:
        return self.state.shapes()

    def cache_nbytes(self) -> int:
        return self.state.nbytes()


@dataclass(frozen=True)
class DecoderSnapshot:
    state: CausalSnapshot
    frames_out: int
    latents_in: int


class StreamingEncoder:
    """Encodes one stream chunk by chunk; output identical to encoding the whole clip.

    The first chunk has 1 + 4a frames (the lone first frame plus a groups of 4) and gives
    1 + a latents; every later chunk has 4b frames and gives b latents.
    """

    def __init__(self, vae: CausalVAE):
        self.vae = vae
        self.state = CausalState(vae.encoder.n_slots)
        self.frames_in = 0
        self.latents_out = 0

    def encode_dist(self, video_chunk: Tensor) -> tuple[Tensor, Tensor]:
        """video_chunk (B, 3, n, H, W) in [-1, 1] -> unnormalised (mean, logvar) of its latents."""
        self.vae._check_video(video_chunk, first=self.state.first)
        mean, logvar = _split_moments(self.vae.encoder(video_chunk, self.state))
        self.frames_in += video_chunk.shape[2]
        self.latents_out += mean.shape[2]
        return mean, logvar

    def encode(self, video_chunk: Tensor) -> Tensor:
        """video_chunk (B, 3, n, H, W) in [-1, 1] -> normalised posterior mean (B, z, f, H/8, W/8),
        f = latents_for_frames(n, first=this is the stream's first chunk)."""
        return self.vae.normalize(self.encode_dist(video_chunk)[0])

    def reset(self) -> None:
        self.state.reset()
        self.frames_in = self.latents_out = 0

    def cache_shapes(self) -> list[tuple[int, ...] | None]:
        return self.state.shapes()

    def cache_nbytes(self) -> int:
        return self.state.nbytes()
