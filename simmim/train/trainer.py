"""The Trainer of a run directory, shared by both stages."""
from __future__ import annotations

import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

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
    """best.ckpt (by `monitor`), last.ckpt (every epoch), step-<step>.ckpt every `cfg.every_n_steps` steps,
    time-<step>.ckpt every `cfg.every_minutes` minutes and sigterm-<step>.ckpt when SIGTERM stops the run (the
    newest `cfg.keep_last` of each). (Lightning's own `save_last=True` copies only the checkpoints it saves, so with
    a monitor last.ckpt would be the best.) A resumed run overwrites a checkpoint of the same step."""
    common = dict(dirpath=folder, auto_insert_metric_name=False, enable_version_counter=False)
    callbacks = [ModelCheckpoint(filename="best", monitor=monitor, mode=mode, **common),
                 ModelCheckpoint(filename="last", **common)]
    if cfg.every_n_steps:
        callbacks.append(PeriodicCheckpoint(folder, "step", cfg.keep_last, every_n_train_steps=cfg.every_n_steps))
    if cfg.every_minutes:
        callbacks.append(PeriodicCheckpoint(folder, "time", cfg.keep_last,
                                            train_time_interval=timedelta(minutes=cfg.every_minutes)))
    return [SigtermCheckpoint(folder, cfg.keep_last), *callbacks]


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
            keep_newest(Path(self.dirpath), self.prefix, self.keep_last)


class SigtermCheckpoint(pl.Callback):
    """On SIGTERM (a scheduler's time limit or preemption: SLURM, Kubernetes, spot instances; `scancel`,
    `docker stop`, torchrun passing it on) training ends after the optimizer step under way, on every rank after the
    same one: before the next batch, once that step and its metrics are done, it is saved as `sigterm-<step>.ckpt`
    (the newest `keep_last` kept), which `resume=auto` continues from exactly, mid-epoch included. The scripts then
    exit with status 143 (`sigterm_exit_status`). It goes first among the callbacks, so that it saves before any
    other starts the next batch.

    Lightning's own handling stops each rank where it notices the signal, mid-validation included, so a rank that
    notices it a step before another waits for it forever: from the sanity check (or the start of training) to
    the teardown, when Lightning puts back the handlers it found, this callback's handler takes SIGTERM instead, and
    after every optimizer step the ranks agree whether any of them got it (one all-reduce of a flag per step under
    DDP, FSDP or DeepSpeed), so a signal to any one rank stops them all."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder, self.keep_last = Path(folder), keep_last
        self.received, self._step = False, 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.received = False

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_sigterm()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_sigterm()
        self._step = trainer.global_step

    def _take_sigterm(self) -> None:
        """From here on SIGTERM sets `received` (Lightning registers its handler after the `setup` hooks)."""
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame) -> None:
        self.received = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step == self._step:  # the first batch, or gradients still accumulating: no new step
            return
        self._step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = self.folder / f"sigterm-{trainer.global_step:08d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # every rank: sharded strategies gather the state
        if trainer.is_global_zero:
            keep_newest(self.folder, "sigterm", self.keep_last)
            print(f"stopped by SIGTERM after step {trainer.global_step}: saved {path}; the same command continues "
                  f"the run", file=sys.stderr, flush=True)
        raise SIGTERMException


def keep_newest(folder: Path, prefix: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` of the `<prefix>-<step>.ckpt` checkpoints in folder."""
    for old in sorted(folder.glob(f"{prefix}-*.ckpt"))[:-keep_last]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)  # DeepSpeed saves folders


@contextmanager
def sigterm_exit_status():
    """Training that SIGTERM stopped ends the process with status 143 (128 + SIGTERM), as a process killed by it
    would, instead of Lightning's 0: a job script or a retry loop sees that the run has not finished."""
    try:
        yield
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)
