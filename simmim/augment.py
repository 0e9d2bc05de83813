"""The fine-tune augmentations of the official Swin / SimMIM recipe beyond crops and flips, as albumentations
transforms: RandAugment ("rand-m9-mstd0.5-inc1": 2 ops, magnitude 9 drawn with std 0.5, the increasing op set)
and random erasing (probability 0.25, one box filled with per-pixel normal noise, on the normalized image).

Both draw from albumentations' random state, so `Compose.set_random_seed` (per DataLoader worker, see
simmim.data.ImageDataset) makes them reproducible.
"""
from __future__ import annotations

import math

import albumentations as A
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["RANDAUG_OPS", "MAX_MAGNITUDE", "RandAugment", "RandomErasing", "apply_op"]

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
    return np.asarray(RANDAUG_OPS[name](Image.fromarray(image), level, rng))


class RandAugment(A.ImageOnlyTransform):
    """RandAugment on uint8 (H, W, 3) RGB: `num_ops` ops drawn with replacement from `RANDAUG_OPS`, each
    applied with probability `op_prob` at a magnitude drawn from N(magnitude, magnitude_std), clipped to
    [0, 10] (timm's "rand-m9-mstd0.5-inc1" with the defaults)."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, op_prob: float = 0.5,
                 p: float = 1.0):
        super().__init__(p=p)
        if num_ops < 0 or not 0 <= magnitude <= MAX_MAGNITUDE or magnitude_std < 0:
            raise ValueError(f"RandAugment needs num_ops >= 0, magnitude in [0, {MAX_MAGNITUDE:g}] and "
                             f"magnitude_std >= 0; got {num_ops}, {magnitude}, {magnitude_std}")
        self.num_ops, self.magnitude, self.magnitude_std, self.op_prob = num_ops, magnitude, magnitude_std, op_prob

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        rng = self.random_generator
        names = list(RANDAUG_OPS)
        for name in rng.choice(names, size=self.num_ops, replace=True):
            if rng.random() >= self.op_prob:
                continue
            magnitude = rng.normal(self.magnitude, self.magnitude_std) if self.magnitude_std else self.magnitude
            img = apply_op(str(name), img, magnitude, rng)
        return np.ascontiguousarray(img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("num_ops", "magnitude", "magnitude_std", "op_prob")


class RandomErasing(A.ImageOnlyTransform):
    """With probability `p`, one box of 2 % to 1/3 of a normalized float (H, W, C) image, aspect ratio
    log-uniform in [0.3, 1/0.3], is replaced by per-pixel N(0, 1) noise (timm's mode "pixel", count 1). Up to
    10 draws for a box that fits; none fits: the image is unchanged."""

    def __init__(self, p: float = 0.25, area: tuple[float, float] = (0.02, 1 / 3), min_aspect: float = 0.3):
        super().__init__(p=p)
        self.area, self.min_aspect = tuple(area), min_aspect

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        rng = self.random_generator
        height, width = img.shape[:2]
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        for _ in range(10):
            target = rng.uniform(*self.area) * height * width
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < h < height and 0 < w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                img = img.copy()
                img[top:top + h, left:left + w] = rng.standard_normal((h, w, img.shape[2])).astype(img.dtype)
                return img
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("area", "min_aspect")
