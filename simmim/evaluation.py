"""What a frozen encoder's features are worth: k-NN and linear-probe top-1 on pooled features, and the k-NN
monitor of pretraining with its plot.

k-NN follows DINO's evaluation: features are L2-normalized, each query takes its k most cosine-similar training
images, which vote for their labels with weight exp(similarity / temperature); the class with the largest sum
wins. The linear probe is an L2-regularized logistic regression (scikit-learn) on standardized features.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simmim.plots import knn_history_figure, save_figure
from simmim.train.checkpoint_io import written_atomically
from simmim.train.strategies import root_params_gathered
from simmim.data.workers import ShieldedDataLoader

__all__ = ["pooled_features", "knn_scores", "knn_top1", "linear_probe_top1", "ONE_LABEL", "KNNMonitor", "knn_monitor",
           "knn_summary", "plot_knn_history"]

KNN_K, KNN_TEMPERATURE = 20, 0.07  # neighbours and softmax temperature of the weighted vote (DINO's k-NN)


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, C) float32, labels (N,) int64) on the CPU: the mean over positions of the encoder's final
    normalized map, what a classifier head reads. The encoder is run as it is (the caller sets eval mode)."""
    features, labels = [], []
    for x, y in loader:
        pooled = encoder.forward_head(encoder.forward_features(x.to(device)), pre_logits=True)
        features.append(pooled.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(features), torch.cat(labels).long()


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
               chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, num_classes) of queries (Q, C) from training features (N, C) and labels (N,): the sum of
    exp(cosine similarity / temperature) over each query's k nearest training images (all when N < k), each row
    divided by exp(its largest similarity / temperature), which leaves the vote as it is and keeps a small
    temperature from overflowing float32 (at temperature 0.01, exp(1 / 0.01) is inf: every neighbour tied)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for query in F.normalize(query_features.float(), dim=1).split(chunk):
        similarity, index = (query @ train.T).topk(k, dim=1)  # sorted: column 0 is the largest
        votes = torch.zeros(len(query), num_classes)
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        scores.append(votes.scatter_add_(1, train_labels[index], weights))
    return torch.cat(scores)


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
             val_labels: torch.Tensor, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Fraction of val images whose k-NN vote (`knn_scores`) is their label."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, val_features, num_classes, k, temperature)
    return (scores.argmax(dim=1) == val_labels).float().mean().item()


def linear_probe_top1(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                      val_labels: torch.Tensor, c: float = 1.0) -> float:
    """Top-1 on val of a multinomial logistic regression (L2, inverse strength `c`, L-BFGS) fitted on the
    training features, both standardized with the training mean and std."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features.numpy())
    probe = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train_features.numpy()), train_labels.numpy())
    return float((probe.predict(scaler.transform(val_features.numpy())) == val_labels.numpy()).mean())


# ------------------------------------------------------------------------------------------------ monitor
FEW_VAL_IMAGES = 20  # below this, the k-NN monitor's top-1 is noise (`knn_monitor` warns)
ONE_LABEL = ("k-NN monitor off: the training images have a single label (give the folder class subfolders, the list "
             "file labels or the shards .cls files), or set eval.knn_every_n_epochs=0")


class KNNMonitor(pl.Callback):
    """k-NN top-1 of the pretraining encoder (`pl_module.simmim.encoder`) while it trains.

    Before the first epoch (a fresh run), every `every_n_epochs` epochs and after the last, `train_set` and
    `val_set` (labeled, un-augmented (image, label) datasets) are embedded in eval mode and `knn/top1` is logged at
    the current step. `history` keeps one row per epoch ({"epoch", "train_loss" (mean over the epoch's steps),
    "val_loss", "knn_top1"}, None where not measured; epoch 0 is before training); it is saved in checkpoints
    with the losses of the epoch so far (a run resumed mid-epoch averages over the whole epoch), and written at
    the end of training as a plot to `plot_path` and as JSON beside it (`history_path`: also where the process
    that started spawned ranks finds it). Every rank embeds the whole sets (sharded weights are gathered); rank 0
    logs and writes.
    """

    def __init__(self, train_set: Dataset, val_set: Dataset, every_n_epochs: int = 1, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE, batch_size: int = 64, num_workers: int = 0,
                 plot_path: str | Path | None = None):
        if every_n_epochs < 1:
            raise ValueError(f"eval.knn_every_n_epochs={every_n_epochs} must be >= 1 (0 turns the monitor off)")
        self.train_set, self.val_set = train_set, val_set
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.history: list[dict] = []
        self.off = False  # set when the training images turn out to have a single label
        self._losses: list[float] = []  # the training losses of epoch _losses_epoch so far
        self._losses_epoch: int | None = None

    def measure(self, pl_module: pl.LightningModule, strategy=None) -> float | None:
        """k-NN top-1 of the module's encoder now (its train / eval mode is restored); None when the training
        images all have one label (unlabeled data): then the monitor warns and measures no more (`off`)."""
        encoder = pl_module.simmim.encoder
        was_training = encoder.training
        encoder.eval()
        features = partial(self._features, encoder, pl_module.device)
        with root_params_gathered(strategy) if strategy is not None else nullcontext():
            train, train_labels = features(self.train_set)
            if len(train_labels.unique()) < 2:
                self.off = True
            else:
                val, val_labels = features(self.val_set)
        encoder.train(was_training)
        if self.off:
            rank_zero_warn(ONE_LABEL)
            return None
        return knn_top1(train, train_labels, val, val_labels, self.k, self.temperature)

    def _features(self, encoder: nn.Module, device: torch.device, dataset: Dataset):
        loader = ShieldedDataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        return pooled_features(encoder, loader, device)

    def _record(self, trainer, pl_module, epoch: int, measure: bool, **losses) -> None:
        top1 = self.measure(pl_module, trainer.strategy) if measure and not self.off else None
        self.history.append({"epoch": epoch, **losses, "knn_top1": top1})
        if top1 is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"knn/top1": top1}, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        if trainer.current_epoch == 0 and not self.history:
            self._record(trainer, pl_module, 0, True, train_loss=None, val_loss=None)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self._losses_epoch:  # else resumed mid-epoch: the losses before are kept
            self._losses, self._losses_epoch = [], trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss))

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1
        if self.history and self.history[-1]["epoch"] >= epoch:  # Lightning repeats the hook after a resume (with
            return  # max_steps) from a checkpoint saved in it: the epoch is recorded already
        measure = epoch % self.every_n_epochs == 0 or epoch >= trainer.max_epochs
        val_loss = trainer.callback_metrics.get("val/loss")
        self._record(trainer, pl_module, epoch, measure,
                     train_loss=float(np.mean(self._losses)) if self._losses else None,
                     val_loss=float(val_loss) if val_loss is not None else None)

    def on_train_end(self, trainer, pl_module):
        if self.plot_path is not None and trainer.is_global_zero:
            plot_knn_history(self.history, self.plot_path)
            with written_atomically(history_path(self.plot_path)) as tmp:
                tmp.write_text(json.dumps(self.history, indent=1) + "\n")

    def state_dict(self) -> dict:
        return {"history": self.history, "losses": self._losses, "losses_epoch": self._losses_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self._losses, self._losses_epoch = list(state_dict.get("losses", [])), state_dict.get("losses_epoch")


def history_path(plot_path: str | Path) -> Path:
    """Where `KNNMonitor` writes its history as JSON: beside its plot (knn.png -> knn.json)."""
    return Path(plot_path).with_suffix(".json")


def knn_summary(history: Sequence[dict]) -> str:
    """`epoch: top-1` of each measured row of `KNNMonitor.history`, e.g. "0: 0.512, 4: 0.861"."""
    return ", ".join(f"{row['epoch']}: {row['knn_top1']:.3f}" for row in history if row["knn_top1"] is not None)


def plot_knn_history(history: Sequence[dict], path: str | Path) -> Path:
    """A PNG of the losses (left axis) and k-NN top-1 (right axis) per epoch from `KNNMonitor.history`."""
    return save_figure(knn_history_figure(history), path)


def knn_monitor(cfg, train_set: Dataset, val_set: Dataset, plot_path: str | Path) -> list[KNNMonitor]:
    """The pretraining run's k-NN monitor from the recipe (`eval.*`, `data.*`) on labeled, un-augmented train and
    val sets (`SimMIMDataModule.knn_sets`); [] when eval.knn_every_n_epochs is 0, or with a warning when the
    training set's `labels` (where it knows them without reading images: listed sources) are all one; streamed
    sets are checked at their first embedding (`KNNMonitor.measure`)."""
    if not cfg.eval.knn_every_n_epochs:
        return []
    labels = getattr(train_set, "labels", None)
    if labels is not None and len(np.unique(labels)) < 2:
        rank_zero_warn(ONE_LABEL)
        return []
    if len(val_set) < FEW_VAL_IMAGES:
        rank_zero_warn(f"the k-NN monitor measures {len(val_set)} held-out image(s): its top-1 moves in steps of "
                       f"1/{len(val_set)}, more noise than signal; give more images (2 % of a folder or list are "
                       f"held out) or data.val_shards, or set eval.knn_every_n_epochs=0")
    return [KNNMonitor(train_set, val_set, cfg.eval.knn_every_n_epochs, cfg.eval.knn_k, cfg.eval.knn_temperature,
                       cfg.data.batch_size, cfg.data.num_workers, plot_path)]
