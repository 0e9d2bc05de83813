"""Recipes: `recipes/<stage>/default.yaml` <- the recipes it is `based_on` <- `recipes/<stage>/<name>.yaml` <-
command-line `key=value`.

`default.yaml` of a stage is the schema: every key a run reads is there, so a typo in a recipe or on the
command line is an error with near matches, never a silent default. `trainer.*` accepts every argument of
`pytorch_lightning.Trainer`. A recipe's top-level `based_on: NAME` (a recipe of the stage) or `based_on: FILE.yaml`
(relative to the recipe's folder) merges that recipe, and what it is based on, under it.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from simmim.errors import ConfigError
from simmim.models.arguments import variant_model
from simmim.train.checkpoint_io import written_atomically


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # a link to the top-level recipes/ in a checkout


def available_recipes(stage: str) -> list[str]:
    return sorted(p.stem for p in (RECIPES_DIR / stage).glob("*.yaml"))


def _recipe_path(stage: str, name: str, folder: Path = Path()) -> Path:
    """A recipe's file: `recipes/<stage>/<name>.yaml`, or a YAML path (relative to `folder`)."""
    if name.endswith((".yaml", ".yml")):
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist; pass an existing YAML path or a recipe name")
        return path
    path = RECIPES_DIR / stage / f"{name}.yaml"
    if not path.is_file():
        names = available_recipes(stage)
        near = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ConfigError(f"unknown {stage} recipe {name!r}; {hint}available: {', '.join(names)}")
    return path


def leaves(node: Mapping, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested dict: model.img_size, ..."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def dotted_keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of a config, sections included: model, model.img_size, ..."""
    def walk(node: dict, prefix: str):
        for key, value in node.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
    return list(walk(OmegaConf.to_container(cfg, resolve=False), ""))


def _at(container: dict, key: str):
    """The value of a dotted key in a config container."""
    for part in key.split("."):
        container = container[part]
    return container


HELP = {"-h", "--help", "help"}  # a script's arguments that ask for its usage and keys


def trainer_defaults() -> dict:
    """Every pytorch_lightning.Trainer argument with its default."""
    import pytorch_lightning as pl

    return {name: p.default for name, p in inspect.signature(pl.Trainer.__init__).parameters.items() if name != "self"}


def check_keys(overrides: DictConfig, schema: DictConfig, source: str) -> None:
    """ConfigError for a key of overrides that the schema (or the Trainer) lacks, or a value where it has a section."""
    known = set(dotted_keys(schema))
    given, sections = (OmegaConf.to_container(c, resolve=False) for c in (overrides, schema))
    trainer_args = None
    for key in dotted_keys(overrides):
        if key in known:
            if isinstance(_at(sections, key), dict) and not isinstance(value := _at(given, key), dict):
                raise ConfigError(f"{key}={show_value(value)} in {source}: {key} is a section of keys; give them "
                                  f"as {key}.KEY=VALUE, or in a file as '{key}: {{KEY: VALUE}}'")
            continue
        if key.startswith("trainer."):
            trainer_args = trainer_args or list(trainer_defaults())
            name = key.split(".")[1]
            if name in trainer_args:
                continue
            candidates = [f"trainer.{a}" for a in trainer_args]
        else:
            candidates = sorted(known)
        near = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(near)}?" if near else "; run with --help to list the keys"
        raise ConfigError(f"unknown key {key!r} in {source}{hint}")


def load_yaml(path: Path) -> DictConfig:
    """A recipe or config file; a YAML syntax error is one line naming the file, line and problem."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error ({getattr(error, 'problem', None) or error}); "
                          f"fix the file") from None


def _dotlist(pairs: dict[str, str]) -> DictConfig:
    """`key=value` arguments as a config; a value that is not valid YAML is one line naming it."""
    merged = OmegaConf.create()
    for key, value in pairs.items():
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}={value}: not valid YAML ({getattr(error, 'problem', None) or error}); "
                              f"quote strings and close brackets, e.g. {key}=[2,2,6,2]") from None
    return merged


def _key_value_pairs(argv: list[str], example: str) -> dict[str, str]:
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"expected key=value arguments, got {bad[0]!r}; e.g. {example}")
    return dict(a.split("=", 1) for a in argv)


def parse_cli(argv: list[str]) -> tuple[str, DictConfig, bool]:
    """`recipe=NAME key=value ...` -> (recipe name, dotlist overrides, print_config)."""
    pairs = _key_value_pairs(argv, "recipe=default trainer.max_epochs=2")
    recipe = pairs.pop("recipe", "default")
    print_config = pairs.pop("print_config", "false").lower() in ("1", "true", "yes")
    return recipe, _dotlist(pairs), print_config


def config_from_argv(stage: str, argv: list[str], usage: str, here: bool = True) -> tuple[DictConfig, bool] | None:
    """A script's (resolved config, print_config) from `recipe=NAME key=value ...`; None after printing the
    usage, the recipes and every key for --help. here=False, or print_config=true: the run is not for this machine
    (no check of its accelerator, devices and launcher against what this machine has: a GPU recipe prints on a login
    node)."""
    if HELP & set(argv):
        print(usage + "\n" + describe_keys(stage))
        return None
    recipe, overrides, print_config = parse_cli(argv)
    return load_config(stage, recipe, overrides, here and not print_config), print_config


def show_value(value) -> str:
    """A value as it is written on the command line: [2, 2], true, null."""
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(show_value(v) for v in value)}]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def as_list(value) -> list[str]:
    """A key of names or paths given as one value (key=a) or a list (key=[a,b]) as a list of strings (YAML reads
    checkpoint=123 as a number); null as []."""
    if value is None:
        return []
    return [str(v) for v in ([value] if isinstance(value, (str, int, float)) else value)]


def options_from_argv(defaults: dict, argv: list[str], usage: str, mixed: tuple[str, ...] = (),
                      nullable: tuple[str, ...] = ()) -> DictConfig | None:
    """A tool's options: `defaults` <- `key=value` arguments, unknown keys and values of the wrong type rejected
    (`simmim.train.validate.validate_options`; `mixed`: keys that take values of several types; `nullable`: keys
    with a default that may be set to null; data.* keys of a source other than data.source: `check_source_keys`);
    None after printing the usage and the keys for --help."""
    from simmim.train.validate import check_source_keys, validate_options  # here: validate imports ConfigError

    schema = OmegaConf.create(defaults)
    if HELP & set(argv):
        keys = "\n".join(_key_lines(defaults))
        print(f"{usage}\nkeys (default value):\n{keys}")
        return None
    example = " ".join(f"{k}={v}" for k, v in list(defaults.items())[:2])
    overrides = _dotlist(_key_value_pairs(argv, example))
    check_keys(overrides, schema, "the command line")
    cfg = OmegaConf.merge(schema, validate_options(overrides, defaults, mixed, nullable))
    if "source" in cfg.get("data", {}):
        check_source_keys(cfg.data)
    return cfg


def stage_schema(stage: str) -> DictConfig:
    """`recipes/<stage>/default.yaml`: every key a run of the stage reads, with its default."""
    return load_yaml(_recipe_path(stage, "default"))


def _is_schema(stage: str, path: Path) -> bool:
    """Whether a recipe file is the stage's default.yaml, the schema: under every recipe already, never merged again
    (over the variant's widths, depths and heads)."""
    return path.resolve() == _recipe_path(stage, "default").resolve()


def _load_recipe(path: Path) -> tuple[DictConfig, str | None]:
    """A recipe file's keys, and the recipe a run's config.yaml (given as a recipe) was made from (its `recipe`
    key, taken out); a file that is not a mapping of keys (a list, a single value) is a ConfigError."""
    cfg = load_yaml(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"recipe {path} holds a list, not a mapping of keys; write it as sections of keys, such "
                          f"as 'trainer: {{max_epochs: 2}}' (print_config=true writes one)")
    return cfg, cfg.pop("recipe", None)


def _recipe_layers(stage: str, path: Path, cfg: DictConfig, schema: DictConfig,
                   chain: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The recipe `cfg` (read from `path`) after the recipes it is `based_on`, the farthest first, each without its
    `based_on` and checked against the schema. `chain`: the recipes based on this one (a cycle is a ConfigError)."""
    base = cfg.pop("based_on", None)
    check_keys(cfg, schema, f"recipe {path}")
    if base is None:
        return [cfg]
    where = f"recipe {path}: based_on: {base}"
    if not isinstance(base, str):
        raise ConfigError(f"{where}: expected a recipe name or a .yaml path relative to {path.parent}")
    try:
        base_path = _recipe_path(stage, base, path.parent)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if _is_schema(stage, base_path):
        return [cfg]
    chain = (*chain, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(base_path.resolve()):], base_path))
        raise ConfigError(f"{where} makes a cycle ({cycle}); base one of them on another recipe or on none")
    base_cfg, _ = _load_recipe(base_path)  # a run's config.yaml as the base: the recipe based on it names the run
    return [*_recipe_layers(stage, base_path, base_cfg, schema, chain), cfg]


def load_config(stage: str, recipe: str = "default", overrides: DictConfig | list[str] | None = None,
                here: bool = True) -> DictConfig:
    """Merge default <- the recipes the recipe is `based_on` <- recipe <- overrides, reject unknown keys, return the
    resolved config (here: see `check_config`). A recipe may be a run's saved config.yaml: the same run again."""
    schema = stage_schema(stage)
    layers = [schema]
    recipe_path, made_from = _recipe_path(stage, recipe), None
    if not _is_schema(stage, recipe_path):  # by its file: recipe=<path of default.yaml> too
        recipe_cfg, made_from = _load_recipe(recipe_path)
        layers += _recipe_layers(stage, recipe_path, recipe_cfg, schema)
    if overrides is not None:
        if isinstance(overrides, (list, ListConfig)):
            overrides = _dotlist(_key_value_pairs(list(overrides), "trainer.max_epochs=2"))
        check_keys(overrides, schema, "the command line")
        layers.append(overrides)
    variant = OmegaConf.merge(*layers).model.get("variant")
    if variant is not None:  # under the keys of the layer that names it, over those of the layers below (a base
        # that is a run's config.yaml or a copy of default.yaml has every width: they must not undo the variant's)
        named = max(i for i, layer in enumerate(layers) if "variant" in (layer.get("model") or {}))
        layers.insert(named, OmegaConf.create({"model": variant_model(variant)}))
    cfg = OmegaConf.merge(*layers)
    cfg.recipe = made_from or Path(recipe).stem
    OmegaConf.resolve(cfg)
    check_config(cfg, schema, here)
    return cfg


def check_config(cfg: DictConfig, schema: DictConfig, here: bool = True) -> None:
    """Every value of a resolved config against the stage's schema (`simmim.train.validate`), and what must hold
    between keys; run by load_config and by the Lightning CLI. here: also the accelerator and devices against this
    machine (false for a plan of a run elsewhere)."""
    from simmim.train.validate import validate_config  # here: validate imports ConfigError from this module

    validate_config(cfg, schema, here)
    if cfg.model.img_size != cfg.data.img_size:
        raise ConfigError(f"model.img_size={cfg.model.img_size} differs from data.img_size={cfg.data.img_size}; "
                          f"set data.img_size (the model is built for the images it gets)")


def describe_keys(stage: str) -> str:
    """The --help text: recipes and every key with its default."""
    schema = OmegaConf.to_container(OmegaConf.load(_recipe_path(stage, "default")), resolve=False)
    lines = [f"recipes ({RECIPES_DIR / stage}): {', '.join(available_recipes(stage))}", "", "keys (default value):",
             *_key_lines(schema), "  trainer.<any pytorch_lightning.Trainer argument>"]
    return "\n".join(lines)


def _key_lines(node: dict, prefix: str = "") -> list[str]:
    """`  section.key=default` for every leaf of a config container."""
    lines = []
    for key, value in node.items():
        if isinstance(value, dict):
            lines += _key_lines(value, f"{prefix}{key}.")
        else:
            lines.append(f"  {prefix}{key}={value}")
    return lines


def save_config(cfg: DictConfig, path: Path) -> None:
    with written_atomically(path) as tmp:  # every rank of a run writes it, each to a temporary file of its own
        tmp.write_text(OmegaConf.to_yaml(cfg))
