"""What a resumed run needs, beyond Lightning's checkpoint, to replay the uninterrupted run exactly.

The data's randomness depends only on (seed, epoch, index) (`simmim.data`); the model's (drop path, dropout,
Mixup) comes from the global generators, which `ExactResume` reseeds before every training batch from
(seed, epoch, batch index, rank). A run resumed at any step therefore draws what the uninterrupted run drew, without
saving generator states, whatever the loaders and validation drew in between. `ExactResume` also keeps metrics.csv
to one row per logged value: what a crashed run logged after its checkpoint is dropped when a run resumes from it.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from simmim.train.run_dir import AppendingCSVLogger


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed of one training batch on one rank."""
    return int(np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


class ExactResume(pl.Callback):
    """Seeds torch (CPU and CUDA), numpy and random from `batch_seed(seed, epoch, batch_idx, rank)` at the start
    of every training batch; logs a resumed run's metrics at the step of the uninterrupted run (Lightning 2.6 logs
    one step ahead after a resume from a checkpoint saved at the end of an epoch). A checkpoint records how many
    rows metrics.csv (`AppendingCSVLogger`) held when it was saved; a run resumed from it first drops the later rows
    of the steps it logs again. At each epoch's start it mends Lightning's epoch count (see on_train_epoch_start)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._align_step = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._align_step = trainer.ckpt_path is not None and pl_module.automatic_optimization

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Resumed from a checkpoint saved at the end of an epoch with trainer.max_steps set, Lightning 2.6 ends that
        # epoch a second time and counts it twice, so its count of epochs (which max_epochs stops) runs one ahead
        # and the run would stop an epoch early. An epoch starts with every epoch before it processed and completed.
        progress = trainer.fit_loop.epoch_progress
        for count in (progress.current, progress.total):
            count.processed = min(count.processed, count.completed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._align_step:  # one optimizer step per step: the logged step is the global step
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self._align_step = False
        value = batch_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        torch.manual_seed(value)
        np.random.seed(value % 2 ** 32)
        random.seed(value)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:  # by the path in the run directory: the folder may be moved or copied
            checkpoint["csv_rows"] = {_in_run_dir(logger): logger.saved_rows() for logger in _csv_loggers(trainer)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero and trainer.state.fn == TrainerFn.FITTING:  # validate / test replay no steps
            ckpt = trainer.ckpt_path and Path(os.path.realpath(trainer.ckpt_path))
            for logger in _csv_loggers(trainer):
                run_dir = Path(logger.metrics_file).parent.parent
                if not ckpt or ckpt.parent.parent != run_dir:  # a checkpoint of another run directory
                    continue
                saved = checkpoint.get("csv_rows", {})
                rows = saved.get(_in_run_dir(logger), saved.get(logger.metrics_file))  # (absolute: older ones)
                if rows is not None:
                    logger.rewind(rows, checkpoint["global_step"])


def _in_run_dir(logger: AppendingCSVLogger) -> str:
    """metrics.csv's path in the run directory (csv/metrics.csv)."""
    path = Path(logger.metrics_file)
    return str(path.relative_to(path.parent.parent))


def _csv_loggers(trainer) -> list[AppendingCSVLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, AppendingCSVLogger)]
