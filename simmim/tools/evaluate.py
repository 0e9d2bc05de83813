"""k-NN and linear-probe top-1 of frozen encoders, one table row per checkpoint.

    python scripts/evaluate.py checkpoint=runs/pretrain/default/encoder.pth
    python scripts/evaluate.py checkpoint=[runs/pretrain/default/encoder.pth,runs/finetune/default/checkpoints/last.ckpt]
    python scripts/evaluate.py checkpoint=swinv2_tiny.pth model.variant=tiny model.img_size=256 model.window_size=16 \\
        data.source=folder data.root=/data/imagenet max_images=20000
    python scripts/evaluate.py checkpoint=runs/pretrain/giant/encoder.pth data.source=shards \\
        data.shards=/data/shards/train data.val_shards=/data/shards/val max_images=20000

A checkpoint may have any layout simmim.models.checkpoint loads; its encoder is built from the config our
checkpoints carry, model.* keys override it (give foreign checkpoints model.variant, img_size, window_size).
Both splits of the source (train, val: the digits' fixed split, a folder's train/ and val/, else a fixed 2 %
held out; shards: data.val_shards, else the last shard), `max_images` of each (a fixed random subset of a listed
source, the first shards holding as many), pass the eval transform at the encoder's img_size; the features are
the encoder's pooled final map (see simmim.evaluation). k-NN: cosine, `k` neighbours, votes exp(similarity /
temperature) (DINO). Linear probe: logistic regression (L2 strength 1 / probe_c) on standardized train
features, scored on val.
random_baseline=true adds a row for the first checkpoint's architecture with random weights (seed 0): what
the weights add over the architecture alone.
Arguments are key=value:
"""
from __future__ import annotations

import time

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from simmim.cli import check_loader_options, check_values, checkpoint_paths, resolve_device
from simmim.evaluation import KNN_K, KNN_TEMPERATURE, knn_top1, linear_probe_top1, pooled_features
from simmim.models.checkpoint import encoder_from_checkpoint
from simmim.models.swinv2 import SwinTransformerV2
from simmim.models.arguments import model_section
from simmim.train.config import ConfigError, options_from_argv

SCHEMA = {
    "checkpoint": None,          # required: a path or [a,b,...]: our .ckpt / encoder.pth, official SimMIM / SwinV2
    "data": {
        "source": "digits",      # digits | folder | list | shards
        "root": None,            # folder source: image directory (class subfolders, or train/ and val/)
        "list_file": None,       # list source: text file, one image path and its label per line
        "shards": None,          # shards source: WebDataset shards with .cls labels (as data.shards of pretraining)
        "val_shards": None,      # shards source: validation shards (null: the last shard of data.shards)
    },
    "max_images": None,          # per split (null: all): a fixed random subset, or the first shards holding as many
    "k": KNN_K,
    "temperature": KNN_TEMPERATURE,
    "probe_c": 1.0,              # inverse L2 strength of the linear probe
    "random_baseline": True,     # add a row: the first checkpoint's architecture with random weights
    "batch_size": 64,
    "num_workers": 2,
    "device": "auto",            # auto | cpu | cuda | cuda:N
    "model": model_section(),    # null: the checkpoint's value
}


def evaluate_encoder(encoder: SwinTransformerV2, cfg, img_size: int, device: torch.device) -> dict:
    """{"train", "val", "classes", "features", "knn_top1", "probe_top1"} of one encoder on the source's splits."""
    from simmim.data.datasets import labeled_eval_sets  # albumentations, scikit-learn

    data = cfg.data
    splits = labeled_eval_sets(data.source, img_size, cfg.max_images, data.root, data.list_file, data.shards,
                               data.val_shards)
    encoder.eval().to(device)
    (train, train_labels), (val, val_labels) = (
        pooled_features(encoder, DataLoader(split, batch_size=cfg.batch_size, num_workers=cfg.num_workers), device)
        for split in splits)
    if len(train_labels.unique()) < 2:
        raise ValueError(f"the {data.source} source gives every training image the same label; evaluation needs "
                         f"labels: class subfolders (folder), a label per line (list) or .cls files (shards)")
    return {"train": len(train), "val": len(val), "classes": len(train_labels.unique()), "features": train.shape[1],
            "knn_top1": knn_top1(train, train_labels, val, val_labels, cfg.k, cfg.temperature),
            "probe_top1": linear_probe_top1(train, train_labels, val, val_labels, cfg.probe_c)}


def format_table(rows: list[tuple[str, str, dict]], k: int) -> str:
    """A Markdown table: checkpoint, layout, k-NN top-1, linear-probe top-1."""
    lines = [f"| checkpoint | layout | k-NN top-1 (k={k}) | linear probe top-1 |", "|---|---|---|---|"]
    lines += [f"| {name} | {layout} | {r['knn_top1']:.3f} | {r['probe_top1']:.3f} |" for name, layout, r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__)
    if cfg is None:
        return
    if cfg.max_images is not None and (type(cfg.max_images) is not int or cfg.max_images < 1):
        raise ConfigError(f"max_images={cfg.max_images} must be a positive integer or null (every image)")
    check_values(cfg, (("k", cfg.k >= 1, "an integer >= 1"), ("temperature", cfg.temperature > 0, "> 0"),
                       ("probe_c", cfg.probe_c > 0, "> 0 (the inverse L2 strength of the probe)")))
    check_loader_options(cfg)
    checkpoints = checkpoint_paths(cfg.checkpoint)
    if not checkpoints:
        raise ConfigError("checkpoint= is required: a path or [a,b,...] (our .ckpt or encoder.pth, or an official "
                          "SimMIM / SwinV2 file)")
    device = resolve_device(cfg.device)
    overrides = OmegaConf.to_container(cfg.model)
    rows, first = [], None
    for path in checkpoints:
        start = time.perf_counter()
        encoder, model, report = encoder_from_checkpoint(path, overrides)
        first = first or model
        rows.append((str(path), report.layout, evaluate_encoder(encoder, cfg, model["img_size"], device)))
        print(f"{path}: {time.perf_counter() - start:.0f} s", flush=True)
    if cfg.random_baseline:
        torch.manual_seed(0)
        rows.append(("random weights (same architecture)", "-",
                     evaluate_encoder(SwinTransformerV2(**first), cfg, first["img_size"], device)))
    result = rows[0][2]
    print(f"{cfg.data.source}: {result['train']} train / {result['val']} val images, {result['classes']} classes, "
          f"{result['features']}-d pooled features, img_size {first['img_size']}\n{format_table(rows, cfg.k)}")
