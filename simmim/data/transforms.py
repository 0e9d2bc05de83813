"""Training and evaluation transforms: random resized crop + flip (+ RandAugment) on uint8 pixels in the
workers (`TrainAugment`), normalization on the device (`normalize_images`), the eval resize + center crop."""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from simmim.data.augment import RandAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_crop_flip(crop_scale: Sequence[float], crop_ratio: Sequence[float], hflip: float) -> None:
    """ValueError naming the data.* key when a crop range or the flip probability is out of bounds."""
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"data.crop_scale={list(crop_scale)} must be [min, max] area fractions with "
                         f"0 < min <= max <= 1, e.g. [0.67, 1.0]")
    if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
        raise ValueError(f"data.crop_ratio={list(crop_ratio)} must be [min, max] aspect ratios (width / height) "
                         f"with 0 < min <= max, e.g. [0.75, 1.333]")
    if not 0 <= hflip <= 1:
        raise ValueError(f"data.hflip={hflip} must be a probability in [0, 1] (0: no flips)")


def pretrain_transform(img_size: int, crop_scale: Sequence[float] = (0.67, 1.0),
                       crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> "TrainAugment":
    """SimMIM pretraining augmentation: uint8 (H, W, 3) RGB -> uint8 (img_size, img_size, 3), normalized later
    on the device (`normalize_images`).

    A random crop of `crop_scale` (fractions of the area) and `crop_ratio` (width / height) resized bilinearly
    to img_size, a horizontal flip with probability `hflip` (`TrainAugment`).
    """
    check_crop_flip(crop_scale, crop_ratio, hflip)
    return TrainAugment(img_size, crop_scale, crop_ratio, hflip)


def finetune_transform(img_size: int, crop_scale: Sequence[float] = (0.08, 1.0),
                       crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, randaug_ops: int = 0,
                       randaug_magnitude: float = 9.0, randaug_magnitude_std: float = 0.5) -> "TrainAugment":
    """Classification fine-tune augmentation: uint8 (H, W, 3) RGB -> uint8 (img_size, img_size, 3), normalized
    (and randomly erased: `simmim.data.augment.random_erasing`) later on the device.

    Random resized crop (bicubic, like the official recipe) and flip as in `pretrain_transform` (the defaults are
    the ImageNet recipe's), then RandAugment when `randaug_ops` > 0 (the official recipe: 2 ops, magnitude 9,
    std 0.5).
    """
    check_crop_flip(crop_scale, crop_ratio, hflip)
    randaug = RandAugment(randaug_ops, randaug_magnitude, randaug_magnitude_std) if randaug_ops else None
    return TrainAugment(img_size, crop_scale, crop_ratio, hflip, cv2.INTER_CUBIC, randaug)


class TrainAugment:
    """Random resized crop + horizontal flip (+ RandAugment) on uint8 pixels: (H, W, C) -> uint8 tensor (S, S, C).

    The crop's area is drawn uniformly from `scale` (fractions of the image) and its aspect ratio (width / height)
    log-uniformly from `ratio`, up to 10 tries for one that fits, else the largest centered crop of an allowed
    ratio (torchvision's rule); it is resized to size x size with `interpolation` (one OpenCV resize of the
    crop's pixels) and flipped with probability `hflip`; `randaug` (simmim.data.augment.RandAugment) follows. Pixels
    stay uint8 and channels last: the batch is permuted and normalized on the device (`normalize_images`, called
    by the DataModules' `on_after_batch_transfer`), which spares the workers the float work and the collation
    a strided copy, and the host-to-device copy three quarters of its bytes. Used like an albumentations
    transform: ``augment(image=array)["image"]``, ``augment.set_random_seed(seed)``.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.67, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: int = cv2.INTER_LINEAR, randaug: RandAugment | None = None):
        self.size, self.scale, self.ratio, self.hflip = (size, size), tuple(scale), tuple(ratio), hflip
        self.interpolation, self.randaug = interpolation, randaug
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of the next random crop of a height x width image."""
        area, log_ratio = height * width, np.log(self.ratio)
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = np.exp(self.rng.uniform(*log_ratio))
            w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(self.rng.integers(height - h + 1)), int(self.rng.integers(width - w + 1)), h, w
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        h, w = (height, min(width, round(height * aspect))) if width / height >= aspect else \
            (min(height, round(width / aspect)), width)
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, *, image: np.ndarray) -> dict[str, torch.Tensor]:
        top, left, h, w = self.box(*image.shape[:2])
        out = cv2.resize(image[top:top + h, left:left + w], self.size, interpolation=self.interpolation)
        if self.rng.random() < self.hflip:
            out = cv2.flip(out, 1)
        out = out.reshape(*self.size, -1)  # cv2 drops a single channel's axis
        if self.randaug is not None:
            out = self.randaug(out, self.rng)
        return {"image": torch.from_numpy(out)}


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB, as `TrainAugment` leaves them -> float32 (B, 3, H, W), ImageNet-normalized like
    the float transforms' output."""
    images = images.permute(0, 3, 1, 2).contiguous()
    mean = images.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = images.new_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def eval_transform(img_size: int) -> A.Compose:
    """Resize the short side to img_size / 0.875, center-crop: -> float (3, img_size, img_size)."""
    return A.Compose([
        A.SmallestMaxSize(max_size=round(img_size / 0.875), interpolation=cv2.INTER_CUBIC),
        A.CenterCrop(height=img_size, width=img_size),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
        ToTensorV2(),
    ])
