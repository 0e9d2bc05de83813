"""The smallest dense-prediction head over a SwinV2 backbone: the README's backbone example."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StageSegmentationHead(nn.Module):
    """Per-pixel class logits from every stage of a SwinV2: a 1x1 conv per stage map (C_i -> num_classes),
    each upsampled bilinearly to the output size, summed. No FPN, no fusion layers.

    `feature_info`: the encoder's (one {"num_chs": C_i, "reduction": r_i, ...} per stage).
    forward(maps, size): maps [(B, C_i, H / r_i, W / r_i)] as from `forward_intermediates` -> (B, num_classes, *size).
    """

    def __init__(self, feature_info: list[dict], num_classes: int):
        super().__init__()
        self.classifiers = nn.ModuleList(nn.Conv2d(info["num_chs"], num_classes, 1) for info in feature_info)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(maps) != len(self.classifiers):
            raise ValueError(f"expected {len(self.classifiers)} stage maps (one per feature_info entry), got "
                             f"{len(maps)}; call forward_intermediates without indices")
        return sum(F.interpolate(classify(m), size=size, mode="bilinear", align_corners=False)
                   for classify, m in zip(self.classifiers, maps))
