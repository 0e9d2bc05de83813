"""Loggers and extra callbacks of a run, from the recipe (`logging.loggers`, `callbacks`), and pictures to
every logger that takes images.

    logging.loggers=[tensorboard,csv,wandb]          # names: tensorboard | csv | wandb | mlflow
    callbacks=[{class_path: EarlyStopping, init_args: {monitor: val/top1, mode: max, patience: 3}}]

A `logging.loggers` entry is a name above (written under the run directory; wandb and mlflow need
`pip install '.[wandb]'` / `'.[mlflow]'`) or `{class_path: ..., init_args: {...}}` for any Lightning logger
(e.g. WandbLogger with your project and entity). A `callbacks` entry is `{class_path, init_args}`; a bare class
name is looked up in `pytorch_lightning.callbacks`. Both come on top of what the scripts add (checkpoints,
throughput, pictures), so `trainer.logger` and `trainer.callbacks` are refused.

Every start of a run directory continues its W&B run and its MLflow run (`_continue_runs`: their ids are kept in
`<run dir>/logger_runs.json`), as metrics.csv and TensorBoard's files continue.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from simmim.train.checkpoint_io import written_atomically
from simmim.train.config import ConfigError
from simmim.train.run_dir import AppendingCSVLogger, launch_rank, utc_stamp

__all__ = ["LOGGER_NAMES", "check_loggers_and_callbacks", "build_loggers", "build_callbacks", "log_recipe",
           "log_image"]

LOGGER_NAMES = ("tensorboard", "csv", "wandb", "mlflow")
PROJECT = "swinv2-simmim"  # the wandb project / mlflow experiment of the named loggers


RUNS_FILE = "logger_runs.json"  # {"wandb": run id, "mlflow": run id, "mlflow URI": run id}: the runs every start
# continues ("mlflow": in the run directory's store, "mlflow URI": in the store of another tracking URI)
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")  # as the process started: MLflow sets it to the last run's
MLFLOW_NAMED_STORES = ("databricks", "databricks-uc", "uc")  # tracking URIs MLflow takes by name, not as folders
MLFLOW_DEFAULTS = {name: p.default for name, p in inspect.signature(MLFlowLogger).parameters.items()
                   if name in ("tracking_uri", "save_dir")}  # a subclass's own signature may not show them


def _named(name: str, run_dir: Path, run_name: str) -> tuple[str, type, dict]:
    """A `LOGGER_NAMES` name -> (class_path, class, init_args) of a logger writing under `run_dir`."""
    if name == "tensorboard":
        return name, TensorBoardLogger, dict(save_dir=run_dir, name="tensorboard", version="")
    if name == "csv":  # a resumed run appends
        return name, AppendingCSVLogger, dict(save_dir=run_dir, name="csv", version="")
    if name == "wandb":  # offline runs: WANDB_MODE=offline
        return name, WandbLogger, dict(project=PROJECT, name=run_name, save_dir=str(run_dir))
    # MLFLOW_TRACKING_URI picks a server; else a SQLite store and artifacts under the run directory
    if TRACKING_URI:
        return name, MLFlowLogger, dict(experiment_name=PROJECT, run_name=run_name, tracking_uri=TRACKING_URI)
    run_dir.mkdir(parents=True, exist_ok=True)
    return name, MLFlowLogger, dict(experiment_name=PROJECT, run_name=run_name, tracking_uri=_run_dir_store(run_dir),
                                    artifact_location=(run_dir / "mlruns").resolve().as_uri())


def _run_dir_store(run_dir: Path) -> str:
    """The tracking URI of the MLflow store in the run directory (a SQLite file)."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def _resolve(entry, key: str, default_module: str, base: type) -> tuple[str, type, dict]:
    """`{class_path, init_args}` -> (class_path, the class, init_args); ConfigError naming `key`, the entry and the
    fix."""
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
    return class_path, cls, dict(entry.get("init_args") or {})


def _bind(resolved: tuple[str, type, dict], key: str) -> None:
    """ConfigError naming `key` and the entry unless what `_resolve` gave binds to its class's signature: the
    arguments of a class checked without being built (`_instantiate` builds it, which checks them)."""
    class_path, cls, init_args = resolved
    try:
        inspect.signature(cls).bind(**init_args)
    except TypeError as error:
        raise ConfigError(f"{key}: {class_path}(**{init_args}) failed: {error}") from error


def _instantiate(resolved: tuple[str, type, dict], key: str):
    """What `_resolve` gave -> the object; ConfigError naming `key` and the entry if the class refuses it."""
    class_path, cls, init_args = resolved
    try:
        return cls(**init_args)
    except Exception as error:  # any class's own checks (Lightning raises MisconfigurationException)
        raise ConfigError(f"{key}: {class_path}(**{init_args}) failed: {error}") from error


def _entries(node, key: str) -> list:
    entries = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if isinstance(entries, (str, Mapping)):
        raise ConfigError(f"{key}={entries} is not a list; write {key}=[{entries}]")
    return list(entries or [])


def _logger_entries(cfg: DictConfig, checking: bool = False) -> list:
    """`logging.loggers` checked: names (known, their package installed) and `_resolve`d Logger classes, their
    init_args bound to the signature when `checking` (the config check; `build_loggers` builds them)."""
    if "logger" in cfg.trainer:
        raise ConfigError("trainer.logger clashes with the run's loggers; set logging.loggers=[tensorboard,csv,"
                          "wandb,mlflow] (names or {class_path, init_args}), or logging.loggers=[] for none")
    logging = cfg.get("logging") or {}
    checked = []
    for entry in _entries(logging.get("loggers", ["tensorboard", "csv"]), "logging.loggers"):
        if not isinstance(entry, str):
            entry = _resolve(entry, "logging.loggers", "pytorch_lightning.loggers", Logger)
            if checking:
                _bind(entry, "logging.loggers")
            class_path, cls, init_args = entry
            if issubclass(cls, MLFlowLogger):  # its tracking_uri, else a folder: file:<save_dir>
                given = {**MLFLOW_DEFAULTS, **{k: v for k, v in init_args.items() if v is not None}}
                uri = given.get("tracking_uri") or f"file:{given['save_dir']}"
                check_mlflow_store(uri, f"logging.loggers {class_path} init_args.tracking_uri")
        elif entry not in LOGGER_NAMES:
            raise ConfigError(f"logging.loggers names {entry!r}; use {', '.join(LOGGER_NAMES)} or "
                              f"{{class_path: ..., init_args: {{...}}}}")
        elif entry in ("wandb", "mlflow"):
            try:
                importlib.import_module(entry)
            except ImportError as error:
                raise ConfigError(f"logging.loggers names {entry}, which needs the {entry} package: pip install "
                                  f"'swinv2-simmim[{entry}]' (or -e '.[{entry}]' in a checkout)") from error
            if entry == "mlflow" and TRACKING_URI:
                check_mlflow_store(TRACKING_URI, "MLFLOW_TRACKING_URI")
        checked.append(entry)
    return checked


def check_mlflow_store(uri: str, key: str) -> None:
    """ConfigError when the MLflow tracking store `uri` (set by `key`) is a folder and the installed MLflow refuses
    folders (the versions with MLFLOW_ALLOW_FILE_STORE do, unless it is true): found by the config check, before
    the run directory exists."""
    try:
        from mlflow import environment_variables
    except ImportError:  # building the logger names the package
        return
    allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)  # None: an MLflow that takes folders
    named = uri in MLFLOW_NAMED_STORES or uri.startswith("databricks")  # no folder, though without a scheme
    if named or urlparse(uri).scheme not in ("", "file") or allowed is None or allowed.get():
        return
    raise ConfigError(f"{key}={uri} is a folder path, which MLflow refuses as a tracking store; set {key} to a "
                      f"database, e.g. sqlite:///mlflow.db (or MLFLOW_ALLOW_FILE_STORE=true to keep the folder)")


def _callback_entries(cfg: DictConfig) -> list:
    """`callbacks` checked: `_resolve`d Callback classes taking their init_args."""
    if "callbacks" in cfg.trainer:
        raise ConfigError("trainer.callbacks clashes with the run's callbacks; add yours as callbacks=[{class_path: "
                          "EarlyStopping, init_args: {monitor: val/loss}}]")
    return [_resolve(entry, "callbacks", "pytorch_lightning.callbacks", pl.Callback)
            for entry in _entries(cfg.get("callbacks"), "callbacks")]


def check_loggers_and_callbacks(cfg: DictConfig) -> None:
    """ConfigError for `logging.loggers` or `callbacks` entries that `build_loggers` / `build_callbacks` would
    refuse (config validation: before the run directory is touched). The callbacks are built and dropped (their
    own checks run); the loggers are not built (some write or connect when made): their arguments are bound."""
    _logger_entries(cfg, checking=True)
    build_callbacks(cfg)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The loggers `logging.loggers` names (default tensorboard and csv), writing under `run_dir`; W&B and MLflow
    loggers continue the runs of the directory's earlier starts (`_continue_runs`)."""
    run_dir = Path(run_dir)
    run_name = str(cfg.get("run_name", run_dir.name))
    entries = [_named(entry, run_dir, run_name) if isinstance(entry, str) else entry for entry in _logger_entries(cfg)]
    if launch_rank() != 0:  # only rank 0 logs to W&B and MLflow
        return [_instantiate(entry, "logging.loggers") for entry in entries]
    return _continue_runs(entries, run_dir / RUNS_FILE)


def _continue_runs(entries: list[tuple[str, type, dict]], path: Path) -> list[Logger]:
    """The loggers of `_resolve`d entries; W&B and MLflow loggers without a run id of their own get the run that
    `path` records (rank 0). A new W&B run gets its id here and a new MLflow run is started here, both recorded in
    `path` before anything is logged; an MLflow run that the tracking store no longer has is replaced with a
    warning (e.g. MLFLOW_TRACKING_URI changed). A W&B run of another id left open in this process is ended.
    A subclass of MLFlowLogger of yours is built as it is (a new run per start unless you pass run_id)."""
    runs = _read_runs(path)
    recorded = dict(runs)
    loggers = []
    for class_path, cls, init_args in entries:
        if issubclass(cls, WandbLogger) and not (init_args.get("id") or init_args.get("version")):
            runs["wandb"] = runs.get("wandb") or secrets.token_hex(6)  # a W&B run id: letters and digits
            init_args = {**init_args, "id": runs["wandb"]}
        if issubclass(cls, WandbLogger):
            _end_other_wandb_run(init_args.get("id") or init_args.get("version"))
        if cls is MLFlowLogger and not init_args.get("run_id"):
            loggers.append(_mlflow_logger((class_path, init_args), runs, path.parent))
        else:
            loggers.append(_instantiate((class_path, cls, init_args), "logging.loggers"))
    if runs != recorded:
        with written_atomically(path) as tmp:
            tmp.write_text(json.dumps(runs, indent=1) + "\n")
    return loggers


def _end_other_wandb_run(run_id: str) -> None:
    """End the W&B run this process has open if it is not `run_id`: Lightning leaves a run open when training ends
    and its next WandbLogger would log into it (e.g. a fine-tuning run after pretraining in one notebook)."""
    import wandb

    if wandb.run is not None and wandb.run.id != run_id:
        wandb.finish()


def _mlflow_logger(resolved: tuple[str, dict], runs: dict, run_dir: Path) -> MLFlowLogger:
    """A `RunMLFlowLogger` on the run `runs` records for its tracking store, marked running again, or on a new run,
    recorded in `runs`. The store of the run directory (`_named`) is "mlflow" (wherever the folder has moved), any
    other "mlflow URI": a run logged to a server for a while and then to its folder again continues in each."""
    import mlflow
    from mlflow.exceptions import MlflowException

    class_path, init_args = resolved
    uri = init_args.get("tracking_uri")
    key = "mlflow" if uri in (None, _run_dir_store(run_dir)) else f"mlflow {uri}"
    if runs.get(key):
        logger = _instantiate((class_path, RunMLFlowLogger, {**init_args, "run_id": runs[key]}), "logging.loggers")
        try:
            logger.experiment.update_run(runs[key], status="RUNNING")
            return logger
        except MlflowException as error:
            rank_zero_warn(f"MLflow run {runs[key]} of {RUNS_FILE} cannot be continued in the tracking store "
                           f"{mlflow.get_tracking_uri()} ({str(error).splitlines()[0]}): logging to a new run")
    logger = _instantiate((class_path, RunMLFlowLogger, init_args), "logging.loggers")
    try:
        runs[key] = logger.run_id  # starts the run
    except MlflowException as error:  # a server that does not answer: after MLflow's retries (minutes)
        raise ValueError(f"MLflow cannot start a run in the tracking store {mlflow.get_tracking_uri()} "
                         f"({str(error).splitlines()[0][:200]}); check MLFLOW_TRACKING_URI or the mlflow logger's "
                         f"tracking_uri, or leave mlflow out of logging.loggers") from None
    return logger


class RunMLFlowLogger(MLFlowLogger):
    """An MLFlowLogger whose run may hold the parameters of an earlier start: MLflow refuses to change a logged
    parameter (Lightning's logger would stop the run), so only new ones are sent and a changed one keeps its first
    value, with a warning."""

    def log_hyperparams(self, params) -> None:
        from lightning_fabric.utilities.logger import _convert_params, _flatten_dict

        logged = self.experiment.get_run(self.run_id).data.params
        params = _flatten_dict(_convert_params(params))
        changed = [f"{key} {logged[key]} (now {value})" for key, value in params.items()
                   if key in logged and not str(value).startswith(logged[key])]  # Lightning may truncate
        if changed:
            rank_zero_warn(f"MLflow run {self.run_id} keeps the first value of a parameter: {'; '.join(changed)}; "
                           f"each start's config is in the run directory's config.<UTC time>.yaml")
        super().log_hyperparams({key: value for key, value in params.items() if key not in logged})


def _read_runs(path: Path) -> dict:
    """What `path` records ({} when there is no such file; when it cannot be read, a warning and the file moved
    aside to `logger_runs.unreadable-<UTC time>.json`). A folder there is a ValueError."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder: the run directory records its W&B and MLflow runs in a file of that "
                         f"name; move the folder away")
    try:
        runs = json.loads(path.read_text())
        if not isinstance(runs, dict):
            raise ValueError("not a JSON object")
        for name, run_id in runs.items():
            if not (isinstance(run_id, str) and re.fullmatch(r"[\w-]+", run_id)):
                raise ValueError(f"{name}: {run_id!r} is not a run id")
        return runs
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        kept = path.with_name(f"{path.stem}.unreadable-{utc_stamp()}.json")
        os.replace(path, kept)
        rank_zero_warn(f"{path} cannot be read ({error}): W&B and MLflow log to new runs, recorded there anew (the "
                       f"file is kept as {kept.name})")
        return {}


def log_recipe(loggers: list[Logger], cfg: DictConfig) -> None:
    """The resolved recipe as the `recipe` hyperparameters of the W&B and MLflow loggers (rank 0), beside the
    module's and the data's arguments that Lightning logs: run settings such as trainer.devices or the recipe's
    name show in their run tables. (TensorBoard and CSV runs have it in config.yaml.)"""
    recipe = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        if isinstance(logger, (WandbLogger, MLFlowLogger)):
            logger.log_hyperparams({"recipe": recipe})


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The extra callbacks of `callbacks` ({class_path, init_args} each), after those the scripts add, and a
    `MonitorCheck` of those that monitor a metric."""
    callbacks = [_instantiate(entry, "callbacks") for entry in _callback_entries(cfg)]
    return [*callbacks, MonitorCheck(callbacks)] if callbacks else []


class MonitorCheck(pl.Callback):
    """ConfigError when a `callbacks` entry monitors a val/ metric the run does not log, once the sanity check's
    validation has logged them all: EarlyStopping's own error came at the end of the first epoch, a traceback that
    left no checkpoint of it. (Train metrics are not all logged at every step: those are left to the callback.)"""

    def __init__(self, callbacks: list[pl.Callback]):
        self.monitors = [(type(callback).__name__, callback.monitor) for callback in callbacks
                         if isinstance(getattr(callback, "monitor", None), str)]

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = sorted(key for key in trainer.callback_metrics if key.startswith("val/"))
        for name, monitor in self.monitors:
            if monitor.startswith("val/") and logged and monitor not in logged:
                near = difflib.get_close_matches(monitor, logged, n=1)
                raise ConfigError(f"callbacks: {name} monitors {monitor}, which this run does not log"
                                  f"{f' (did you mean {near[0]}?)' if near else ''}; its validation metrics are "
                                  f"{', '.join(logged)}: set init_args.monitor to one of them")


def log_image(logger: Logger, key: str, image: np.ndarray, step: int) -> bool:
    """Send an RGB uint8 picture (H, W, 3) to `logger` if it takes images (TensorBoard, W&B, MLflow); returns
    whether it did."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[image], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, f"{key}/step_{step:07d}.png")
    else:
        return False
    return True
