"""SwinV2 classification fine-tune (or linear probe): layer-wise lr decay, Mixup / CutMix, EMA, top-1 / top-5
accuracy and a confusion-matrix picture."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from finetune.mixup import Mixup, soft_target_cross_entropy
from simmim.data.augment import random_erasing
from simmim.data.datamodule import ResumableDataModule
from simmim.data.datasets import LabeledItem, SkipCounter, labeled_datasets
from simmim.data.transforms import eval_transform, finetune_transform
from simmim.plots import confusion_matrix_figure, figure_to_rgb, save_figure
from simmim.train.loggers import log_image
from simmim.train.optim import adamw_per_step_schedule, param_groups, skip_weight_decay
from simmim.train.speed import CompileTime, compile_encoder
from simmim.train.strategies import shards_parameters
from simmim.models.checkpoint import PROBE_BN_EPS
from simmim.models.swinv2 import SwinTransformerV2, encoder_args


# ------------------------------------------------------------------------------------------------ layer decay
def layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer-decay depth of a SwinV2 parameter (official SimMIM convention): patch embedding and absolute
    position embedding 0, stage i block j sum(depths[:i]) + j + 1, stage i downsample sum(depths[:i + 1]) (its
    last block), everything else (final norm, head) sum(depths) + 1."""
    if name.startswith(("patch_embed.", "absolute_pos_embed")):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[:stage + 1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        raise ValueError(f"no layer-decay depth for {name}")
    return sum(depths) + 1


def layer_decay_groups(model: SwinTransformerV2, weight_decay: float, layer_decay: float,
                       depths: Sequence[int] | None = None) -> list[dict]:
    """AdamW groups, one per (layer id, decay or not), for the trainable parameters of a SwinV2.

    Each group has "params", "weight_decay" (0 for 1-D params, biases, norms, cpb_mlp, logit_scale, ...),
    "layer_id" and "lr_scale" = layer_decay ** (num_layers + 1 - layer_id) with num_layers = sum(depths).
    `depths` defaults to the stage depths of `model`.
    """
    depths = depths or [len(layer.blocks) for layer in model.layers]
    num_layers = sum(depths)
    skip_names, skip_keywords = model.no_weight_decay(), model.no_weight_decay_keywords()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid, no_decay = layer_id(name, depths), skip_weight_decay(name, param, skip_names, skip_keywords)
        group = groups.setdefault((lid, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "layer_id": lid,
            "lr_scale": layer_decay ** (num_layers + 1 - lid)})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


# ------------------------------------------------------------------------------------------------ module
class SwinV2Classifier(pl.LightningModule):
    """SwinV2 fine-tune: AdamW with layer-wise lr decay, lr scaled by total batch / 512, per-step warmup then
    cosine, Mixup / CutMix + soft-target CE (else label-smoothed CE), optional EMA of the weights.

    `linear_probe`: the encoder is frozen (and kept in eval mode), the head is BatchNorm1d (no affine, as in
    MAE) + Linear on the pooled features, trained alone with AdamW, no Mixup and no layer decay.
    The SwinV2 is `self.model` (checkpoint keys `model.*`), the EMA copy `self.ema` (`ema.*`).
    """

    def __init__(self, model: dict[str, Any], base_lr: float = 1.25e-3, warmup_lr: float = 2.5e-7, min_lr: float = 2.5e-7,
                 weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 warmup_epochs: float = 20, layer_decay: float = 0.75, label_smoothing: float = 0.1,
                 mixup: float = 0.8, cutmix: float = 1.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 ema_decay: float | None = None, linear_probe: bool = False,
                 confusion_matrix_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model = SwinTransformerV2(**encoder_args(model))
        self.compile_setting, self.compiled = model.get("compile", False), False
        num_classes = self.model.num_classes
        if linear_probe:
            self.model.requires_grad_(False)
            self.model.head = nn.Sequential(nn.BatchNorm1d(self.model.num_features, affine=False, eps=PROBE_BN_EPS),
                                            nn.Linear(self.model.num_features, num_classes))
            nn.init.trunc_normal_(self.model.head[1].weight, std=0.01)
            nn.init.zeros_(self.model.head[1].bias)
        self.mixup_fn = None
        if (mixup > 0 or cutmix > 0) and not linear_probe:
            self.mixup_fn = Mixup(mixup, cutmix, mixup_prob, mixup_switch_prob, label_smoothing, num_classes)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if ema_decay is not None else None

        top_k = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.val_top1_ema = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        # over the ranks: not self.log's batch_size=, which averages counts as integers; a NaN loss is kept (the
        # default drops it: the other batches' mean)
        self.val_loss = MeanMetric(nan_strategy=float("nan"))
        self.last_confusion: torch.Tensor | None = None  # (N, N) counts of the last validation, rows true

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        return self.model(x)

    def train(self, mode: bool = True):
        """A linear probe keeps the frozen encoder in eval mode (dropout, drop path off) and trains the head."""
        super().train(mode)
        if self.hparams.linear_probe:
            self.model.eval()
            self.model.head.train(mode)
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Label i's class name (a folder source's class folders) under `class_names`, for exports and readers."""
        names = getattr(self.trainer.datamodule, "class_names", None) if self._trainer is not None else None
        if names:
            checkpoint["class_names"] = list(names)

    # -- training
    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup_fn is not None:
            x, targets = self.mixup_fn(x, y)
            loss = soft_target_cross_entropy(self(x), targets)
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over the ranks: the whole batch's
        self.log("train/lr", self.optimizers().param_groups[-1]["lr"], prog_bar=True)
        return loss

    def configure_model(self) -> None:
        """`model.compile`: the encoder's blocks under torch.compile, once the run's device is known."""
        if not self.compiled:
            device = self.device if self._trainer is None else self.trainer.strategy.root_device
            self.compiled = compile_encoder(self.model, self.compile_setting, device)

    def configure_callbacks(self):
        return [CompileTime()]  # reports the compile time when configure_model compiled

    def setup(self, stage: str) -> None:
        if self.ema is not None and shards_parameters(self.trainer.strategy):
            raise ValueError(f"train.ema_decay averages whole weights, but {type(self.trainer.strategy).__name__} "
                             f"shards them across devices; use trainer.strategy=ddp, ddp_zero1 or "
                             f"deepspeed_stage_1/2, or train.ema_decay=null")

    def on_fit_start(self) -> None:
        # start the EMA from the weights fine-tuning starts from (e.g. loaded after construction), unless resuming
        if self.ema is not None and self.trainer.ckpt_path is None:
            self.ema.load_state_dict(self.model.state_dict())

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema = decay * ema + (1 - decay) * live, for parameters and floating buffers (others are copied)."""
        decay = self.hparams.ema_decay
        for ema, live in zip(self.ema.state_dict().values(), self.model.state_dict().values()):
            if ema.is_floating_point():
                ema.lerp_(live, 1 - decay)
            else:
                ema.copy_(live)

    # -- validation
    def validation_step(self, batch, batch_idx):
        """Metrics of the batch's own images (`val_batch_own`: not the padding of a split over several ranks); the
        model still sees the whole batch, as every rank runs the same forward passes. Every rank logs every metric,
        also one whose batches are all padding (a split of fewer images than ranks): the epoch's sync needs them."""
        x, y = batch
        data = getattr(self.trainer, "datamodule", None)
        own = data.val_batch_own(batch_idx, len(y)) if hasattr(data, "val_batch_own") else len(y)
        logits, ema_logits = self(x)[:own], (self.ema(x)[:own] if self.ema is not None else None)
        if own:  # else only padding: the last batch of a rank
            y = y[:own]
            self.val_loss.update(F.cross_entropy(logits, y), weight=own)
            self.val_top1.update(logits, y)
            self.val_top5.update(logits, y)
            self.val_confusion.update(logits.argmax(dim=1), y)
            if ema_logits is not None:
                self.val_top1_ema.update(ema_logits, y)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/top1", self.val_top1, prog_bar=True)
        self.log("val/top5", self.val_top5)
        if ema_logits is not None:
            self.log("val/top1_ema", self.val_top1_ema)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # a few batches of the untrained model: not the run's result
            self.last_confusion = self.val_confusion.compute().cpu()
        self.val_confusion.reset()

    def on_fit_end(self) -> None:
        """The last validation's confusion matrix to `confusion_matrix_path` and to every logger that takes
        images."""
        if self.last_confusion is None or not self.trainer.is_global_zero:
            return
        figure = confusion_matrix_figure(self.last_confusion.numpy())
        if self.hparams.confusion_matrix_path:
            save_figure(figure, self.hparams.confusion_matrix_path)
        image = figure_to_rgb(figure)
        for logger in self.trainer.loggers:
            log_image(logger, "confusion_matrix", image, self.global_step)

    # -- optimizer
    def configure_optimizers(self):
        hp = self.hparams
        if hp.linear_probe:
            groups = param_groups(self.model.head, hp.weight_decay)
        else:
            groups = layer_decay_groups(self.model, hp.weight_decay, hp.layer_decay)
        return adamw_per_step_schedule(self.trainer, groups, base_lr=hp.base_lr, warmup_lr=hp.warmup_lr,
                                       min_lr=hp.min_lr, betas=hp.betas, eps=hp.eps, warmup_epochs=hp.warmup_epochs)


# ------------------------------------------------------------------------------------------------ data
class ClassificationDataModule(ResumableDataModule):
    """(image (B, 3, S, S), label (B,)) batches from `simmim.data.datasets.labeled_datasets` (fine-tune / eval
    transforms; RandAugment as `simmim.data.transforms.finetune_transform` takes it, random erasing on the device:
    `device_augment`; train images leave the loader uint8 and are normalized on the device; labels_per_class images
    per class drawn by seed, or all), or streamed from WebDataset shards (source="shards":
    `simmim.data.shards.ShardSource`, its position in the epoch saved in checkpoints). Train augmentations depend on
    (seed, epoch, index) and the order resumes mid-epoch (`ResumableDataModule`)."""

    def __init__(self, source: str = "digits", root: str | None = None, list_file: str | None = None,
                 img_size: int = 128, batch_size: int = 32, num_workers: int = 0, verify: bool = False,
                 shards: str | None = None, val_shards: str | None = None, shuffle_buffer: int = 1000,
                 seed: int = 0, crop_scale: Sequence[float] = (0.08, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 labels_per_class: int | None = None, randaug_ops: int = 0, randaug_magnitude: float = 9.0,
                 randaug_magnitude_std: float = 0.5, random_erasing: float = 0.0, pin_memory: bool | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.train_set = self.val_set = None
        self.skipped = SkipCounter()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        augment = dict(crop_scale=hp.crop_scale, crop_ratio=hp.crop_ratio, hflip=hp.hflip,
                       randaug_ops=hp.randaug_ops, randaug_magnitude=hp.randaug_magnitude,
                       randaug_magnitude_std=hp.randaug_magnitude_std)
        if hp.source == "shards":
            if hp.labels_per_class is not None:
                raise ValueError(f"data.labels_per_class={hp.labels_per_class} needs a folder, list or digits "
                                 f"source (shards are streamed); set data.labels_per_class=null")
            transforms = finetune_transform(hp.img_size, **augment), eval_transform(hp.img_size)
            self.stream_shards([LabeledItem(t) for t in transforms], transforms)
            return
        self.train_set, self.val_set = labeled_datasets(hp.source, hp.img_size, hp.root, hp.list_file, hp.verify,
                                                        hp.labels_per_class, hp.seed, **augment)
        self.train_set.skipped = self.val_set.skipped = self.skipped
        self.train_set.seed = hp.seed

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A label outside the classifier's classes (model.num_classes) stops the run with one line (streamed shards'
        labels are first seen here; listed sources are checked at start: `finetune.train.check_labels`); on the
        host, before the transfer."""
        model = getattr(self.trainer.lightning_module, "model", None) if self.trainer is not None else None
        labels, classes = batch[1], getattr(model, "num_classes", 0)
        if classes and torch.is_tensor(labels) and labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            bad = int(labels[(labels < 0) | (labels >= classes)][0])
            raise ValueError(f"model.num_classes={classes}: the data has label {bad}, expected 0..{classes - 1}; set "
                             f"model.num_classes to the number of classes of the data, or fix its labels")
        return batch

    @property
    def class_names(self) -> list[str]:
        """Label i's class name: a folder source's class folders (set up), else [] (labels are the names)."""
        return list(getattr(getattr(self.train_set, "samples", None), "classes", []))

    def device_augment(self, images: torch.Tensor) -> torch.Tensor:
        """Random erasing (`random_erasing` > 0) of a normalized train batch on the device, seeded by (seed, the
        batches this fit has fetched before it, rank): the same in a run resumed from a step checkpoint."""
        hp = self.hparams
        if not hp.random_erasing:
            return images
        before = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        # not ExactResume's batch_seed: that one seeds the global generators, whose draws must not repeat here
        seed = np.random.SeedSequence([hp.seed, before, self.trainer.global_rank]).generate_state(1)[0]
        return random_erasing(images, hp.random_erasing, int(seed))

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(drop_last=self.shards is not None or len(self.train_set) >= self.hparams.batch_size)
