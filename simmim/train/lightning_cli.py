"""The Lightning CLI over the recipes: LightningCLI builds a stage's classes, with the recipe as its defaults.

    python scripts/cli.py fit --stage pretrain --recipe default --trainer.max_epochs 2 --data.batch_size 32
    python scripts/cli.py fit --stage finetune --run.pretrained runs/pretrain/default/encoder.pth
    python scripts/cli.py fit --stage pretrain --recipe base --print_config      # the resolved config, then exit
    python scripts/cli.py validate --stage pretrain --ckpt_path runs/pretrain/default/checkpoints/best.ckpt

`--stage` and `--recipe` pick the recipe (`recipes/<stage>/<recipe>.yaml`, loaded as by the scripts); it becomes
the first `--config`: `model` holds the LightningModule's arguments, `data` the DataModule's, `trainer` the
Trainer's, and `run` the rest of the recipe (output_dir, run_name, resume, pretrained, logging). Later `--config`
files and `--section.key value` arguments override it. The run then goes through the same steps as the stage's
script (`simmim.train.stage`): run directory and resume=auto, the pretrained weights and Log-CPB windows, the
strategies, checkpoints, pictures and encoder export. `fit --ckpt_path` is `--run.resume`; `validate` reads a
checkpoint (`--ckpt_path`, else the run directory's newest) and writes nothing. The stages have no test or predict
step: the CLI offers fit and validate.
"""
from __future__ import annotations

import difflib
import inspect
import json
import re
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from simmim.train.checkpoint_io import Resumable, newest_good_checkpoint, read_resumable
from simmim.train.config import (ConfigError, check_config, check_keys, leaves, load_config, load_yaml, show_value,
                                 stage_schema, trainer_defaults)
from simmim.train.resume import check_ema, check_same_model, prepare_run
from simmim.train.stage import Stage, plain, self_and_parents, start_fit
from simmim.train.trainer import make_trainer

SUBCOMMANDS = ("fit", "validate")  # the stages have no test or predict step


def _pop_option(args: list[str], name: str, default: str | None) -> str | None:
    """The value of `--name value` or `--name=value` in args (removed from them), else default."""
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if arg.startswith(f"--{name}="):
            del args[i]
            return arg.split("=", 1)[1]
    return default


def _filled_in(arg: str, recipe: dict, given: dict) -> dict:
    """The recipe's dict argument `arg` of the module with the keys `given` names; ConfigError for a key it does not
    have (a typo was SwinTransformerV2's TypeError)."""
    for key in set(given) - set(recipe):
        near = difflib.get_close_matches(key, list(recipe), n=1)
        raise ConfigError(f"unknown key {key!r} in --model.{arg}" + (f"; did you mean {near[0]}?" if near
                          else f"; its keys: {', '.join(recipe)}"))
    return {**recipe, **given}


def _read_config_files(args: list[str], module_args: dict) -> list[str]:
    """args, each `--config PATH` / `-c PATH` / `--config=PATH` read: FileNotFoundError for a name that is neither a
    file nor inline YAML, a YAML error as the file and line (jsonargparse: "<unicode string>"), an empty file or a
    list refused (jsonargparse: "Unexpected config"); after a file that names some keys of a dict argument of the
    module (`model: {model: {window_size: 8}}`), `--model.ARG <the recipe's dict with those keys>`: jsonargparse
    replaces the whole dict with the keys a file gives, which --print_config then showed, and the run lacked the
    others."""
    out, rest = [], iter(args)
    for arg in rest:
        out.append(arg)
        value = next(rest, None) if arg in ("--config", "-c") else arg.partition("=")[2] \
            if arg.startswith("--config=") else None
        if arg in ("--config", "-c") and value is not None:
            out.append(value)
        if value is None or not Path(value).is_file():
            if value is not None and not re.search(r"[:{\n]", value):
                raise FileNotFoundError(f"--config {value}: no such file; pass a YAML file (--print_config writes "
                                        f"one)")
            continue
        if not isinstance(content := load_yaml(Path(value)), DictConfig) or not content:
            raise ConfigError(f"--config {value} holds no options; expected a mapping of them, such as "
                              f"'trainer: {{max_epochs: 2}}' (--print_config writes one)")
        if "based_on" in content:  # jsonargparse: "Option 'based_on' is not accepted"
            raise ConfigError(f"--config {value}: based_on is a recipe's key (a recipe has the scripts' sections, "
                              f"model.KEY and optim.KEY, not this CLI's); pass the file as --recipe {value}")
        section = content.get("model")
        for name, recipe in module_args.items() if isinstance(section, DictConfig) else ():
            if isinstance(recipe, dict) and isinstance(section.get(name), DictConfig):
                out += [f"--model.{name}", json.dumps(_filled_in(name, recipe, OmegaConf.to_container(section[name])))]
    return out


def _check_stage_of(resume: Resumable, name: str, stages: dict[str, Stage]) -> None:
    """ConfigError when the checkpoint's hyperparameters are not all arguments of stage `name`'s module (Lightning
    would apply them before our code runs: jsonargparse's "does not accept option")."""
    if resume.checkpoint is None:  # a DeepSpeed folder
        return
    ckpt_path, saved = resume.path, resume.checkpoint.get("hyper_parameters") or {}
    saved = [key for key in saved if not key.startswith("_")]  # e.g. the CLI's _instantiator
    def takes(stage: Stage) -> bool:
        return set(saved) <= set(inspect.signature(stage.module.__init__).parameters)
    if takes(stages[name]):
        return
    fitting = [other for other, stage in stages.items() if other != name and takes(stage)]
    unknown = sorted(set(saved) - set(inspect.signature(stages[name].module.__init__).parameters))
    raise ConfigError(f"--ckpt_path {ckpt_path} is not a checkpoint of the {name} stage (its hyperparameters "
                      f"{', '.join(unknown)} are not {name} arguments); "
                      + (f"pass --stage {fitting[0]}" if fitting else "pass a checkpoint of a run of this stage"))


TYPE_WORDS = {"int": ("an integer",), "float": ("a number",), "bool": ("true", "false"), "str": ("a string",),
              "NoneType": ("null",)}


def _one_line(message: str) -> str:
    """A jsonargparse error in one line; a value of the wrong type as `--KEY VALUE: expected an integer or null`."""
    union = re.match(r'Parser key "([^"]+)":.*?Subtypes: \[(.*?)\]\n.*Given value: (.*)', message, re.S)
    single = re.match(r'Parser key "([^"]+)":\s*Expected a (.*?)\. Got value: (.*)', message, re.S)
    if union or single:
        key, kinds, value = (union or single).groups()
        kinds = re.sub(r"typing\.Literal\[(.*?)\]", r"\1", re.sub(r"<class '(\w+)'>", r"\1", kinds))
        words = list(dict.fromkeys(word for kind in kinds.split(", ") for word in TYPE_WORDS.get(kind, (kind,))))
        expected = " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
        return f"--{key} {value.strip()}: expected {expected}"
    return " ".join(message.split())


def _int_before_float(hint):
    """`hint`, a union of int and float, with int tried first (jsonargparse tries a union's types in order).
    typing's cache answers the Trainer's Optional[Union[int, float]] with the equal Union[float, int, None] made for
    lightning_fabric's Optional[Union[float, int]] where that is still cached as pytorch_lightning.trainer is
    imported (how many unions come between depends on the packages installed): --trainer.limit_val_batches 2 was
    then 2.0 (refused) and 1 was 1.0 (the whole epoch). A flat Union[...] is cached by its types in their order."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) not in (typing.Union, types.UnionType) or int not in args or float not in args \
            or args.index(int) < args.index(float):
        return hint
    return typing.Union[tuple(float if arg is int else int if arg is float else arg for arg in args)]


class OneLineParser(LightningArgumentParser):
    """Lightning's parser, with its errors in one line instead of the usage and a block of text, no abbreviated
    options (--trainer.max_epoch was taken as --trainer.max_epochs), and ints read as ints where an argument takes
    both (`_int_before_float`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def add_class_arguments(self, *args, **kwargs) -> list[str]:
        added = super().add_class_arguments(*args, **kwargs)
        for action in self._actions:
            if action.dest in added and hasattr(action, "_typehint"):  # jsonargparse's ActionTypeHint
                action._typehint = _int_before_float(action._typehint)
        return added

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying alternatives: raises, as it expects
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"error: {_one_line(message)} ({prog} --help lists the options)\n")
        self.exit(2)


# every pytorch_lightning.Trainer argument with its default
TRAINER_DEFAULTS = trainer_defaults()


class RecipeCLI(LightningCLI):
    """LightningCLI for one of `stages`, chosen by `--stage` (default: the first), from `--recipe` (default)."""

    def __init__(self, stages: dict[str, Stage], args: list[str]):
        args = list(args)
        name = _pop_option(args, "stage", next(iter(stages)))
        if name not in stages:
            raise ConfigError(f"unknown --stage {name!r}; choose one of {', '.join(stages)}")
        self.stage = stages[name]
        self.recipe = load_config(name, _pop_option(args, "recipe", "default"))
        ckpt_path = _pop_option(list(args), "ckpt_path", None)  # Lightning reads its hyperparameters first
        self.ckpt_read = None  # the --ckpt_path checkpoint, read once: the run's checks read it from here
        if ckpt_path is not None:
            try:
                resume = read_resumable(ckpt_path)
            except ValueError as problem:
                raise ConfigError(f"--ckpt_path {ckpt_path} cannot be read ({problem}); pass a checkpoint of a run") \
                    from None
            _check_stage_of(resume, name, stages)
            self.ckpt_read = resume
        module_args, data_args = self.stage.init_args(self.recipe)
        # the --model.KEY options given, also with the recipe's value (`_parse_ckpt_path`)
        self.model_options_given = {arg.removeprefix("--model.").partition("=")[0] for arg in args
                                    if arg.startswith("--model.")}
        args = _read_config_files(args, module_args)
        trainer_args = {k: v for k, v in plain(self.recipe.trainer).items() if k in TRAINER_DEFAULTS}
        defaults = {"seed_everything": self.recipe.seed, "trainer": trainer_args,
                    "model": module_args, "data": data_args, "run": self._run_section(self.recipe)}
        if args and args[0] in SUBCOMMANDS:  # the recipe is the first config of the subcommand
            args[1:1] = ["--config", json.dumps(defaults)]
        with warnings.catch_warnings():  # args are the command line (scripts/cli.py), with the recipe put in
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            try:
                super().__init__(self.stage.module, self.stage.datamodule, args=args, save_config_callback=None,
                                 auto_configure_optimizers=False, parser_class=OneLineParser)
            except (ConfigError, ValueError, FileNotFoundError) as error:
                if type(error) not in (ConfigError, ValueError, FileNotFoundError):
                    raise
                raise type(error)(self._in_cli_syntax(str(error))) from None

    def _in_cli_syntax(self, message: str) -> str:
        """`message` with the scripts' `key=value` of recipe keys written as this CLI's options: run_name=NEW ->
        --run.run_name NEW, model.embed_dim=32 -> --model.model.embed_dim 32, data.root=/x -> --data.root /x."""
        options = {"seed": "--seed_everything", **{f"trainer.{name}": f"--trainer.{name}" for name in TRAINER_DEFAULTS}}
        module_keys, data_keys = self.stage.module_keys(self.recipe), self.stage.data_keys(self.recipe)
        for section, keys in (("model", module_keys), ("data", data_keys)):
            for arg, key in keys.items():
                options.setdefault(key, f"--{section}.{arg}")

        def option(match: re.Match) -> str:
            key = match.group(1)
            known = next((k for k in self_and_parents(key) if k in options), None)
            if known is not None:
                return f"{options[known]}{key[len(known):]} "
            return f"--run.{key} " if key.split(".")[0] in self.recipe else match.group(0)
        return re.sub(r"(?<![\w./=:-])([A-Za-z_]\w*(?:\.\w+)*)=(?!=)", option, message)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def _run_section(self, recipe: DictConfig) -> dict:
        """The recipe without the keys that feed the classes, the Trainer and the seed (trainer keys that are not
        Trainer arguments, such as trainer.tf32, stay: --run.trainer.tf32)."""
        run = OmegaConf.to_container(recipe, resolve=True)
        keys = [*self.stage.module_keys(recipe).values(), *self.stage.data_keys(recipe).values(), "seed", "recipe",
                *(f"trainer.{k}" for k in recipe.trainer if k in TRAINER_DEFAULTS)]
        for key in keys:
            *parents, leaf = key.split(".")
            node = run
            for parent in parents:
                node = node.get(parent, {})
            node.pop(leaf, None)
        return {k: v for k, v in run.items() if v != {}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run", type=dict[str, Any], default={},
                            help="the recipe's other keys: output_dir, run_name, resume, pretrained, logging, ...")

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the module's arguments with the --ckpt_path checkpoint's hyperparameters; a value the
        command line (or a --config) set otherwise would be dropped without a word (validate of a res-post-norm
        checkpoint with --model.model.norm_mode pre_norm measured the res-post-norm model): refused instead. A value
        counts as set where it differs from the recipe's or its --model.KEY option (or one of a dict above it) is
        given, also with the recipe's value (--model.ema_decay null against a checkpoint trained with an EMA)."""
        subcommand = self.config.get("subcommand")
        given = dict(leaves(self.config[subcommand].model.as_dict())) if subcommand else {}
        super()._parse_ckpt_path()
        if not given:
            return
        recipe = dict(leaves(self.stage.init_args(self.recipe)[0]))
        saved = dict(leaves(self.config[subcommand].model.as_dict()))
        for key, value in given.items():
            named = any(key == option or key.startswith(f"{option}.") for option in self.model_options_given)
            if (value != recipe.get(key) or named) and saved.get(key) != value:
                raise ConfigError(f"--model.{key} {show_value(value)}: the checkpoint of --ckpt_path was trained with "
                                  f"{show_value(saved.get(key))}, and Lightning builds the module from its "
                                  f"hyperparameters; drop --model.{key}")

    def before_instantiate_classes(self) -> None:
        """The recipe as the parsed arguments leave it; the stage's derived values (Log-CPB windows) filled in."""
        config = self.config[self.subcommand]
        model_args, data_args = config.model.as_dict(), config.data.as_dict()
        for arg, value in self.stage.init_args(self.recipe)[0].items():
            # a dict given whole that names some keys (an inline --config or --model.model JSON; files: see
            # `_read_config_files`) replaces the whole dict in jsonargparse; the recipe fills in the rest
            if isinstance(value, dict) and isinstance(model_args.get(arg), dict):
                model_args[arg] = _filled_in(arg, value, model_args[arg])
        run = OmegaConf.from_dotlist([f"{key}={show_value(value)}"  # YAML-typed values
                                      for key, value in leaves(config.run)])
        check_keys(run, self.recipe, "--run")
        cfg = OmegaConf.merge(self.recipe, run)
        ours = {k: v for k, v in cfg.trainer.items() if k not in TRAINER_DEFAULTS}  # e.g. tf32, from --run.trainer
        cfg.trainer = {**{k: v for k, v in config.trainer.as_dict().items()
                          if k in self.recipe.trainer or TRAINER_DEFAULTS.get(k, object()) != v}, **ours}
        cfg.seed = config.seed_everything
        if config.ckpt_path:  # fit: Lightning's way to continue (resume=PATH); both: the checkpoint whose weights
            # and Log-CPB windows the run takes (fine-tuning's pretrained file is not needed then: read_pretrained)
            if self.subcommand == "fit" and cfg.resume not in ("auto", config.ckpt_path):
                raise ConfigError(f"--ckpt_path {config.ckpt_path} and --run.resume {cfg.resume} disagree; give one")
            cfg.resume = config.ckpt_path
        model, data_size = model_args.get("model"), data_args.get("img_size", self.recipe.data.img_size)
        if isinstance(model, dict) and model.get("img_size") == self.recipe.model.img_size != data_size:
            model["img_size"] = data_args["img_size"]  # the model follows --data.img_size, as in the scripts
        elif (isinstance(model, dict) and config.ckpt_path and data_size == self.recipe.data.img_size
              and model.get("img_size") not in (None, data_size)):
            data_args["img_size"] = model["img_size"]  # the data follows the --ckpt_path model's (it was refused)
        self.cfg = self.stage.recipe_from_init_args(cfg, model_args, data_args)
        check_config(self.cfg, stage_schema(self.stage.name))
        self.prepared = self.stage.prepare(self.cfg)
        for arg, value in self.stage.init_args(self.cfg)[0].items():
            config.model[arg] = value

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        if self.subcommand == "validate":
            return self._validation_trainer()
        run_dir, resume = prepare_run(self.cfg, self.ckpt_read)
        self.run_dir = run_dir
        self.datamodule.setup("fit")  # bad data paths fail here, before anything is written
        self.stage.check_data(self.datamodule, self.cfg)
        self.config_init[self.subcommand]["ckpt_path"] = resume and resume.path
        return start_fit(self.stage, self.cfg, run_dir, resume, self.model, self.datamodule, self.prepared)

    def _validation_trainer(self) -> pl.Trainer:
        """validate: the checkpoint of --ckpt_path, else the newest of the run directory. Nothing is written (no
        lock, config copy, logger or picture): the run may be training in that directory."""
        if self.cfg.trainer.get("limit_val_batches") == 0:  # Lightning validates nothing and prints nothing
            raise ConfigError("--trainer.limit_val_batches 0: validate would run no batch and print no metric; give a "
                              "number of batches >= 1, a fraction in (0, 1], or leave it out (every batch)")
        run_dir = Path(self.cfg.output_dir) / str(self.cfg.run_name)
        given = self.config.validate.ckpt_path
        if given is None:
            resume = newest_good_checkpoint(run_dir / "checkpoints")
        else:  # as __init__ read it, unless a --config file gave it
            resume = read_resumable(given, self.ckpt_read)
        if resume is None:
            raise ConfigError(f"validate needs a checkpoint: --ckpt_path PATH, or --run.output_dir and --run.run_name "
                              f"of a run that has one ({run_dir / 'checkpoints'} has none)")
        ckpt = resume.path
        check_same_model(self.cfg, Path(ckpt).parent.parent / "config.yaml", f"cannot validate {ckpt}",
                         "pass the recipe and model values of that run (--recipe, --model.*, --run.pretrained)")
        if resume.checkpoint is not None:  # None: a DeepSpeed folder
            check_ema(self.cfg, resume.checkpoint.get("hyper_parameters") or {}, f"cannot validate {ckpt}")
        self.datamodule.setup("validate")  # bad data paths fail here
        self.stage.check_data(self.datamodule, self.cfg)
        self.config_init["validate"]["ckpt_path"] = str(ckpt)
        quiet = OmegaConf.merge(self.cfg, {"logging": {"loggers": []}})
        return make_trainer(quiet, run_dir, self.stage.monitor, self.stage.mode)

    def after_fit(self) -> None:
        lines = self.stage.finish(self.trainer, self.model, self.cfg, self.run_dir)
        if self.trainer.is_global_zero:
            print("\n".join([f"run directory: {self.run_dir}", *lines]))
