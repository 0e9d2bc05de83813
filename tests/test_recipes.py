"""Recipes built on others (`based_on`): the size recipes resolve to the configs of their full copies before they
were based on base.yaml, and a wrong `based_on` is one line naming the file and the value."""
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from simmim.models.swinv2 import VARIANTS
from simmim.train.config import RECIPES_DIR, ConfigError, leaves, load_config, save_config

# The keys base.yaml set when each size recipe was a full copy of it (written out here, not read from the recipes)
BASE = {
    "pretrain": {
        "model.variant": "base", "model.compile": "auto", "model.window_size": 12, "model.drop_path_rate": 0.1,
        "simmim.mask_patch_size": 32, "simmim.mask_ratio": 0.6, "simmim.norm_target_patch_size": 47,
        "data.img_size": 192, "data.source": "folder", "data.batch_size": 128, "data.num_workers": 8,
        "data.crop_scale": [0.67, 1.0], "data.crop_ratio": [0.75, 1.3333333333333333], "data.hflip": 0.5,
        "optim.base_lr": 1e-4, "optim.warmup_lr": 5e-7, "optim.min_lr": 5e-6, "optim.warmup_epochs": 10,
        "optim.schedule": "multistep", "optim.milestones": [700], "optim.gamma": 0.1,
        "eval.knn_every_n_epochs": 20, "eval.knn_max_images": 20000, "logging.recon_every_n_steps": 5000,
        "checkpoint.every_minutes": 30, "trainer.max_epochs": 800, "trainer.precision": "16-mixed",
        "trainer.log_every_n_steps": 100,
    },
    "finetune": {
        "pretrained": None, "model.variant": "base", "model.compile": "auto", "model.window_size": 14,
        "model.pretrained_window_sizes": [12, 12, 12, 6], "model.num_classes": 1000, "model.drop_path_rate": 0.1,
        "data.img_size": 224, "data.source": "folder", "data.batch_size": 128, "data.num_workers": 8,
        "data.randaug_ops": 2, "data.randaug_magnitude": 9, "data.randaug_magnitude_std": 0.5,
        "data.random_erasing": 0.25, "data.crop_scale": [0.08, 1.0], "data.crop_ratio": [0.75, 1.3333333333333333],
        "data.hflip": 0.5, "optim.base_lr": 1.25e-3, "optim.warmup_lr": 2.5e-7, "optim.min_lr": 2.5e-7,
        "optim.warmup_epochs": 20, "optim.layer_decay": 0.75, "train.label_smoothing": 0.1, "train.mixup": 0.8,
        "train.cutmix": 1.0, "checkpoint.every_minutes": 30, "trainer.max_epochs": 100,
        "trainer.precision": "16-mixed", "trainer.log_every_n_steps": 100,
    },
}
GIANT_FITS = {"model.drop_path_rate": 0.2, "model.use_checkpoint": True, "model.sequential_attn": True,
              "model.sequential_attn_chunk": 2, "trainer.devices": 8, "trainer.strategy": "fsdp",
              "trainer.precision": "bf16-mixed"}
# What each size recipe's full copy set otherwise
SIZES = {
    "pretrain": {"base": {}, "tiny": {}, "small": {}, "large": {"model.drop_path_rate": 0.2},
                 "huge": {"model.drop_path_rate": 0.2}, "giant": {**GIANT_FITS, "data.batch_size": 32}},
    "finetune": {"base": {}, "tiny": {}, "small": {}, "large": {"model.drop_path_rate": 0.2},
                 "huge": {"model.drop_path_rate": 0.2},
                 "giant": {**GIANT_FITS, "model.window_size": 40, "data.img_size": 640, "data.batch_size": 8}},
}


def resolved(stage: str, recipe: str, *overrides: str) -> dict:
    return dict(leaves(OmegaConf.to_container(load_config(stage, recipe, list(overrides), here=False))))


@pytest.mark.parametrize("stage", SIZES)
def test_size_recipes_resolve_as_their_full_copies_did(stage):
    """Every key: the default's, under the variant's widths, under what the full copy set."""
    default = resolved(stage, "default")
    for name, own in SIZES[stage].items():
        variant = {f"model.{key}": list(value) if isinstance(value, tuple) else value
                   for key, value in VARIANTS[name].items()}
        expected = {**default, **variant, **BASE[stage], "model.variant": name, **own, "recipe": name,
                    "run_name": name}
        expected["model.img_size"] = expected["data.img_size"]
        assert resolved(stage, name) == expected, name


def test_a_recipe_file_based_on_a_recipe_and_on_a_relative_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("based_on: tiny\ndata:\n  batch_size: 16\n")
    (tmp_path / "top.yaml").write_text("based_on: sub/mine.yaml\ntrainer:\n  max_epochs: 3\n")
    cfg = load_config("pretrain", str(tmp_path / "top.yaml"), ["optim.base_lr=2e-4"], here=False)
    assert (cfg.model.variant, cfg.model.embed_dim, cfg.data.batch_size, cfg.trainer.max_epochs) == ("tiny", 96, 16, 3)
    assert (cfg.optim.base_lr, cfg.simmim.norm_target_patch_size, cfg.recipe) == (2e-4, 47, "top")
    assert "based_on" not in cfg

    save_config(cfg, tmp_path / "run" / "config.yaml")  # a run's saved config: complete, the same run again
    assert "based_on" not in (tmp_path / "run" / "config.yaml").read_text()
    assert load_config("pretrain", str(tmp_path / "run" / "config.yaml"), here=False) == cfg


def test_based_on_default_is_the_schema_under_every_recipe(tmp_path):
    """default.yaml is never merged again over the variant's widths (embed_dim stays the variant's)."""
    (tmp_path / "mine.yaml").write_text("based_on: default\nmodel:\n  variant: small\n")
    assert load_config("pretrain", str(tmp_path / "mine.yaml"), here=False).model.embed_dim == 96


def test_the_path_of_default_yaml_is_the_default_recipe():
    """recipe=<the path of default.yaml> is recipe=default: the schema was merged again over the variant's widths,
    depths and heads (model.variant=tiny resolved to tiny with default.yaml's embed_dim 32)."""
    path = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "default.yaml"
    for recipe in (str(path), str(path.parent / ".." / "pretrain" / "default.yaml")):
        cfg = load_config("pretrain", recipe, ["model.variant=tiny"], here=False)
        assert cfg == load_config("pretrain", "default", ["model.variant=tiny"], here=False), recipe
        assert cfg.model.embed_dim == VARIANTS["tiny"]["embed_dim"] and cfg.recipe == "default"


def test_a_variant_goes_over_the_widths_of_the_recipes_under_it(tmp_path):
    """A base with every width (a run's saved config.yaml, a copy of default.yaml) under a recipe or command line that
    names another variant: the base's widths were merged over the variant's ('variant: small' with embed_dim 32 and
    depths [2, 2, 2, 2]). The variant's widths go under the keys of the layer naming it; that layer's own keep."""
    run = load_config("pretrain", "default", here=False)
    save_config(run, tmp_path / "run" / "config.yaml")
    shutil.copy(RECIPES_DIR / "pretrain" / "default.yaml", tmp_path / "copy.yaml")
    (tmp_path / "on_run.yaml").write_text("based_on: run/config.yaml\nmodel:\n  variant: small\n")
    (tmp_path / "on_copy.yaml").write_text("based_on: copy.yaml\nmodel:\n  variant: small\n  embed_dim: 64\n")
    small = (96, [2, 2, 18, 2], [3, 6, 12, 24])
    for recipe, overrides, widths in (("on_run.yaml", [], small), ("on_copy.yaml", [], (64, *small[1:])),
                                      ("run/config.yaml", ["model.variant=small"], small),
                                      ("run/config.yaml", [], (32, [2, 2, 2, 2], [2, 4, 8, 16]))):
        cfg = load_config("pretrain", str(tmp_path / recipe), overrides, here=False)
        assert (cfg.model.embed_dim, list(cfg.model.depths), list(cfg.model.num_heads)) == widths, recipe


@pytest.mark.parametrize("text, message", [
    ("based_on: bsae\n", r"recipe .*mine.yaml: based_on: bsae: unknown pretrain recipe 'bsae'; did you mean base"),
    ("based_on: nowhere.yaml\n", r"recipe .*mine.yaml: based_on: nowhere.yaml: recipe file .*nowhere.yaml does not"),
    ("based_on: [base]\n", r"recipe .*mine.yaml: based_on: \['base'\]: expected a recipe name or a .yaml path"),
    ("based_on: mine.yaml\n", r"recipe .*mine.yaml: based_on: mine.yaml makes a cycle \(mine.yaml -> mine.yaml\)"),
    ("based_on: other.yaml\n", r"recipe .*other.yaml: based_on: mine.yaml makes a cycle "
                               r"\(mine.yaml -> other.yaml -> mine.yaml\)"),
    ("based_on: base\nmodel:\n  windw_size: 8\n", r"unknown key 'model.windw_size' in recipe .*mine.yaml"),
    ("based_on: bad.yaml\n", r"unknown key 'model.windw_size' in recipe .*bad.yaml"),
    ("based_on: listed.yaml\n", r"recipe .*listed.yaml holds a list, not a mapping of keys; write it as sections"),
    ("- trainer.max_epochs=2\n", r"recipe .*mine.yaml holds a list, not a mapping of keys; write it as sections"),
    ("based_on: base\nmodel: 3\n", r"model=3 in recipe .*mine.yaml: model is a section of keys; give them as "
                                  r"model.KEY=VALUE, or in a file as 'model: \{KEY: VALUE\}'"),
    ("trainer:\n", r"trainer=null in recipe .*mine.yaml: trainer is a section of keys"),
])
def test_a_wrong_based_on_is_one_line_naming_the_file_and_value(tmp_path, text, message):
    (tmp_path / "other.yaml").write_text("based_on: mine.yaml\n")
    (tmp_path / "bad.yaml").write_text("based_on: base\nmodel:\n  windw_size: 8\n")
    (tmp_path / "listed.yaml").write_text("- model.variant=tiny\n")
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config("pretrain", str(tmp_path / "mine.yaml"), here=False)
    assert "\n" not in str(error.value)
