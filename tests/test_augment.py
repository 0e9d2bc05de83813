"""RandAugment and random erasing of the official fine-tune recipe (simmim/data/augment.py)."""

import cv2
import numpy as np
import pytest
import torch

from simmim.data.augment import RANDAUG_OPS, RandAugment, apply_op, random_erasing
from simmim.data.transforms import TrainAugment, finetune_transform
from simmim.train.config import load_config


def picture(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_op_levels_follow_magnitude():
    rng = np.random.default_rng(0)
    image = picture()
    assert np.array_equal(apply_op("Invert", image, 9, rng), 255 - image)
    assert np.array_equal(apply_op("Posterize", image, 5, rng), image & 0b11000000)  # 4 - int(2) = 2 bits kept
    assert not apply_op("Posterize", image, 10, rng).any()  # 0 bits at magnitude 10
    solarized = apply_op("Solarize", image, 5, rng)  # threshold 256 - 128 = 128
    assert np.array_equal(solarized, np.where(image >= 128, 255 - image, image))
    added = apply_op("SolarizeAdd", image, 10, rng).astype(int)  # +110 below 128
    assert np.array_equal(added, np.where(image < 128, np.minimum(image.astype(int) + 110, 255), image))
    for name in ("Rotate", "ShearX", "TranslateY", "Color", "Contrast", "Brightness", "Sharpness"):
        assert np.array_equal(apply_op(name, image, 0, rng), image), name  # magnitude 0: no change
    assert np.array_equal(apply_op("Invert", image, 42, rng), 255 - image)  # magnitudes clip to [0, 10]


def test_translation_moves_by_45_percent_at_full_magnitude():
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, 50] = 255  # one white column
    for _ in range(4):  # both signs occur
        moved = apply_op("TranslateX", image, 10, np.random.default_rng(_))
        columns = np.nonzero(moved[:, :, 0].max(axis=0) > 128)[0]
        assert len(columns) == 1 and abs(columns[0] - 50) == 45
        assert (moved[:, 0] == (124, 116, 104)).all() or (moved[:, -1] == (124, 116, 104)).all()  # mean fill


def test_rand_augment_draws_ops_with_probability_and_magnitude():
    """2 ops each applied with probability 0.5: a quarter of the images pass unchanged (all ops change this
    random picture at magnitude ~9)."""
    image, rng = picture(), np.random.default_rng(1)
    randaug = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    unchanged = sum(np.array_equal(randaug(image, rng), image) for _ in range(400))
    assert abs(unchanged / 400 - 0.25) < 0.07, unchanged
    assert len(RANDAUG_OPS) == 15
    with pytest.raises(ValueError, match="magnitude in \\[0, 10\\]"):
        RandAugment(magnitude=12)


def test_random_erasing_probability_area_and_noise():
    images = torch.zeros(800, 3, 60, 80)
    out = random_erasing(images, 0.25, seed=2)
    erased = (out != 0).any(dim=1)  # (B, H, W)
    hit = erased.flatten(1).any(1)
    assert abs(hit.float().mean().item() - 0.25) < 0.05
    fractions = []
    for box in erased[hit]:
        rows, cols = np.nonzero(box.numpy())
        assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one box
        fractions.append(box.float().mean().item())
    assert 0.015 < min(fractions) and max(fractions) < 1 / 3 + 0.02
    values = out.permute(0, 2, 3, 1)[erased]  # (pixels, 3): every channel noise
    assert (values != 0).all() and abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05
    assert not torch.equal(values[:, 0], values[:, 1])
    assert torch.equal(out, random_erasing(images, 0.25, seed=2)) and not torch.equal(out, random_erasing(images, 0.25, 3))
    assert torch.equal(random_erasing(images, 0.0, seed=2), images)
    ones = torch.ones(2, 3, 8, 8, dtype=torch.bfloat16)
    assert random_erasing(ones, 1.0, seed=0).dtype == torch.bfloat16


def test_finetune_transform_with_the_official_augmentation_is_reproducible():
    transform = finetune_transform(32, randaug_ops=2, randaug_magnitude=9, randaug_magnitude_std=0.5)
    assert isinstance(transform, TrainAugment) and transform.interpolation == cv2.INTER_CUBIC
    assert (transform.randaug.num_ops, transform.randaug.magnitude, transform.randaug.magnitude_std) == (2, 9, 0.5)
    image = picture(40, 40)
    transform.set_random_seed(5)
    first = [transform(image=image)["image"] for _ in range(3)]
    assert first[0].shape == (32, 32, 3) and first[0].dtype == torch.uint8
    transform.set_random_seed(5)
    assert all(torch.equal(a, transform(image=image)["image"]) for a in first)
    assert finetune_transform(32).randaug is None


def test_size_recipes_turn_them_on_and_the_demo_leaves_them_off():
    assert load_config("finetune", "default").data.randaug_ops == 0
    for name in ("tiny", "small", "base", "large", "huge", "giant"):
        data = load_config("finetune", name).data
        assert (data.randaug_ops, data.randaug_magnitude, data.randaug_magnitude_std, data.random_erasing) == (
            2, 9, 0.5, 0.25), name
