"""scripts/cli.py: the Lightning CLI runs both stages from the recipes, with the scripts' run directory, checkpoints,
pictures, encoder export and Log-CPB handoff; validate reads a checkpoint and writes nothing."""
import re
import shutil
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_script
from simmim.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "scripts" / "cli.py")]
FAST = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--data.num_workers=0", "--data.batch_size=8"]


def cli(*args, cwd):
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_both_stages_through_the_cli(tmp_path):
    out = cli("fit", "--stage", "pretrain", *FAST, "--model.model.embed_dim=16", "--model.model.num_heads=[2,2,4,8]",
              f"--run.output_dir={tmp_path}/pre",
              "--run.logging.recon_every_n_steps=0", cwd=tmp_path)
    run = tmp_path / "pre" / "default"
    assert f"run directory: {run}" in out
    saved = OmegaConf.load(run / "config.yaml")
    # the saved config is the recipe with the CLI's values, as scripts/pretrain.py writes it
    assert saved.model.embed_dim == 16 and saved.data.batch_size == 8 and saved.trainer.max_steps == 2
    assert saved.trainer.gradient_clip_val == 5.0 and saved.simmim.mask_patch_size == 16
    assert set(saved) == set(load_config("pretrain"))
    encoder = torch.load(run / "encoder.pth", weights_only=False)
    assert encoder["config"]["model"]["embed_dim"] == 16
    assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "reconstructions").glob("*.png"))

    # validate: the checkpoint of --ckpt_path (before: the run's newest, whatever was passed), nothing written
    other = tmp_path / "other.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", other)
    files = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    out = cli("validate", "--stage", "pretrain", *FAST, "--model.model.embed_dim=16", "--model.model.num_heads=[2,2,4,8]",
              f"--run.output_dir={tmp_path}/pre", f"--ckpt_path={other}", cwd=tmp_path)
    assert f"Restoring states from the checkpoint path at {other}" in out and "val/loss" in out
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == files
    # a module argument other than the checkpoint's: Lightning applied the checkpoint's and measured that model
    result = subprocess.run([*CLI, "validate", "--stage", "pretrain", *FAST, "--model.model.norm_mode=pre_norm",
                             f"--ckpt_path={other}"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 1 and result.stderr == (
        "error: --model.model.norm_mode pre_norm: the checkpoint of --ckpt_path was trained with res_post_norm, and "
        "Lightning builds the module from its hyperparameters; drop --model.model.norm_mode\n"), result.stderr
    # fit --ckpt_path continues from that checkpoint (before: ignored, resume=auto chose)
    out = cli("fit", "--stage", "pretrain", *FAST, "--trainer.max_steps=3", "--model.model.embed_dim=16",
              "--model.model.num_heads=[2,2,4,8]", f"--run.output_dir={tmp_path}/pre",
              "--run.logging.recon_every_n_steps=0", f"--ckpt_path={other}", cwd=tmp_path)
    assert f"Restoring states from the checkpoint path at {other}" in out
    assert OmegaConf.load(run / "config.yaml").resume == str(other)

    out = cli("fit", "--stage", "finetune", *FAST, "--model.model.embed_dim=16", "--model.model.num_heads=[2,2,4,8]",
              f"--run.output_dir={tmp_path}/ft", f"--run.pretrained={run / 'encoder.pth'}",
              "--trainer.val_check_interval=2", cwd=tmp_path)  # a validation at step 2: its confusion matrix
    assert "reinitialized" in out  # the pretrained weights were loaded (the head is new)
    saved = OmegaConf.load(tmp_path / "ft" / "default" / "config.yaml")
    assert list(saved.model.pretrained_window_sizes) == [4, 4, 4, 2]  # Log-CPB handoff from the saved config
    assert saved.model.window_size == 8 and (tmp_path / "ft" / "default" / "confusion_matrix.png").is_file()

    # a checkpoint of the other stage: one line naming the stage it belongs to (before: jsonargparse's "does not
    # accept option 'model.layer_decay'", as Lightning applies its hyperparameters first)
    finetuned = tmp_path / "ft" / "default" / "checkpoints" / "last.ckpt"
    for command, stage, ckpt, belongs in (("validate", "pretrain", finetuned, "finetune"),
                                          ("fit", "finetune", other, "pretrain")):
        result = run_script("finetune.lightning_cli", command, "--stage", stage, f"--ckpt_path={ckpt}")
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith(
            f"error: --ckpt_path {ckpt} is not a checkpoint of the {stage} stage (its hyperparameters "), result.stderr
        assert result.stderr.strip().endswith(f"are not {stage} arguments); pass --stage {belongs}")


def test_print_config_and_recipe_choice():
    result = run_script("finetune.lightning_cli", "fit", "--stage", "pretrain", "--recipe", "base", "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    config = OmegaConf.create(result.stdout)
    assert config.model.model.embed_dim == 128 and config.model.model.window_size == 12
    assert config.data.img_size == 192 and config.run.output_dir == "runs/pretrain"
    assert config.trainer.precision == load_config("pretrain", "base").trainer.precision


def test_bad_stage_recipe_and_run_key_are_one_line(tmp_path):
    ckpt = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {}, "loops": {}}, ckpt)  # reads as a Lightning checkpoint
    for args, message in ((["--stage", "nope"], "unknown --stage 'nope'"),
                          (["--recipe", "nope"], "unknown pretrain recipe 'nope'"),
                          (["--run.outpt_dir=x"], "unknown key 'outpt_dir' in --run; did you mean output_dir?"),
                          (["--model.model.patch_size=2"], "--data.model_patch_size=4 disagrees with --model.model"),
                          (["--data.img_size=32", "--model.model.img_size=128"],  # both given: (--data.img_size
                           "--model.model.img_size 128 differs from --data.img_size 32"),  # alone: the model follows)
                          (["--ckpt_path=/no.ckpt"], "--ckpt_path /no.ckpt cannot be read (FileNotFoundError: "),
                          ([f"--ckpt_path={__file__}"], f"--ckpt_path {__file__} cannot be read ("),
                          ([f"--ckpt_path={ckpt}", "--run.resume=/x.ckpt"],
                           f"--ckpt_path {ckpt} and --run.resume /x.ckpt disagree; give one")):
        result = run_script("finetune.lightning_cli", "fit", *args)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr[-1000:]


def test_a_config_file_naming_some_model_keys_keeps_the_recipes_others(tmp_path):
    """`model: {model: {window_size: 8}}` in a --config file replaces the whole dict in jsonargparse; the recipe
    fills in the rest as for --model.model.window_size (before: "--data.model_patch_size=4 disagrees with
    --model.model (recipe key model.patch_size: None)"). validate then stops at its missing checkpoint, after the
    config has passed every check."""
    for value, message in (("8", f"error: validate needs a checkpoint: --ckpt_path PATH, or --run.output_dir and "
                                 f"--run.run_name of a run that has one ({tmp_path / 'default' / 'checkpoints'} has"),
                           ("abc", "error: --model.model.window_size abc: expected an integer, as the default 4")):
        (tmp_path / "some.yaml").write_text(f"model:\n  model:\n    window_size: {value}\n")
        result = run_script("finetune.lightning_cli", "validate", "--config", str(tmp_path / "some.yaml"),
                            f"--run.output_dir={tmp_path}")
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-1000:]
    # --print_config shows the dict the run uses (before: the file's one key; the run filled in the rest)
    result = run_script("finetune.lightning_cli", "fit", "-c", str(tmp_path / "some.yaml"),
                        "--model.model.embed_dim=24", "--print_config")
    printed = OmegaConf.create(result.stdout).model.model
    assert result.returncode == 0 and printed.window_size == "abc" and printed.embed_dim == 24  # later options win
    recipe, others = load_config("pretrain").model, set(printed) - {"window_size", "embed_dim"}  # the first stage
    assert len(others) > 20 and all(printed[key] == recipe[key] for key in others)


def test_the_model_follows_data_img_size(tmp_path):
    """--data.img_size 32 alone stopped at "--model.model.img_size 64 differs from --data.img_size 32; set
    data.img_size", which the user had; the model follows it, as in the scripts. validate then stops at its missing
    checkpoint, after the config passed every check."""
    result = run_script("finetune.lightning_cli", "validate", "--data.img_size=32", "--data.mask_patch_size=8",
                        f"--run.output_dir={tmp_path}")
    assert result.stderr.strip().splitlines()[-1].startswith("error: validate needs a checkpoint"), result.stderr


def test_parser_errors_are_one_line(tmp_path):
    """jsonargparse's errors printed the whole usage (100 lines) and a block of text; a YAML error in a --config
    file named "<unicode string>" instead of the file; a recipe given as --config says to pass it as --recipe."""
    (tmp_path / "broken.yaml").write_text("trainer:\n  max_epochs: [1\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "recipe.yaml").write_text("based_on: tiny\ntrainer:\n  max_epochs: 2\n")
    for args, line in (
            (["--trainer.max_epochs=abc"], "error: --trainer.max_epochs abc: expected an integer or null (PROG fit "),
            (["--data.batch_size=abc"], "error: --data.batch_size abc: expected an integer (PROG fit --help lists the"),
            (["--trainer.fast_dev_run=x"], "error: --trainer.fast_dev_run x: expected an integer, true or false ("),
            (["--bogus=1"], "error: unrecognized arguments: --bogus=1 (PROG fit --help lists the options)"),
            (["--trainer.max_epoch=1"], "error: unrecognized arguments: --trainer.max_epoch=1"),  # was max_epochs
            (["--trainer.devices=-3"], "error: --trainer.devices -3: expected an integer > 0, -1 (every device)"),
            (["--config", str(tmp_path / "broken.yaml")],
             f"error: {tmp_path / 'broken.yaml'}, line 3: YAML syntax error (did not find expected ',' or ']')"),
            (["--config", str(tmp_path / "empty.yaml")],  # was jsonargparse's "Unexpected config"
             f"error: --config {tmp_path / 'empty.yaml'} holds no options; expected a mapping of them, such as "),
            (["--config", str(tmp_path / "recipe.yaml")],  # was jsonargparse's "Option 'based_on' is not accepted"
             f"error: --config {tmp_path / 'recipe.yaml'}: based_on is a recipe's key (a recipe has the scripts' "
             f"sections, model.KEY and optim.KEY, not this CLI's); pass the file as --recipe "
             f"{tmp_path / 'recipe.yaml'}"),
            ([f"--config={tmp_path / 'none.yaml'}"],
             f"error: --config {tmp_path / 'none.yaml'}: no such file; pass a YAML file (--print_config writes one)"),
            (["--model.model.embed_dimm=16"],  # was SwinTransformerV2's TypeError traceback
             "error: unknown key 'embed_dimm' in --model.model; did you mean embed_dim?")):
        result = run_script("finetune.lightning_cli", "fit", *args)  # the program's name: its argv[0]
        lines = [line for line in result.stderr.splitlines() if line and not line.startswith("Seed set")]
        expected = line.replace("PROG", "finetune.lightning_cli")
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(expected), result.stderr[-2000:]


def test_errors_name_the_cli_options_not_the_scripts_keys(tmp_path):
    """A run directory in use: the way out is said as this CLI takes it (before: `pass run_name=NEW`)."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "default").mkdir()
        (tmp_path / "default" / "run.lock").write_text(f"{socket.gethostname()} {other.pid}\n")
        result = run_script("finetune.lightning_cli", "fit", f"--run.output_dir={tmp_path}")
    finally:
        other.kill()
        other.wait()
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and f"is in use by pid {other.pid}" in last, result.stderr[-1000:]
    assert "pass --run.run_name NEW for another run" in last


def test_validate_needs_a_checkpoint_and_test_predict_are_not_offered(tmp_path):
    """The stages have no test or predict step: the CLI offers fit and validate (before: a traceback from
    Lightning, after the run directory's config.yaml had been rewritten); validate of no batch is refused."""
    for args, message in ((["validate", f"--run.output_dir={tmp_path}"], "validate needs a checkpoint: --ckpt_path"),
                          (["test"], "invalid choice: 'test' (choose from 'fit', 'validate')"),
                          # Lightning validated no batch and printed nothing, with exit status 0
                          (["validate", f"--run.output_dir={tmp_path}", "--trainer.limit_val_batches", "0"],
                           "--trainer.limit_val_batches 0: validate would run no batch and print no metric")):
        result = run_script("finetune.lightning_cli", *args)
        assert result.returncode != 0
        assert message in result.stderr.strip().splitlines()[-1], result.stderr[-1000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_validate_takes_the_image_size_of_the_checkpoint(tmp_path):
    """validate --ckpt_path of a 32 px fine-tune, without --data.img_size: the data follows the checkpoint's model
    (it stopped at "--model.model.img_size 32 differs from --data.img_size 64")."""
    import finetune.train as finetune_script

    finetune_script.main([f"output_dir={tmp_path}", "run_name=f", "pretrained=null", "data.img_size=32",
                          "model.embed_dim=16", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                          "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=8"])
    out = cli("validate", "--stage", "finetune", "--ckpt_path", str(tmp_path / "f" / "checkpoints" / "last.ckpt"),
              "--run.pretrained", "null", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              "--data.num_workers=0", cwd=tmp_path)
    assert "val/top1" in out and "on_before_batch_transfer" not in out  # nor Lightning's warning of two hooks


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_explicit_null_counts_as_given_against_the_checkpoint(tmp_path):
    """--model.ema_decay null is the recipe's value, so it was not seen as given: validate of a checkpoint trained
    with an EMA dropped it without a word (Lightning builds the module from the checkpoint's 0.9). Refused instead,
    as any other value the checkpoint was not trained with."""
    import finetune.train as finetune_script

    finetune_script.main([f"output_dir={tmp_path}", "run_name=f", "pretrained=null", "data.img_size=32",
                          "model.embed_dim=16", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                          "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=8",
                          "train.ema_decay=0.9"])
    result = run_script("finetune.lightning_cli", "validate", "--stage", "finetune", "--ckpt_path",
                        str(tmp_path / "f" / "checkpoints" / "last.ckpt"), "--run.pretrained", "null",
                        "--model.ema_decay", "null", "--trainer.limit_val_batches=1", "--data.num_workers=0")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "error: --model.ema_decay null: the checkpoint of --ckpt_path was trained with 0.9, and Lightning builds the "
        "module from its hyperparameters; drop --model.ema_decay"), result.stderr[-2000:]
    # without --ckpt_path, validate takes the run directory's newest checkpoint: its EMA weights met a module without
    # one (a traceback of unexpected state-dict keys)
    result = run_script("finetune.lightning_cli", "validate", "--stage", "finetune", "--run.output_dir", str(tmp_path),
                        "--run.run_name", "f", "--run.pretrained", "null", "--data.img_size=32",
                        "--model.model.embed_dim=16", "--model.ema_decay", "null", "--trainer.limit_val_batches=1",
                        "--data.num_workers=0")
    assert result.returncode == 1 and re.fullmatch(
        r"error: cannot validate .*last.ckpt: it was trained with --model.ema_decay 0.9, this run asks for null; "
        r"its EMA weights are saved only when it had them: give --model.ema_decay 0.9 as it was, or pass "
        r"--run.run_name NEW to start another run", result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]


@pytest.mark.slow
def test_a_number_of_batches_stays_an_integer(tmp_path, monkeypatch):
    """typing's cache of unions can give the Trainer's Optional[Union[int, float]] arguments as Union[float, int,
    None] (lightning_fabric's Optional[Union[float, int]], where it is still cached as pytorch_lightning is imported:
    it depends on the packages installed). jsonargparse, trying float first, read --trainer.limit_val_batches 2 as
    2.0 ("expected a fraction of the epoch's batches in [0, 1] or a number of batches >= 0") and 1 as 1.0, the whole
    epoch. With the annotations made so here, fit and validate take 2 as 2 batches, and 0.5 is still a fraction."""
    import pytorch_lightning as pl

    from simmim.train.lightning_cli import RecipeCLI

    hints = pl.Trainer.__init__.__annotations__
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                 "overfit_batches", "val_check_interval"):  # a flat Union[...] keeps the order given
        monkeypatch.setitem(hints, name, typing.Union[tuple(sorted(typing.get_args(hints[name]),
                                                                    key=lambda arg: arg is not float))])
    trainers, instantiate = [], RecipeCLI.instantiate_trainer
    monkeypatch.setattr(RecipeCLI, "instantiate_trainer", lambda self, **kwargs: trainers.append(
        instantiate(self, **kwargs)) or trainers[-1])
    tiny = ["--stage", "pretrain", "--trainer.enable_progress_bar=false", "--data.num_workers=0", "--data.batch_size=8",
            "--model.model.embed_dim=16", "--model.model.num_heads=[2,2,4,8]", f"--run.output_dir={tmp_path}",
            "--run.eval.knn_every_n_epochs=0"]
    result = run_script("finetune.lightning_cli", "fit", *tiny, "--trainer.max_epochs=1",
                        "--run.logging.recon_every_n_steps=0", "--trainer.limit_train_batches", "2",
                        "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    fit = trainers[-1]
    assert (fit.num_training_batches, fit.val_check_batch, fit.num_val_batches) == (2, 1, [2])
    for given in ("2", "0.5"):
        result = run_script("finetune.lightning_cli", "validate", *tiny, "--trainer.limit_val_batches", given,
                            "--ckpt_path", str(tmp_path / "default" / "checkpoints" / "last.ckpt"))
        assert result.returncode == 0, result.stderr[-2000:]
        every = len(trainers[-1].val_dataloaders)
        assert trainers[-1].num_val_batches == [2 if given == "2" else every // 2] and every > 4


@pytest.mark.slow
def test_validate_without_the_runs_model_names_its_values(tmp_path):
    """validate of a 2-stage fine-tune without its model values (the recipe's 4 stages) and with its pretrained file
    gone took the run's 2 Log-CPB windows from its checkpoint for the recipe's model: SwinTransformerV2's "depths,
    num_heads and pretrained_window_sizes need one entry per stage; got [2, 2, 2, 2], [2, 4, 8, 16], [4, 4]". Now the
    check against the run's config says so, naming every value that differs (it named one, a different one from run
    to run); given them, validate runs."""
    import finetune.train as finetune_script

    finetune_script.main([f"output_dir={tmp_path}", "run_name=f", "pretrained=null", "data.img_size=32",
                          "model.embed_dim=16", "model.depths=[2,2]", "model.num_heads=[2,4]",
                          "model.pretrained_window_sizes=[4,4]", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                          "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=8"])
    args = ["validate", "--stage", "finetune", "--run.output_dir", str(tmp_path), "--run.run_name", "f",
            "--run.pretrained", str(tmp_path / "gone.pth"), "--data.img_size=32", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--data.num_workers=0"]
    result = run_script("finetune.lightning_cli", *args)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: cannot validate {tmp_path}/f/checkpoints/last.ckpt: it was trained with --model.model.depths [2, 2], "
        f"--model.model.embed_dim 16, --model.model.num_heads [2, 4], --model.model.pretrained_window_sizes [4, 4], "
        f"this run asks for [2, 2, 2, 2], 32, [2, 4, 8, 16], null; pass the recipe and model values of that run "
        f"(--recipe, --model.*, --run.pretrained)"), result.stderr[-2000:]
    result = run_script("finetune.lightning_cli", *args, "--model.model.embed_dim=16", "--model.model.depths=[2,2]",
                        "--model.model.num_heads=[2,4]")
    assert result.returncode == 0 and "val/top1" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_the_ckpt_path_checkpoint_is_read_once_by_us(tmp_path, monkeypatch):
    """fit and validate --ckpt_path read the checkpoint in RecipeCLI.__init__ (the stage check) and read it again
    for the run (prepare_run / _validation_trainer): now the first read is passed on. Lightning's own reads (the
    hyperparameters, weights_only; the restore, from an open file) are not ours (read_resumable maps it: mmap)."""
    tiny = ["--stage", "pretrain", "--trainer.enable_progress_bar=false", "--data.num_workers=0", "--data.batch_size=8",
            "--model.model.embed_dim=16", "--model.model.num_heads=[2,2,4,8]", f"--run.output_dir={tmp_path}",
            "--run.logging.recon_every_n_steps=0", "--run.eval.knn_every_n_epochs=0", "--trainer.limit_val_batches=1"]
    result = run_script("finetune.lightning_cli", "fit", *tiny, "--trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = tmp_path / "elsewhere.ckpt"  # outside the run directory, whose checkpoints a resume=PATH also reads
    shutil.copy(tmp_path / "default" / "checkpoints" / "last.ckpt", ckpt)
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *args, **kwargs: reads.append((f, kwargs.get("mmap"))) or load(
        f, *args, **kwargs))
    for command, more in (("fit", ["--trainer.max_steps=2"]), ("validate", [])):
        reads.clear()
        result = run_script("finetune.lightning_cli", command, *tiny, *more, f"--ckpt_path={ckpt}")
        assert result.returncode == 0, result.stderr[-2000:]
        ours = [f for f, mmap in reads if mmap and str(f) == str(ckpt)]
        assert len(ours) == 1, (command, reads)


@pytest.mark.slow
def test_validate_of_a_checkpoint_needs_no_pretrained_file(tmp_path):
    """validate --ckpt_path of a fine-tune whose pretrained file is gone, from another run directory than the
    recipe's: the checkpoint holds the weights and the Log-CPB windows, but the pretrained file was looked for (and
    the run directory's checkpoint in its stead): "pretrained=... does not exist; run scripts/pretrain.py first".
    The windows now come from the --ckpt_path checkpoint, as a resume's do."""
    import finetune.train as finetune_script

    finetune_script.main([f"output_dir={tmp_path}", "run_name=f", "pretrained=null", "data.img_size=32",
                          "model.embed_dim=16", "model.pretrained_window_sizes=[2,2,2,2]", "trainer.max_steps=1",
                          "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "data.num_workers=0",
                          "data.batch_size=8"])
    with pytest.warns(UserWarning, match=r"gone.pth no longer exists; this run takes its weights and Log-CPB windows "
                                         r"from .*last.ckpt"):
        result = run_script("finetune.lightning_cli", "validate", "--stage", "finetune", "--ckpt_path",
                            str(tmp_path / "f" / "checkpoints" / "last.ckpt"), "--run.pretrained",
                            str(tmp_path / "gone.pth"), "--trainer.limit_val_batches=1",
                            "--trainer.enable_progress_bar=false", "--data.num_workers=0")
    assert result.returncode == 0 and "val/top1" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_validate_does_not_need_a_full_training_batch(tmp_path):
    """validate of a pretraining run on 6 training images at the recipe's batch of 64 refused with the training
    check "only 6 training images, fewer than data.batch_size=64 (every batch is full)"; validate trains no batch."""
    import simmim.pretrain as pretrain_script
    from test_validate import write_images

    for split in ("train", "val"):
        write_images(tmp_path / "data" / split, 6 if split == "train" else 2)
    data = [f"--data.root={tmp_path / 'data'}", "--data.source=folder", "--data.num_workers=0"]
    pretrain_script.main([f"output_dir={tmp_path}", "run_name=p", f"data.root={tmp_path / 'data'}",
                          "data.source=folder", "data.img_size=32", "data.batch_size=2", "model.embed_dim=16",
                          "simmim.mask_patch_size=8",
                          "trainer.max_steps=1", "trainer.enable_progress_bar=false", "data.num_workers=0",
                          "eval.knn_every_n_epochs=0", "logging.recon_every_n_steps=0"])
    result = run_script("finetune.lightning_cli", "validate", "--stage", "pretrain", "--ckpt_path",
                        str(tmp_path / "p" / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar=false",
                        "--data.mask_patch_size=8", *data)
    assert result.returncode == 0 and "val/loss" in result.stdout, result.stderr[-2000:]
