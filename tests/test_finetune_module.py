"""Layer-wise lr decay groups, Mixup / CutMix, and the SwinV2 fine-tune module (training, EMA, linear probe,
confusion-matrix picture)."""
import types
import warnings

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from finetune.mixup import Mixup, smooth_one_hot, soft_target_cross_entropy
from finetune.module import ClassificationDataModule, SwinV2Classifier, layer_decay_groups, layer_id
from simmim.models.swinv2 import SwinTransformerV2
from simmim.train.optim import adamw_per_step_schedule, lr_at_step

TINY_MODEL = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                  num_classes=10, drop_path_rate=0.0)


# ------------------------------------------------------------------------------------------------ layer decay
def test_layer_ids_by_hand():
    depths = [2, 2]
    expected = {
        "patch_embed.proj.weight": 0, "patch_embed.norm.bias": 0, "absolute_pos_embed": 0,
        "layers.0.blocks.0.attn.qkv.weight": 1, "layers.0.blocks.1.mlp.fc1.bias": 2,
        "layers.0.downsample.reduction.weight": 2, "layers.0.downsample.norm.weight": 2,
        "layers.1.blocks.0.attn.logit_scale": 3, "layers.1.blocks.1.norm2.weight": 4,
        "norm.weight": 5, "head.weight": 5, "head.bias": 5,
    }
    assert {name: layer_id(name, depths) for name in expected} == expected
    assert layer_id("layers.2.blocks.1.attn.qkv.weight", [2, 2, 6, 2]) == 2 + 2 + 1 + 1
    assert layer_id("layers.2.downsample.reduction.weight", [2, 2, 6, 2]) == 10
    assert layer_id("head.weight", [2, 2, 6, 2]) == 13


def test_layer_decay_groups_cover_every_parameter_once():
    model = SwinTransformerV2(**dict(TINY_MODEL, depths=(2, 2), ape=True))
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())
    assert len({(g["layer_id"], g["weight_decay"]) for g in groups}) == len(groups)
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["layer_id"] == layer_id(name, [2, 2])
            assert g["lr_scale"] == pytest.approx(0.75 ** (4 + 1 - layer_id(name, [2, 2])))
            no_decay = p.ndim <= 1 or any(k in name for k in ("cpb_mlp", "logit_scale", "absolute_pos_embed"))
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75 ** 5)
    assert by_name["layers.0.blocks.0.attn.cpb_mlp.0.weight"]["weight_decay"] == 0.0
    assert by_name["layers.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05


# ------------------------------------------------------------------------------------------------ mixup
def test_label_smoothing_values():
    targets = smooth_one_hot(torch.tensor([0, 3]), num_classes=10, label_smoothing=0.1)
    assert targets[0, 0] == pytest.approx(0.91) and targets[0, 1] == pytest.approx(0.01)
    assert targets[1, 3] == pytest.approx(0.91) and targets.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_without_mixing_targets_are_smoothed_one_hot():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = Mixup(mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1, num_classes=5, seed=0)(x, y)
    assert torch.equal(mixed, x)
    assert torch.allclose(targets, smooth_one_hot(y, 5, 0.1))


def test_mixup_targets_sum_to_one_and_match_the_blend():
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    mixed, targets = Mixup(mixup_alpha=0.8, cutmix_alpha=0, label_smoothing=0.0, num_classes=6, seed=1)(x, y)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    lam = targets[0, 0].item()
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_lambda_is_the_kept_pixel_fraction(seed):
    batch, size = 4, 16
    x = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, size, size)
    y = torch.arange(batch)
    mixup = Mixup(mixup_alpha=0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=batch, seed=seed)
    mixed, targets = mixup(x, y)
    assert torch.allclose(targets.sum(1), torch.ones(batch))
    kept = (mixed[0] == 0).float().mean().item()  # image 0 is all 0, its partner (the last image) all 3
    smoothed_lam = targets[0, 0].item()  # = lam * (0.925 - 0.025) + 0.025: on 0.925, off 0.025
    assert smoothed_lam == pytest.approx(kept * 0.9 + 0.025)
    assert torch.equal(x[:, 0, 0, 0], torch.arange(batch, dtype=torch.float32))  # input not modified


def test_soft_target_cross_entropy_matches_hard_labels():
    logits, y = torch.randn(5, 7), torch.tensor([0, 6, 2, 2, 1])
    hard = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, smooth_one_hot(y, 7, 0.1)) == pytest.approx(hard.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ module
def _trainer(tmp_path, **kwargs):
    kwargs = {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, **kwargs}
    return pl.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _data():
    return ClassificationDataModule(source="digits", img_size=32, batch_size=16)


def test_training_logs_accuracy_and_writes_the_confusion_matrix(tmp_path):
    path = tmp_path / "confusion.png"
    module = SwinV2Classifier(model=TINY_MODEL, warmup_epochs=0, confusion_matrix_path=str(path))
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=_data())
    for key in ("train/loss", "train/lr", "val/loss", "val/top1", "val/top5"):
        assert key in trainer.callback_metrics, key
    assert 0 <= trainer.callback_metrics["val/top1"] <= trainer.callback_metrics["val/top5"] <= 1
    assert module.last_confusion.sum() == 2 * 16  # two val batches of 16
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] >= 400 and image.shape[2] == 3
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # colors and text, not a blank picture


def test_lr_scales_follow_layer_decay(tmp_path):
    module = SwinV2Classifier(model=TINY_MODEL, base_lr=1e-3, warmup_epochs=0, min_lr=1e-3, layer_decay=0.5)
    _trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=_data())
    peak = 1e-3 * 16 / 512
    for group in module.optimizers().param_groups:
        assert group["lr"] == pytest.approx(peak * 0.5 ** (5 - group["layer_id"]))


def test_a_resume_with_another_total_batch_keeps_the_layer_decay_of_its_lr():
    """The optimizer and scheduler states of a run at a total batch of 8, restored as Lightning does (optimizer,
    then scheduler) over those of a run at 16: every layer-decay group trains at lr_scale x the schedule of 16
    (before: of 8, the saved base lrs), from the restored step on."""
    groups = {}
    for batch in (8, 16):
        trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(hparams=types.SimpleNamespace(
            batch_size=batch)), world_size=1, accumulate_grad_batches=1, gradient_clip_val=None, precision="32-true",
            strategy=None, max_epochs=4, estimated_stepping_batches=40)
        model = SwinTransformerV2(**TINY_MODEL)
        groups[batch] = adamw_per_step_schedule(trainer, layer_decay_groups(model, 0.05, 0.5), base_lr=1e-3,
                                                warmup_lr=1e-6, min_lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                                warmup_epochs=1)
    optimizer, scheduler = groups[8]["optimizer"], groups[8]["lr_scheduler"]["scheduler"]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    optimizer, resumed = groups[16]["optimizer"], groups[16]["lr_scheduler"]["scheduler"]
    optimizer.load_state_dict(groups[8]["optimizer"].state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(scheduler.state_dict())
    assert [str(w.message) for w in caught] == [
        "the total batch is 16 (was 8 when step 5 was saved): the learning rate follows it, peak 3.125e-05 "
        "(was 1.563e-05; optim.base_lr x total batch / 512)"]
    resumed.restart()
    peak = 1e-3 * 16 / 512
    for step in (5, 6):
        lr = lr_at_step(step, peak_lr=peak, warmup_lr=1e-6 * 16 / 512, min_lr=1e-5 * 16 / 512, warmup_steps=10,
                        total_steps=40)
        assert len(optimizer.param_groups) > 2
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(group["lr_scale"] * lr, rel=1e-9)
            assert group["lr_scale"] == 0.5 ** (5 - group["layer_id"]) and group["initial_lr"] == peak
        optimizer.step()
        resumed.step()

def test_ema_lags_the_live_weights_and_is_checkpointed(tmp_path):
    module = SwinV2Classifier(model=TINY_MODEL, ema_decay=0.9, mixup=0, cutmix=0)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=_data())
    live, ema = module.model.state_dict(), module.ema.state_dict()
    assert not torch.allclose(live["layers.0.blocks.0.attn.qkv.weight"], ema["layers.0.blocks.0.attn.qkv.weight"])
    assert "val/top1_ema" in trainer.callback_metrics
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(state["ema.head.weight"], ema["head.weight"])


def test_ema_with_decay_zero_equals_the_live_weights(tmp_path):
    module = SwinV2Classifier(model=TINY_MODEL, ema_decay=0.0)
    _trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=_data())
    live, ema = module.model.state_dict(), module.ema.state_dict()
    assert live.keys() == ema.keys()
    assert all(torch.equal(live[k], ema[k]) for k in live)


def test_linear_probe_trains_only_the_head(tmp_path):
    module = SwinV2Classifier(model=TINY_MODEL, linear_probe=True, base_lr=0.1, warmup_epochs=0)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    _trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=_data())
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
                       "head.1.weight", "head.1.bias"}
    module.train()
    assert not module.model.layers.training and module.model.head.training
    assert all(len(g["params"]) > 0 for g in module.optimizers().param_groups)
    assert module.mixup_fn is None


@pytest.mark.timeout(120)
def test_train_batches_reach_the_model_normalized_and_erased_on_the_device(tmp_path):
    """The fine-tune augment yields uint8; the DataModule normalizes on the device and erases one box of noise
    per image (random_erasing=1), drawn anew for every batch; the rest of each image is the normalized crop."""
    from simmim.data.transforms import normalize_images

    module = SwinV2Classifier(model=TINY_MODEL, warmup_epochs=0, mixup=0.0, cutmix=0.0)
    real_forward, seen = module.model.forward, []
    module.model.forward = lambda x: seen.append(x.detach().clone()) or real_forward(x)
    erased_data = lambda: ClassificationDataModule(source="digits", img_size=32, batch_size=16, random_erasing=1.0)
    _trainer(tmp_path, limit_train_batches=2, limit_val_batches=0).fit(module, datamodule=erased_data())
    data = erased_data()  # the same batches, outside a trainer
    data.setup("fit")
    raws = [batch[0] for batch, _ in zip(data.train_dataloader(), range(2))]
    for raw, images in zip(raws, seen):
        assert raw.dtype == torch.uint8 and images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
        changed = (images != normalize_images(raw)).any(dim=1)  # (B, H, W)
        fractions = changed.flatten(1).float().mean(1)
        assert (fractions > 0.01).all() and (fractions < 0.4).all()  # one box of 2 % to 1/3 each (rounded to pixels)
        assert torch.allclose(images[:, :, ~changed.any(0)], normalize_images(raw)[:, :, ~changed.any(0)])
    first, second = ((images != normalize_images(raw)).any(1) for raw, images in zip(raws, seen))
    assert not torch.equal(first, second)
