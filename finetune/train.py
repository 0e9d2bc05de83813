"""Fine-tune a pretrained SwinV2 encoder for classification, usually at a larger image and window size.

    python scripts/finetune.py                                     # the demo: digits at 128 px / window 8
    python scripts/finetune.py pretrained=null run_name=scratch    # the same recipe from scratch
    python scripts/finetune.py recipe=base pretrained=runs/pretrain/base/encoder.pth data.root=/data/imagenet

Arguments are key=value, as for scripts/pretrain.py. Log-CPB transfer: the model is built with
model.pretrained_window_sizes, read from the checkpoint's saved config when not given.
"""
from pathlib import Path


import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_warn

from simmim.models.checkpoint import load_pretrained, pretrained_window_sizes, read_checkpoint
from finetune.module import ClassificationDataModule, SwinV2Classifier
from simmim.train.config import ConfigError, config_from_argv, prepare_run
from simmim.train.run_dir import start_run
from simmim.train.trainer import make_trainer
from simmim.train.validate import validate_labels


def resolve_window_sizes(cfg, checkpoint: dict) -> None:
    """Fill model.pretrained_window_sizes from the pretrained checkpoint when the recipe leaves it null."""
    if cfg.model.pretrained_window_sizes is not None:
        return
    windows = pretrained_window_sizes(checkpoint)
    if windows is None:
        rank_zero_warn(f"{cfg.pretrained} does not say which windows it was pretrained with; set "
                       f"model.pretrained_window_sizes=[...] (e.g. [12,12,12,6] for 192 px / window 12) for the "
                       f"Log-CPB transfer")
    else:
        cfg.model.pretrained_window_sizes = windows


def main(argv: list[str]) -> None:
    parsed = config_from_argv("finetune", argv, __doc__)
    if parsed is None:
        return
    cfg, print_config = parsed
    pretrained = None
    if cfg.pretrained:
        if not Path(cfg.pretrained).is_file():
            raise ConfigError(f"pretrained={cfg.pretrained} does not exist; run scripts/pretrain.py first, pass "
                              f"another checkpoint, or pretrained=null to train from scratch")
        pretrained = read_checkpoint(cfg.pretrained)  # read once: the window sizes and the weights come from it
        resolve_window_sizes(cfg, pretrained)
    if print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return
    run_dir, ckpt_path = prepare_run(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    data = ClassificationDataModule(source=cfg.data.source, root=cfg.data.root, list_file=cfg.data.list_file,
                                    img_size=cfg.data.img_size, batch_size=cfg.data.batch_size,
                                    num_workers=cfg.data.num_workers, seed=cfg.seed)
    data.setup("fit")
    for split, dataset in (("train", data.train_set), ("val", data.val_set)):
        validate_labels(dataset.samples, cfg.model.num_classes, f"the {split} split of data.source={cfg.data.source}")
    module = SwinV2Classifier(model=OmegaConf.to_container(cfg.model), **OmegaConf.to_container(cfg.optim),
                              **OmegaConf.to_container(cfg.train),
                              confusion_matrix_path=str(run_dir / "confusion_matrix.png"))
    if pretrained is not None and ckpt_path is None:
        report = load_pretrained(module.model, pretrained)
        print(f"loaded {cfg.pretrained}\n{report}")
    start_run(cfg, run_dir)  # the lock, the config and its dated copy

    trainer = make_trainer(cfg, run_dir, monitor="val/top1", mode="max")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        top1 = trainer.callback_metrics.get("val/top1")
        result = f"{float(top1):.4f}" if top1 is not None else "none (no validation ran)"
        print(f"run directory: {run_dir}\nheld-out top-1 (last validation): {result}")

