"""What both scripts share: the Trainer of a run directory, and one-line errors on the command line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from simmim.config import ConfigError
from simmim.module import AtomicCheckpointIO


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str, callbacks: list = ()) -> pl.Trainer:
    """A Trainer from `cfg.trainer` that logs to TensorBoard and CSV under run_dir and keeps
    checkpoints/last.ckpt and checkpoints/best.ckpt (by `monitor`), written atomically."""
    return pl.Trainer(
        default_root_dir=run_dir,
        logger=[TensorBoardLogger(run_dir, name="tensorboard", version=""), CSVLogger(run_dir, name="csv", version="")],
        callbacks=[ModelCheckpoint(run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode,
                                   save_last=True), *callbacks],
        plugins=[AtomicCheckpointIO()],
        **OmegaConf.to_container(cfg.trainer))


def run_cli(main: Callable[[list[str]], None]) -> None:
    """Run a script's main(argv); configuration and input errors end it with one line on stderr."""
    try:
        main(sys.argv[1:])
    except (ConfigError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
