"""The Trainer of a run directory, shared by both stages."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from simmim.train.checkpoint_io import AtomicCheckpointIO
from simmim.train.loggers import build_callbacks, build_loggers
from simmim.train.strategies import build_strategy


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str, callbacks: list = ()) -> pl.Trainer:
    """A Trainer from `cfg.trainer` with the loggers and extra callbacks of the recipe (`build_loggers`,
    `build_callbacks`: TensorBoard and CSV under run_dir by default) that keeps
    checkpoints/last.ckpt (every epoch) and checkpoints/best.ckpt (by `monitor`), written atomically.
    `trainer.strategy` names are resolved by `simmim.train.strategies.build_strategy`. (Lightning's own
    `save_last=True` copies only the checkpoints it saves, so with a monitor last.ckpt would be the best.)"""
    trainer_args = OmegaConf.to_container(cfg.trainer)
    trainer_args["strategy"] = build_strategy(trainer_args.get("strategy", "auto"), trainer_args.get("precision"))
    return pl.Trainer(
        default_root_dir=run_dir,
        logger=build_loggers(cfg, run_dir),
        callbacks=[ModelCheckpoint(run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode),
                   ModelCheckpoint(run_dir / "checkpoints", filename="last"), *callbacks, *build_callbacks(cfg)],
        plugins=[AtomicCheckpointIO()],
        **trainer_args)


