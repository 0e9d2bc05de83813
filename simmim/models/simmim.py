"""SimMIM on a SwinV2 encoder: mask token, one-layer linear decoder, masked L1 loss.

State-dict keys are those of the official SimMIM release (`encoder.*`, `decoder.0.*`), so checkpoints load
both ways.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simmim.models.kernels import linear
from simmim.models.swinv2 import SwinTransformerV2, encoder_args


class SwinTransformerV2ForSimMIM(SwinTransformerV2):
    """SwinV2 encoder whose masked patch embeddings are replaced by a learnable `mask_token` (1, 1, C)."""

    def __init__(self, **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), mask (B, H/p, W/p) of 0/1 -> last-stage map (B, num_features, H/32, W/32)."""
        tokens = self.embed(x, mask=mask, mask_token=self.mask_token)
        return self.forward_tokens(tokens).permute(0, 3, 1, 2)


NORM_WINDOW_RULE = "an odd window of pixels >= 3, e.g. 47 (the official recipes)"


def is_norm_window(window) -> bool:
    """Whether `window` can be the normalized targets' window (`NORM_WINDOW_RULE`): centred on its pixel, with
    more than that pixel (a window of 1 has no variance: the targets are NaN)."""
    return isinstance(window, int) and not isinstance(window, bool) and window >= 3 and window % 2 == 1


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over each pixel's window x window neighbourhood, pixels inside the image only; the box is separable,
    so two 1-D passes (2 x window reads per pixel instead of window^2). (B, C, H, W) -> (B, C, H, W)."""
    pad = window // 2
    x = F.avg_pool2d(x, (window, 1), stride=1, padding=(pad, 0), count_include_pad=False)
    return F.avg_pool2d(x, (1, window), stride=1, padding=(0, pad), count_include_pad=False)


def _box_count(size: int, window: int) -> torch.Tensor:
    """How many of the `window` positions centred on each of `size` positions lie inside: (size,)."""
    i, pad = torch.arange(size), window // 2
    return (i + pad).clamp(max=size - 1) - (i - pad).clamp(min=0) + 1


def local_stats(x: torch.Tensor, window: int = 47) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (unbiased variance + 1e-6) of each pixel's `window` x `window` neighbourhood, counting only
    pixels inside the image, as the official SimMIM release does. (B, C, H, W) -> two (B, C, H, W)."""
    if not is_norm_window(window):
        raise ValueError(f"norm target window {window}: expected {NORM_WINDOW_RULE}")
    mean, mean_sq = _box_mean(x, window), _box_mean(x ** 2, window)
    count = (_box_count(x.shape[-2], window)[:, None] * _box_count(x.shape[-1], window)).to(x.device, x.dtype)
    var = ((mean_sq - mean ** 2) * (count / (count - 1))).clamp(min=0.0)
    return mean, (var + 1e-6) ** 0.5


def norm_targets(x: torch.Tensor, window: int = 47) -> torch.Tensor:
    """Locally normalized pixels, the SimMIM target option: (x - local mean) / local std."""
    mean, std = local_stats(x, window)
    return (x - mean) / std


class PointwiseConv(nn.Conv2d):
    """1x1 convolution (an nn.Conv2d: same parameters and state-dict keys) computed as a linear map over the
    channels of the channels-last map the encoders return: (B, C_in, H, W) -> (B, C_out, H, W), channels-last
    strides. On CPU this avoids the slow direct convolution PyTorch picks for a channels-last 1x1 input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class SimMIM(nn.Module):
    """Encoder + decoder (1x1 conv to stride^2 * in_chans channels, then PixelShuffle(stride)) + loss.

    forward(x, mask) -> scalar loss: L1 on masked pixels only,
    sum(|target - x_rec| * mask) / (mask.sum() + 1e-5) / in_chans; forward(x, mask, first) -> that loss over the
    batch's first `first` images only (the model still runs on the whole batch).
    """

    def __init__(self, encoder: SwinTransformerV2ForSimMIM, encoder_stride: int = 32, in_chans: int = 3,
                 patch_size: int = 4, norm_target_patch_size: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride, self.in_chans, self.patch_size = encoder_stride, in_chans, patch_size
        self.norm_target_patch_size = norm_target_patch_size
        self.decoder = nn.Sequential(
            PointwiseConv(encoder.num_features, encoder_stride ** 2 * in_chans),
            nn.PixelShuffle(encoder_stride),
        )

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return self.encoder.no_weight_decay_keywords()

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Token mask (B, H/p, W/p) -> pixel mask (B, 1, H, W)."""
        return mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm_target_patch_size is None else norm_targets(x, self.norm_target_patch_size)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, in_chans, H, W), in the space of `target(x)`."""
        return self.decoder(self.encoder(x, mask))

    def reconstruct_pixels(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels in the space of `x`: with normalized targets, mapped back with each pixel's local
        mean and std of the original (which only pictures may use: it peeks at the masked pixels)."""
        prediction = self.reconstruct(x, mask)
        if self.norm_target_patch_size is None:
            return prediction
        mean, std = local_stats(x, self.norm_target_patch_size)
        return prediction * std + mean

    def forward(self, x: torch.Tensor, mask: torch.Tensor, first: int | None = None) -> torch.Tensor:
        x_rec = self.reconstruct(x, mask)
        if first is not None:  # only then: a slice would put a copy of the whole gradient in training's backward
            x_rec, x, mask = x_rec[:first], x[:first], mask[:first]
        pixel_mask = self.pixel_mask(mask).to(x_rec.dtype)
        loss = F.l1_loss(self.target(x).to(x_rec.dtype), x_rec, reduction="none")
        return (loss * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.in_chans


def build_simmim(model: dict, norm_target_patch_size: int | None = None) -> SimMIM:
    """SimMIM around a SwinV2 built from a `model` config section (SwinTransformerV2 arguments; `variant` is
    resolved into widths, depths and heads when the config is loaded; `compile` is the LightningModule's)."""
    encoder = SwinTransformerV2ForSimMIM(**encoder_args(model))
    return SimMIM(encoder, encoder_stride=encoder.patch_size * 2 ** (encoder.num_layers - 1),
                  in_chans=encoder.in_chans, patch_size=encoder.patch_size,
                  norm_target_patch_size=norm_target_patch_size)
