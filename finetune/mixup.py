"""Batch-mode Mixup / CutMix with label smoothing (the DeiT / official Swin fine-tune recipe) and its loss."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def smooth_one_hot(y: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, num_classes): off = smoothing / num_classes, on = 1 - smoothing + off."""
    off = label_smoothing / num_classes
    targets = torch.full((len(y), num_classes), off, device=y.device)
    return targets.scatter_(1, y.long().view(-1, 1), 1 - label_smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)); logits and targets (B, num_classes)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class Mixup:
    """Mixes every image of a batch with the same image of the flipped batch, with one lambda per batch.

    With probability `prob`: CutMix (with probability `switch_prob` when both alphas are > 0) or Mixup, lambda
    ~ Beta(alpha, alpha); a CutMix box covers 1 - lambda of the image, clipped to it, and lambda is then set to
    the uncovered fraction. `seed` makes the draws of successive batches repeatable.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000,
                 seed: int | None = None):
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        # without a seed, every batch draws from a generator seeded by torch's global one: repeatable under
        # pl.seed_everything, and in a resumed run (simmim.train.resume reseeds torch before every batch)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def _draw(self) -> tuple[float, bool]:
        """(lambda, use CutMix); lambda 1 means no mixing."""
        if self.rng.random() >= self.prob or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def _box(self, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        """A box (y0, y1, x0, x1) of area about (1 - lam) * H * W around a uniform random center, clipped."""
        cut = np.sqrt(1 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(self.rng.integers(height)), int(self.rng.integers(width))
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        return int(y0), int(y1), int(x0), int(x1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), y (B,) -> mixed x (B, C, H, W) (a new tensor), soft targets (B, num_classes)."""
        if self.seed is None:
            self.rng = np.random.default_rng(int(torch.randint(2 ** 62, (), device="cpu")))
        lam, use_cutmix = self._draw()
        if lam < 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = self._box(lam, *x.shape[-2:])
                x = x.clone()
                x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
                lam = 1 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])
            else:
                x = x * lam + x.flip(0) * (1 - lam)
        targets = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        return x, lam * targets + (1 - lam) * targets.flip(0)
