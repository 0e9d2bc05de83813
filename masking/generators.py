"""Mask generators for SimMIM pretraining (numpy only).

A mask is sampled on the coarse *mask-patch* grid (``grid x grid``, one cell per
``mask_patch_size`` pixels) and then upsampled to the model's *token* grid
(``token_grid x token_grid``, one cell per ``model_patch_size`` pixels), so every
``scale x scale`` block of tokens is either fully masked or fully visible.

Convention: 1 = masked, 0 = visible.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("random", "block")


def _multiples_near(value: int, base: int) -> str:
    """'a or b': the multiples of base just below and above value (only the positive ones)."""
    below, above = base * (value // base), base * (value // base + 1)
    return f"{below} or {above}" if below > 0 else f"{above}"


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; use a whole number greater than 0")


def mask_patch_sizes(input_size: int, model_patch_size: int) -> list[int]:
    """The mask patch sizes (pixels) that fit: the divisors of input_size that are multiples of model_patch_size."""
    return [size for size in range(model_patch_size, input_size + 1, model_patch_size) if input_size % size == 0]


def check_mask_patch_size(input_size: int, mask_patch_size: int, model_patch_size: int) -> None:
    """ValueError, naming the values and the fix, unless the three are positive integers and mask_patch_size
    divides input_size and is a multiple of model_patch_size (the mask patch grid covers whole tokens)."""
    for name, value in (("input_size", input_size), ("mask_patch_size", mask_patch_size),
                        ("model_patch_size", model_patch_size)):
        _check_positive_int(name, value)
    if input_size % mask_patch_size != 0:
        raise ValueError(f"input_size {input_size} is not divisible by mask_patch_size {mask_patch_size}; "
                         f"use an input size that is a multiple of {mask_patch_size} "
                         f"(e.g. {_multiples_near(input_size, mask_patch_size)})")
    if mask_patch_size % model_patch_size != 0:
        raise ValueError(f"mask_patch_size {mask_patch_size} is not divisible by model_patch_size "
                         f"{model_patch_size}; use a mask patch size that is a multiple of {model_patch_size} "
                         f"(e.g. {_multiples_near(mask_patch_size, model_patch_size)})")


class MaskGenerator:
    """SimMIM random masking: whole mask_patch_size blocks, exactly ceil(mask_ratio * num_mask_patches) of them.

    Args:
        input_size: image side in pixels (e.g. 192).
        mask_patch_size: side of one masked block in pixels (e.g. 32).
        model_patch_size: side of one model token in pixels (e.g. 4).
        mask_ratio: fraction of mask patches to mask, strictly inside (0, 1).
        seed: seed for the generator's own ``np.random.Generator`` (None: fresh OS entropy).

    Attributes:
        grid: mask patches per side (input_size // mask_patch_size).
        scale: tokens per mask patch per side (mask_patch_size // model_patch_size).
        token_grid: tokens per side (input_size // model_patch_size).
        num_masked: mask patches masked per sample (ceil(mask_ratio * grid**2)).
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, seed: int | None = None):
        check_mask_patch_size(input_size, mask_patch_size, model_patch_size)
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float, np.floating, np.integer)) \
                or not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be strictly between 0 and 1, got {mask_ratio!r}; "
                             f"use a fraction such as 0.6")
        self.input_size = int(input_size)
        self.mask_patch_size = int(mask_patch_size)
        self.model_patch_size = int(model_patch_size)
        self.mask_ratio = float(mask_ratio)
        self.seed = seed
        self.grid = self.input_size // self.mask_patch_size
        self.scale = self.mask_patch_size // self.model_patch_size
        self.token_grid = self.input_size // self.model_patch_size
        # The tiny epsilon keeps float noise from rounding up, e.g. 0.7 * 10 = 7.000000000000001 -> 7, not 8.
        self.num_masked = math.ceil(self.mask_ratio * self.grid ** 2 - 1e-9)
        self.rng = np.random.default_rng(seed)

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """Sample one mask.

        Args:
            rng: generator to draw from (e.g. a per-sample one); None uses the generator's own.

        Returns:
            (token_grid, token_grid) int64 array of 0/1; 1 = masked.
        """
        patch_mask = self.sample_patch_mask(self.rng if rng is None else rng)
        token_mask = patch_mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return token_mask.astype(np.int64)

    def sample_patch_mask(self, rng: np.random.Generator) -> np.ndarray:
        """(grid, grid) bool mask on the mask-patch grid with exactly num_masked True cells."""
        flat = np.zeros(self.grid ** 2, dtype=bool)
        flat[rng.permutation(self.grid ** 2)[:self.num_masked]] = True
        return flat.reshape(self.grid, self.grid)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
                f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}, "
                f"num_masked={self.num_masked}/{self.grid ** 2})")


class BlockMaskGenerator(MaskGenerator):
    """BEiT-style block-wise masking on the mask-patch grid.

    Repeatedly places random rectangles (area drawn between min_block_patches and the remaining
    budget, aspect ratio log-uniform in [min_aspect, 1/min_aspect]); a rectangle is kept only if it
    adds at least one new patch and does not overshoot the budget. After ``max_attempts`` tries (or
    once the budget is met) the count is made EXACT by masking random single patches.

    Extra args:
        min_block_patches: smallest rectangle area, in mask patches (>= 1).
        min_aspect: smallest height/width ratio, in (0, 1].
        max_attempts: rectangle placements tried per sample before topping up.
    """

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, seed: int | None = None, min_block_patches: int = 4,
                 min_aspect: float = 0.3, max_attempts: int = 100):
        super().__init__(input_size, mask_patch_size, model_patch_size, mask_ratio, seed)
        _check_positive_int("min_block_patches", min_block_patches)
        _check_positive_int("max_attempts", max_attempts)
        if isinstance(min_aspect, bool) or not isinstance(min_aspect, (int, float, np.floating)) \
                or not 0.0 < float(min_aspect) <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect!r}; use e.g. 0.3 "
                             f"(aspect ratios are drawn from [min_aspect, 1/min_aspect])")
        self.min_block_patches = int(min_block_patches)
        self.min_aspect = float(min_aspect)
        self.max_attempts = int(max_attempts)
        self._log_aspect = (math.log(self.min_aspect), math.log(1.0 / self.min_aspect))

    def sample_patch_mask(self, rng: np.random.Generator) -> np.ndarray:
        """(grid, grid) bool mask made of random rectangles, with exactly num_masked True cells."""
        g = self.grid
        mask = np.zeros((g, g), dtype=bool)
        count = 0
        for _ in range(self.max_attempts):
            remaining = self.num_masked - count
            if remaining <= 0:
                break
            area = rng.uniform(min(self.min_block_patches, remaining), remaining)
            aspect = math.exp(rng.uniform(*self._log_aspect))  # height / width
            h = min(g, max(1, round(math.sqrt(area * aspect))))
            w = min(g, max(1, round(math.sqrt(area / aspect))))
            top = int(rng.integers(0, g - h + 1))
            left = int(rng.integers(0, g - w + 1))
            block = mask[top:top + h, left:left + w]
            added = int(block.size - block.sum())
            if 0 < added <= remaining:
                block[...] = True
                count += added

        # Blocks never overshoot the budget; random single patches make the count exact.
        free = np.flatnonzero(~mask)
        mask.flat[rng.choice(free, self.num_masked - count, replace=False)] = True
        return mask

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", min_block_patches={self.min_block_patches}, "
                f"min_aspect={self.min_aspect})")


def build_mask_generator(kind: str = "random", **kwargs) -> MaskGenerator:
    """Build a mask generator: kind "random" -> MaskGenerator, "block" -> BlockMaskGenerator.

    kwargs are passed to the constructor (input_size, mask_patch_size, model_patch_size, mask_ratio, seed, ...).
    """
    if kind == "random":
        return MaskGenerator(**kwargs)
    if kind == "block":
        return BlockMaskGenerator(**kwargs)
    raise ValueError(f"unknown mask generator kind {kind!r}; choose one of {', '.join(KINDS)}")
