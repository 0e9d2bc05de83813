"""scripts/pretrain.py end to end on the default recipe, a few steps of a tiny model."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import simmim.pretrain as pretrain
from conftest import run_script
from simmim.models.swinv2 import VARIANTS
from simmim.train.config import ConfigError, available_recipes, leaves, load_config

ROOT = Path(__file__).resolve().parents[1]


def fast_args(tmp_path, *extra):
    return [f"output_dir={tmp_path}", "run_name=demo", "data.batch_size=8", "data.num_workers=0",
            "model.embed_dim=16", "model.num_heads=[2,2,4,8]", "trainer.max_epochs=1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "logging.recon_every_n_steps=2", "logging.recon_images=4",
            "eval.knn_max_images=40", *extra]


@pytest.mark.slow
def test_default_recipe_end_to_end_and_resume(tmp_path, capsys):
    pretrain.main(fast_args(tmp_path))
    run = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert f"encoder: {run / 'encoder.pth'}" in printed
    assert "k-NN top-1 (val) by epoch: 0: " in printed and (run / "knn.png").is_file()

    saved = OmegaConf.load(run / "config.yaml")
    assert saved.model.embed_dim == 16 and saved.trainer.limit_train_batches == 3 and saved.recipe == "default"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    pictures = sorted((run / "reconstructions").glob("*.png"))
    assert [p.name for p in pictures] == ["step_0000002.png", "step_0000003.png"]  # the interval, then the end
    import cv2
    assert cv2.imread(str(pictures[-1])).shape == (4 * 64, 4 * 64, 3)
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/mask_ratio", "val/loss",
                 "knn/top1"):
        assert name in metrics, name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    exported = torch.load(run / "encoder.pth", weights_only=True)
    keys = list(exported["model"])
    assert keys[0] == "encoder.mask_token" and keys[-1] == "decoder.0.bias"
    assert all(k.startswith(("encoder.", "decoder.0.")) for k in keys)
    assert exported["config"]["model"]["window_size"] == 4

    # resume=auto (the default) continues the same run at the saved step, with the lr schedule's state
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 3
    pretrain.main(fast_args(tmp_path, "trainer.max_epochs=2"))
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 6 and second["epoch"] == 1
    assert second["lr_schedulers"][0]["last_epoch"] == 6
    history = next(v for k, v in second["callbacks"].items() if k.startswith("KNNMonitor"))["history"]
    assert [row["epoch"] for row in history] == [0, 1, 2]  # the monitor's rows survive the resume

    with pytest.raises(ConfigError, match="already holds checkpoints; pass resume=auto"):
        pretrain.main(fast_args(tmp_path, "resume=null"))
    with pytest.raises(ConfigError, match="model.embed_dim=16, this run asks for 32"):
        pretrain.main(fast_args(tmp_path, "model.embed_dim=32"))


def test_unknown_recipe_and_keys_name_near_matches():
    with pytest.raises(ConfigError, match="unknown pretrain recipe 'bsae'; did you mean base"):
        load_config("pretrain", "bsae")
    with pytest.raises(ConfigError, match=r"unknown key 'model.window' .*did you mean model.window_size"):
        load_config("pretrain", "default", ["model.window=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.max_epoch' .*trainer.max_epochs"):
        load_config("pretrain", "default", ["trainer.max_epoch=3"])
    cfg = load_config("pretrain", "default", ["trainer.fast_dev_run=true"])  # any Trainer argument
    assert cfg.trainer.fast_dev_run is True


def test_a_runs_saved_config_is_a_recipe(tmp_path):
    """recipe=<run dir>/config.yaml gives the config that run resolved (was "unknown key 'recipe'")."""
    from simmim.train.config import save_config

    for stage, recipe in (("pretrain", "base"), ("finetune", "few_labels")):
        cfg = load_config(stage, recipe, ["trainer.max_epochs=3", "run_name=mine"])
        save_config(cfg, tmp_path / stage / "config.yaml")
        assert load_config(stage, str(tmp_path / stage / "config.yaml")) == cfg


def test_every_recipe_resolves_and_builds_on_meta():
    from simmim.models.simmim import build_simmim

    assert set(available_recipes("pretrain")) >= {"default", "tiny", "small", "base", "large", "huge", "giant"}
    for name in available_recipes("pretrain"):
        cfg = load_config("pretrain", name)
        if cfg.model.variant:
            assert cfg.model.embed_dim == VARIANTS[cfg.model.variant]["embed_dim"]
            assert (cfg.model.img_size, cfg.model.window_size, cfg.simmim.mask_patch_size) == (192, 12, 32)
            assert cfg.simmim.norm_target_patch_size == 47 and cfg.optim.base_lr == 1e-4
        with torch.device("meta"):
            build_simmim(OmegaConf.to_container(cfg.model), cfg.simmim.norm_target_patch_size)
    giant = load_config("pretrain", "giant")
    assert giant.model.use_checkpoint and giant.model.sequential_attn and giant.trainer.precision == "bf16-mixed"
    base = load_config("pretrain", "base")
    assert base.trainer.max_epochs == 800 and list(base.optim.milestones) == [700]


def test_command_line_errors_are_one_line(tmp_path):
    script = str(ROOT / "scripts" / "pretrain.py")  # the whole stderr of a real process: one line
    result = subprocess.run([sys.executable, script, "recipe=nope"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown pretrain recipe 'nope'")

    result = run_script("simmim.pretrain", "recipe=base", "print_config=true")
    assert result.returncode == 0 and "variant: base" in result.stdout and "embed_dim: 128" in result.stdout

    result = run_script("simmim.pretrain", "--help")
    assert "giant" in result.stdout and "model.window_size=4" in result.stdout


def test_missing_data_folder_fails_before_training(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path / "nowhere")):
        pretrain.main(fast_args(tmp_path, "data.source=folder", f"data.root={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "demo" / "config.yaml").exists()


@pytest.mark.slow
def test_a_resume_with_other_masking_names_it(tmp_path):
    """simmim.mask_ratio changed on a resume: the rest of the run masks otherwise, named in a warning (was silent;
    data.* and train.* values were named already)."""
    pretrain.main(fast_args(tmp_path, "eval.knn_every_n_epochs=0"))
    with pytest.warns(UserWarning, match=r"resuming .*last.ckpt with other settings than it was trained with: "
                                         r"simmim.mask_ratio 0.6 -> 0.5; the rest of the run"):
        pretrain.main(fast_args(tmp_path, "eval.knn_every_n_epochs=0", "simmim.mask_ratio=0.5"))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_size_recipes_are_the_base_recipe_at_another_size(stage):
    """The size recipes are `based_on: base`; this keeps what they set over it to their size: tiny ... huge differ
    from base only in the variant's widths, depths and heads and the drop path rate; giant also in how it fits
    (batch, precision, strategy, devices; for fine-tuning its 640 px / window 40)."""
    base = load_config(stage, "base", here=False)
    sized = {"model.variant", "model.embed_dim", "model.depths", "model.num_heads", "model.extra_norm_every",
             "model.drop_path_rate", "recipe", "run_name"}
    fits = {"data.batch_size", "trainer.precision", "trainer.strategy", "trainer.devices", "model.use_checkpoint",
            "model.sequential_attn", "model.sequential_attn_chunk",
            *(("data.img_size", "model.img_size", "model.window_size") if stage == "finetune" else ())}
    for name, allowed in (("tiny", sized), ("small", sized), ("large", sized), ("huge", sized),
                          ("giant", sized | fits)):
        cfg = load_config(stage, name, here=False)
        before, now = (dict(leaves(OmegaConf.to_container(c))) for c in (base, cfg))
        differ = {key for key in {*before, *now} if before.get(key) != now.get(key)}
        assert differ <= allowed, (name, sorted(differ - allowed))
