from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, randomize_, tiny_swinv2
from simmim.models.checkpoint import load_pretrained, pretrained_window_sizes
from simmim.pretrain import SimMIMPretrainModule
from simmim.tools.export import to_timm  # checked against real timm in test_export.py

DATA = Path(__file__).parent / "data"
ENCODER_CFG = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items() if k != "num_classes"}
HEAD = ["head.weight", "head.bias"]


def pretrain_module(**overrides) -> SimMIMPretrainModule:
    return randomize_(SimMIMPretrainModule(model={**ENCODER_CFG, **overrides}), seed=1)


def lightning_ckpt(module: SimMIMPretrainModule) -> dict:
    """What Lightning writes for our pretraining module (the parts the loader reads)."""
    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.6"}


def assert_encoder_loaded(model: nn.Module, source: dict) -> None:
    """Every non-head tensor of `model` equals `source` (our names)."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert ours
    for key, value in ours.items():
        assert torch.equal(value, source[key].to(value.dtype)), key


def encoder_state(module: SimMIMPretrainModule) -> dict:
    return {k.removeprefix("simmim.encoder."): v for k, v in module.state_dict().items()}


def test_lightning_pretrain_checkpoint(tmp_path):
    module = pretrain_module()
    ckpt = lightning_ckpt(module)
    ckpt["hyper_parameters"]["note"] = Fraction(1, 3)  # not allowed by weights_only: the full unpickler loads it
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = tiny_swinv2(num_classes=5)
    report = load_pretrained(model, tmp_path / "last.ckpt")
    assert_encoder_loaded(model, encoder_state(module))
    assert report.layout == "lightning-simmim"
    assert report.reinitialized == HEAD and not report.missing and not report.unexpected
    assert len(report.loaded) == len(model.state_dict()) - 2
    assert "reinitialized    2  head.weight, head.bias" in str(report)


def test_lightning_classifier_checkpoint(tmp_path):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = randomize_(tiny_swinv2(num_classes=7), seed=2)
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(7))

    source = Classifier()
    torch.save({"state_dict": source.state_dict(), "pytorch-lightning_version": "2.6.6"}, tmp_path / "ft.ckpt")
    model = tiny_swinv2(num_classes=5)
    report = load_pretrained(model, tmp_path / "ft.ckpt")
    assert_encoder_loaded(model, source.model.state_dict())
    assert report.layout == "lightning-classifier" and report.reinitialized == HEAD

    same_classes = tiny_swinv2(num_classes=7)
    report = load_pretrained(same_classes, tmp_path / "ft.ckpt")
    assert torch.equal(same_classes.head.weight, source.model.head.weight) and not report.reinitialized


def test_exported_encoder(tmp_path):
    module = pretrain_module()
    path = module.export_encoder(tmp_path / "encoder.pth", {"model": ENCODER_CFG, "data": {"img_size": 64}})
    model = tiny_swinv2(num_classes=5)
    report = load_pretrained(model, path)
    assert_encoder_loaded(model, encoder_state(module))
    assert report.layout == "exported-simmim" and report.reinitialized == HEAD and not report.unexpected


def test_official_simmim_drops_buffers_mask_token_and_decoder(tmp_path):
    """The official SimMIM state dict stores relative_coords_table, relative_position_index, attn_mask,
    encoder.mask_token and decoder.0.*: all dropped, nothing unexpected."""
    official = torch.load(DATA / "simmim_official.pt", weights_only=True)["state_dict"]
    assert any(k.endswith("attn_mask") for k in official) and "encoder.mask_token" in official
    torch.save({"model": official}, tmp_path / "simmim.pth")
    model = tiny_swinv2(num_classes=5)
    report = load_pretrained(model, tmp_path / "simmim.pth")
    assert_encoder_loaded(model, {k.removeprefix("encoder."): v for k, v in official.items()})
    assert report.layout == "official-simmim"
    assert report.reinitialized == HEAD and not report.missing and not report.unexpected
    assert not any("mask_token" in k or "decoder" in k or "attn_mask" in k for k in report.loaded)


@pytest.mark.parametrize("num_classes", [10, 5])
def test_official_swinv2_classification(tmp_path, num_classes):
    official = torch.load(DATA / "swinv2_official_w4.pt", weights_only=True)["state_dict"]
    torch.save({"model": official}, tmp_path / "swinv2.pth")
    model = tiny_swinv2(num_classes=num_classes)
    report = load_pretrained(model, tmp_path / "swinv2.pth")
    assert_encoder_loaded(model, official)
    assert report.layout == "official-swinv2" and not report.missing and not report.unexpected
    if num_classes == 10:
        assert torch.equal(model.head.weight, official["head.weight"]) and not report.reinitialized
        assert set(HEAD) <= set(report.loaded)
    else:
        assert report.reinitialized == HEAD


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd}, lambda sd: {"model": sd}])
@pytest.mark.parametrize("num_classes", [10, 5])
def test_timm_layout(tmp_path, wrap, num_classes):
    source = randomize_(tiny_swinv2(num_classes=10), seed=3)
    timm_state = to_timm(source.state_dict())
    assert "layers.3.downsample.reduction.weight" in timm_state and "head.fc.weight" in timm_state
    torch.save(wrap(timm_state), tmp_path / "timm.pth")
    model = tiny_swinv2(num_classes=num_classes)
    report = load_pretrained(model, tmp_path / "timm.pth")
    assert_encoder_loaded(model, source.state_dict())
    assert report.layout == "timm" and not report.missing and not report.unexpected
    assert report.reinitialized == ([] if num_classes == 10 else HEAD)
    if num_classes == 10:
        assert torch.equal(model.head.bias, source.head.bias)


def test_timm_layout_without_head():
    """A timm encoder built with num_classes=0 has no head.fc: detected by where the merging sits."""
    source = randomize_(tiny_swinv2(num_classes=0), seed=4)
    model = tiny_swinv2(num_classes=5)
    report = load_pretrained(model, to_timm(source.state_dict()))
    assert report.layout == "timm"
    assert_encoder_loaded(model, source.state_dict())


def test_width_mismatch_names_first_key_and_shapes():
    ckpt = lightning_ckpt(pretrain_module(embed_dim=32))
    with pytest.raises(ValueError) as error:
        load_pretrained(tiny_swinv2(), ckpt)
    assert str(error.value).startswith(
        "checkpoint does not match the model: patch_embed.proj.weight is (32, 3, 4, 4) in the checkpoint but "
        "(16, 3, 4, 4) in the model; the checkpoint's weights are of model.embed_dim=32 (this model: 16); set those")
    base = {"patch_embed.proj.weight": torch.zeros(128, 3, 4, 4),  # the weights of SwinV2-B, as far as the hint reads
            **{f"layers.{i}.blocks.{j}.attn.logit_scale": torch.zeros(heads, 1, 1) for i, (depth, heads) in
               enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32))) for j in range(depth)}}
    with pytest.raises(ValueError, match=r"are of model.embed_dim=128 \(this model: 16\), model.depths=\[2, 2, 18, 2\] "
                                         r"\(this model: \[2, 2, 2, 2\]\), model.num_heads=\[4, 8, 16, 32\] \(this "
                                         r"model: \[2, 2, 4, 8\]\); set model.variant=base$"):
        load_pretrained(tiny_swinv2(), {"model": base})


def test_depth_mismatch_is_reported_and_strict_raises():
    ckpt = lightning_ckpt(pretrain_module())  # depths 2, 2, 2, 2
    deeper = tiny_swinv2(depths=(2, 2, 3, 2))
    with pytest.raises(ValueError, match=r"17 missing keys \['layers\.2\.blocks\.2\.norm1\.weight'"):
        load_pretrained(deeper, ckpt)
    missing = load_pretrained(deeper, ckpt, strict=False).missing
    assert missing == [f"layers.2.blocks.2.{k}" for k in deeper.layers[2].blocks[2].state_dict()]
    report = load_pretrained(tiny_swinv2(depths=(2, 2, 1, 2)), ckpt, strict=False)
    assert report.unexpected and all(k.startswith("layers.2.blocks.1.") for k in report.unexpected)
    assert not report.missing and f"unexpected    {len(report.unexpected):>4}" in str(report)


def test_unrecognized_checkpoint():
    with pytest.raises(ValueError, match="unrecognized checkpoint layout"):
        load_pretrained(tiny_swinv2(), {"optimizer": {}})


def test_pretrained_window_sizes(tmp_path):
    module = pretrain_module()
    assert pretrained_window_sizes(lightning_ckpt(module)) == [4, 4, 4, 2]
    path = module.export_encoder(tmp_path / "encoder.pth", {"model": ENCODER_CFG})
    assert pretrained_window_sizes(path) == [4, 4, 4, 2]
    big = {**ENCODER_CFG, "img_size": 192, "window_size": 12}
    assert pretrained_window_sizes({"model": {}, "config": {"model": big}}) == [12, 12, 12, 6]
    refined = {**big, "window_size": 24, "img_size": 384, "pretrained_window_sizes": [12, 12, 12, 6]}
    assert pretrained_window_sizes({"model": {}, "config": {"model": refined}}) == [12, 12, 12, 6]  # kept
    official = torch.load(DATA / "swinv2_official_w4.pt", weights_only=True)["state_dict"]
    assert pretrained_window_sizes({"model": official}) is None
    assert pretrained_window_sizes(to_timm(official)) is None


def cpb_grid(attn) -> torch.Tensor:
    """16 * sigmoid(cpb_mlp(table)) over the (2W-1, 2W-1) offset grid: (2W-1, 2W-1, heads). One offset at a
    time, so that how the matrix multiply blocks the rows of a bigger grid cannot change the last bit."""
    table = attn.relative_coords_table[0]
    rows = torch.stack([attn.cpb_mlp(coords) for coords in table.reshape(-1, 2)])
    return 16 * torch.sigmoid(rows).view(*table.shape[:2], -1)


@torch.no_grad()
def test_log_cpb_transfers_to_a_larger_window():
    """Fine-tuning at 128 px / window 8 from 64 px / window 4: each block's bias at offsets both windows have
    is exactly the pretrained one, in every stage (stage 3 was pretrained with a window clipped to 2)."""
    module = pretrain_module()
    ckpt = lightning_ckpt(module)
    pretrained = tiny_swinv2(num_classes=0)
    load_pretrained(pretrained, ckpt)
    finetuned = tiny_swinv2(img_size=128, window_size=8, pretrained_window_sizes=pretrained_window_sizes(ckpt))
    load_pretrained(finetuned, ckpt)
    naive = tiny_swinv2(img_size=128, window_size=8)
    load_pretrained(naive, ckpt)

    windows = []
    for layer_p, layer_f, layer_n in zip(pretrained.layers, finetuned.layers, naive.layers):
        for block_p, block_f, block_n in zip(layer_p.blocks, layer_f.blocks, layer_n.blocks):
            wp, wf = block_p.attn.window_size, block_f.attn.window_size
            windows.append((wp, wf))
            shared = slice(wf - wp, wf + wp - 1)  # offsets -(wp-1) .. wp-1 of the larger grid
            assert torch.equal(cpb_grid(block_f.attn)[shared, shared], cpb_grid(block_p.attn))
            assert not torch.equal(cpb_grid(block_n.attn)[shared, shared], cpb_grid(block_p.attn))
    assert windows == [(4, 8)] * 6 + [(2, 4)] * 2


def test_a_file_without_windows_is_warned_about_where_the_tools_build_its_model():
    """export and evaluate built an official / timm file (no config) with pretrained windows 0 without a word;
    fine-tuning warned. Now model_config warns for them all, unless the windows are given."""
    import warnings

    from simmim.models.checkpoint import model_config

    plain = {"model": tiny_swinv2().state_dict()}  # the official layout: no config
    with pytest.warns(UserWarning, match=r"does not say which windows scale its CPB coordinates; .* give them as "
                                         r"model.pretrained_window_sizes=\[...\]"):
        model_config(plain, dict(TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_config(plain, {**TINY, "pretrained_window_sizes": [4, 4, 4, 2]})
        model_config({**plain, "config": {"model": dict(TINY)}})


def test_a_linear_probe_head_is_read_as_the_linear_it_computes():
    """A linear probe's head is BatchNorm1d (no affine) + Linear: every reader took no head from it (exports wrote
    num_classes=0 without a word); folded into one Linear, the encoder with it gives the probe's logits."""
    from finetune.module import SwinV2Classifier

    probe = SwinV2Classifier(model=dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                        window_size=4, num_classes=3, drop_path_rate=0.0), linear_probe=True)
    generator = torch.Generator().manual_seed(0)
    probe.model.head[0].running_mean.copy_(torch.randn(32, generator=generator))
    probe.model.head[0].running_var.copy_(torch.rand(32, generator=generator) + 0.5)
    probe.eval()
    ckpt = {"state_dict": probe.state_dict(), "hyper_parameters": dict(probe.hparams)}
    model = tiny_swinv2(img_size=32, depths=(2, 2), num_heads=(2, 4), num_classes=3).eval()
    report = load_pretrained(model, ckpt)
    assert "head.weight" in report.loaded and not report.reinitialized
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model(x), probe(x), rtol=0, atol=1e-5)


def test_a_mismatch_of_attention_kind_names_model_attn_mode():
    """Dot-product attention against cosine weights (recipe ablation_dot_attention on a cosine encoder): the
    unexpected logit scales named model.attn_mode (the hint named embed_dim, depths, num_heads)."""
    with pytest.raises(ValueError, match=r"unexpected keys .*logit_scale.*; the checkpoint's weights are of "
                                         r"model.attn_mode=cosine \(this model: dot\); set those"):
        load_pretrained(tiny_swinv2(attn_mode="dot"), lightning_ckpt(pretrain_module()))
