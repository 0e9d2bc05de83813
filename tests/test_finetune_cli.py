"""Pretrain -> fine-tune end to end with a window change (4 -> 8), through both scripts."""
import pytest
import torch
from omegaconf import OmegaConf

from simmim.train.config import ConfigError

import finetune.train as finetune_script
import simmim.pretrain as pretrain

SMALL = ["data.batch_size=8", "data.num_workers=0", "model.embed_dim=16", "model.num_heads=[2,2,4,8]",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_pretrain_then_finetune_at_a_larger_window(tmp_path, capsys):
    pretrain.main([f"output_dir={tmp_path}/pre", "run_name=p", "logging.recon_every_n_steps=0", *SMALL])
    encoder = tmp_path / "pre" / "p" / "encoder.pth"
    capsys.readouterr()

    finetune_script.main([f"output_dir={tmp_path}/ft", "run_name=f", f"pretrained={encoder}", *SMALL])
    printed = capsys.readouterr().out
    run = tmp_path / "ft" / "f"
    saved = OmegaConf.load(run / "config.yaml")
    assert list(saved.model.pretrained_window_sizes) == [4, 4, 4, 2]  # from the pretraining run's config
    assert saved.model.window_size == 8 and saved.model.img_size == 64
    assert "held-out top-1" in printed and "reinitialized" in printed
    assert "Log-CPB windows: pretrained [4, 4, 4, 2] -> now [8, 8, 4, 2] (per stage)" in printed
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "confusion_matrix.png").is_file()

    # the fine-tuned model started from the pretrained encoder: blocks equal before training moved them
    pretrained = torch.load(encoder, weights_only=True)["model"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["model"]["pretrained_window_sizes"] == [4, 4, 4, 2]
    key = "layers.3.blocks.1.attn.cpb_mlp.0.weight"
    moved = (ckpt["state_dict"][f"model.{key}"] - pretrained[f"encoder.{key}"]).abs().max()
    assert moved < 1e-3  # two AdamW steps at lr <= 8e-5 from the pretrained weights (a fresh init is ~0.05 away)

    # windows other than those the encoder was trained at would scale its Log-CPB coordinates wrongly: refused
    with pytest.raises(ConfigError, match=r"model.pretrained_window_sizes=\[8, 8, 8, 8\]: pretrained=.*encoder.pth was "
                                          r"trained at windows \[4, 4, 4, 2\], which scale its Log-CPB coordinates"):
        finetune_script.main([f"output_dir={tmp_path}/ft", "run_name=w", f"pretrained={encoder}",
                              "model.pretrained_window_sizes=[8,8,8,8]", *SMALL])
    assert not (tmp_path / "ft" / "w").exists()


@pytest.mark.slow
def test_finetune_from_a_transformers_folder(tmp_path, capsys):
    """pretrained= a transformers Swinv2 folder (how the Hub holds microsoft's SwinV2 weights): the windows it was
    trained with come from its config.json (window 4 at 64 px: [4, 4, 4, 2], fine-tuned at window 8) and the
    encoder starts from its weights."""
    import transformers
    from conftest import randomize_

    config = transformers.Swinv2Config(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2],
                                       num_heads=[2, 2, 4, 8], window_size=4)
    randomize_(transformers.Swinv2Model(config), seed=5).save_pretrained(tmp_path / "hf")
    finetune_script.main([f"output_dir={tmp_path}/ft", "run_name=f", f"pretrained={tmp_path / 'hf'}", *SMALL])
    assert "pretrained weights (hf layout)" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "ft" / "f" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["model"]["pretrained_window_sizes"] == [4, 4, 4, 2]
    pretrained = transformers.Swinv2Model.from_pretrained(tmp_path / "hf").state_dict()
    theirs = pretrained["encoder.layers.3.blocks.1.attention.self.continuous_position_bias_mlp.0.weight"]
    moved = (ckpt["state_dict"]["model.layers.3.blocks.1.attn.cpb_mlp.0.weight"] - theirs).abs().max()
    assert moved < 1e-3  # two AdamW steps at lr <= 8e-5 from the pretrained weights


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; run scripts/pretrain.py first"):
        finetune_script.main([f"output_dir={tmp_path}", f"pretrained={tmp_path}/none.pth"])
    with pytest.raises(ConfigError, match=r"is a folder without config.json \(not a transformers Swinv2 folder\); "
                                          r"pass a checkpoint file in it .*encoder.pth"):
        finetune_script.main([f"output_dir={tmp_path}", f"pretrained={tmp_path}"])  # was: "does not exist"


def test_pretrained_model_of_other_stages_is_a_clear_error(tmp_path):
    """A 2-stage encoder into the 4-stage default (was: "depths, num_heads and pretrained_window_sizes need one
    entry per stage; got [2, 2, 2, 2], [2, 4, 8, 16], [8, 8]", with no word of which key to set)."""
    config = {"model": {"img_size": 32, "patch_size": 2, "window_size": 8, "depths": [2, 2], "num_heads": [2, 4]}}
    torch.save({"model": {}, "config": config}, tmp_path / "two_stages.pth")
    with pytest.raises(ConfigError, match=r"pretrained=.*two_stages.pth holds a SwinV2 of 2 stages, model.depths="
                                          r"\[2, 2, 2, 2\] builds 4; give the pretrained model's depths and num_heads"):
        finetune_script.main([f"output_dir={tmp_path}", f"pretrained={tmp_path / 'two_stages.pth'}"])
    assert not (tmp_path / "default").exists()


def test_unreadable_pretrained_file_is_a_clear_error(tmp_path):
    """A truncated checkpoint and a file of junk (were OSError and KeyError tracebacks from torch.load)."""
    torch.save({"model": {f"w{i}": torch.ones(1000) for i in range(5)}}, tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:5000])
    (tmp_path / "junk.pth").write_text("junk\n")
    for name in ("truncated.pth", "junk.pth"):
        with pytest.raises(ValueError, match=rf"cannot read .*{name} as a PyTorch checkpoint \(\w+: .*\); pass a "
                                             rf"file written by torch.save, whole"):
            finetune_script.main([f"output_dir={tmp_path}", f"pretrained={tmp_path / name}"])


def test_every_finetune_recipe_resolves_and_builds_on_meta():
    from finetune.module import SwinV2Classifier
    from simmim.train.config import available_recipes, load_config

    assert set(available_recipes("finetune")) >= {"default", "tiny", "small", "base", "large", "huge", "giant"}
    for name in available_recipes("finetune"):
        cfg = load_config("finetune", name)
        with torch.device("meta"):
            SwinV2Classifier(model=OmegaConf.to_container(cfg.model), **OmegaConf.to_container(cfg.optim),
                             **OmegaConf.to_container(cfg.train))
    base = load_config("finetune", "base")
    assert (base.model.img_size, base.model.window_size, list(base.model.pretrained_window_sizes)) == (224, 14, [12, 12, 12, 6])
    assert (base.optim.base_lr, base.optim.layer_decay, base.optim.warmup_epochs, base.trainer.max_epochs) == (1.25e-3, 0.75, 20, 100)
    with pytest.raises(ConfigError, match=r"unknown key 'train.mixupp' .*did you mean train.mixup"):
        load_config("finetune", "default", ["train.mixupp=0.5"])


@pytest.mark.slow
def test_class_folder_names_reach_the_checkpoint_and_the_exports(tmp_path):
    """Fine-tuned on class folders: the checkpoint records label i's folder name, and the exports carry it (they
    wrote LABEL_i into transformers' id2label); through the official layout and back too."""
    import json

    import cv2
    import numpy as np

    from simmim.models.checkpoint import class_names, read_checkpoint
    from simmim.tools.export import main as export

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        for i in range(4):
            (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "images" / name / f"{i}.png"), rng.integers(0, 256, (40, 40, 3), np.uint8))
    finetune_script.main([f"output_dir={tmp_path}", "run_name=f", "pretrained=null", "data.source=folder",
                          f"data.root={tmp_path / 'images'}", "model.num_classes=3", *SMALL])
    ckpt = tmp_path / "f" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["class_names"] == ["cat", "dog", "fox"]
    export([f"checkpoint={ckpt}", "format=hf", f"out={tmp_path / 'hf'}"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"} and config["label2id"]["fox"] == 2
    export([f"checkpoint={tmp_path / 'hf'}", "format=official", f"out={tmp_path / 'official.pth'}"])
    export([f"checkpoint={tmp_path / 'official.pth'}", "format=timm", f"out={tmp_path / 'timm.safetensors'}"])
    assert class_names(read_checkpoint(tmp_path / "timm.safetensors")) == ["cat", "dog", "fox"]


@pytest.mark.slow
def test_epochs_without_validation_are_saved_and_reruns_say_what_the_run_has(tmp_path, capsys):
    """Validation every 3rd epoch (recipe few_labels: every 10th): last.ckpt still comes at each epoch's end (it
    came only after a validation: a 2-epoch run saved nothing), and no confusion matrix of the sanity check's
    untrained model is written. A rerun of the finished run prints the best held-out top-1 it recorded (was "none");
    one with EMA switched on, or fewer epochs than it trained, is one line (was a traceback); other augmentation
    settings are named in a warning."""
    args = [f"output_dir={tmp_path}", "run_name=f", "pretrained=null", *SMALL]
    finetune_script.main([*args, "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=3"])
    assert torch.load(tmp_path / "f" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (tmp_path / "f" / "confusion_matrix.png").exists()

    args[1] = "run_name=g"
    finetune_script.main([*args, "trainer.max_epochs=3"])
    capsys.readouterr()
    finetune_script.main([*args, "trainer.max_epochs=3"])
    assert "held-out top-1: no validation in this start; the run's best: " in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"cannot resume .*last.ckpt: it was trained with train.ema_decay=null, this "
                                          r"run asks for 0.99; its EMA weights are saved only when it had them"):
        finetune_script.main([*args, "trainer.max_epochs=3", "train.ema_decay=0.99"])
    with pytest.raises(ConfigError, match=r"cannot resume .*last.ckpt: it is at epoch 2 \(counted from 0\), past "
                                          r"trainer.max_epochs=1; pass trainer.max_epochs=2 or more"):
        finetune_script.main([*args, "trainer.max_epochs=1"])
    with pytest.warns(UserWarning, match=r"resuming .*last.ckpt with other settings than it was trained with: "
                                         r"data.randaug_ops 0 -> 2, train.label_smoothing 0.1 -> 0.2; the rest of "):
        finetune_script.main([*args, "trainer.max_epochs=3", "data.randaug_ops=2", "train.label_smoothing=0.2"])


def test_a_fine_tune_into_a_pretraining_run_directory_says_so(tmp_path):
    """run_name of a pretraining run: the stage is named first, with the fix (was a chain of model differences
    ending in "pass ... resume=auto", which was in use)."""
    pretrain.main([f"output_dir={tmp_path}", "run_name=p", "logging.recon_every_n_steps=0", *SMALL])
    with pytest.raises(ConfigError, match=r"it is a lightning-simmim checkpoint, not one of a fine-tuning run; "
                                          r".*p is a run directory of that stage: give this run another run_name"):
        finetune_script.main([f"output_dir={tmp_path}", "run_name=p", "pretrained=null", *SMALL])


@pytest.mark.slow
def test_a_resume_goes_on_when_the_pretrained_file_is_gone(tmp_path, capsys):
    """The encoder a run was fine-tuned from, moved or deleted: the resume (whose weights and windows come from its
    checkpoint) goes on with a warning; it stopped at "pretrained=... does not exist"."""
    pretrain.main([f"output_dir={tmp_path}/pre", "run_name=p", "logging.recon_every_n_steps=0", *SMALL])
    encoder = tmp_path / "pre" / "p" / "encoder.pth"
    args = [f"output_dir={tmp_path}/ft", "run_name=f", f"pretrained={encoder}", *SMALL]
    finetune_script.main(args)
    encoder.unlink()
    with pytest.warns(UserWarning, match=r"pretrained=.*encoder.pth no longer exists; this run takes its weights and "
                                         r"Log-CPB windows from .*last.ckpt"):
        finetune_script.main([*args, "trainer.max_epochs=2"])
    ckpt = torch.load(tmp_path / "ft" / "f" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["model"]["pretrained_window_sizes"] == [4, 4, 4, 2]
    with pytest.raises(ConfigError, match="does not exist; run scripts/pretrain.py first"):  # a fresh run needs it
        finetune_script.main([*args[:1], "run_name=g", *args[2:]])


def test_fewer_training_classes_than_the_head_are_warned_of():
    """A 2-class folder fine-tuned with the recipe's model.num_classes=10 said nothing (held-out top-5 0.5 counted
    classes the data does not have)."""
    import warnings
    from types import SimpleNamespace

    import numpy as np

    from simmim.data.datasets import ImageDataset
    from simmim.data.transforms import eval_transform

    samples = [(np.zeros((8, 8, 3), np.uint8), label) for label in (0, 1, 1, 0)]
    data = SimpleNamespace(train_set=ImageDataset(samples, eval_transform(8)),
                           val_set=ImageDataset(samples[:2], eval_transform(8)))
    cfg = OmegaConf.create({"data": {"source": "folder"}, "model": {"num_classes": 10}})
    with pytest.warns(UserWarning, match=r"^model.num_classes=10: the training labels are 0..1, so 8 of the head's "
                                         r"classes are never a target; set model.num_classes=2 unless"):
        finetune_script.check_labels(data, cfg)
    cfg.model.num_classes = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune_script.check_labels(data, cfg)
