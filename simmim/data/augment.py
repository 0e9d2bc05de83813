"""The fine-tune augmentations of the official Swin / SimMIM recipe beyond crops and flips: RandAugment
("rand-m9-mstd0.5-inc1": 2 ops, magnitude 9 drawn with std 0.5, the increasing op set) on a worker's uint8
pixels, drawn from the sample's numpy Generator, and random erasing (probability 0.25, one box filled with
per-pixel normal noise) on a normalized batch on the device, drawn from a seed per batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["RANDAUG_OPS", "MAX_MAGNITUDE", "RandAugment", "random_erasing", "apply_op"]

MAX_MAGNITUDE = 10.0
FILL = (124, 116, 104)  # ImageNet mean in uint8: what geometric ops move into the picture


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


def _enhance(enhancer) -> callable:
    """Color / contrast / brightness / sharpness: factor 1 +- 0.9 * level (level = magnitude / 10)."""
    return lambda image, level, rng: enhancer(image).enhance(1.0 + _signed(0.9 * level, rng))


def _solarize_add(image: Image.Image, level: float, rng) -> Image.Image:
    """Add 110 * level to the pixels below 128, saturating."""
    pixels = np.asarray(image).astype(np.int16)
    added = np.where(pixels < 128, np.minimum(pixels + int(110 * level), 255), pixels)
    return Image.fromarray(added.astype(np.uint8))


def _posterize(image: Image.Image, level: float, rng) -> Image.Image:
    """Keep the 4 - int(4 * level) high bits of each pixel (none at level 1: black)."""
    keep = 4 - int(4 * level)
    return Image.fromarray(np.asarray(image) & np.uint8((0xFF << (8 - keep)) & 0xFF))


# name -> op(image, level in [0, 1], rng); the "increasing" set: a larger level is always a stronger change
RANDAUG_OPS = {
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Rotate": lambda image, level, rng: image.rotate(_signed(30.0 * level, rng), resample=Image.BILINEAR,
                                                     fillcolor=FILL),
    "Posterize": _posterize,
    "Solarize": lambda image, level, rng: ImageOps.solarize(image, 256 - int(256 * level)),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda image, level, rng: _affine(image, (1, _signed(0.3 * level, rng), 0, 0, 1, 0)),
    "ShearY": lambda image, level, rng: _affine(image, (1, 0, 0, _signed(0.3 * level, rng), 1, 0)),
    "TranslateX": lambda image, level, rng: _affine(
        image, (1, 0, _signed(0.45 * level, rng) * image.size[0], 0, 1, 0)),
    "TranslateY": lambda image, level, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * image.size[1])),
}


def apply_op(name: str, image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """One RandAugment op on a uint8 (H, W, 3) RGB image at `magnitude` in [0, 10]."""
    level = min(max(magnitude, 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE
    return np.array(RANDAUG_OPS[name](Image.fromarray(image), level, rng))  # a writable copy


class RandAugment:
    """RandAugment on uint8 (H, W, 3) RGB: `num_ops` ops drawn with replacement from `RANDAUG_OPS`, each
    applied with probability `op_prob` at a magnitude drawn from N(magnitude, magnitude_std), clipped to
    [0, 10] (timm's "rand-m9-mstd0.5-inc1" with the defaults). ``randaug(image, rng)``."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, op_prob: float = 0.5):
        if num_ops < 0 or not 0 <= magnitude <= MAX_MAGNITUDE or magnitude_std < 0:
            raise ValueError(f"RandAugment needs num_ops >= 0, magnitude in [0, {MAX_MAGNITUDE:g}] and "
                             f"magnitude_std >= 0; got {num_ops}, {magnitude}, {magnitude_std}")
        self.num_ops, self.magnitude, self.magnitude_std, self.op_prob = num_ops, magnitude, magnitude_std, op_prob

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        names = list(RANDAUG_OPS)
        for name in rng.choice(names, size=self.num_ops, replace=True):
            if rng.random() >= self.op_prob:
                continue
            magnitude = rng.normal(self.magnitude, self.magnitude_std) if self.magnitude_std else self.magnitude
            image = apply_op(str(name), image, magnitude, rng)
        return image


def random_erasing(images: torch.Tensor, p: float, seed: int, area: tuple[float, float] = (0.02, 1 / 3),
                   min_aspect: float = 0.3) -> torch.Tensor:
    """(B, C, H, W) normalized float -> the same with, in each image with probability `p`, one box of `area`
    (fractions of the image), aspect ratio log-uniform in [min_aspect, 1 / min_aspect], replaced by per-pixel
    N(0, 1) noise (timm's mode "pixel", count 1). Up to 10 draws for a box that fits; none fits: unchanged.
    The draws come from torch generators seeded with `seed` (the boxes on the CPU, the noise on the images'
    device), so a batch and a seed give one result."""
    batch, _, height, width = images.shape
    draws = torch.Generator().manual_seed(seed)
    erase = torch.rand(batch, generator=draws) < p
    log_aspect = math.log(min_aspect)
    target = torch.empty(batch, 10).uniform_(*area, generator=draws) * height * width
    aspect = torch.exp(torch.empty(batch, 10).uniform_(log_aspect, -log_aspect, generator=draws))
    h, w = torch.round(torch.sqrt(target * aspect)).long(), torch.round(torch.sqrt(target / aspect)).long()
    fits = (h > 0) & (h < height) & (w > 0) & (w < width)
    first = fits.long().argmax(1, keepdim=True)  # the first draw that fits (0 where none does)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    erase &= fits.any(1)
    if not erase.any():
        return images
    top = (torch.rand(batch, generator=draws) * (height - h + 1)).long()
    left = (torch.rand(batch, generator=draws) * (width - w + 1)).long()
    device = images.device
    top, left, bottom, right = (v.to(device)[:, None, None] for v in (top, left, top + h, left + w))
    rows, cols = torch.arange(height, device=device)[:, None], torch.arange(width, device=device)
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right) & erase.to(device)[:, None, None]
    noise = torch.randn(images.shape, generator=torch.Generator(device).manual_seed(seed), device=device,
                        dtype=images.dtype)
    return torch.where(inside[:, None], noise, images)
