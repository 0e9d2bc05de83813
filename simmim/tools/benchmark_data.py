"""Input-pipeline benchmark: images/s per worker (images per CPU second of one process, one thread) of the
folder and shards sources against a plain decode-everything-then-crop baseline, in the same run.

    python scripts/benchmark_data.py
    python scripts/benchmark_data.py images=400 rounds=5 pretrain_size=192 finetune_size=224

For each of `image_sizes` (default ImageNet-sized 500x375, and 1280x960 photos), generates `images` JPEGs
(quality 90; a third of them upright) under `work`, packs them into shards (scripts/make_shards.py) as they are
and with short_side=`short_side`, then times, for the pretraining transform (with SimMIM masks) and the
fine-tuning transform:
  baseline  cv2.imdecode of the whole file (IMREAD_UNCHANGED, then BGR->RGB), then albumentations: random resized
            crop (bilinear for pretraining, bicubic for fine-tuning), flip, Normalize, ToTensorV2: float out
  folder    the folder source's ImageDataset as training builds it (simplejpeg, DCT-scaled when the crop allows,
            EXIF orientation, per-sample seeds, `TrainAugment`: uint8 channels-last out, normalized on the device)
  shards    the shards source's ShardDataset (tar stream, shuffle buffer, same decoding and transforms)
  shards_small  the same on the shards packed with short_side and quality (images stored smaller: see make_shards)
All through a DataLoader's collation like training.
Every pipeline runs `rounds` times, interleaved (baseline, folder, shards, baseline, ...), so that a busy
machine slows them alike; the table gives the median images/s and the median of the per-round ratios to the
baseline. `gpu_images_per_s` (default: SwinV2-T SimMIM, compiled bf16 on one H200, the speed issue) divided by
the best pretraining images/s per worker on the first image size gives the cores that feed one GPU. Writes
JSON to `out`; an earlier result there is kept beside it as benchmark_data.<UTC time it was written>.json (for the
default `out`), and any other file there is refused.
Arguments are key=value:
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import simplejpeg
import torch
from albumentations.pytorch import ToTensorV2
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from masking import build_mask_generator
from simmim.cli import check_output_folder, check_result_file, json_with, keeping_earlier
from simmim.data.datasets import ImageDataset, LabeledItem, MaskedImageDataset, MaskedItem, SkipCounter
from simmim.data.decode import decode_image, decode_needs
from simmim.data.shards import ShardDataset, shard_counts, shard_urls
from simmim.data.sources import FileList
from simmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, finetune_transform, pretrain_transform
from simmim.tools.make_shards import QUALITY, make_shards
from simmim.train.config import ConfigError, options_from_argv

SCHEMA = {
    "images": 300,              # generated JPEGs
    "rounds": 3,                # interleaved repetitions of every pipeline
    "pretrain_size": 192,
    "finetune_size": 224,
    "batch_size": 32,
    "gpu_images_per_s": 1573,   # SwinV2-T SimMIM training, compiled bf16, one H200 (speed issue)
    "image_sizes": [[500, 375], [1280, 960]],  # width x height of the generated sets: ImageNet-sized, photo-sized
    "short_side": 256,          # the short side of the shards_small pipeline's images ...
    "quality": QUALITY,         # ... and their JPEG quality (make_shards' default)
    "work": "runs/benchmark_data",
    "out": "runs/benchmark_data/benchmark_data.json",
}
PIPELINES = ("baseline", "folder", "shards", "shards_small")
MASK_PATCH = 32  # SimMIM's mask patch (px) of the pretraining pipelines


class DecodeAllDataset(Dataset):
    """The baseline: decode the whole file with OpenCV, then the transform: (image (3, S, S), label)."""

    def __init__(self, samples: FileList, transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]):
        path, label = self.samples[item[0] if isinstance(item, tuple) else item]
        image = cv2.cvtColor(cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
        return self.transform(image=image)["image"], label


def generate(folder: Path, count: int, width: int, height: int) -> FileList:
    """count JPEGs of width x height (every third one turned upright), quality 90, random colors with coarse
    and fine detail (~100 KB at 500x375, like ImageNet photos); 4 class folders."""
    paths = []
    for i in range(count):
        path = folder / f"class{i % 4}" / f"{i:06d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shape = (width, height, 3) if i % 3 == 2 else (height, width, 3)
            noise = np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
            image = cv2.addWeighted(cv2.GaussianBlur(noise, (0, 0), 6), 0.8, cv2.GaussianBlur(noise, (0, 0), 0.8), 0.5,
                                    0)
            partial_path = path.with_suffix(".partial.jpg")  # renamed when whole: a kill leaves no torn image to reuse
            assert cv2.imwrite(str(partial_path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            partial_path.replace(path)
        paths.append(path)
    return FileList(paths, [i % 4 for i in range(count)])


def timed(loader) -> float:
    """Images per CPU second of this process (one thread) over one pass of loader: a core's throughput, which
    other processes on a shared machine slow far less than wall time."""
    start, count = time.process_time(), 0
    for batch in loader:
        count += len(batch[0])
    return count / (time.process_time() - start)


def plain_transform(stage: str, size: int) -> A.Compose:
    """The baseline's transform: albumentations end to end, float (3, size, size) out; pretraining: bilinear crops
    of 0.67 to all of the image, fine-tuning: bicubic crops of 0.08 to all."""
    scale, interpolation = ((0.67, 1.0), cv2.INTER_LINEAR) if stage == "pretrain" else ((0.08, 1.0), cv2.INTER_CUBIC)
    return A.Compose([A.RandomResizedCrop(size=(size, size), scale=scale, ratio=(3 / 4, 4 / 3),
                                          interpolation=interpolation),
                      A.HorizontalFlip(), A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()])


def pipelines(stage: str, samples: FileList, shards: dict[str, list[str]], cfg) -> dict:
    """name -> DataLoader (main process, batch_size) for the stage's transform."""
    size = cfg.pretrain_size if stage == "pretrain" else cfg.finetune_size
    transform = (pretrain_transform if stage == "pretrain" else finetune_transform)(size)  # reseeded per sample
    masks = build_mask_generator("random", input_size=size, mask_patch_size=MASK_PATCH, model_patch_size=4,
                                 mask_ratio=0.6)
    item = MaskedItem(transform, masks) if stage == "pretrain" else LabeledItem(transform)
    decode = partial(decode_image, **decode_needs(transform))
    streams = {name: ShardDataset(urls, shard_counts(urls), item, decode, SkipCounter(), shuffle_buffer=100)
               for name, urls in shards.items()}
    baseline, folder = DecodeAllDataset(samples, plain_transform(stage, size)), ImageDataset(samples, transform, seed=0)
    if stage == "pretrain":
        baseline, folder = MaskedImageDataset(baseline, masks), MaskedImageDataset(folder, masks)
    return {"baseline": DataLoader(baseline, batch_size=cfg.batch_size),
            "folder": DataLoader(folder, batch_size=cfg.batch_size),
            **{name: DataLoader(stream, batch_size=cfg.batch_size) for name, stream in streams.items()}}


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__)
    if cfg is None:
        return
    for key in ("images", "rounds", "batch_size", "pretrain_size", "finetune_size", "short_side", "quality"):
        if not (isinstance(cfg[key], int) and cfg[key] > 0):
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")
    if cfg.quality > 100:
        raise ConfigError(f"quality={cfg.quality} must be a JPEG quality from 1 to 100")
    if cfg.pretrain_size % MASK_PATCH:
        raise ConfigError(f"pretrain_size={cfg.pretrain_size} must be a multiple of the mask patch size {MASK_PATCH}, "
                          f"e.g. 192")
    if not cfg.gpu_images_per_s > 0:
        raise ConfigError(f"gpu_images_per_s={cfg.gpu_images_per_s} must be a positive number of images/s")
    sizes = OmegaConf.to_container(cfg.image_sizes) if OmegaConf.is_list(cfg.image_sizes) else None
    if not sizes or not all(isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)
                            for size in sizes):
        raise ConfigError(f"image_sizes={cfg.image_sizes} must be a list of [width, height] in pixels, e.g. "
                          f"image_sizes=[[500,375]]")
    check_output_folder(cfg.work, "work")
    check_result_file(cfg.out, json_with("cores_per_gpu"), "benchmark")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    results = {}
    for width, height in cfg.image_sizes:
        work = Path(cfg.work) / f"{width}x{height}"
        samples = generate(work / "images", cfg.images, width, height)
        full, small = work / f"shards_{cfg.images}", work / f"shards_{cfg.images}_{cfg.short_side}_q{cfg.quality}"
        make_shards(samples, full, "bench", 16_000_000, 2)
        make_shards(samples, small, "bench", 16_000_000, 2, short_side=cfg.short_side, quality=cfg.quality)
        shards = {"shards": shard_urls(str(full)), "shards_small": shard_urls(str(small))}
        results[f"{width}x{height}"] = {**measure(samples, shards, cfg), "decode_ms": decode_ms(samples)}

    first = results[next(iter(results))]["pretrain"]
    best = max(first[name]["images_per_s"] for name in ("folder", "shards"))  # the images as they are
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_average": os.getloadavg(), "config": OmegaConf.to_container(cfg), "results": results,
               "cores_per_gpu": cfg.gpu_images_per_s / best}
    print(f"{'images':<10} {'stage':<9} {'pipeline':<13} {'images/s per worker':>20} {'vs baseline':>12}")
    for size, stages in results.items():
        for stage in ("pretrain", "finetune"):
            for name, row in stages[stage].items():
                print(f"{size:<10} {stage:<9} {name:<13} {row['images_per_s']:>20.1f} {row['vs_baseline']:>11.2f}x")
    for size, stages in results.items():
        ms = stages["decode_ms"]
        print(f"{size}: a whole JPEG decodes in {ms['full']:.3f} ms, at 1/8 scale (entropy decoding, which no crop or "
              f"scale avoids, and little else) in {ms['eighth']:.3f} ms ({ms['eighth'] / ms['full']:.0%})")
    print(f"cores to feed {cfg.gpu_images_per_s} images/s (pretraining at {cfg.pretrain_size} px on "
          f"{next(iter(results))} images, best source): {summary['cores_per_gpu']:.1f}; load average during the "
          f"run: {', '.join(f'{x:.1f}' for x in summary['load_average'])} on {os.cpu_count()} cores")
    with keeping_earlier(cfg.out) as (tmp,):
        tmp.write_text(json.dumps(summary, indent=1) + "\n")


def decode_ms(samples: FileList, rounds: int = 3) -> dict[str, float]:
    """CPU ms per image of simplejpeg decoding the whole JPEG and at 1/8 scale (best of rounds)."""
    files = [np.fromfile(path, np.uint8) for path, _ in samples]
    times = {}
    for name, smallest in (("full", 0), ("eighth", 1)):  # min_height=1: the smallest scale libjpeg-turbo has
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            for data in files:
                simplejpeg.decode_jpeg(data, min_height=smallest, min_width=smallest)
            best = min(best, time.process_time() - start)
        times[name] = 1000 * best / len(files)
    return times


def measure(samples: FileList, shards: dict[str, list[str]], cfg) -> dict:
    """{stage: {pipeline: {"images_per_s" (median), "vs_baseline" (median per-round ratio), "rounds"}}}."""
    results = {}
    for stage in ("pretrain", "finetune"):
        loaders = pipelines(stage, samples, shards, cfg)
        for name in PIPELINES:  # warm-up: page cache, first-call costs
            timed(loaders[name])
        rates = {name: [] for name in PIPELINES}
        for _ in range(cfg.rounds):
            for name in PIPELINES:
                rates[name].append(timed(loaders[name]))
        results[stage] = {name: {"images_per_s": statistics.median(rates[name]),
                                 "vs_baseline": statistics.median(r / b for r, b in zip(rates[name],
                                                                                         rates["baseline"])),
                                 "rounds": rates[name]} for name in PIPELINES}
    return results
