"""SimMIM pretraining: the LightningModule, its callbacks (throughput, reconstruction pictures) and the run.


    python scripts/pretrain.py                                   # the demo: a tiny SwinV2 on the bundled digits
    python scripts/pretrain.py recipe=base data.source=folder data.root=/data/imagenet/train trainer.devices=8
    python scripts/pretrain.py recipe=giant print_config=true    # show the resolved config and exit

Arguments are key=value: recipe=NAME (recipes/pretrain/NAME.yaml or a path), any key of the recipe, any
pytorch_lightning.Trainer argument as trainer.NAME. The run directory (output_dir/run_name) gets the resolved
config, checkpoints (last, best), logs (TensorBoard, CSV), reconstruction pictures and encoder.pth.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import IterableDataset
from torchmetrics import MeanMetric

from simmim.evaluation import KNNMonitor, history_path, knn_monitor, knn_summary
from simmim.models.simmim import SimMIM, build_simmim
from simmim.train.checkpoint_io import atomic_save
from simmim.train.loggers import log_image
from simmim.train.optim import adamw_per_step_schedule, param_groups
from simmim.train.strategies import GradNormMonitor, full_state_dict, root_params_gathered
from simmim.train.speed import CompileTime, compile_encoder
from simmim.train.stage import Stage, run_stage, section


class SimMIMPretrainModule(pl.LightningModule):
    """SimMIM pretraining: AdamW (no decay on 1-D params, biases, norms, cpb_mlp, logit_scale, mask_token),
    lr scaled by total batch / 512, per-step warmup then cosine or multistep, a non-finite-loss guard."""

    def __init__(self, model: dict[str, Any], norm_target_patch_size: int | None = None, base_lr: float = 1e-4,
                 warmup_lr: float = 5e-7, min_lr: float = 5e-6, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_epochs: float = 10,
                 schedule: str = "cosine", milestones: tuple[int, ...] = (), gamma: float = 0.1,
                 max_nonfinite_steps: int = 20):
        super().__init__()
        self.save_hyperparameters()
        self.simmim = build_simmim(dict(model), norm_target_patch_size)
        self.compile_setting, self.compiled = model.get("compile", False), False
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        # val/loss over the ranks: the sums of losses x images and of images (Lightning's batch_size-weighted mean
        # averages the ranks' image counts as integers: 9 and 8 images made 8); a NaN loss is kept (the default
        # drops it: the other batches' mean)
        self.val_loss = MeanMetric(nan_strategy=float("nan"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.simmim(x, mask)

    def configure_model(self) -> None:
        """`model.compile`: the encoder's blocks under torch.compile, once the run's device is known."""
        if not self.compiled:
            device = self.device if self._trainer is None else self.trainer.strategy.root_device
            self.compiled = compile_encoder(self.simmim.encoder, self.compile_setting, device)

    def configure_callbacks(self):
        # the compile time when configure_model compiled; train/grad_norm, the whole gradient's under every strategy
        return [CompileTime(), GradNormMonitor()]

    def training_step(self, batch, batch_idx):
        x, mask, _ = batch
        loss = self.simmim(x, mask)
        # every rank must agree, or ranks that skip would leave the others waiting in the gradient all-reduce
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return self._skip_nonfinite(loss)
        self.nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over the ranks: the whole batch's
        self.log("train/mask_ratio", mask.float().mean())
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return loss

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        """Skip this step (Lightning does no backward or update when training_step returns None)."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.hparams.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise RuntimeError(
                f"loss was {loss.item()} for {limit} steps in a row (step {self.global_step}); the run diverged: "
                f"lower optim.base_lr, keep trainer.gradient_clip_val on, or use trainer.precision=bf16-mixed "
                f"instead of 16-mixed, then resume from the last checkpoint")
        rank_zero_warn(f"non-finite loss ({loss.item()}) at step {self.global_step}: step skipped "
                       f"({self.nonfinite_total} skipped so far, {self.nonfinite_in_a_row} in a row)")
        self.log("train/skipped_steps", float(self.nonfinite_total))
        return None

    def validation_step(self, batch, batch_idx):
        """The loss of the batch's own images (`val_batch_own`: not the padding of a split over several ranks),
        weighted by their count (every image masks as many pixels: the epoch's value is the split's loss); the
        model still sees the whole batch, as every rank runs the same forward passes."""
        x, mask, _ = batch
        data = getattr(self.trainer, "datamodule", None)
        own = data.val_batch_own(batch_idx, len(x)) if hasattr(data, "val_batch_own") else len(x)
        loss = self.simmim(x, mask, first=own)
        if own:  # else only padding: the last batch of a rank, logged still (the epoch's sync needs every rank)
            self.val_loss.update(loss, weight=own)
        self.log("val/loss", self.val_loss, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_per_step_schedule(
            self.trainer, param_groups(self.simmim, hp.weight_decay), base_lr=hp.base_lr, warmup_lr=hp.warmup_lr,
            min_lr=hp.min_lr, betas=hp.betas, eps=hp.eps, warmup_epochs=hp.warmup_epochs, schedule=hp.schedule,
            milestones=hp.milestones, gamma=hp.gamma)

    def export_encoder(self, path: str | Path, config: dict, state_dict: dict | None = None) -> Path:
        """Write `{"model": SimMIM state dict (encoder.*, decoder.0.*), "config": ...}`, the official SimMIM
        checkpoint layout, atomically. `state_dict`: this module's whole state dict where a strategy shards it
        (`simmim.train.strategies.full_state_dict`); by default `self.simmim`'s."""
        model = self.simmim.state_dict() if state_dict is None else {
            k.removeprefix("simmim."): v for k, v in state_dict.items() if k.startswith("simmim.")}
        atomic_save({"model": model, "config": config}, path)
        return Path(path)


class ThroughputMonitor(pl.Callback):
    """Logs train/images_per_s over all devices at every step, measured from the previous batch's end: the wait
    for the data counts, so an input pipeline that cannot keep up shows. The first batch of an epoch or after a
    validation is measured from its own start (not the workers' start or the validation)."""

    def __init__(self):
        self._last = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._last = None

    def on_validation_end(self, trainer, pl_module):
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        pl_module.log("train/images_per_s", batch[0].shape[0] * trainer.world_size / (now - self._last),
                      prog_bar=True)
        self._last = now


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized (B, 3, H, W) -> [0, 1]."""
    from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # here: it imports OpenCV, albumentations

    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(simmim: SimMIM, x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """One row per image: original | masked input | reconstruction | reconstruction pasted into the visible
    pixels. Predictions against normalized targets are mapped back with each pixel's local mean and std.
    Returns an RGB uint8 array (B*H, 4*W, 3)."""
    prediction = simmim.reconstruct_pixels(x, mask).to(x.dtype)
    pixel_mask = simmim.pixel_mask(mask).to(x.dtype)
    columns = [x, x * (1 - pixel_mask), prediction, x * (1 - pixel_mask) + prediction * pixel_mask]
    rows = torch.cat([unnormalize(c) for c in columns], dim=3)  # B, 3, H, 4W
    grid = torch.cat(list(rows), dim=1)  # 3, B*H, 4W
    return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


class ReconstructionPictures(pl.Callback):
    """A PNG grid for a fixed validation batch every `every_n_steps` and at the end of training, written to
    `<run dir>/reconstructions/` and to every logger that takes images (TensorBoard, W&B, MLflow)."""

    def __init__(self, out_dir: str | Path, every_n_steps: int = 100, num_images: int = 8):
        self.out_dir, self.every_n_steps, self.num_images = Path(out_dir), every_n_steps, num_images
        self.last_path: Path | None = None

    def _fixed_batch(self, trainer, device):
        dataset = trainer.datamodule.val_set
        if isinstance(dataset, IterableDataset):  # streamed (the shards source): its first samples
            items = list(itertools.islice(dataset, self.num_images))
        else:
            items = [dataset[(i, 0)] for i in range(min(self.num_images, len(dataset)))]
        x = torch.stack([item[0] for item in items]).to(device)
        mask = torch.stack([torch.as_tensor(item[1]) for item in items]).to(device)
        return x, mask

    def _write(self, trainer, pl_module) -> None:
        was_training = pl_module.training
        pl_module.eval()
        x, mask = self._fixed_batch(trainer, pl_module.device)
        with root_params_gathered(trainer.strategy):  # every rank: sharded weights are gathered together
            grid = reconstruction_grid(pl_module.simmim, x, mask)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        Image.fromarray(grid).save(path)
        self.last_path = path
        for logger in trainer.loggers:
            log_image(logger, "reconstruction", grid, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module)


def _module_keys(cfg) -> dict[str, str]:
    return {"model": "model", "norm_target_patch_size": "simmim.norm_target_patch_size", **section(cfg, "optim")}


def _data_keys(cfg) -> dict[str, str]:
    return {**section(cfg, "data"), "mask_kind": "simmim.mask_kind", "mask_patch_size": "simmim.mask_patch_size",
            "mask_ratio": "simmim.mask_ratio", "model_patch_size": "model.patch_size", "seed": "seed"}


def _callbacks(cfg, run_dir: Path, data) -> list[pl.Callback]:
    from simmim.data.datamodule import LogSkipped

    pictures = ReconstructionPictures(run_dir / "reconstructions", cfg.logging.recon_every_n_steps,
                                      cfg.logging.recon_images)
    knn = knn_monitor(cfg, *data.knn_sets(cfg.eval.knn_max_images), run_dir / "knn.png")
    return [ThroughputMonitor(), LogSkipped(), pictures, *knn]


def _finish(trainer: pl.Trainer, module: SimMIMPretrainModule, cfg, run_dir: Path) -> list[str]:
    """Write encoder.pth (the official SimMIM layout, with the resolved config)."""
    state = full_state_dict(trainer.strategy)  # on every rank: sharding strategies gather the weights here
    if not trainer.is_global_zero:
        return []
    encoder = module.export_encoder(run_dir / "encoder.pth", OmegaConf.to_container(cfg), state)
    pictures = next(c for c in trainer.callbacks if isinstance(c, ReconstructionPictures))
    newest = pictures.last_path or max((run_dir / "reconstructions").glob("step_*.png"), default=None)  # a rerun
    lines = [f"reconstructions: {newest or 'none'}", f"encoder: {encoder}"]  # of a finished run trains no step
    knn = [c.plot_path for c in trainer.callbacks if isinstance(c, KNNMonitor)]
    history = knn and history_path(knn[0])  # read back: under ddp_spawn the monitor measured in a spawned rank
    if history and history.is_file() and (summary := knn_summary(json.loads(history.read_text()))):
        lines.append(f"k-NN top-1 (val) by epoch: {summary}; plot: {knn[0]}")
    return lines


def stage() -> Stage:
    """Pretraining as `simmim.train.stage` runs it."""
    from simmim.data.datamodule import SimMIMDataModule  # here: the GPU tools run without albumentations, sklearn

    return Stage(name="pretrain", module=SimMIMPretrainModule, datamodule=SimMIMDataModule, module_keys=_module_keys,
                 data_keys=_data_keys, monitor="val/loss", mode="min", callbacks=_callbacks, finish=_finish)


def main(argv: list[str]) -> None:
    run_stage(stage(), argv, __doc__)
