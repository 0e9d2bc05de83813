"""SimMIM reconstructions of your own images by a pretraining checkpoint, as one PNG grid.

    python scripts/reconstruct.py checkpoint=runs/pretrain/default/encoder.pth images=[a.png,b.jpg]
    python scripts/reconstruct.py checkpoint=runs/pretrain/base/checkpoints/last.ckpt images=photos/ mask_ratio=0.8
    python scripts/reconstruct.py checkpoint=simmim_swinv2_base.pth model.variant=base model.img_size=192 \\
        model.window_size=12 norm_target_patch_size=47 images=photos/ mask_patch_size=32 seed=3

The checkpoint is our Lightning pretraining .ckpt, our exported encoder.pth, or an official SimMIM file (a
fine-tuned classifier has no decoder). The model is built from the config our checkpoints carry; model.* keys
override it (official files carry none: give model.variant or the widths, img_size / window_size, and
norm_target_patch_size=47 when the file was pretrained on normalized targets, as the official recipes are). Masks
follow the checkpoint's pretraining (mask_patch_size, mask_kind) unless given, at `mask_ratio`, drawn from
`seed`. Each image (a file, or every image under a folder, sorted; at most max_images) passes the eval transform
(resize the short side to img_size / 0.875, center crop).

One row per image: original | masked input (masked patches gray) | reconstruction | reconstruction pasted into
the visible pixels. Predictions of normalized targets are mapped back with each pixel's local mean and std.
Prints the masked L1 loss of the batch (in the target space the checkpoint was trained on).
Arguments are key=value:
"""
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf

from simmim.models.checkpoint import read_checkpoint, saved_simmim_config, simmim_from_checkpoint
from simmim.models.simmim import NORM_WINDOW_RULE, is_norm_window
from masking import build_mask_generator
from simmim.models.arguments import model_section
from simmim.train.config import ConfigError, as_list, options_from_argv
from simmim.train.validate import check_mask_patch
from simmim.data.decode import read_image
from simmim.data.sources import image_files
from simmim.data.transforms import eval_transform
from simmim.pretrain import reconstruction_grid
from simmim.cli import check_new_output, resolve_device

SCHEMA = {
    "checkpoint": None,          # required: our .ckpt or encoder.pth, or an official SimMIM file
    "images": None,              # required: an image file, a folder, or [files and folders]
    "max_images": 16,
    "mask_ratio": 0.6,
    "mask_patch_size": None,     # null: the checkpoint's (32 when it does not say)
    "mask_kind": None,           # random | block; null: the checkpoint's (random when it does not say)
    "norm_target_patch_size": None,  # null: the checkpoint's; official files: 47 if pretrained on normalized targets
    "seed": 0,
    "device": "auto",            # auto | cpu | cuda | cuda:N
    "out": "reconstructions.png",
    "overwrite": False,          # replace an existing out (never one of the images)
    "model": model_section(),    # null: the checkpoint's value
}
DEFAULT_MASK = {"mask_patch_size": 32, "mask_kind": "random"}  # the official SimMIM recipes


def image_paths(images, limit: int) -> list[Path]:
    """The files named by `images` (a path or a list; folders give their images, sorted), at most `limit`."""
    paths = []
    for entry in as_list(images):
        entry = Path(entry)
        if entry.is_dir():
            paths += [entry / name for name in image_files(entry, "images")]
        elif entry.is_file():
            paths.append(entry)
        else:
            raise FileNotFoundError(f"image {entry} does not exist; pass images=FILE, images=FOLDER or "
                                    f"images=[a.png,b.jpg]")
    return paths[:limit]


def read_images(paths: list[Path], where) -> tuple[list[Path], list[np.ndarray]]:
    """The decodable files of `paths` and their uint8 RGB pixels; the others are skipped with one counted warning
    (as training does), an error when none decodes."""
    kept, images = [], []
    for path in paths:
        try:
            images.append(read_image(path))
            kept.append(path)
        except (OSError, ValueError):
            pass
    bad = [path for path in paths if path not in kept]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable images of {len(paths)} under {where} (first: {bad[0]})",
                      stacklevel=2)
    if not kept:
        raise ValueError(f"no readable images under {where}; all {len(paths)} files failed to decode")
    return kept, images


def masks_for(cfg, saved: dict, count: int, img_size: int, patch_size: int) -> torch.Tensor:
    """(count, S/p, S/p) int64 masks, 1 = masked, drawn from cfg.seed."""
    choice = {key: cfg[key] if cfg[key] is not None else saved.get(key, DEFAULT_MASK[key]) for key in DEFAULT_MASK}
    check_mask_patch("mask_patch_size", choice["mask_patch_size"], img_size, patch_size)
    generator = build_mask_generator(choice["mask_kind"], input_size=img_size,
                                     mask_patch_size=choice["mask_patch_size"], model_patch_size=patch_size,
                                     mask_ratio=cfg.mask_ratio, seed=cfg.seed)
    return torch.from_numpy(np.stack([generator() for _ in range(count)]))


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__)
    if cfg is None:
        return
    if not cfg.checkpoint or not cfg.images:
        raise ConfigError("checkpoint= and images= are required, e.g. checkpoint=runs/pretrain/default/encoder.pth "
                          "images=[a.png,b.jpg]")
    if cfg.max_images < 1:
        raise ConfigError(f"max_images={cfg.max_images}: expected an integer >= 1")
    size = cfg.norm_target_patch_size
    if size is not None and not is_norm_window(size):
        raise ConfigError(f"norm_target_patch_size={size}: expected {NORM_WINDOW_RULE}, or null (the checkpoint's)")
    out = Path(cfg.out)
    if out.is_dir() or not cv2.haveImageWriter(str(out)):
        raise ConfigError(f"out={out}: expected a picture file to write, e.g. out=reconstructions.png")
    device = resolve_device(cfg.device)
    paths = image_paths(cfg.images, cfg.max_images)
    if out.resolve() in {path.resolve() for path in paths}:
        raise ConfigError(f"out={out} is one of the images; give another out=")
    check_new_output(out, cfg.overwrite)
    ckpt = read_checkpoint(cfg.checkpoint)
    simmim, model = simmim_from_checkpoint(ckpt, OmegaConf.to_container(cfg.model))
    if cfg.norm_target_patch_size is not None:
        simmim.norm_target_patch_size = cfg.norm_target_patch_size
    transform = eval_transform(model["img_size"])
    paths, images = read_images(paths, cfg.images)
    x = torch.stack([transform(image=image)["image"] for image in images])
    mask = masks_for(cfg, saved_simmim_config(ckpt), len(paths), model["img_size"], simmim.patch_size)

    simmim.eval().to(device)
    x, mask = x.to(device), mask.to(device)
    grid = reconstruction_grid(simmim, x, mask)
    with torch.no_grad():
        loss = simmim(x, mask).item()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"cannot write {out}; pass out=<a writable .png path>")
    print(f"{len(paths)} images, {mask.float().mean().item():.0%} of patches masked, masked L1 {loss:.4f}\n"
          f"reconstructions: {out}")

