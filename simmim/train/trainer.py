"""The Trainer of a run directory, shared by both stages."""
from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from simmim.train.checkpoint_io import AtomicCheckpointIO
from simmim.train.loggers import build_callbacks, build_loggers
from simmim.train.resume import ExactResume
from simmim.train.speed import set_tf32
from simmim.train.strategies import build_strategy


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str, callbacks: list = ()) -> pl.Trainer:
    """A Trainer from `cfg.trainer` with the loggers and extra callbacks of the recipe (`build_loggers`,
    `build_callbacks`: TensorBoard and CSV under run_dir by default, both appended to by resumed and repeated
    runs) that keeps the checkpoints of `checkpoint_callbacks`, written atomically. `trainer.strategy` names are
    resolved by `simmim.train.strategies.build_strategy`. `trainer.tf32` is ours, not a Trainer argument:
    `simmim.train.speed.set_tf32`."""
    trainer_args = OmegaConf.to_container(cfg.trainer)
    tf32 = trainer_args.pop("tf32", False)
    trainer_args["strategy"] = build_strategy(trainer_args.get("strategy", "auto"), trainer_args.get("precision"))
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=build_loggers(cfg, run_dir),
        callbacks=[*checkpoint_callbacks(cfg.checkpoint, run_dir / "checkpoints", monitor, mode),
                   ExactResume(cfg.seed), *callbacks, *build_callbacks(cfg)],
        plugins=[AtomicCheckpointIO()],
        **trainer_args)
    set_tf32(tf32, trainer.strategy.root_device)
    return trainer


def checkpoint_callbacks(cfg: DictConfig, folder: Path, monitor: str, mode: str) -> list[pl.Callback]:
    """best.ckpt (by `monitor`), last.ckpt (every epoch), step-<step>.ckpt every `cfg.every_n_steps` steps and
    time-<step>.ckpt every `cfg.every_minutes` minutes (the newest `cfg.keep_last` of each). (Lightning's own
    `save_last=True` copies only the checkpoints it saves, so with a monitor last.ckpt would be the best.) A resumed
    run overwrites a checkpoint of the same step."""
    common = dict(dirpath=folder, auto_insert_metric_name=False, enable_version_counter=False)
    callbacks = [ModelCheckpoint(filename="best", monitor=monitor, mode=mode, **common),
                 ModelCheckpoint(filename="last", **common)]
    if cfg.every_n_steps:
        callbacks.append(PeriodicCheckpoint(folder, "step", cfg.keep_last, every_n_train_steps=cfg.every_n_steps))
    if cfg.every_minutes:
        callbacks.append(PeriodicCheckpoint(folder, "time", cfg.keep_last,
                                            train_time_interval=timedelta(minutes=cfg.every_minutes)))
    return callbacks


class PeriodicCheckpoint(ModelCheckpoint):
    """`<prefix>-<step>.ckpt` at a ModelCheckpoint trigger (`every_n_train_steps`, `train_time_interval`); the
    newest `keep_last` of the folder's `<prefix>-*` checkpoints are kept, those of earlier runs included."""

    def __init__(self, folder: Path, prefix: str, keep_last: int, **trigger):
        super().__init__(dirpath=folder, filename=f"{prefix}-{{step:08d}}", auto_insert_metric_name=False,
                         enable_version_counter=False, save_top_k=-1, **trigger)
        self.prefix, self.keep_last = prefix, keep_last

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            for old in sorted(Path(self.dirpath).glob(f"{self.prefix}-*.ckpt"))[:-self.keep_last]:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)  # DeepSpeed saves folders
