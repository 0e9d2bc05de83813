"""A training stage (pretraining, fine-tuning) as the recipe maps onto it, and `fit`, which runs one.

Both entry points run a stage through the same steps: `scripts/pretrain.py` / `scripts/finetune.py` with a recipe and
`key=value` overrides (`fit`), and the Lightning CLI (`simmim.train.lightning_cli`), which lets LightningCLI build the
same classes from the same recipe. `Stage.module_keys` / `data_keys` say which recipe key feeds which constructor
argument, in both directions: recipe -> constructor arguments (`init_args`), and CLI arguments -> recipe
(`recipe_from_init_args`), so the saved config, the run directory and the checkpoints are the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from simmim.train.checkpoint_io import Resumable
from simmim.train.config import ConfigError, config_from_argv
from simmim.train.resume import prepare_run, set_aside_later_checkpoints
from simmim.train.run_dir import start_run
from simmim.train.trainer import make_trainer, signal_exit_status

KeyMap = Callable[[DictConfig], dict[str, str]]  # constructor argument -> dotted recipe key


def section(cfg: DictConfig, name: str) -> dict[str, str]:
    """Every key of a recipe section as a constructor argument of the same name: {"base_lr": "optim.base_lr", ...}."""
    return {key: f"{name}.{key}" for key in cfg[name]}


@dataclass
class Stage:
    """What running one stage needs beyond its recipe.

    module / datamodule: the LightningModule and LightningDataModule classes (or factories); module_keys / data_keys:
    their constructor arguments' recipe keys; monitor / mode: the metric of best.ckpt. Hooks, each optional:
    prepare(cfg) fills derived recipe values before anything is built (fine-tuning reads the pretrained checkpoint's
    windows) and returns what `setup` needs; check_data(datamodule, cfg) checks the set-up data against the config
    (fine-tuning: labels against model.num_classes); setup(module, cfg, run_dir, resuming, prepared) runs before fit
    (fine-tuning loads the pretrained weights); callbacks(cfg, run_dir, datamodule) adds Lightning callbacks
    (the datamodule is set up);
    finish(trainer, module, cfg, run_dir) runs after fit on every rank and returns lines to print on rank 0.
    """

    name: str
    module: Callable[..., pl.LightningModule]
    datamodule: Callable[..., pl.LightningDataModule]
    module_keys: KeyMap
    data_keys: KeyMap
    monitor: str
    mode: str
    prepare: Callable[[DictConfig], Any] = lambda cfg: None
    check_data: Callable[[pl.LightningDataModule, DictConfig], None] = lambda data, cfg: None
    setup: Callable[..., None] = lambda module, cfg, run_dir, resuming, prepared: None
    callbacks: Callable[[DictConfig, Path, pl.LightningDataModule], list] = lambda cfg, run_dir, data: []
    finish: Callable[..., list[str]] = lambda trainer, module, cfg, run_dir: []

    def init_args(self, cfg: DictConfig) -> tuple[dict, dict]:
        """(module, datamodule) constructor arguments from a resolved recipe."""
        def pick(keys: dict[str, str]) -> dict:
            return {arg: plain(OmegaConf.select(cfg, key, throw_on_missing=True)) for arg, key in keys.items()}
        return pick(self.module_keys(cfg)), pick(self.data_keys(cfg))

    def recipe_from_init_args(self, cfg: DictConfig, module_args: dict, data_args: dict) -> DictConfig:
        """A copy of `cfg` with the constructor arguments written back to their recipe keys. Where two arguments
        feed one recipe key (data.model_patch_size and model.model's patch_size), they must agree."""
        cfg = cfg.copy()
        written: dict[str, str] = {}  # recipe key -> the argument that wrote it
        for prefix, keys, args in (("model", self.module_keys(cfg), module_args),
                                   ("data", self.data_keys(cfg), data_args)):
            for arg, key in keys.items():
                value = _as_recipe_type(plain(args[arg]), OmegaConf.select(cfg, key))
                writer = next((written[k] for k in self_and_parents(key) if k in written), None)
                if writer is None:
                    OmegaConf.update(cfg, key, value, merge=False)
                    written[key] = f"{prefix}.{arg}"
                elif plain(OmegaConf.select(cfg, key)) != value:
                    raise ConfigError(f"--{prefix}.{arg}={value} disagrees with --{writer} (recipe key {key}: "
                                      f"{plain(OmegaConf.select(cfg, key))}); set the same value in both")
        return cfg


def _as_recipe_type(value, recipe_value):
    """A whole float back to an int where the recipe holds an int (a constructor's `float` argument turns 1 into
    1.0 on the CLI)."""
    if (isinstance(recipe_value, int) and not isinstance(recipe_value, bool) and isinstance(value, float)
            and value.is_integer()):
        return int(value)
    return value


def self_and_parents(key: str) -> list[str]:
    """model.a.b -> [model.a.b, model.a, model]."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def plain(value):
    """omegaconf containers and tuples as plain lists and dicts."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def run_stage(stage: Stage, argv: list[str], usage: str) -> None:
    """A stage's command line: `recipe=NAME key=value ...`, then fit (or print the resolved config, or --help)."""
    parsed = config_from_argv(stage.name, argv, usage)
    if parsed is None:
        return
    cfg, print_config = parsed
    prepared = stage.prepare(cfg)
    if print_config:  # after what building the module (on the meta device: no memory) refuses, as a run would
        with torch.device("meta"):
            stage.module(**stage.init_args(cfg)[0])
        print(OmegaConf.to_yaml(cfg), end="")
        return
    fit(stage, cfg, prepared)


def start_fit(stage: Stage, cfg: DictConfig, run_dir: Path, resume: Resumable | None, module: pl.LightningModule,
              data: pl.LightningDataModule, prepared: Any) -> pl.Trainer:
    """A start's steps once its data is set up and checked, shared by the scripts and the Lightning CLI: the stage's
    setup of the module, the run directory's lock, the Trainer, what fit would refuse for the run's ranks (checked
    before fit writes the loggers' first files; the config is saved once the checkpoint is restored: RecordStart),
    then, on rank 0, the checkpoints of a branch the resume leaves set aside."""
    stage.setup(module, cfg, run_dir, resume is not None, prepared)
    start_run(run_dir)
    trainer = make_trainer(cfg, run_dir, stage.monitor, stage.mode, stage.callbacks(cfg, run_dir, data))
    data.check_fit(resume, trainer.world_size)
    if trainer.is_global_zero and cfg.resume not in (None, "auto"):  # resume=auto took the highest step
        set_aside_later_checkpoints(run_dir, resume)
    return trainer


def fit(stage: Stage, cfg: DictConfig, prepared: Any = None) -> None:
    """Run a stage from its resolved recipe (after `stage.prepare`): run directory, data, module, Trainer, fit, then
    the stage's finish."""
    run_dir, resume = prepare_run(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    module_args, data_args = stage.init_args(cfg)
    data = stage.datamodule(**data_args)
    data.setup("fit")  # bad data paths fail here, before anything is written
    stage.check_data(data, cfg)
    module = stage.module(**module_args)
    trainer = start_fit(stage, cfg, run_dir, resume, module, data, prepared)
    with signal_exit_status():
        trainer.fit(module, datamodule=data, ckpt_path=resume and resume.path)
    lines = stage.finish(trainer, module, cfg, run_dir)
    if trainer.is_global_zero:
        print("\n".join([f"run directory: {run_dir}", *lines]))
