"""The Trainer of a run directory, shared by both stages."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from simmim.train.checkpoint_io import AtomicCheckpointIO
from simmim.train.speed import set_tf32
from simmim.train.strategies import build_strategy


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str, callbacks: list = ()) -> pl.Trainer:
    """A Trainer from `cfg.trainer` that logs to TensorBoard and CSV under run_dir and keeps
    checkpoints/last.ckpt (every epoch) and checkpoints/best.ckpt (by `monitor`), written atomically.
    `trainer.strategy` names are resolved by `simmim.train.strategies.build_strategy`. (Lightning's own
    `save_last=True` copies only the checkpoints it saves, so with a monitor last.ckpt would be the best.)
    `trainer.tf32` is ours, not a Trainer argument: `simmim.train.speed.set_tf32`."""
    trainer_args = OmegaConf.to_container(cfg.trainer)
    tf32 = trainer_args.pop("tf32", False)
    trainer_args["strategy"] = build_strategy(trainer_args.get("strategy", "auto"), trainer_args.get("precision"))
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=[TensorBoardLogger(run_dir, name="tensorboard", version=""), CSVLogger(run_dir, name="csv", version="")],
        callbacks=[ModelCheckpoint(run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode),
                   ModelCheckpoint(run_dir / "checkpoints", filename="last"), *callbacks],
        plugins=[AtomicCheckpointIO()],
        **trainer_args)
    set_tf32(tf32, trainer.strategy.root_device)
    return trainer


