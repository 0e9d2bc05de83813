"""Fine-tune a pretrained SwinV2 encoder for classification, usually at a larger image and window size.

    python scripts/finetune.py                                     # the demo: digits at 64 px / window 8
    python scripts/finetune.py pretrained=null run_name=scratch    # the same recipe from scratch
    python scripts/finetune.py recipe=base pretrained=runs/pretrain/base/encoder.pth data.root=/data/imagenet

Arguments are key=value, as for scripts/pretrain.py. Log-CPB transfer: the model is built with
model.pretrained_window_sizes, read from the checkpoint's saved config when not given.
"""
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

from finetune.module import ClassificationDataModule, SwinV2Classifier
from simmim.data.datamodule import LogSkipped
from simmim.models.checkpoint import (check_weights_meaning, load_pretrained, pretrained_window_sizes,
                                      read_checkpoint, saved_model_config, stage_windows)
from simmim.train.config import ConfigError
from simmim.train.resume import checkpoint_to_resume
from simmim.train.run_dir import launch_rank
from simmim.train.stage import Stage, run_stage, section
from simmim.train.validate import validate_labels


def read_pretrained(cfg) -> dict | None:
    """The `pretrained` checkpoint, read once (the windows and the weights come from it); fills
    model.pretrained_window_sizes from its saved config when the recipe leaves it null (the Log-CPB transfer)."""
    if not cfg.pretrained:
        return None
    if Path(cfg.pretrained).is_dir() and not (Path(cfg.pretrained) / "config.json").is_file():
        raise ConfigError(f"pretrained={cfg.pretrained} is a folder without config.json (not a transformers Swinv2 "
                          f"folder); pass a checkpoint file in it (a pretraining run directory holds encoder.pth), "
                          f"or pretrained=null to train from scratch")
    if not Path(cfg.pretrained).exists():
        with warnings.catch_warnings():  # a bad newer checkpoint is named by prepare_run, which looks again
            warnings.simplefilter("ignore")
            resumed = checkpoint_to_resume(cfg)
        if resumed is not None:  # its weights come from there: so can its windows
            windows = (saved_model_config(resumed.checkpoint or {}) or {}).get("pretrained_window_sizes")
            # of a model of other stages: the resume's model check names the difference (it was SwinTransformerV2's
            # "need one entry per stage", as the Lightning CLI builds the module first)
            if cfg.model.pretrained_window_sizes is None and windows is not None \
                    and len(windows) == len(cfg.model.depths):
                cfg.model.pretrained_window_sizes = list(windows)
            rank_zero_warn(f"pretrained={cfg.pretrained} no longer exists; this run takes its weights and Log-CPB "
                           f"windows from {resumed.path}")
            return None
        raise ConfigError(f"pretrained={cfg.pretrained} does not exist; run scripts/pretrain.py first, pass "
                          f"another checkpoint, or pretrained=null to train from scratch")
    checkpoint = read_checkpoint(cfg.pretrained)
    check_weights_meaning(checkpoint, cfg.model, f"pretrained={cfg.pretrained}", "set model.{key}={trained}")
    windows = pretrained_window_sizes(checkpoint)
    given = cfg.model.pretrained_window_sizes
    if given is not None and windows is not None and list(given) != windows:
        raise ConfigError(f"model.pretrained_window_sizes={list(given)}: pretrained={cfg.pretrained} was trained at "
                          f"windows {windows}, which scale its Log-CPB coordinates; drop the override (they are read "
                          f"from the checkpoint)")
    if given is None:
        if windows is None:
            rank_zero_warn(f"{cfg.pretrained} does not say which windows it was pretrained with; set "
                           f"model.pretrained_window_sizes=[...] (e.g. [12,12,12,6] for 192 px / window 12) for the "
                           f"Log-CPB transfer")
        elif len(windows) != len(cfg.model.depths):
            raise ConfigError(f"pretrained={cfg.pretrained} holds a SwinV2 of {len(windows)} stages, model.depths="
                              f"{list(cfg.model.depths)} builds {len(cfg.model.depths)}; give the pretrained model's "
                              f"depths and num_heads (model.variant, or model.depths and model.num_heads)")
        else:
            cfg.model.pretrained_window_sizes = windows
    return checkpoint


def load_weights(module: SwinV2Classifier, cfg, run_dir: Path, resuming: bool, checkpoint: dict | None) -> None:
    """The pretrained weights into a fresh run (a resumed run has its own); the confusion matrix goes to run_dir."""
    module.hparams.confusion_matrix_path = str(run_dir / "confusion_matrix.png")
    if checkpoint is not None and not resuming:
        report = load_pretrained(module.model, checkpoint)  # every rank loads; rank 0 says so
        if launch_rank() == 0:
            print(f"loaded {cfg.pretrained}\n{report}\nLog-CPB windows: pretrained "
                  f"{list(cfg.model.pretrained_window_sizes or stage_windows(cfg.model))} -> now "
                  f"{stage_windows(cfg.model)} (per stage)")


def check_labels(data: ClassificationDataModule, cfg) -> None:
    """Every label of a listed source a class of model.num_classes, before training (streamed shards are checked
    as they come); a warning when the training labels use fewer of the classes (a head of the recipe's size on
    fewer classes: its extra outputs are never a target, and top-5 counts them)."""
    if cfg.data.source == "shards":
        return
    for split, dataset in (("train", data.train_set), ("val", data.val_set)):
        validate_labels(dataset.samples, cfg.model.num_classes, f"the {split} split of data.source={cfg.data.source}")
    if (used := int(data.train_set.labels.max()) + 1) < cfg.model.num_classes:
        rank_zero_warn(f"model.num_classes={cfg.model.num_classes}: the training labels are 0..{used - 1}, so "
                       f"{cfg.model.num_classes - used} of the head's classes are never a target; set "
                       f"model.num_classes={used} unless the data is a subset of more classes")


def held_out_top1(trainer: pl.Trainer, module, cfg, run_dir: Path) -> list[str]:
    top1 = trainer.callback_metrics.get("val/top1")
    if top1 is not None:
        return [f"held-out top-1 (last validation): {float(top1):.4f}"]
    best = next((c.best_model_score for c in trainer.checkpoint_callbacks if c.monitor == "val/top1"), None)
    if best is not None:  # a rerun of a finished run validates nothing: the best its checkpoints recorded
        return [f"held-out top-1: no validation in this start; the run's best: {float(best):.4f} (best.ckpt)"]
    return ["held-out top-1 (last validation): none (no validation ran)"]


def stage() -> Stage:
    """Fine-tuning as `simmim.train.stage` runs it."""
    return Stage(name="finetune", module=SwinV2Classifier, datamodule=ClassificationDataModule,
                 module_keys=lambda cfg: {"model": "model", **section(cfg, "optim"), **section(cfg, "train")},
                 data_keys=lambda cfg: {**section(cfg, "data"), "seed": "seed"}, monitor="val/top1", mode="max",
                 prepare=read_pretrained, check_data=check_labels, setup=load_weights, callbacks=lambda cfg, run_dir, data: [LogSkipped()],
                 finish=held_out_top1)


def main(argv: list[str]) -> None:
    run_stage(stage(), argv, __doc__)
