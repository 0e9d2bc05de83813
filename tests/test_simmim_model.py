from pathlib import Path

import torch

from conftest import TINY, randomize_
from simmim.models.simmim import SimMIM, SwinTransformerV2ForSimMIM, norm_targets

DATA = Path(__file__).parent / "data"


def tiny_simmim(norm_target_patch_size=None, **overrides) -> SimMIM:
    cfg = {**TINY, **overrides}
    cfg.pop("num_classes")
    return SimMIM(SwinTransformerV2ForSimMIM(**cfg), encoder_stride=32, in_chans=3, patch_size=4,
                  norm_target_patch_size=norm_target_patch_size)


def _official_case():
    ref = torch.load(DATA / "simmim_official.pt", weights_only=True)
    cfg = ref["config"]
    encoder_args = {k: cfg[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads",
                                        "window_size", "mlp_ratio", "qkv_bias", "drop_rate", "drop_path_rate",
                                        "ape", "patch_norm", "pretrained_window_sizes")}
    return ref, cfg, encoder_args


def test_matches_official_simmim():
    """Loss and latent of the official SimMIM code on random weights (tests/data/README.md)."""
    ref, cfg, encoder_args = _official_case()
    for norm_target, loss_key, x_key in ((47, "loss", "input"), (None, "loss_no_norm_target", "input"),
                                         (47, "loss_b", "input_b"), (None, "loss_b_no_norm_target", "input_b")):
        model = SimMIM(SwinTransformerV2ForSimMIM(**encoder_args), encoder_stride=cfg["encoder_stride"],
                       in_chans=3, patch_size=4, norm_target_patch_size=norm_target).eval()
        model.load_state_dict(ref["state_dict"])  # official keys, derived buffers included, strict
        with torch.no_grad():
            loss = model(ref[x_key], ref["mask"])
            latent = model.encoder(ref["input"], ref["mask"])
        torch.testing.assert_close(loss, ref[loss_key], rtol=1e-5, atol=1e-5, msg=loss_key)
        torch.testing.assert_close(latent, ref["latent"], rtol=0, atol=1e-4)


def test_state_dict_layout_is_official():
    keys = list(tiny_simmim().state_dict())
    assert keys[:3] == ["encoder.mask_token", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    assert keys[-2:] == ["decoder.0.weight", "decoder.0.bias"]
    assert not any(k.startswith("encoder.head") for k in keys)
    official = torch.load(DATA / "simmim_official.pt", weights_only=True)["state_dict"]
    derived = ("relative_coords_table", "relative_position_index", "attn_mask")
    assert keys == [k for k in official if not k.endswith(derived)]


def test_loss_by_hand_on_small_tensors():
    model = tiny_simmim()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    mask[0, :4, :4] = 1
    mask[1, 8:, :] = 1
    with torch.no_grad():
        x_rec = model.reconstruct(x, mask)
        loss = model(x, mask)
    masked_pixels = 16 * 16 + 32 * 64  # per channel: a 16x16 corner and the lower half
    expected = ((x[0, :, :16, :16] - x_rec[0, :, :16, :16]).abs().sum()
                + (x[1, :, 32:, :] - x_rec[1, :, 32:, :]).abs().sum()) / (masked_pixels + 1e-5) / 3
    torch.testing.assert_close(loss, expected)


def test_visible_pixels_get_no_gradient():
    model = randomize_(tiny_simmim())
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[0, 4:8, 4:12] = 1
    x_rec = model.reconstruct(x, mask).detach().requires_grad_(True)
    pixel_mask = model.pixel_mask(mask).float()
    loss = ((x - x_rec).abs() * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
    loss.backward()
    visible = pixel_mask.expand_as(x_rec) == 0
    assert x_rec.grad[visible].abs().max() == 0 and x_rec.grad[~visible].abs().min() > 0
    # and the module's own loss uses exactly that pixel mask
    torch.testing.assert_close(model(x, mask), loss.detach(), rtol=1e-5, atol=1e-6)


def test_norm_target_formula():
    x = torch.rand(1, 1, 9, 9) * 3
    out = norm_targets(x, window=5)
    for i, j in [(0, 0), (4, 4), (8, 2)]:  # corner, centre, edge: only pixels inside the image count
        patch = x[0, 0, max(i - 2, 0):i + 3, max(j - 2, 0):j + 3]
        expected = (x[0, 0, i, j] - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
        torch.testing.assert_close(out[0, 0, i, j], expected, rtol=1e-4, atol=1e-4)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_simmim(embed_dim=16)
    x = torch.randn(4, 3, 64, 64)
    mask = (torch.rand(4, 8, 8) < 0.6).long().repeat_interleave(2, 1).repeat_interleave(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = model(x, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_local_stats_match_a_direct_window_loop():
    """The separable box filter equals mean / unbiased std over each pixel's in-image window, counted by hand."""
    from simmim.models.simmim import local_stats

    x = torch.randn(1, 2, 9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, std = local_stats(x, window=5)
    for i in range(9):
        for j in range(7):
            patch = x[0, :, max(i - 2, 0):i + 3, max(j - 2, 0):j + 3].flatten(1)
            torch.testing.assert_close(mean[0, :, i, j], patch.mean(1))
            torch.testing.assert_close(std[0, :, i, j], (patch.var(1) + 1e-6).sqrt())
