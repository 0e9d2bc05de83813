"""The same SimMIM step on other SwinV2 implementations, for `scripts/benchmark.py peers=true`.

timm: its `SwinTransformerV2` as the encoder (our mask token after its patch embedding), inside our `SimMIM` (the
same 1x1 conv + PixelShuffle decoder and masked L1 loss). transformers: `Swinv2ForMaskedImageModeling`, which
has that decoder and loss itself. Neither library is a dependency: `available_peers()` lists those importable.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from simmim.models.simmim import SimMIM

PEERS = ("timm", "transformers")


def available_peers() -> list[str]:
    return [name for name in PEERS if importlib.util.find_spec(name) is not None]


class TimmEncoder(nn.Module):
    """timm's SwinV2 with a SimMIM mask token: (B, 3, H, W), mask (B, H/4, W/4) -> (B, num_features, H/s, W/s), s = 4 * 2^(stages - 1)."""

    def __init__(self, img_size: int, window_size: int, embed_dim: int, depths, num_heads, drop_path_rate: float):
        super().__init__()
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        self.swin = SwinTransformerV2(img_size=img_size, patch_size=4, embed_dim=embed_dim, depths=tuple(depths),
                                      num_heads=tuple(num_heads), window_size=window_size, num_classes=0,
                                      drop_path_rate=drop_path_rate)
        self.num_features = self.swin.num_features
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"swin.{name}" for name in self.swin.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"cpb_mlp", "logit_scale"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.swin.patch_embed(x)  # B, H/4, W/4, C
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - w) + self.mask_token.to(tokens.dtype) * w
        return self.swin.norm(self.swin.layers(tokens)).permute(0, 3, 1, 2)


class TransformersSimMIM(nn.Module):
    """transformers' Swinv2ForMaskedImageModeling behind our SimMIM call: forward(x, mask) -> loss."""

    def __init__(self, img_size: int, window_size: int, embed_dim: int, depths, num_heads, drop_path_rate: float):
        super().__init__()
        from transformers import Swinv2Config, Swinv2ForMaskedImageModeling

        config = Swinv2Config(image_size=img_size, patch_size=4, num_channels=3, embed_dim=embed_dim,
                              depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                              drop_path_rate=drop_path_rate, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, encoder_stride=4 * 2 ** (len(depths) - 1))
        self.model = Swinv2ForMaskedImageModeling(config)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"continuous_position_bias_mlp", "logit_scale", "mask_token"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, bool_masked_pos=mask.flatten(1).bool()).loss


def build_peer(name: str, img_size: int, window_size: int, embed_dim: int, depths, num_heads,
               drop_path_rate: float = 0.1) -> nn.Module:
    """A peer's SimMIM module, forward(x, mask) -> loss, with raw-pixel targets."""
    args = dict(img_size=img_size, window_size=window_size, embed_dim=embed_dim, depths=depths,
                num_heads=num_heads, drop_path_rate=drop_path_rate)
    if name == "timm":
        return SimMIM(TimmEncoder(**args), encoder_stride=4 * 2 ** (len(depths) - 1), in_chans=3, patch_size=4)
    if name == "transformers":
        return TransformersSimMIM(**args)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
