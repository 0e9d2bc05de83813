"""What the scripts share: the Trainer of a run directory, one-line errors on the command line, the device."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from simmim.config import ConfigError
from simmim.module import AtomicCheckpointIO
from simmim.strategies import build_strategy


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str, callbacks: list = ()) -> pl.Trainer:
    """A Trainer from `cfg.trainer` that logs to TensorBoard and CSV under run_dir and keeps
    checkpoints/last.ckpt (every epoch) and checkpoints/best.ckpt (by `monitor`), written atomically.
    `trainer.strategy` names are resolved by `simmim.strategies.build_strategy`. (Lightning's own
    `save_last=True` copies only the checkpoints it saves, so with a monitor last.ckpt would be the best.)"""
    trainer_args = OmegaConf.to_container(cfg.trainer)
    trainer_args["strategy"] = build_strategy(trainer_args.get("strategy", "auto"), trainer_args.get("precision"))
    return pl.Trainer(
        default_root_dir=run_dir,
        logger=[TensorBoardLogger(run_dir, name="tensorboard", version=""), CSVLogger(run_dir, name="csv", version="")],
        callbacks=[ModelCheckpoint(run_dir / "checkpoints", filename="best", monitor=monitor, mode=mode),
                   ModelCheckpoint(run_dir / "checkpoints", filename="last"), *callbacks],
        plugins=[AtomicCheckpointIO()],
        **trainer_args)


def run_cli(main: Callable[[list[str]], None]) -> None:
    """Run a script's main(argv); configuration and input errors end it with one line on stderr."""
    try:
        main(sys.argv[1:])
    except (ConfigError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


def resolve_device(name: str) -> torch.device:
    """`auto` (the first CUDA device when there is one, else CPU) or a torch device name such as cpu, cuda:1."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device
