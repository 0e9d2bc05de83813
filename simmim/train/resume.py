"""Resuming a run: which checkpoint it continues from and whether it may (`prepare_run`), and what it needs,
beyond Lightning's checkpoint, to replay the uninterrupted run exactly (`ExactResume`).

The data's randomness depends only on (seed, epoch, index) (`simmim.data`); the model's (drop path, dropout,
Mixup) comes from the global generators, which `ExactResume` reseeds before every training batch from
(seed, epoch, batch index, rank). A run resumed at any step therefore draws what the uninterrupted run drew, without
saving generator states, whatever the loaders and validation drew in between. `ExactResume` also keeps metrics.csv
to one row per logged value: what a crashed run logged after its checkpoint is dropped when a run resumes from it.
"""
from __future__ import annotations

import os
import random
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from simmim.models.checkpoint import a_layout, detect_layout
from simmim.train.checkpoint_io import (Resumable, checkpoint_problem, newest_good_checkpoint, read_checkpoints,
                                       read_resumable)
from simmim.train.config import ConfigError, dotted_keys, show_value
from simmim.train.optim import PerStepLR
from simmim.train.run_dir import AppendingCSVLogger, check_unlocked, utc_stamp


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed of one training batch on one rank."""
    return int(np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


class ExactResume(pl.Callback):
    """Seeds torch (CPU and CUDA), numpy and random from `batch_seed(seed, epoch, batch_idx, rank)` at the start
    of every training batch; logs a resumed run's metrics at the step of the uninterrupted run (Lightning 2.6 logs
    one step ahead after a resume from a checkpoint saved at the end of an epoch). A checkpoint records how many
    rows metrics.csv (`AppendingCSVLogger`) held when it was saved; a run resumed from it first drops the later rows
    of the steps it logs again. At each epoch's start it mends Lightning's epoch count (see on_train_epoch_start).
    A resumed run trains from its first step at its own lr schedule's lrs (`PerStepLR.restart`), which differ from
    the saved optimizer's where the run was made longer or its total batch changed."""

    def __init__(self, seed: int):
        self.seed = seed
        self._align_step = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._align_step = trainer.ckpt_path is not None and pl_module.automatic_optimization
        if trainer.ckpt_path is not None:  # the data is set up: the schedule may read the run's length
            for config in trainer.lr_scheduler_configs:
                if isinstance(config.scheduler, PerStepLR):
                    config.scheduler.restart()

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


def _saved_config(path: Path) -> DictConfig:
    """A run directory's config.yaml (what its latest start resolved), with its model section."""
    try:
        saved = OmegaConf.load(path)
    except Exception as error:  # YAML syntax and the like
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    else:
        if isinstance(saved, DictConfig) and isinstance(saved.get("model"), DictConfig):
            return saved
        reason = "it has no model section"  # an empty file, a list, a mapping without it
    raise ConfigError(f"cannot read {path} ({reason}), the config of the run's latest start that a resume checks "
                      f"its model against: put back a copy of it (config.<time>.yaml beside it, one per start) or "
                      f"delete it to skip that check")


def prepare_run(cfg: DictConfig, read: Resumable | None = None) -> tuple[Path, Resumable | None]:
    """The run directory and the checkpoint to resume from (None: a fresh run), read once for the checks here and
    the datamodule's (`check_fit`); writes nothing. `read`: the resume=PATH checkpoint where the caller has read it
    already (the Lightning CLI's --ckpt_path).

    resume=auto continues from the checkpoint of the highest step in `<run dir>/checkpoints/` that can be read
    (newer broken ones are named in a warning); a fresh run refuses a directory that already holds checkpoints
    instead of overwriting them; a resumed run must have the same model; a directory that a live run holds is
    refused.
    """
    run_dir = Path(cfg.output_dir) / str(cfg.run_name)
    check_unlocked(run_dir)
    folder = run_dir / "checkpoints"
    existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    for path in existing:  # the run saves its checkpoints under these names: it failed there after an epoch
        if path.is_dir() and checkpoint_problem(path):  # (a DeepSpeed checkpoint is a folder)
            raise ConfigError(f"{path} is a folder that holds no DeepSpeed checkpoint, where the run saves its "
                              f"checkpoints; move it away (or pass run_name=NEW)")
    if cfg.resume == "auto":
        resume = checkpoint_to_resume(cfg) if existing else None
        if existing and resume is None:
            raise ConfigError(f"no checkpoint in {folder} can be resumed from (see the warnings above); pass "
                              f"resume=PATH of a good one, or run_name=NEW to start another run")
    elif cfg.resume:
        if not Path(cfg.resume).exists():
            raise ConfigError(f"resume={cfg.resume} does not exist; pass a .ckpt file, resume=auto or resume=null")
        try:
            resume = read_resumable(cfg.resume, read)
        except ValueError as problem:
            raise ConfigError(f"resume={cfg.resume} cannot be resumed from ({problem}); pass another checkpoint or "
                              f"resume=auto") from None
    else:
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints; pass resume=auto to continue that run or "
                              f"run_name=NEW to start another")
        resume = None
    if resume is not None:
        _check_resumed_model(cfg, resume)  # first: a checkpoint of the other stage is named as such
        if (run_dir / "config.yaml").is_file():
            saved = _saved_config(run_dir / "config.yaml")
            _check_same_pretrained(cfg, saved, resume.path)
            _compare_models(saved.model, cfg, f"cannot resume {resume.path}",
                            "drop the override or pass run_name=NEW to start another run")
    return run_dir, resume


def set_aside_later_checkpoints(run_dir: Path, resume: Resumable | None) -> list[Path]:
    """Move the run's checkpoints of later steps than the one it resumes (left by the branch a resume=PATH of an
    earlier checkpoint leaves; resume=auto would go back to them at the next start) to
    `checkpoints/superseded-<time>/`, named in a warning; returns their old paths. For rank 0 of a resume=PATH,
    once the start's checks have passed."""
    if resume is None or resume.checkpoint is None:  # a fresh run, a DeepSpeed folder
        return []
    step, resumed = resume.step, Path(resume.path).resolve()  # read already, and not later than itself
    others = [path for path in sorted((Path(run_dir) / "checkpoints").glob("*.ckpt")) if path.resolve() != resumed]
    readable, _ = read_checkpoints(others)  # the broken ones: named by every resume=auto
    later = [Path(found.path) for found in readable if found.step > step]
    if later:
        aside = Path(run_dir) / "checkpoints" / f"superseded-{utc_stamp()}"
        aside.mkdir()
        for path in later:
            path.rename(aside / path.name)
        warnings.warn(f"resuming {resume.path} (step {step}): {', '.join(p.name for p in later)} of later steps belong "
                      f"to the branch this run leaves (resume=auto would go back to them); moved to {aside}",
                      stacklevel=2)
    return later


def _check_same_pretrained(cfg: DictConfig, saved: DictConfig, ckpt: str) -> None:
    """ConfigError when a fine-tuning run resumes with another `pretrained` file than its latest start named (while
    that one is still there: a moved file may be named anew): its weights come from the checkpoint, so the new
    file would only be named in config.yaml, as if the run had been fine-tuned from it."""
    if "pretrained" not in cfg:
        return
    before, now = saved.get("pretrained"), cfg.pretrained
    if before == now or (before and now and Path(before).exists() and Path(now).exists()
                         and os.path.samefile(before, now)):
        return
    if before is None or Path(before).exists():
        raise ConfigError(f"cannot resume {ckpt}: it was fine-tuned from pretrained={before}, this run names "
                          f"{now}; a resumed run goes on from its own weights: pass pretrained={before}, or "
                          f"run_name=NEW to fine-tune from {now} in another run")


def checkpoint_to_resume(cfg: DictConfig) -> Resumable | None:
    """The checkpoint `prepare_run` would resume from (resume=PATH, or the run directory's with resume=auto), None
    for a fresh run or one that cannot be read (`prepare_run` says why); not checked against cfg."""
    folder = Path(cfg.output_dir) / str(cfg.run_name) / "checkpoints"
    if cfg.resume == "auto":
        return newest_good_checkpoint(folder) if folder.is_dir() else None
    try:
        return read_resumable(cfg.resume) if cfg.resume and Path(cfg.resume).exists() else None
    except ValueError:
        return None


def check_same_model(cfg: DictConfig, saved: Path, refusal: str, fix: str) -> None:
    """ConfigError (`refusal`: ..., `fix`) when the run directory config `saved` (if there is one) has another
    model than `cfg`: its checkpoints hold the weights of that model."""
    if saved.is_file():
        _compare_models(_saved_config(saved).model, cfg, refusal, fix)


def _compare_models(before: DictConfig, cfg: DictConfig, refusal: str, fix: str) -> None:
    """ConfigError naming every model key (but compile) whose value in `cfg` differs from `before`'s, in key order."""
    shared = (set(dotted_keys(cfg.model)) & set(dotted_keys(before))) - {"compile"}  # compiling keeps the weights
    keys = sorted(key for key in shared if OmegaConf.select(before, key) != OmegaConf.select(cfg.model, key))
    if keys:
        trained = ", ".join(f"model.{key}={show_value(OmegaConf.select(before, key))}" for key in keys)
        asked = ", ".join(show_value(OmegaConf.select(cfg.model, key)) for key in keys)
        raise ConfigError(f"{refusal}: it was trained with {trained}, this run asks for {asked}; {fix}")


RESUME_TAKES = ("max_nonfinite_steps",)  # optim.* keys a resumed run applies; the others are its saved state


RESUME_MAY_CHANGE = ("root", "list_file", "shards", "val_shards", "num_workers", "verify", "batch_size")


def _warn_changed_settings(cfg: DictConfig, checkpoint: dict, ckpt: str) -> None:
    """A warning naming the data.*, train.* and simmim.* values a resumed run trains on that differ from those its
    checkpoint was trained with (augmentation, mixup, masking, ...): the rest of the run differs from the one
    interrupted. Where the data is and how it is read (`RESUME_MAY_CHANGE`; data.batch_size is checked mid-epoch by
    the datamodule) may change. (The module's and the datamodule's hyperparameters use the keys' own names.)"""
    data, module = (checkpoint.get(name) or {} for name in ("datamodule_hyper_parameters", "hyper_parameters"))
    saved = {**{f"data.{k}": v for k, v in data.items()}, **{f"train.{k}": v for k, v in module.items()},
             **{f"simmim.{k}": v for k, v in {**data, **module}.items()}}
    changed = []
    for section in ("data", "train", "simmim"):
        for key, value in OmegaConf.to_container(cfg.get(section, OmegaConf.create())).items():
            before = saved.get(f"{section}.{key}", value)
            before = list(before) if isinstance(before, tuple) else before
            if key not in RESUME_MAY_CHANGE and before != value:
                changed.append(f"{section}.{key} {before} -> {value}")
    if changed:
        rank_zero_warn(f"resuming {ckpt} with other settings than it was trained with: {', '.join(changed)}; the "
                       f"rest of the run trains with these (give the old values to continue it as it was)",
                       stacklevel=6)  # every rank checks the checkpoint


def _check_resumed_model(cfg: DictConfig, resume: Resumable) -> None:
    """ConfigError when the checkpoint to resume cannot continue as cfg asks (each check below says what it
    refuses); a warning naming the data, training and masking values that differ (`_warn_changed_settings`)."""
    if resume.checkpoint is None:  # a DeepSpeed folder
        return
    _check_stage(cfg, resume)
    hparams = resume.checkpoint.get("hyper_parameters") or {}
    if isinstance(hparams.get("model"), Mapping):
        _compare_models(OmegaConf.create(dict(hparams["model"])), cfg, f"cannot resume {resume.path}",
                        "give the model values of that run, or start a new run (another run_name, no resume=PATH)")
    check_ema(cfg, hparams, f"cannot resume {resume.path}")
    _check_epoch(cfg, resume.checkpoint.get("epoch", 0), resume.path)
    _warn_changed_settings(cfg, resume.checkpoint, resume.path)
    _check_optim(cfg, hparams, resume.path)


def _check_stage(cfg: DictConfig, resume: Resumable) -> None:
    """A checkpoint of the other stage (or none of ours) is named as such (Lightning's state-dict error listed
    hundreds of keys, after the run directory was written)."""
    stage, layout = ("pretraining", "lightning-simmim") if "simmim" in cfg else ("fine-tuning", "lightning-classifier")
    try:
        found = detect_layout(resume.checkpoint)
    except ValueError:
        found = "unrecognized"
    if found != layout:
        where = ("pass a .ckpt of this stage's run directory, or resume=auto" if cfg.resume not in (None, "auto") else
                 f"{Path(resume.path).parent.parent} is a run directory of that stage: give this run another run_name")
        raise ConfigError(f"cannot resume {resume.path}: it is {a_layout(found)}, not one of a {stage} run; "
                          f"{where}")


def check_ema(cfg: DictConfig, hparams: Mapping, refusal: str) -> None:
    """ConfigError (`refusal`: ...) when a checkpoint's module hyperparameters `hparams` and cfg differ in having an
    EMA (switched on or off): its weights are saved only by a run that had them."""
    saved, asked = hparams.get("ema_decay"), cfg.train.ema_decay if "train" in cfg else None
    if "train" in cfg and (saved is None) != (asked is None) and "model" in hparams:
        raise ConfigError(f"{refusal}: it was trained with train.ema_decay={show_value(saved)}, this run asks for "
                          f"{show_value(asked)}; its EMA weights are saved only when it had them: give "
                          f"train.ema_decay={show_value(saved)} as it was, or pass run_name=NEW to start another run")


def _check_epoch(cfg: DictConfig, epoch: int, ckpt: str) -> None:
    """A checkpoint past trainer.max_epochs (Lightning's MisconfigurationException, in the fit)."""
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs not in (None, -1) and epoch > max_epochs:
        raise ConfigError(f"cannot resume {ckpt}: it is at epoch {epoch} (counted from 0), past trainer.max_epochs="
                          f"{max_epochs}; pass trainer.max_epochs={epoch} or more (at {epoch} the run ends at once), "
                          f"or run_name=NEW to start another run")


def _check_optim(cfg: DictConfig, hparams: Mapping, ckpt: str) -> None:
    """Other optim.* values than saved (but `RESUME_TAKES`): the optimizer and the lr schedule come back as saved,
    so a new optim.base_lr was ignored without a word (and warped the schedule a little)."""
    for key, value in OmegaConf.to_container(cfg.get("optim", OmegaConf.create())).items():
        saved = hparams.get(key)
        if key not in RESUME_TAKES and key in hparams and (list(saved) if isinstance(saved, tuple) else saved) != value:
            raise ConfigError(f"cannot resume {ckpt}: it was trained with optim.{key}={saved}, this run asks for "
                              f"{value}; a resumed run keeps the optimizer and lr schedule it saved: drop the "
                              f"override, or pass run_name=NEW to start another run")
