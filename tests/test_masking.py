"""Tests for the SimMIM mask generators (masking package)."""

import math

import numpy as np
import pytest

from masking import BlockMaskGenerator, MaskGenerator, build_mask_generator

# (input_size, mask_patch_size, model_patch_size, mask_ratio) -> expected masked mask patches
CONFIGS = {
    (192, 32, 4, 0.6): 22,   # 6x6 grid, 21.6 -> 22
    (64, 8, 4, 0.6): 39,     # 8x8 grid, 38.4 -> 39
    (64, 16, 4, 0.6): 10,    # 4x4 grid, 9.6 -> 10
    (224, 32, 4, 0.75): 37,  # 7x7 grid, 36.75 -> 37
    (224, 16, 4, 0.4): 79,   # 14x14 grid, 78.4 -> 79
    (160, 16, 4, 0.7): 70,   # 10x10 grid, exact
    (160, 32, 4, 0.28): 7,   # 5x5 grid, 0.28 * 25 is 7.000000000000001 in floats: must stay 7
}
GENERATORS = [MaskGenerator, BlockMaskGenerator]


def kwargs_of(cfg):
    input_size, mask_patch_size, model_patch_size, mask_ratio = cfg
    return dict(input_size=input_size, mask_patch_size=mask_patch_size, model_patch_size=model_patch_size,
                mask_ratio=mask_ratio)


def to_patch_grid(mask, scale):
    """(T, T) token mask -> (T/scale, T/scale, scale*scale) blocks."""
    g = mask.shape[0] // scale
    return mask.reshape(g, scale, g, scale).transpose(0, 2, 1, 3).reshape(g, g, scale * scale)


def masked_neighbours(patch_mask):
    """Mean number of masked 4-neighbours per masked cell of a (g, g) 0/1 mask."""
    m = patch_mask.astype(int)
    n = np.zeros_like(m)
    n[1:] += m[:-1]
    n[:-1] += m[1:]
    n[:, 1:] += m[:, :-1]
    n[:, :-1] += m[:, 1:]
    return (n * m).sum() / m.sum()


def chi_square(counts, draws, p):
    """Chi-square of per-position mask counts against Binomial(draws, p) at every position."""
    expected = draws * p
    return float(((counts - expected) ** 2 / (expected * (1 - p))).sum())


# --- attributes, shape, dtype, exact count, block structure ---------------------------------------------------


@pytest.mark.parametrize("cls", GENERATORS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_exact_count_shape_dtype_and_blocks(cls, cfg):
    gen = cls(**kwargs_of(cfg), seed=0)
    input_size, mask_patch_size, model_patch_size, _ = cfg
    assert gen.grid == input_size // mask_patch_size
    assert gen.scale == mask_patch_size // model_patch_size
    assert gen.token_grid == input_size // model_patch_size
    assert gen.num_masked == CONFIGS[cfg]
    for _ in range(20):
        mask = gen()
        assert mask.shape == (gen.token_grid, gen.token_grid)
        assert mask.dtype == np.int64
        assert set(np.unique(mask)) <= {0, 1}
        assert mask.sum() == gen.num_masked * gen.scale ** 2  # tokens
        blocks = to_patch_grid(mask, gen.scale)
        assert np.all((blocks.min(-1) == blocks.max(-1))), "a mask patch is partly masked"
        assert blocks[..., 0].sum() == gen.num_masked  # mask patches


def test_default_is_simmim_192_32_4_06():
    gen = MaskGenerator()
    assert (gen.input_size, gen.mask_patch_size, gen.model_patch_size, gen.mask_ratio) == (192, 32, 4, 0.6)
    assert (gen.grid, gen.scale, gen.token_grid, gen.num_masked) == (6, 8, 48, 22)
    assert gen().shape == (48, 48)


def test_num_masked_is_ceil():
    for ratio in (0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9):
        gen = MaskGenerator(input_size=96, mask_patch_size=16, model_patch_size=4, mask_ratio=ratio)
        assert gen.num_masked == math.ceil(round(ratio * 36, 6))


# --- uniformity of the random generator ----------------------------------------------------------------------


def test_random_generator_is_uniform():
    gen = MaskGenerator(192, 32, 4, 0.6, seed=123)
    draws = 4000
    counts = sum(gen()[:: gen.scale, :: gen.scale] for _ in range(draws)).ravel()
    p = gen.num_masked / gen.grid ** 2  # 22/36 ~= 0.611: each position is masked this often on average
    freq = counts / draws
    assert np.all(np.abs(freq - p) < 0.03), freq.round(3)
    assert abs(freq.mean() - p) < 1e-12  # exact count per draw
    # 35 degrees of freedom (the total is fixed); 99.99% quantile of chi2(35) is ~74.9.
    assert chi_square(counts, draws, p) < 74.9


def test_chi_square_check_detects_bias():
    """The uniformity statistic used above does flag a generator that prefers some positions."""
    rng = np.random.default_rng(0)
    draws, g, k = 4000, 6, 22
    weights = np.ones(g * g)
    weights[:6] = 1.5  # first row favoured
    counts = np.zeros(g * g)
    for _ in range(draws):
        counts[rng.choice(g * g, k, replace=False, p=weights / weights.sum())] += 1
    assert chi_square(counts, draws, k / (g * g)) > 74.9


# --- reproducibility ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "block"])
def test_same_seed_same_masks_different_seeds_differ(kind):
    a = build_mask_generator(kind, seed=7)
    b = build_mask_generator(kind, seed=7)
    c = build_mask_generator(kind, seed=8)
    seq_a = np.stack([a() for _ in range(10)])
    seq_b = np.stack([b() for _ in range(10)])
    seq_c = np.stack([c() for _ in range(10)])
    np.testing.assert_array_equal(seq_a, seq_b)
    assert not np.array_equal(seq_a, seq_c)
    assert not all(np.array_equal(seq_a[0], m) for m in seq_a[1:]), "successive draws should differ"


@pytest.mark.parametrize("kind", ["random", "block"])
def test_explicit_rng_is_used_and_reproducible(kind):
    gen_a = build_mask_generator(kind, seed=1)
    gen_b = build_mask_generator(kind, seed=2)  # own seed must not matter when rng is given
    m1 = gen_a(np.random.default_rng(42))
    m2 = gen_b(np.random.default_rng(42))
    np.testing.assert_array_equal(m1, m2)
    per_sample = [gen_a(np.random.default_rng(s)) for s in range(10)]
    assert not all(np.array_equal(per_sample[0], m) for m in per_sample[1:])
    # passing an rng leaves the generator's own stream untouched
    fresh = build_mask_generator(kind, seed=1)
    np.testing.assert_array_equal(gen_a(), fresh())


def test_seed_none_uses_fresh_entropy():
    masks = [MaskGenerator(seed=None)() for _ in range(5)]
    assert not all(np.array_equal(masks[0], m) for m in masks[1:])


# --- block generator --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [(192, 32, 4, 0.6), (64, 8, 4, 0.6), (224, 16, 4, 0.4)])
def test_block_masks_are_more_clustered_than_random(cfg):
    rand = MaskGenerator(**kwargs_of(cfg), seed=0)
    block = BlockMaskGenerator(**kwargs_of(cfg), seed=0)
    draws = 300
    rand_nb = np.mean([masked_neighbours(rand()[:: rand.scale, :: rand.scale]) for _ in range(draws)])
    block_nb = np.mean([masked_neighbours(block()[:: block.scale, :: block.scale]) for _ in range(draws)])
    assert block_nb > rand_nb + 0.3, (block_nb, rand_nb)


def test_block_exact_count_with_awkward_settings():
    # large min block (most rectangles overshoot) and a single attempt: top-up must still make the count exact
    for kw in (dict(min_block_patches=30), dict(max_attempts=1), dict(min_aspect=1.0), dict(min_block_patches=1)):
        gen = BlockMaskGenerator(192, 32, 4, 0.6, seed=3, **kw)
        for _ in range(50):
            assert gen().sum() == gen.num_masked * gen.scale ** 2, kw


def test_build_mask_generator_kinds():
    assert type(build_mask_generator()) is MaskGenerator
    assert type(build_mask_generator("random", input_size=64, mask_patch_size=16)) is MaskGenerator
    block = build_mask_generator("block", input_size=64, mask_patch_size=8, min_block_patches=2, min_aspect=0.5)
    assert type(block) is BlockMaskGenerator
    assert (block.grid, block.min_block_patches, block.min_aspect) == (8, 2, 0.5)


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_size=200), r"input_size 200 is not divisible by mask_patch_size 32; .*multiple of 32 \(e\.g\. 192 or 224\)"),
    (dict(input_size=192, mask_patch_size=24, model_patch_size=5),
     r"mask_patch_size 24 is not divisible by model_patch_size 5; .*multiple of 5"),
    (dict(mask_ratio=0.0), r"mask_ratio must be strictly between 0 and 1, got 0\.0"),
    (dict(mask_ratio=1.0), r"mask_ratio must be strictly between 0 and 1, got 1\.0"),
    (dict(mask_ratio=-0.2), r"mask_ratio must be strictly between 0 and 1"),
    (dict(mask_ratio=1.5), r"mask_ratio must be strictly between 0 and 1"),
    (dict(input_size=0), r"input_size must be a positive integer, got 0"),
    (dict(mask_patch_size=-32), r"mask_patch_size must be a positive integer, got -32"),
    (dict(model_patch_size=0), r"model_patch_size must be a positive integer, got 0"),
    (dict(input_size=192.0), r"input_size must be a positive integer, got 192\.0"),
])
@pytest.mark.parametrize("cls", GENERATORS)
def test_bad_inputs_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_block_patches=0), r"min_block_patches must be a positive integer"),
    (dict(min_aspect=0.0), r"min_aspect must be in \(0, 1\]"),
    (dict(min_aspect=2.0), r"min_aspect must be in \(0, 1\]"),
])
def test_block_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockMaskGenerator(**kwargs)


def test_unknown_kind_lists_kinds():
    with pytest.raises(ValueError, match=r"unknown mask generator kind 'grid'; choose one of random, block"):
        build_mask_generator("grid")
