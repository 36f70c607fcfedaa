"""Building blocks of the causal video VAE (model/vae.py).

Every block maps `(x, state) -> y` with x frame-major, (B, T, C, H, W): frames fold
into the batch for free (the 2D convs, the depth-to-time reshape). Convolutions pad
only the past in time, so frame t of the output depends on input frames <= t. The
`CausalState` carries, per causal convolution, the last input frames it needs from the
previous chunk; feeding a clip chunk by chunk through one state gives the same result as
feeding it whole (the first chunk sees zeros as its past, exactly like a whole clip).

Normalisation is RMS over channels at each (frame, pixel): a norm that pools over time
(GroupNorm over T) would let later frames change earlier outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalState:
    """Per-stream memory of every causal layer of one network (encoder or decoder).

    Slot i belongs to the i-th `CausalConv3d` (numbered by `number_slots`) and holds the
    last input frames that conv needs from the past, (B, n_i, C_i, H_i, W_i). A slot is
    allocated by the first chunk and overwritten in place by later ones, so the memory of
    a stream never grows. `first` is True until the first chunk has passed; the time
    resamplers treat the clip's first frame alone while it is set.

    keep=False is a one-shot pass over a whole clip: nothing is stored.
    """

    def __init__(self, n_slots: int, keep: bool = True):
        self.n_slots = n_slots
        self.keep = keep
        self.first = True
        self.buffers: list[Tensor | None] = [None] * n_slots
        # Reference-conditioned decoder only: the portrait (B, 3, H, W) in [-1, 1] and its
        # features per level, computed once per stream (a constant, kept across reset()).
        self.reference: "ReferenceInputs | None" = None

    def reset(self) -> None:
        """Forget the past: the next chunk starts a new clip (any batch size or frame size)."""
        self.first = True
        self.buffers = [None] * self.n_slots

    def past(self, slot: int) -> Tensor | None:
        return self.buffers[slot]

    def update(self, slot: int, tail: Tensor) -> None:
        """Store `tail` (B, n, C, H, W), the frames the next chunk needs, into slot `slot`."""
        if not self.keep:
            return
        buf = self.buffers[slot]
        if buf is None:
            self.buffers[slot] = tail.detach().clone()  # the slot's one allocation
        elif buf.shape != tail.shape:
            raise ValueError(f"chunk geometry changed mid-stream: cached {tuple(buf.shape)}, "
                             f"new {tuple(tail.shape)}; call reset() before a different batch or frame size")
        else:
            buf.copy_(tail)

    def shapes(self) -> list[tuple[int, ...] | None]:
        return [None if b is None else tuple(b.shape) for b in self.buffers]

    def snapshot(self) -> "CausalSnapshot":
        """Copies of the slots and the first-chunk flag as they are now."""
        return CausalSnapshot(self.first, tuple(None if b is None else b.clone() for b in self.buffers))

    def restore(self, snap: "CausalSnapshot") -> None:
        """Back to `snap`, into the slots' own storage where they have it (the snapshot stays usable)."""
        self.first = snap.first
        for i, saved in enumerate(snap.buffers):
            buf = self.buffers[i]
            if saved is None or buf is None or buf.shape != saved.shape:
                self.buffers[i] = None if saved is None else saved.clone()
            else:
                buf.copy_(saved)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers if b is not None)


@dataclass(frozen=True)
class CausalSnapshot:
    first: bool
    buffers: tuple[Tensor | None, ...]


class CausalConv3d(nn.Conv3d):
    """3D conv, kernel (kt, kh, kw), that pads only the past in time ('same' in space).

    Works on frame-major activations (B, T, C, H, W) and runs as one conv2d over frames
    folded into the batch, with the kt temporal taps stacked as input channels: on CPU
    this keeps every call on the fast oneDNN path (PyTorch sends small batch-1 conv3d
    calls to a slow fallback). The weight is an ordinary Conv3d weight
    (Cout, Cin, kt, kh, kw).

    Temporal stride st > 1 downsamples time: with kt = 3, st = 2 and the causal pad of
    kt - 1 = 2 zeros, output frame 0 sees (0, 0, x0) -- the first frame alone -- and
    output j >= 1 sees (x_{2j-2}, x_{2j-1}, x_{2j}). Between chunks the last kt - st input
    frames are cached; a chunk must then consume whole windows (checked).
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 stride: tuple[int, int, int] = (1, 1, 1)):
        kt, kh, kw = kernel
        if kt < stride[0]:
            raise ValueError(f"temporal kernel {kt} smaller than temporal stride {stride[0]} would skip frames")
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, kh // 2, kw // 2))
        self.slot = -1  # set by number_slots(); -1 = needs no memory (kt == 1)
        self.keep_frames = kt - stride[0]

    @property
    def causal(self) -> bool:
        return self.kernel_size[0] > 1

    def forward(self, x: Tensor, state: CausalState) -> Tensor:
        """x (B, T, Cin, H, W) -> (B, T', Cout, H', W'); T' = T for temporal stride 1."""
        kt, st = self.kernel_size[0], self.stride[0]
        B, T, C, H, W = x.shape
        if kt > 1 and T == 1 and state.past(self.slot) is None:
            # A lone first frame (a still image: the portrait, a warped portrait): every tap
            # but the last reads the zero pad, so only the last one is computed (a third of
            # the work for kt = 3; the same sums without the zero terms).
            if self.keep_frames:
                state.update(self.slot, torch.cat([x.new_zeros(B, kt - 1, C, H, W), x], dim=1)[:, kt - self.keep_frames:])
            n, weight = 1, self.weight[:, :, -1]
        elif kt > 1:
            past = state.past(self.slot)
            if past is None:
                past = x.new_zeros(B, kt - 1, C, H, W)  # the causal pad of the first chunk
            elif past.shape[0] != B or past.shape[2:] != x.shape[2:]:
                raise ValueError(f"chunk geometry changed mid-stream: cached frames {tuple(past.shape)}, "
                                 f"new chunk {tuple(x.shape)} (B, T, C, H, W); call reset() first")
            x = torch.cat([past, x], dim=1)  # (B, n_past + T, Cin, H, W)
            if (x.shape[1] - kt) % st:
                raise ValueError(f"a chunk of {T} frames does not fill whole windows of a stride-{st} "
                                 f"time downsample; see model.vae.frames_for_latents()")
            if self.keep_frames:
                state.update(self.slot, x[:, x.shape[1] - self.keep_frames:])
            n = (x.shape[1] - kt) // st + 1
            # Output frame t reads input frames t*st .. t*st + kt - 1: stack them as channels.
            x = torch.cat([x[:, j: j + st * (n - 1) + 1: st] for j in range(kt)], dim=2)  # (B, n, kt*Cin, H, W)
            weight = self.weight.transpose(1, 2).reshape(self.out_channels, kt * C, *self.kernel_size[1:])
        else:
            n = T
            weight = self.weight.squeeze(2)  # (Cout, Cin, kh, kw)
        y = F.conv2d(x.reshape(B * n, -1, H, W), weight, self.bias, self.stride[1:], self.padding[1:])
        return y.view(B, n, *y.shape[1:])


def number_slots(module: nn.Module) -> int:
    """Give every causal conv inside `module` its own state slot; returns the slot count."""
    n = 0
    for m in module.modules():
        if isinstance(m, CausalConv3d) and m.causal:
            m.slot = n
            n += 1
    return n


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (frame, pixel), learned per-channel gain. Causal-safe."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C, H, W) -> same shape."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=2, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight.view(1, 1, -1, 1, 1).to(x.dtype)


class ResBlock(nn.Module):
    """x + conv2(act(norm(conv1(act(norm(x)))))), conv1 with temporal kernel `kt` (memory).

    norm=False drops the norms (the decoder: cheaper, TAEHV-like); a 1x1 projection
    carries the skip when the width changes.
    """

    def __init__(self, cin: int, cout: int, kt: int, norm: bool, act: type[nn.Module]):
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin) if norm else nn.Identity()
        self.conv1 = CausalConv3d(cin, cout, (kt, 3, 3))
        self.norm2 = ChannelRMSNorm(cout) if norm else nn.Identity()
        self.conv2 = CausalConv3d(cout, cout, (1, 3, 3))
        self.act = act()
        self.skip = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

    def forward(self, x: Tensor, state: CausalState) -> Tensor:
        """x (B, T, Cin, H, W) -> (B, T, Cout, H, W)."""
        h = self.conv1(self.act(self.norm1(x)), state)
        h = self.conv2(self.act(self.norm2(h)), state)
        return (x if self.skip is None else self.skip(x, state)) + h


class TimeUp(nn.Module):
    """Temporal x2 upsample, first frame alone: T frames -> 2T, or 2T - 1 on the first chunk.

    A 1x1x1 conv makes two frames' worth of channels per input frame (depth-to-time); on
    the clip's first chunk the first of them is dropped, so latent frame 0 gives one frame.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.proj = CausalConv3d(channels, 2 * channels, (1, 1, 1))

    def forward(self, x: Tensor, state: CausalState) -> Tensor:
        """x (B, T, C, H, W) -> (B, 2T [- 1 on the first chunk], C, H, W)."""
        B, T, C, H, W = x.shape
        y = self.proj(x, state).view(B, 2 * T, C, H, W)  # channels [iC, (i+1)C) of frame t -> frame 2t + i
        return y[:, 1:] if state.first else y


class SpatialUp(nn.Module):
    """1x1 conv (cin -> cout) at low resolution, nearest x2 in space, 3x3 conv (cout -> cout).

    Changing the width before upsampling halves the cost of the 3x3 conv and of the
    upsampling copy when cout = cin / 2. Frame by frame."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.reduce = CausalConv3d(cin, cout, (1, 1, 1))
        self.conv = CausalConv3d(cout, cout, (1, 3, 3))

    def forward(self, x: Tensor, state: CausalState) -> Tensor:
        """x (B, T, Cin, H, W) -> (B, T, Cout, 2H, 2W)."""
        x = self.reduce(x, state)
        B, T, C, H, W = x.shape
        x = x[..., None, :, None].expand(B, T, C, H, 2, W, 2).reshape(B, T, C, 2 * H, 2 * W)  # nearest x2
        return self.conv(x, state)


class ToPixels(nn.Module):
    """Last decoder stage: act, 3x3 conv to 3 * 4 channels, depth-to-space x2 -> RGB.

    A sub-pixel conv (as ESPCN): the full-resolution image comes out of a conv at half
    resolution, so no conv runs at full resolution -- there, a conv costs 4x as much
    and CPU conv kernels with few channels are slow."""

    def __init__(self, cin: int, act: type[nn.Module]):
        super().__init__()
        self.act = act()
        self.conv = CausalConv3d(cin, 3 * 4, (1, 3, 3))

    def forward(self, x: Tensor, state: CausalState) -> Tensor:
        """x (B, T, Cin, H, W) -> (B, T, 3, 2H, 2W)."""
        y = self.conv(self.act(x), state)
        B, T, C, H, W = y.shape
        return F.pixel_shuffle(y.view(B * T, C, H, W), 2).view(B, T, 3, 2 * H, 2 * W)


class ReferenceInputs:
    """What a reference-conditioned decoder needs of the portrait, computed once per stream:
    the image at full resolution and one feature map per decoder level below it."""

    def __init__(self, image: Tensor, features: list[Tensor]):
        self.image = image        # (B, 3, H, W) in [-1, 1]
        self.features = features  # features[i]: (B, C_i, H / 2^(i+1), W / 2^(i+1))


class ReferenceFeatures(nn.Module):
    """Reference portrait -> a feature pyramid at 1/2, 1/4, ... of full resolution.

    Stride-2 3x3 convs with ReLU, one per decoder level; runs once per stream, so its cost
    does not matter at inference."""

    def __init__(self, widths: list[int]):
        super().__init__()
        chans = [3] + list(widths)
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))
            for cin, cout in zip(chans[:-1], chans[1:]))

    def forward(self, image: Tensor) -> list[Tensor]:
        feats, x = [], image
        for conv in self.convs:
            x = conv(torch.relu(x) if feats else x)
            feats.append(x)
        return feats


class ReferenceBlend(nn.Module):
    """Full-resolution output: a per-pixel blend of the decoded image and the reference,
    out = rgb + sigmoid(m) * (reference - rgb), with m from a sub-pixel conv at half
    resolution like `ToPixels`. Starts near 'no blend' (bias -4) so a trained decoder keeps
    its behaviour when the blend is added."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv = CausalConv3d(cin, 4, (1, 3, 3))
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, -4.0)

    def forward(self, x: Tensor, rgb: Tensor, reference: Tensor, state: CausalState) -> Tensor:
        """x (B, T, Cin, h, w) half-resolution features, rgb (B, T, 3, 2h, 2w), reference
        (B or 1, 3, 2h, 2w), or one per output frame (B, T, 3 or 4, 2h, 2w) -> (B, T, 3, 2h, 2w).
        A 4th channel of per-frame references is added to the blend's logit (a personal
        avatar's calibrated trust in its warp: model/personal/blend_calibration.py)."""
        logit = self.logits(x, state)
        if reference.dim() == 4:
            reference = reference[:, None]
        elif reference.shape[1] != logit.shape[1]:
            raise ValueError(f"{reference.shape[1]} blend frames for {logit.shape[1]} output frames")
        if reference.shape[2] == 4:
            reference, offset = reference[:, :, :3], reference[:, :, 3:]
            logit = logit + offset
        return self.mix(rgb, logit, reference)

    @staticmethod
    def mix(rgb: Tensor, logit: Tensor, reference: Tensor) -> Tensor:
        """The blend itself: rgb where the logit is low, the reference where it is high."""
        return rgb + torch.sigmoid(logit) * (reference - rgb)

    def logits(self, x: Tensor, state: CausalState) -> Tensor:
        """The blend's logit (B, T, 1, 2h, 2w) from the half-resolution features."""
        y = self.conv(torch.relu(x), state)
        B, T, C, h, w = y.shape
        return F.pixel_shuffle(y.reshape(B * T, C, h, w), 2).view(B, T, 1, 2 * h, 2 * w)
