"""The encoder at any input size (timm's strict_img_size=False): padding to whole patches, windows and
mergings, shift masks per padded shape (cached), checked against a model built for the size and against
transformers' Swinv2, which pads the same way."""
import pytest
import torch

from conftest import randomize_, tiny_swinv2
from simmim.models.swinv2 import cached_shifted_window_mask
from simmim.tools.export import hf_config, to_hf


@torch.no_grad()
def test_other_size_equals_the_model_built_for_it():
    """Window 2 from 128 px: every stage map is larger than the window at 128 and at 256, so a model built
    for 128 px and fed 256 px images must compute exactly what the same weights built for 256 px compute."""
    small = randomize_(tiny_swinv2(img_size=128, window_size=2, num_classes=10), seed=1).eval()
    big = tiny_swinv2(img_size=256, window_size=2, num_classes=10).eval()
    big.load_state_dict(small.state_dict())
    assert [b.shift_size for layer in small.layers for b in layer.blocks] == [0, 1] * 4
    x = torch.randn(2, 3, 256, 256)
    torch.testing.assert_close(small(x), big(x), rtol=0, atol=1e-5)
    final_small, maps_small = small.forward_intermediates(x)
    final_big, maps_big = big.forward_intermediates(x)
    torch.testing.assert_close(final_small, final_big, rtol=0, atol=1e-5)
    assert [m.shape[-1] for m in maps_small] == [64, 32, 16, 8]
    for a, b in zip(maps_small, maps_big):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(100, 72), (30, 30), (13, 50), (128, 96)])
@torch.no_grad()
def test_any_size_matches_transformers(size):
    """transformers' Swinv2Model pads images to patches, maps to windows (before the roll) and odd maps before
    merging, as we do: same weights, same output at sizes that need every kind of padding."""
    import transformers  # the `test` extra installs it
    model = randomize_(tiny_swinv2(num_classes=0), seed=2).eval()  # 64 px, window 4: shifted stages 0 and 1
    config = {k: v for k, v in hf_config({**dict(img_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2],
                                                 num_heads=[2, 2, 4, 8], window_size=4)}).items()
              if k not in ("model_type", "architectures")}
    hf = transformers.Swinv2Model(transformers.Swinv2Config(**config)).eval()
    hf.load_state_dict(to_hf(model.state_dict()), strict=True)
    x = torch.randn(2, 3, *size)
    ours = model.forward_features(x)
    assert ours.shape[1:3] == (-(-size[0] // 32), -(-size[1] // 32))
    torch.testing.assert_close(ours.flatten(1, 2), hf(pixel_values=x).last_hidden_state, rtol=0, atol=1e-4)


@torch.no_grad()
def test_intermediates_and_reference_attention_at_an_odd_size():
    model = randomize_(tiny_swinv2(num_classes=0), seed=3).eval()
    x = torch.randn(1, 3, 100, 72)
    final, maps = model.forward_intermediates(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 18), (13, 9), (7, 5), (4, 3)]
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    model.set_attn_impl("reference")
    torch.testing.assert_close(model.forward_features(x), final, rtol=0, atol=1e-5)


def test_shift_masks_are_cached_per_shape():
    model = tiny_swinv2().eval()
    cached_shifted_window_mask.cache_clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # img_size: the blocks' own buffers
        assert cached_shifted_window_mask.cache_info().currsize == 0
        model(torch.randn(1, 3, 96, 80))
        misses = cached_shifted_window_mask.cache_info().misses
        assert misses == 2  # one padded shape per shifted stage (stages 0 and 1), shared by their blocks
        model(torch.randn(2, 3, 96, 80))
    assert cached_shifted_window_mask.cache_info().misses == misses
    block = model.layers[0].blocks[1]
    mask = block._shift_mask(24, 20, torch.device("cpu"))
    assert mask.shape == (30, 16, 16) and mask is block._shift_mask(24, 20, torch.device("cpu"))


def test_gradients_flow_at_other_sizes():
    model = randomize_(tiny_swinv2(), seed=4).train()
    model(torch.randn(2, 3, 70, 90)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_absolute_position_embedding_is_resized():
    model = randomize_(tiny_swinv2(ape=True, num_classes=0), seed=5).eval()
    with torch.no_grad():
        same = model._position_embedding(16, 16)
        assert same.shape == (1, 16, 16, 16) and torch.equal(same.flatten(1, 2), model.absolute_pos_embed)
        assert model._position_embedding(24, 20).shape == (1, 24, 20, 16)
        assert model.forward_features(torch.randn(1, 3, 96, 80)).shape == (1, 3, 3, 128)


def test_mask_of_another_grid_is_one_clear_error():
    model = tiny_swinv2()
    with pytest.raises(ValueError, match=r"mask is \(1, 16, 16\) but the image has a \(24, 20\) patch grid"):
        model.embed(torch.randn(1, 3, 96, 80), mask=torch.zeros(1, 16, 16), mask_token=torch.zeros(1, 1, 16))
