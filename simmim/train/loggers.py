"""Loggers and extra callbacks of a run, from the recipe (`logging.loggers`, `callbacks`), and pictures to
every logger that takes images.

    logging.loggers=[tensorboard,csv,wandb]          # names: tensorboard | csv | wandb | mlflow
    callbacks=[{class_path: EarlyStopping, init_args: {monitor: val/top1, mode: max, patience: 3}}]

A `logging.loggers` entry is a name above (written under the run directory; wandb and mlflow need
`pip install '.[wandb]'` / `'.[mlflow]'`) or `{class_path: ..., init_args: {...}}` for any Lightning logger
(e.g. WandbLogger with your project and entity). A `callbacks` entry is `{class_path, init_args}`; a bare class
name is looked up in `pytorch_lightning.callbacks`. Both come on top of what the scripts add (checkpoints,
throughput, pictures), so `trainer.logger` and `trainer.callbacks` are refused.
"""
from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from simmim.train.config import ConfigError
from simmim.train.run_dir import AppendingCSVLogger

__all__ = ["LOGGER_NAMES", "check_loggers_and_callbacks", "build_loggers", "build_callbacks", "log_image"]

LOGGER_NAMES = ("tensorboard", "csv", "wandb", "mlflow")
PROJECT = "swinv2-simmim"  # the wandb project / mlflow experiment of the named loggers


def _named_logger(name: str, run_dir: Path, run_name: str) -> Logger:
    from pytorch_lightning import loggers

    if name == "tensorboard":
        return loggers.TensorBoardLogger(run_dir, name="tensorboard", version="")
    if name == "csv":
        return AppendingCSVLogger(run_dir, name="csv", version="")  # a resumed run appends
    if name == "wandb":  # offline runs: WANDB_MODE=offline
        return loggers.WandbLogger(project=PROJECT, name=run_name, save_dir=str(run_dir))
    # MLFLOW_TRACKING_URI picks a server; else a SQLite store and artifacts under the run directory
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return loggers.MLFlowLogger(experiment_name=PROJECT, run_name=run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return loggers.MLFlowLogger(experiment_name=PROJECT, run_name=run_name,
                                tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}",
                                artifact_location=(run_dir / "mlruns").resolve().as_uri())


def _resolve(entry, key: str, default_module: str, base: type) -> tuple[str, type, dict]:
    """`{class_path, init_args}` -> (class_path, the class, init_args), the arguments bound to its signature;
    ConfigError naming `key`, the entry and the fix."""
    if not isinstance(entry, Mapping) or "class_path" not in entry or set(entry) - {"class_path", "init_args"}:
        raise ConfigError(f"{key} entry {entry!r} is not {{class_path: ..., init_args: {{...}}}}; e.g. "
                          f"{{class_path: pytorch_lightning.callbacks.EarlyStopping, init_args: {{monitor: val/loss}}}}")
    class_path = str(entry["class_path"])
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or default_module), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{key}: cannot import {class_path} ({error}); give the full class path, e.g. "
                          f"{default_module}.{name}") from error
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}: {class_path} is not a {base.__module__}.{base.__name__}")
    init_args = dict(entry.get("init_args") or {})
    try:
        inspect.signature(cls).bind(**init_args)
    except TypeError as error:
        raise ConfigError(f"{key}: {class_path}(**{init_args}) failed: {error}") from error
    return class_path, cls, init_args


def _instantiate(resolved: tuple[str, type, dict], key: str):
    """What `_resolve` gave -> the object; ConfigError naming `key` and the entry if the class refuses it."""
    class_path, cls, init_args = resolved
    try:
        return cls(**init_args)
    except Exception as error:  # any class's own checks (Lightning raises MisconfigurationException)
        raise ConfigError(f"{key}: {class_path}(**{init_args}) failed: {error}") from error


def _entries(node) -> list:
    return list((OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node) or [])


def _logger_entries(cfg: DictConfig) -> list:
    """`logging.loggers` checked: names (known, their package installed) and `_resolve`d Logger classes."""
    if "logger" in cfg.trainer:
        raise ConfigError("trainer.logger clashes with the run's loggers; set logging.loggers=[tensorboard,csv,"
                          "wandb,mlflow] (names or {class_path, init_args}), or logging.loggers=[] for none")
    logging = cfg.get("logging") or {}
    checked = []
    for entry in _entries(logging.get("loggers", ["tensorboard", "csv"])):
        if not isinstance(entry, str):
            entry = _resolve(entry, "logging.loggers", "pytorch_lightning.loggers", Logger)
        elif entry not in LOGGER_NAMES:
            raise ConfigError(f"logging.loggers names {entry!r}; use {', '.join(LOGGER_NAMES)} or "
                              f"{{class_path: ..., init_args: {{...}}}}")
        elif entry in ("wandb", "mlflow"):
            try:
                importlib.import_module(entry)
            except ImportError as error:
                raise ConfigError(f"logging.loggers names {entry}, which needs the {entry} package: pip install "
                                  f"'swinv2-simmim[{entry}]' (or -e '.[{entry}]' in a checkout)") from error
        checked.append(entry)
    return checked


def _callback_entries(cfg: DictConfig) -> list:
    """`callbacks` checked: `_resolve`d Callback classes taking their init_args."""
    if "callbacks" in cfg.trainer:
        raise ConfigError("trainer.callbacks clashes with the run's callbacks; add yours as callbacks=[{class_path: "
                          "EarlyStopping, init_args: {monitor: val/loss}}]")
    return [_resolve(entry, "callbacks", "pytorch_lightning.callbacks", pl.Callback)
            for entry in _entries(cfg.get("callbacks"))]


def check_loggers_and_callbacks(cfg: DictConfig) -> None:
    """ConfigError for `logging.loggers` or `callbacks` entries that `build_loggers` / `build_callbacks` would
    refuse (config validation: before the run directory is touched). The callbacks are built and dropped (their
    own checks run); the loggers are not built (some write or connect when made)."""
    _logger_entries(cfg)
    build_callbacks(cfg)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The loggers `logging.loggers` names (default tensorboard and csv), writing under `run_dir`."""
    return [_named_logger(entry, Path(run_dir), str(cfg.get("run_name", run_dir.name))) if isinstance(entry, str)
            else _instantiate(entry, "logging.loggers") for entry in _logger_entries(cfg)]


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The extra callbacks of `callbacks` ({class_path, init_args} each), after those the scripts add."""
    return [_instantiate(entry, "callbacks") for entry in _callback_entries(cfg)]


def log_image(logger: Logger, key: str, image: np.ndarray, step: int) -> bool:
    """Send an RGB uint8 picture (H, W, 3) to `logger` if it takes images (TensorBoard, W&B, MLflow); returns
    whether it did."""
    from pytorch_lightning import loggers

    if isinstance(logger, loggers.TensorBoardLogger):
        logger.experiment.add_image(key, image, step, dataformats="HWC")
    elif isinstance(logger, loggers.WandbLogger):
        logger.log_image(key=key, images=[image], step=step)
    elif isinstance(logger, loggers.MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, f"{key}/step_{step:07d}.png")
    else:
        return False
    return True
