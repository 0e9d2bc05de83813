"""Every value of a resolved config checked against the schema before anything runs.

Types come from the schema (`recipes/<stage>/default.yaml`: the type of each default; `NULLABLE` for keys whose
default is null) and, for `trainer.*`, from `pytorch_lightning.Trainer`'s annotations. Ranges and choices are in
`RULES`. A problem is a `ConfigError` of one line: the key, the value and what is expected.
"""
from __future__ import annotations

import collections.abc
import os
import re
import typing
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from masking import KINDS, check_mask_patch_size, mask_patch_sizes
from simmim.data.augment import MAX_MAGNITUDE
from simmim.models.simmim import NORM_WINDOW_RULE, is_norm_window
from simmim.models.swinv2 import ATTN_IMPLS, ATTN_MODES, NORM_MODES, POSITION_BIASES
from simmim.models.arguments import model_defaults
from simmim.train.config import ConfigError, leaves, show_value
from simmim.train.loggers import check_loggers_and_callbacks
from simmim.train.optim import SCHEDULES
from simmim.train.speed import COMPILE_VALUES


def _positive(v) -> bool:
    return v > 0


def _at_least(low):
    return lambda v: v >= low


def _fraction(v) -> bool:  # [0, 1)
    return 0 <= v < 1


def _probability(v) -> bool:  # [0, 1]
    return 0 <= v <= 1


def _choice(choices: tuple, note: str = "") -> tuple[typing.Callable, str]:
    """The rule of a value that must be one of `choices` (an owner's tuple), `note` after their names."""
    names = [str(c).lower() for c in choices]
    return (lambda v: v in choices), ", ".join(names[:-1]) + f" or {names[-1]}{note}"


# key -> (check of the value, or of each element of a list value; what is expected)
RULES: dict[str, tuple[typing.Callable, str]] = {
    "seed": (_at_least(0), "an integer >= 0"),
    "model.img_size": (_positive, "an integer > 0"),
    "model.patch_size": (_positive, "an integer > 0"),
    "model.in_chans": (_positive, "an integer > 0"),
    "model.num_classes": (_positive, "an integer > 0"),
    "model.embed_dim": (_positive, "an integer > 0"),
    "model.depths": (_positive, "a list of integers > 0, one per stage"),
    "model.num_heads": (_positive, "a list of integers > 0, one per stage"),
    "model.window_size": (_positive, "an integer > 0"),
    "model.pretrained_window_sizes": (_at_least(0), "null or a list of integers >= 0, one per stage"),
    "model.mlp_ratio": (_positive, "a number > 0"),
    "model.drop_rate": (_fraction, "a number in [0, 1)"),
    "model.attn_drop_rate": (_fraction, "a number in [0, 1)"),
    "model.drop_path_rate": (_fraction, "a number in [0, 1)"),
    "model.norm_mode": _choice(NORM_MODES),
    "model.attn_mode": _choice(ATTN_MODES),
    "model.position_bias": _choice(POSITION_BIASES),
    "model.extra_norm_every": (_at_least(0), "an integer >= 0"),
    "model.sequential_attn_chunk": (_positive, "an integer > 0"),
    "model.compile": _choice(COMPILE_VALUES, " (true where training runs on CUDA)"),
    "model.attn_impl": _choice(ATTN_IMPLS),
    "simmim.mask_patch_size": (_positive, "an integer > 0"),
    "simmim.mask_ratio": (lambda v: 0 < v < 1, "a number in (0, 1), the share of mask patches hidden"),
    "simmim.mask_kind": _choice(KINDS),
    "simmim.norm_target_patch_size": (is_norm_window, f"null or {NORM_WINDOW_RULE}"),
    "data.img_size": (_positive, "an integer > 0"),
    "data.batch_size": (_positive, "an integer > 0 (images per device)"),
    "data.num_workers": (_at_least(0), "an integer >= 0"),
    "data.random_erasing": (_probability, "a number in [0, 1] (0: off)"),
    "data.shuffle_buffer": (_positive, "an integer > 0 (samples; 1: no shuffling)"),
    "data.randaug_ops": (_at_least(0), "an integer >= 0 (0: off)"),
    "data.randaug_magnitude": (lambda v: 0 <= v <= MAX_MAGNITUDE, f"a number in [0, {MAX_MAGNITUDE:g}]"),
    "data.randaug_magnitude_std": (_at_least(0), "a number >= 0"),
    "data.labels_per_class": (_positive, "null (every label) or an integer > 0"),
    "optim.base_lr": (_positive, "a number > 0"),
    "optim.warmup_lr": (_at_least(0), "a number >= 0"),
    "optim.min_lr": (_at_least(0), "a number >= 0"),
    "optim.weight_decay": (_at_least(0), "a number >= 0"),
    "optim.betas": (_fraction, "two numbers in [0, 1)"),
    "optim.eps": (_positive, "a number > 0"),
    "optim.warmup_epochs": (_at_least(0), "a number >= 0"),
    "optim.schedule": _choice(SCHEDULES),
    "optim.milestones": (_at_least(0), "a list of epochs >= 0"),
    "optim.gamma": (_positive, "a number > 0"),
    "optim.max_nonfinite_steps": (_positive, "an integer > 0"),
    "optim.layer_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "eval.knn_every_n_epochs": (_at_least(0), "an integer >= 0 (0: off)"),
    "eval.knn_k": (_positive, "an integer > 0"),
    "eval.knn_temperature": (_positive, "a number > 0"),
    "eval.knn_max_images": (_positive, "null (every image) or an integer > 0 (images per split)"),
    "logging.recon_every_n_steps": (_at_least(0), "an integer >= 0 (0: only at the end)"),
    "logging.recon_images": (_positive, "an integer > 0"),
    "train.label_smoothing": (_fraction, "a number in [0, 1)"),
    "train.mixup": (_at_least(0), "a number >= 0 (0: off)"),
    "train.cutmix": (_at_least(0), "a number >= 0 (0: off)"),
    "train.mixup_prob": (_probability, "a number in [0, 1]"),
    "train.mixup_switch_prob": (_probability, "a number in [0, 1]"),
    "train.ema_decay": (_fraction, "null or a number in [0, 1), e.g. 0.9998"),
    "checkpoint.every_n_steps": (_at_least(0), "an integer >= 0 (0: off)"),
    "checkpoint.every_minutes": (_at_least(0), "a number >= 0 (0: off)"),
    "checkpoint.keep_last": (_positive, "an integer > 0"),
    "trainer.max_epochs": (_at_least(-1), "an integer >= -1 (-1: no limit)"),
    "trainer.max_steps": (_at_least(-1), "an integer >= -1 (-1: no limit)"),
    "trainer.accumulate_grad_batches": (_positive, "an integer > 0"),
    "trainer.log_every_n_steps": (_positive, "an integer > 0"),
    "trainer.num_nodes": (_positive, "an integer > 0"),
    "trainer.gradient_clip_val": (_at_least(0), "null or a number >= 0"),
}
# keys that may be null, and the type of their non-null values
NULLABLE = {
    "resume": str, "pretrained": str, "model.variant": str, "model.pretrained_window_sizes": list,
    "simmim.norm_target_patch_size": int, "data.root": str, "data.list_file": str, "data.shards": str,
    "data.val_shards": str, "train.ema_decay": float, "eval.knn_max_images": int, "data.labels_per_class": int,
}
MIXED = {"model.compile", "logging.loggers", "callbacks"}  # values of several types, checked where they are read
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _is(value, kind: type) -> bool:
    """A YAML value as the schema's type: ints are numbers too, bools are not."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _fail(key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"{key}={show_value(value)}: expected {expected}")


def _check_type(key: str, value, default, default_shown: bool = True) -> None:
    if key.startswith("trainer.") or key in MIXED or value is None and (default is None or key in NULLABLE):
        return
    if value is None:
        raise _fail(key, value, f"{TYPE_NAMES[type(default)]}, as the default {show_value(default)}")
    kind = type(default) if default is not None else NULLABLE.get(key)
    if kind is None:
        return
    if not _is(value, kind):
        example = f", as the default {show_value(default)}" if default is not None and default_shown else " or null"
        raise _fail(key, value, f"{TYPE_NAMES[kind]}{example}")
    if kind is list:
        element = type(default[0]) if default else (int if key in NULLABLE else None)
        if element is not None and not all(_is(v, element) for v in value):
            raise _fail(key, value, f"a list of {TYPE_NAMES[element].removeprefix('an ').removeprefix('a ')}s")


def _check_rule(key: str, value) -> None:
    if key not in RULES or value is None:
        return
    check, expected = RULES[key]
    values = value if isinstance(value, list) else [value]
    try:
        ok = all(check(v) for v in values)
    except TypeError:
        ok = False
    if not ok:
        raise _fail(key, value, expected)


def _matches(value, hint) -> bool:
    """Whether a YAML value fits a Trainer argument's annotation (unknown classes accept anything)."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint in (int, float, bool, str):
        return _is(value, hint)
    if origin in (list, tuple, collections.abc.Iterable) or hint in (list, tuple):
        return isinstance(value, list)
    return isinstance(value, dict)  # a dict (timedelta fields, class_path / init_args) for other classes


def _check_trainer(trainer: dict, here: bool) -> None:
    import pytorch_lightning as pl

    hints = typing.get_type_hints(pl.Trainer.__init__)
    for name, value in trainer.items():
        hint = hints.get(name)
        if hint is not None and not _matches(value, hint):
            expected = re.sub(r"<class '(\w+)'>", r"\1", str(hint)).replace("typing.", "").replace("NoneType", "null")
            raise _fail(f"trainer.{name}", value, f"a value of type {expected}")
    max_time = trainer.get("max_time")
    fields = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")  # of a timedelta
    if (isinstance(max_time, str) and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", max_time)
            or isinstance(max_time, dict) and not all(k in fields and _is(v, float) for k, v in max_time.items())):
        raise _fail("trainer.max_time", max_time, "days:hours:minutes:seconds (02:12:00:00), a map of timedelta "
                                                  "fields ({hours: 60}) or null")
    if isinstance(trainer.get("strategy"), str):
        from simmim.train.strategies import check_strategy_name

        check_strategy_name(trainer["strategy"])
    devices = trainer.get("devices")
    if isinstance(devices, str) and devices.lstrip("-").isdigit():  # the Lightning CLI passes "2" as a string
        devices = int(devices)
    if (type(devices) is int and devices < 1 and devices != -1
            or isinstance(devices, str) and devices != "auto" and not re.fullmatch(r"\d+(,\d+)*,?", devices)):
        raise _fail("trainer.devices", devices, "an integer > 0, -1 (every device), a list of device indices or auto")
    for name, least in (("limit_train_batches", 0), ("limit_val_batches", 0), ("limit_test_batches", 0),
                        ("val_check_interval", 1)):
        value = trainer.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not (value >= least if isinstance(value, int) else 0 < value <= 1 if least else 0 <= value <= 1):
            raise _fail(f"trainer.{name}", value, f"a fraction of the epoch's batches in {'(0' if least else '[0'}, "
                                                  f"1] or a number of batches >= {least}")
    if not here:
        return
    accelerator = str(trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or accelerator == "auto" and not torch.cuda.is_available()
    if on_cpu and isinstance(devices, list):
        raise _fail("trainer.devices", devices, "a number of processes on the CPU (device indices name GPUs), e.g. "
                                                "trainer.devices=2")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible here; use "
                          f"trainer.accelerator=cpu (or auto) or run on a machine with a GPU")
    if on_cpu and devices == -1:  # Lightning's TypeError
        raise _fail("trainer.devices", devices, "a number of processes on the CPU (-1, every device, counts GPUs), "
                                                "e.g. trainer.devices=2")
    strategy = trainer.get("strategy", "auto")  # (accelerator=auto: a GPU recipe, read on a machine without one)
    if accelerator == "cpu" and isinstance(strategy, str) and strategy.startswith("fsdp"):  # FSDP's RuntimeError
        raise ConfigError(f"trainer.strategy={strategy} needs GPUs (FSDP shards the model over CUDA devices); on the "
                          f"CPU use trainer.strategy=ddp or ddp_zero1")
    _check_launcher(devices, trainer.get("num_nodes", 1))


def _check_launcher(devices, num_nodes) -> None:
    """Under torchrun, trainer.devices must be the processes it started per node (else each trains alone, all in
    one run directory); several nodes need a launcher that starts the run on each (else the first process waits
    for the others forever)."""
    from lightning_fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    per_node = (devices if type(devices) is int and devices > 0 else len(devices) if isinstance(devices, list) else
                len([d for d in devices.split(",") if d]) if isinstance(devices, str) and devices != "auto" else None)
    started = os.environ.get("LOCAL_WORLD_SIZE")
    if TorchElasticEnvironment.detect() and started and per_node is not None and per_node != int(started):
        raise _fail("trainer.devices", devices, f"the {started} processes per node torchrun started "
                                                f"(--nproc-per-node={started}): set trainer.devices={started}")
    launched = SLURMEnvironment.detect() or TorchElasticEnvironment.detect() or LSFEnvironment.detect()
    if type(num_nodes) is int and num_nodes > 1 and not launched and "NODE_RANK" not in os.environ:
        raise ConfigError(f"trainer.num_nodes={num_nodes} but this process was not started on several nodes (no "
                          f"SLURM job step, torchrun, LSF or NODE_RANK): its first process would wait for the others "
                          f"forever; start it on every node (srun, or torchrun --nnodes={num_nodes} on each, or "
                          f"NODE_RANK, MASTER_ADDR and MASTER_PORT set on each: README, Scaling out), or set "
                          f"trainer.num_nodes=1")


# data.* keys read by one source only: set with another source they would be ignored (data.shards=... without
# data.source=shards trained on the embedded digits)
SOURCE_KEYS = {"root": "folder", "list_file": "list", "shards": "shards", "val_shards": "shards"}


def check_source_keys(data: DictConfig, sources: tuple[str, ...] = ()) -> None:
    """ConfigError for a data.source that is none of `sources` (when given: a run's; tools have their own), and
    for a `SOURCE_KEYS` key set while data.source names another source (a run's or a tool's)."""
    if sources and data.get("source") not in sources:
        raise _fail("data.source", data.get("source"), f"one of {', '.join(sources)}")
    for key, source in SOURCE_KEYS.items():
        value = data.get(key)
        if value is not None and data.source != source:
            raise ConfigError(f"data.{key}={show_value(value)} is read by data.source={source} only, and data.source="
                              f"{show_value(data.source)}; add data.source={source}, or drop it (data.{key}=null)")


def check_mask_patch(key: str, size, img_size: int, patch_size: int) -> None:
    """ConfigError naming `key`, its value and the sizes that fit unless the mask patch `size` fits the model's
    img_size and patch_size (the rule: `check_mask_patch_size`)."""
    try:
        check_mask_patch_size(img_size, size, patch_size)
    except ValueError:
        raise ConfigError(f"{key}={show_value(size)}: expected a divisor of the model's img_size {img_size} that is a "
                          f"multiple of its patch_size {patch_size}, one of "
                          f"{', '.join(map(str, mask_patch_sizes(img_size, patch_size)))}") from None


def _check_relations(cfg: DictConfig) -> None:
    model = cfg.model
    # here: the tools' option checks need no OpenCV, albumentations or scikit-learn
    from simmim.data.sources import SOURCES
    from simmim.data.transforms import check_crop_flip

    check_source_keys(cfg.data, SOURCES)
    try:  # (refused where the transforms are made, when the data is set up: print_config printed it)
        check_crop_flip(cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip)
    except ValueError as problem:
        raise ConfigError(str(problem)) from None
    if len(model.depths) != len(model.num_heads):
        raise ConfigError(f"model.depths={show_value(list(model.depths))} and model.num_heads="
                          f"{show_value(list(model.num_heads))}: expected one value per stage in each")
    if model.img_size % model.patch_size:
        raise ConfigError(f"model.img_size={model.img_size}: expected a multiple of model.patch_size="
                          f"{model.patch_size}")
    if "simmim" in cfg:
        check_mask_patch("simmim.mask_patch_size", cfg.simmim.mask_patch_size, cfg.data.img_size, model.patch_size)
    if "betas" in cfg.get("optim", {}) and len(cfg.optim.betas) != 2:
        raise _fail("optim.betas", list(cfg.optim.betas), "two numbers in [0, 1), e.g. [0.9, 0.999]")
    if cfg.run_name is None or not str(cfg.run_name).strip():
        raise _fail("run_name", cfg.run_name, "a name for the run's folder under output_dir")
    if Path(str(cfg.run_name)).is_absolute() or ".." in Path(str(cfg.run_name)).parts:  # the run outside output_dir
        raise _fail("run_name", cfg.run_name, "a name for the run's folder under output_dir, not a path out of it; "
                                              "give the folder above as output_dir=")
    output = Path(cfg.output_dir)
    for path in (output, *output.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output_dir={cfg.output_dir}: {path} is a file; expected a folder (new or existing)")
    run_dir = output / str(cfg.run_name)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_name={cfg.run_name}: {run_dir} is a file; expected a folder (new or existing)")


def validate_config(cfg: DictConfig, schema: DictConfig, here: bool = True) -> None:
    """Raise ConfigError (one line: key, value, what is expected) for the first value that the schema, the
    rules, pytorch_lightning.Trainer or the loggers and callbacks (`check_loggers_and_callbacks`) reject. `cfg` is
    resolved; `schema` is the stage's default.yaml; here: also trainer.accelerator and trainer.devices against this
    machine (a GPU for accelerator=gpu, counts not indices on the CPU)."""
    defaults = dict(leaves(OmegaConf.to_container(schema, resolve=False)))
    values = OmegaConf.to_container(cfg, resolve=True)
    for key, value in leaves(values):
        default = defaults.get(key)
        if isinstance(default, str) and default.startswith("${"):  # a copy of another key, checked there
            continue
        _check_type(key, value, default)
        _check_rule(key, value)
    _check_trainer(values.get("trainer", {}), here)
    _check_relations(cfg)
    check_loggers_and_callbacks(cfg)


def validate_options(overrides: DictConfig, defaults: dict, mixed: tuple[str, ...] = (),
                     nullable: tuple[str, ...] = ()) -> DictConfig:
    """A tool's `key=value` arguments (`simmim.train.config.options_from_argv`) checked against its defaults: a
    value for an integer, number or true/false default must be one; null only where the default is null or the key
    is in `nullable` (`key=` is null); `model.*` values must fit SwinTransformerV2's arguments and `RULES`; numbers
    and true/false given for a string default become strings (out=2024). Returns the overrides; raises ConfigError
    of one line."""
    known = dict(leaves(defaults))
    model_types = {f"model.{name}": default for name, default in model_defaults().items()}
    values = OmegaConf.to_container(overrides)
    for key, value in leaves(values):
        default = known.get(key)
        if value is None and default is not None and key not in nullable + mixed and type(default) in TYPE_NAMES:
            raise _fail(key, value, f"{TYPE_NAMES[type(default)]}, as the default {show_value(default)}")
        if value is None or key in mixed:
            continue
        if key.startswith("model.") and default is None:
            default = model_types.get(key)
            _check_type(key, value, list(default) if isinstance(default, tuple) else default, default_shown=False)
            _check_rule(key, value)
        elif isinstance(default, str) and isinstance(value, (bool, int, float)):
            OmegaConf.update(overrides, key, show_value(value))
        elif isinstance(default, (bool, int, float)):
            _check_type(key, value, default)
    return overrides


def validate_labels(samples, num_classes: int, where: str) -> None:
    """Every (image, label) label a class index below num_classes (model.num_classes), before training."""
    for image, label in samples:
        if not 0 <= label < num_classes:
            found = max(label for _, label in samples) + 1
            name = image if isinstance(image, (str, Path)) else "an image"
            raise ConfigError(f"model.num_classes={num_classes}: {where} has label {label} ({name}), expected "
                              f"0..{num_classes - 1}; set model.num_classes={max(found, num_classes)} or fix the "
                              f"labels")
