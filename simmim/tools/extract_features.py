"""Encode images with a pretrained or fine-tuned SwinV2 encoder and save the features.

    python scripts/extract_features.py checkpoint=runs/pretrain/default/encoder.pth data.source=digits
    python scripts/extract_features.py checkpoint=runs/finetune/default/checkpoints/best.ckpt data.root=/data/images
    python scripts/extract_features.py checkpoint=swinv2_base.pth model.variant=base model.img_size=256 \\
        model.window_size=16 data.source=list data.list_file=images.txt format=npy out=features

The checkpoint may have any layout simmim/models/checkpoint.py loads. The encoder is built from the config our
checkpoints carry; model.* keys override it (foreign checkpoints carry none: give model.variant or the widths,
and img_size / window_size). Images pass the eval transform (resize the short side to img_size / 0.875,
center crop) in batches, without gradients, on `device`.

Saved, for N images:
- pooled (N, C): the mean over positions of the final normalized map, what the classifier head reads (linear
  probes, k-NN, retrieval);
- stages: per stage i, (N, C_i) the mean over positions of the stage's map after its blocks and before its
  patch merging (`forward_intermediates`; the last one with the final norm, so stages[-1] equals pooled);
  C_i = embed_dim * 2^i: probes of how far up a property is encoded;
- maps (maps=true only): the stage maps themselves, per stage (N, C_i, H_i, W_i), for dense probes;
- labels (N,), paths (file paths; digits:INDEX for the digits), splits ("train" / "val" per image), and
  feature_info, model (the encoder's arguments), checkpoint, layout.
format=pt writes one torch file `out` (.pt added; `out`/features.pt when out is a folder); format=npy writes a
folder `out` with pooled.npy, stage{i}.npy, map{i}.npy, labels.npy, paths.txt, splits.txt and meta.json. File
paths are saved absolute.
Arguments are key=value:
"""
import json
import os
from pathlib import Path


import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from simmim.models.checkpoint import encoder_from_checkpoint
from simmim.models.arguments import model_section
from simmim.train.config import ConfigError, options_from_argv
from simmim.data.datasets import ImageDataset
from simmim.data.sources import build_sources, digits_split
from simmim.data.transforms import eval_transform
from simmim.cli import check_loader_options, check_new_output, resolve_device

SCHEMA = {
    "checkpoint": None,          # required: our .ckpt / encoder.pth, an official SimMIM or SwinV2 file, timm
    "data": {
        "source": "folder",      # folder | list | digits
        "root": None,            # folder source: image directory (searched recursively)
        "list_file": None,       # list source: text file, one image path (and optional label) per line
        "split": "all",          # all | train | val: the source's fixed split (folder/list hold out 2 %)
    },
    "batch_size": 64,
    "num_workers": 2,
    "device": "auto",            # auto | cpu | cuda | cuda:N
    "maps": False,               # also save the stage maps (N, C_i, H_i, W_i)
    "format": "pt",              # pt | npy
    "out": "features",
    "overwrite": False,          # replace an existing out (features.pt, or the npy folder's files)
    "model": model_section(),    # null: the checkpoint's value
}
SPLITS = ("all", "train", "val")
FORMATS = ("pt", "npy")


def samples_of(cfg, img_size: int) -> tuple[list, list[str], list[str]]:
    """(samples (image, label), ids, split names) of the chosen split: file paths, or digits:INDEX."""
    if cfg.data.split not in SPLITS:
        raise ConfigError(f"data.split={cfg.data.split} is not one of {', '.join(SPLITS)}")
    train, val = build_sources(cfg.data.source, img_size, cfg.data.root, cfg.data.list_file)
    if cfg.data.source == "digits":  # the digits source lists each split in digits_split order
        train_ids, val_ids = ([f"digits:{i}" for i in part] for part in digits_split())
    else:
        train_ids, val_ids = ([os.path.abspath(path) for path, _ in part] for part in (train, val))
    parts = {"train": (train, train_ids), "val": (val, val_ids)}
    chosen = ["train", "val"] if cfg.data.split == "all" else [cfg.data.split]
    return ([s for name in chosen for s in parts[name][0]], [i for name in chosen for i in parts[name][1]],
            [name for name in chosen for _ in parts[name][0]])


@torch.no_grad()
def encode(encoder, loader: DataLoader, device: torch.device, keep_maps: bool) -> dict:
    """{"pooled": (N, C), "stages": [(N, C_i)], "maps": [(N, C_i, H_i, W_i)] or absent, "labels": (N,)}."""
    encoder.eval().to(device)
    pooled, stages, maps, labels = [], [], [], []
    for x, y in loader:
        final, stage_maps = encoder.forward_intermediates(x.to(device), norm=True)
        pooled.append(final.mean(dim=(1, 2)).cpu())
        stages.append([m.mean(dim=(2, 3)).cpu() for m in stage_maps])
        if keep_maps:
            maps.append([m.cpu() for m in stage_maps])
        labels.append(torch.as_tensor(y))
    features = {"pooled": torch.cat(pooled), "stages": [torch.cat(s) for s in zip(*stages)],
                "labels": torch.cat(labels)}
    if keep_maps:
        features["maps"] = [torch.cat(m) for m in zip(*maps)]
    return features


def output_path(out: str, fmt: str) -> Path:
    """Where `save` writes: the .pt file (out, .pt added; out/features.pt for a folder), or the npy folder."""
    out = Path(out)
    if fmt == "npy":
        if out.suffix == ".pt" or out.is_file():
            raise ConfigError(f"out={out}: format=npy writes a folder of .npy files; pass out=FOLDER, or format=pt "
                              f"for one .pt file")
        return out
    if out.is_dir():
        return out / "features.pt"
    return out if out.suffix == ".pt" else out.with_name(f"{out.name}.pt")


def save(features: dict, out: Path, fmt: str) -> Path:
    """One .pt file `out`, or a folder `out` of .npy arrays, paths.txt, splits.txt and meta.json."""
    if fmt == "pt":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(features, out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"pooled": features["pooled"], "labels": features["labels"],
              **{f"stage{i}": s for i, s in enumerate(features["stages"])},
              **{f"map{i}": m for i, m in enumerate(features.get("maps", []))}}
    for name, tensor in arrays.items():
        np.save(out / f"{name}.npy", tensor.numpy())
    for stale in [*out.glob("stage*.npy"), *out.glob("map*.npy")]:  # an overwritten run's arrays this one lacks
        if stale.stem not in arrays:
            stale.unlink()
    for name in ("paths", "splits"):
        (out / f"{name}.txt").write_text("".join(f"{line}\n" for line in features[name]))
    meta = {key: features[key] for key in ("feature_info", "model", "checkpoint", "layout")}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__)
    if cfg is None:
        return
    if not cfg.checkpoint:
        raise ConfigError("checkpoint= is required: our .ckpt or encoder.pth, or an official SimMIM / SwinV2 file")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
    check_loader_options(cfg)
    out = output_path(cfg.out, cfg.format)
    check_new_output(out, cfg.overwrite)
    device = resolve_device(cfg.device)
    encoder, model, report = encoder_from_checkpoint(cfg.checkpoint, OmegaConf.to_container(cfg.model))
    samples, ids, splits = samples_of(cfg, model["img_size"])
    loader = DataLoader(ImageDataset(samples, eval_transform(model["img_size"])), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers)
    features = encode(encoder, loader, device, cfg.maps)
    features.update(paths=ids, splits=splits, feature_info=encoder.feature_info, model=model,
                    checkpoint=str(cfg.checkpoint), layout=report.layout)
    path = save(features, out, cfg.format)
    shapes = ", ".join(str(tuple(s.shape)) for s in features["stages"])
    print(f"{report.layout} checkpoint, {len(report.loaded)} tensors loaded\n{len(ids)} images: pooled "
          f"{tuple(features['pooled'].shape)}, stages {shapes}\nfeatures: {path}")

