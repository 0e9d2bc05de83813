"""The Trainer of a run directory, shared by both stages."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from simmim.train.checkpoint_io import AtomicCheckpointIO
from simmim.train.loggers import build_callbacks, build_loggers, log_recipe
from simmim.train.resume import ExactResume
from simmim.train.run_dir import save_start_config
from simmim.train.speed import ThreadCheck, set_tf32
from simmim.train.strategies import build_strategy


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str, callbacks: list = ()) -> pl.Trainer:
    """A Trainer from `cfg.trainer` with the loggers and extra callbacks of the recipe (`build_loggers`,
    `build_callbacks`: TensorBoard and CSV under run_dir by default, both appended to by resumed and repeated
    runs) that records the start (`RecordStart`), checks the CPU threads of the node's ranks (`ThreadCheck`) and
    keeps the checkpoints of `checkpoint_callbacks`, written atomically. `trainer.strategy` names are resolved by
    `simmim.train.strategies.build_strategy`. `trainer.tf32` is ours, not a Trainer argument:
    `simmim.train.speed.set_tf32`. In a SLURM job, Lightning's own requeue on SIGUSR1 (a checkpoint saved from
    inside its signal handler, mid-step, which resume=auto does not read) is off: `SignalCheckpoint` does it."""
    trainer_args = OmegaConf.to_container(cfg.trainer)
    tf32 = trainer_args.pop("tf32", False)
    trainer_args["strategy"] = build_strategy(trainer_args.get("strategy", "auto"), trainer_args.get("precision"))
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=build_loggers(cfg, run_dir),
        callbacks=[*checkpoint_callbacks(cfg.checkpoint, run_dir / "checkpoints", monitor, mode),
                   ExactResume(cfg.seed), RecordStart(cfg, run_dir), ThreadCheck(), *callbacks, *build_callbacks(cfg)],
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])],
        **trainer_args)
    set_tf32(tf32, trainer.strategy.root_device)
    return trainer


class RecordStart(pl.Callback):
    """Records a start of fit on rank 0: the resolved config (`save_start_config`) and the recipe sent to W&B and
    MLflow (`log_recipe`). At fit start, after the checkpoint to resume is restored: a resume it refuses (the
    data's mid-epoch layout: `simmim.data.datamodule.ResumableDataModule._check_layout`) leaves the run directory
    as it was."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            save_start_config(self.cfg, self.run_dir)
            log_recipe(trainer.loggers, self.cfg)


def checkpoint_callbacks(cfg: DictConfig, folder: Path, monitor: str, mode: str) -> list[pl.Callback]:
    """best.ckpt (by `monitor`), last.ckpt (at every epoch's end, validated or not: with check_val_every_n_epoch
    > 1 Lightning would save it only after a validation), step-<step>.ckpt every `cfg.every_n_steps` steps,
    time-<step>.ckpt every `cfg.every_minutes` minutes, sigterm-, sigusr1- or sigint-<step>.ckpt when SIGTERM,
    SIGUSR1 or Ctrl-C stops the run (the newest `cfg.keep_last` of each). (Lightning's own `save_last=True` copies
    only the checkpoints it saves, so with a monitor last.ckpt would be the best.) A resumed run overwrites a
    checkpoint of the same step."""
    common = dict(dirpath=folder, auto_insert_metric_name=False, enable_version_counter=False)
    callbacks = [ModelCheckpoint(filename="best", monitor=monitor, mode=mode, **common),
                 ModelCheckpoint(filename="last", save_on_train_epoch_end=True, **common)]
    if cfg.every_n_steps:
        callbacks.append(PeriodicCheckpoint(folder, "step", cfg.keep_last, every_n_train_steps=cfg.every_n_steps))
    if cfg.every_minutes:
        callbacks.append(PeriodicCheckpoint(folder, "time", cfg.keep_last,
                                            train_time_interval=timedelta(minutes=cfg.every_minutes)))
    return [SignalCheckpoint(folder, cfg.keep_last), *callbacks]


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


class SignalCheckpoint(pl.Callback):
    """On SIGTERM (a scheduler's time limit or preemption: SLURM, Kubernetes, spot instances; `scancel`,
    `docker stop`, torchrun passing it on), SIGUSR1 (SLURM's requeue signal in Lightning's convention:
    `requeue_job`) or a first Ctrl-C (SIGINT), training ends after the optimizer step under way, on every
    rank after the same one: before the next batch, once that step and its metrics are done, it is saved as
    `sigterm-<step>.ckpt`, `sigusr1-<step>.ckpt` or `sigint-<step>.ckpt` (the newest `keep_last` of each kept),
    which `resume=auto` continues from exactly, mid-epoch included; after SIGUSR1 in a SLURM job, rank 0 then
    requeues the job. The scripts exit with status 128 + the signal (143, 138, 130; `signal_exit_status`). A second
    Ctrl-C stops at once without saving (Lightning's KeyboardInterrupt shutdown). It goes first among the callbacks,
    so that it saves before any other starts the next batch.

    Lightning's own handling stops each rank where it notices SIGTERM, mid-validation included, so a rank that
    notices it a step before another waits for it forever, and a Ctrl-C saves nothing: from the sanity check (or
    the start of training) to the teardown this callback's handler takes both signals instead, and after every
    optimizer step the ranks agree whether any of them got one (one all-reduce per step under DDP, FSDP or
    DeepSpeed: the largest signal number, so SIGTERM wins over SIGUSR1, which wins over SIGINT), so a signal to any
    one rank stops them all."""

    SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1", signal.SIGINT: "Ctrl-C (SIGINT)"}

    def __init__(self, folder: Path, keep_last: int):
        self.folder, self.keep_last = Path(folder), keep_last
        self.received, self._ctrl_c, self._step, self._found, self._rank_zero = 0, False, 0, {}, True
        self._saving = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.received, self._ctrl_c, self._rank_zero = 0, False, trainer.is_global_zero

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals()
        self._step = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._put_back()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._put_back()

    def _take_signals(self) -> None:
        """From here on SIGTERM, SIGUSR1 and SIGINT call `_note` (Lightning registers its SIGTERM handler after the
        `setup` hooks)."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return
        for signum in self.SIGNALS:
            if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # a background job of a shell script (`train &`): the shell keeps Ctrl-C from it
            if signum not in self._found:
                self._found[signum] = signal.signal(signum, self._note)

    def _put_back(self) -> None:
        """The handlers found, where ours is still in place: Lightning puts back the SIGTERM handler it found at its
        teardown, which comes after the on_exception hooks and before the teardown hooks."""
        for signum, handler in self._found.items():
            if signal.getsignal(signum) == self._note:
                signal.signal(signum, handler)
        self._found = {}

    def _note(self, signum: int, frame) -> None:
        """The handler: `received` is the largest signal number received; a second Ctrl-C interrupts."""
        if signum == signal.SIGINT:
            if self._ctrl_c:
                raise KeyboardInterrupt
            self._ctrl_c = True
            if self._rank_zero:  # os.write: a print may be under way on this thread
                os.write(2, b"\nCtrl-C: stopping after this step and saving it; Ctrl-C again stops at once, unsaved\n")
        self.received = max(self.received, signum)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """The signal checkpoint as saved between two batches: it is saved as the next one starts, which Lightning
        has counted as fetched already; with that count the resumed run's later checkpoints were a batch ahead, and
        a run resumed from one of them skipped its epoch's end (validation, best.ckpt, last.ckpt)."""
        if self._saving:
            progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
            for counts in (progress["total"], progress["current"]):
                counts["ready"] = counts["completed"]
            progress["is_last_batch"] = False  # the batch done is not the epoch's last: the next one started

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step == self._step:  # the first batch, or gradients still accumulating: no new step
            return
        self._step = trainer.global_step
        strategy = trainer.strategy
        signum = int(strategy.reduce(torch.tensor(self.received, device=strategy.root_device), reduce_op="max"))
        if not signum:
            return
        name = signal.Signals(signum).name.lower()
        path = self.folder / f"{name}-{trainer.global_step:08d}.ckpt"
        self._saving = True
        try:
            trainer.save_checkpoint(path, weights_only=False)  # every rank: sharded strategies gather the state
        finally:
            self._saving = False
        if trainer.is_global_zero:
            keep_newest(self.folder, name, self.keep_last)
            print(f"stopped by {self.SIGNALS[signum]} after step {trainer.global_step}: saved {path}; the same "
                  f"command continues the run", file=sys.stderr, flush=True)
            if signum == signal.SIGUSR1 and SLURMEnvironment.detect():
                print(requeue_job(), file=sys.stderr, flush=True)
        raise StoppedBySignal(signum)


class StoppedBySignal(SIGTERMException):
    """Raised by `SignalCheckpoint` once it has saved: Lightning tears down as for its own SIGTERMException."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def keep_newest(folder: Path, prefix: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` of the `<prefix>-<step>.ckpt` checkpoints in folder."""
    for old in sorted(folder.glob(f"{prefix}-*.ckpt"))[:-keep_last]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)  # DeepSpeed saves folders


def requeue_job() -> str:
    """Put this SLURM job back in the queue and return the line to print: what was done, or why not and what to do.

    SLURM's requeue convention, as Lightning uses it: the job asks for SIGUSR1 some time before its limit (`#SBATCH
    --signal=USR1@300`), the run saves its step (`SignalCheckpoint`; outside training there is none: `run_cli`) and
    requeues its job (`scontrol requeue`; an array task by its array job id and task id), and the job's next start
    continues from that step."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID", "")
    again = "submit the job again to continue the run"
    if not job:
        return f"not requeued: SLURM_JOB_ID is not set; {again}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue SLURM job {job} (scontrol requeue: {error}); {again}"
    if done.returncode:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"status {done.returncode}"
        return (f"could not requeue SLURM job {job} (scontrol requeue: {reason}); {again}, or let it be requeued: "
                f"#SBATCH --requeue")
    return f"requeued SLURM job {job}: its next start continues the run"


@contextmanager
def signal_exit_status():
    """Training that a signal stopped ends the process with status 128 + the signal (SIGTERM 143, SIGUSR1 138,
    SIGINT 130), as a process killed by it would, instead of Lightning's 0: a job script or a retry loop sees that
    the run has not finished."""
    try:
        yield
    except SIGTERMException as stop:  # ours, or Lightning's own (a SIGTERM before SignalCheckpoint took it)
        sys.exit(128 + getattr(stop, "signum", signal.SIGTERM))
