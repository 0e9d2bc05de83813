"""Data for SimMIM pretraining and the later fine-tune: image sources, transforms, masked datasets.

A *source* gives lists of samples ``(image, label)``, one for train and one for val. ``image`` is a file path
(folder and list sources) or a uint8 array (digits). Sources:

- ``folder``: every image under ``root`` (recursive). Labels are the sorted first-level subfolders when every
  image sits in one, else 0. ``root/train`` + ``root/val`` are used as the splits when both exist; otherwise a
  fixed 2 % of the readable files (at least one) is held out for validation.
- ``list``: a text file with one image path per line and an optional integer label after a space or tab;
  relative paths are relative to the list file; blank lines and ``#`` comments are skipped. Split as above.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, labels 0..9, offline), upscaled once to
  ``img_size``, with a fixed stratified 20 % validation split (`digits_split`).

Masks depend only on (seed, epoch, index): `EpochSampler` hands the epoch to the dataset with every index, so
neither the worker count nor a resumed run changes them.
"""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from masking import build_mask_generator

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SOURCES",
    "pretrain_transform", "finetune_transform", "eval_transform", "read_image",
    "digits_split", "build_sources", "build_source", "labels_per_class_subset", "labeled_datasets",
    "ImageDataset", "MaskedImageDataset", "EpochSampler", "SimMIMDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SOURCES = ("folder", "list", "digits")
VAL_HOLDOUT = 0.02  # fraction of a folder / list held out for validation when it has no val split
DIGITS_VAL_FRACTION = 0.2
CHECK_CHUNK = 256  # files per thread-pool task when checking that images decode

Sample = tuple[str | np.ndarray, int]


# ------------------------------------------------------------------------------------------------ transforms
def _normalize_to_tensor() -> list:
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0), ToTensorV2()]


def _check_crop_flip(crop_scale: Sequence[float], crop_ratio: Sequence[float], hflip: float) -> None:
    """ValueError naming the data.* key when a crop range or the flip probability is out of bounds."""
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"data.crop_scale={list(crop_scale)} must be [min, max] area fractions with "
                         f"0 < min <= max <= 1, e.g. [0.67, 1.0]")
    if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
        raise ValueError(f"data.crop_ratio={list(crop_ratio)} must be [min, max] aspect ratios (width / height) "
                         f"with 0 < min <= max, e.g. [0.75, 1.333]")
    if not 0 <= hflip <= 1:
        raise ValueError(f"data.hflip={hflip} must be a probability in [0, 1] (0: no flips)")


def pretrain_transform(img_size: int, crop_scale: Sequence[float] = (0.67, 1.0),
                       crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> A.Compose:
    """SimMIM pretraining augmentation: uint8 (H, W, 3) RGB -> normalized float (3, img_size, img_size).

    A random crop of `crop_scale` (fractions of the area) and `crop_ratio` (width / height) resized to img_size,
    a horizontal flip with probability `hflip`.
    """
    _check_crop_flip(crop_scale, crop_ratio, hflip)
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(crop_scale), ratio=tuple(crop_ratio)),
        A.HorizontalFlip(p=hflip),
        *_normalize_to_tensor(),
    ])


def finetune_transform(img_size: int, crop_scale: Sequence[float] = (0.08, 1.0),
                       crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> A.Compose:
    """Classification fine-tune augmentation (bicubic, like the official recipe): -> float (3, img_size, img_size).

    Crop and flip as in `pretrain_transform`; the defaults are the ImageNet recipe's.
    """
    _check_crop_flip(crop_scale, crop_ratio, hflip)
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                            interpolation=cv2.INTER_CUBIC),
        A.HorizontalFlip(p=hflip),
        *_normalize_to_tensor(),
    ])


def eval_transform(img_size: int) -> A.Compose:
    """Resize the short side to img_size / 0.875, center-crop: -> float (3, img_size, img_size)."""
    return A.Compose([
        A.SmallestMaxSize(max_size=round(img_size / 0.875), interpolation=cv2.INTER_CUBIC),
        A.CenterCrop(height=img_size, width=img_size),
        *_normalize_to_tensor(),
    ])


# ------------------------------------------------------------------------------------------------ reading
def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB.

    Grayscale is repeated to 3 channels, an alpha channel is composited onto black, 16-bit values are divided
    by 257 (rounded). The file is read with ``np.fromfile`` and decoded with ``cv2.imdecode(IMREAD_UNCHANGED)``:
    unlike ``cv2.imread``, that rejects truncated JPEGs instead of returning them gray-filled. EXIF orientation
    is not applied. Raises OSError if the file cannot be read, ValueError if it does not decode.
    """
    data = np.fromfile(path, dtype=np.uint8)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        raise ValueError(f"cannot decode image {path}: the file is corrupt, truncated or not an image")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype} in {path}: only 8- and 16-bit images are supported")
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] in (2, 4):  # gray + alpha or BGRA
        alpha = image[..., -1:].astype(np.float32) / 255
        image = np.rint(image[..., :-1] * alpha).astype(np.uint8)
    if image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _is_readable(path: str) -> bool:
    try:
        read_image(path)
    except (OSError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------------------ sources
def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed digits split: sorted (train, val) index arrays, 20 % val stratified by label, seed 0."""
    labels = load_digits().target
    train, val = train_test_split(np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION, stratify=labels,
                                  random_state=0)
    return np.sort(train), np.sort(val)


def _digits_samples(img_size: int) -> tuple[list[Sample], list[Sample]]:
    """Digits as uint8 (img_size, img_size) grayscale arrays (0..16 scaled to 0..255, bicubic upscale)."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    images = [cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_CUBIC) for image in images]
    train, val = digits_split()
    return ([(images[i], int(digits.target[i])) for i in train],
            [(images[i], int(digits.target[i])) for i in val])


def _image_files(folder: Path) -> list[Path]:
    """Image files under folder (recursive, following links), sorted, as paths relative to folder."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files += [Path(dirpath, name).relative_to(folder) for name in sorted(filenames)
                  if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}; "
                                f"point root at a folder that holds images (subfolders are searched)")
    return files


def _folder_samples(folder: Path, classes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples under folder and the class names used for their labels.

    classes None: the sorted first-level subfolders when every image sits in one, else [] (every label 0).
    """
    files = _image_files(folder)
    if classes is None:
        classes = [] if any(len(f.parts) == 1 for f in files) else sorted({f.parts[0] for f in files})
    index = {name: i for i, name in enumerate(classes)}
    if classes and (stray := [f for f in files if len(f.parts) == 1 or f.parts[0] not in index]):
        raise ValueError(f"{folder / stray[0]} is outside the train class folders; "
                         f"give train and val the same class folders")
    return [(str(folder / f), index[f.parts[0]] if classes else 0) for f in files], classes


def _list_samples(list_file: Path) -> list[Sample]:
    if not list_file.is_file():
        raise FileNotFoundError(f"image list {list_file} does not exist; pass list_file=<text file with one image "
                                f"path and an optional label per line>")
    samples = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labeled = re.fullmatch(r"(.*\S)\s+(\d+)", line)
        path, label = (labeled[1], int(labeled[2])) if labeled else (line, 0)
        samples.append((str(list_file.parent / path), label))
    if not samples:
        raise ValueError(f"image list {list_file} names no images; write one image path per line")
    return samples


def _hold_out(samples: list[Sample], where: str) -> tuple[list[Sample], list[Sample]]:
    """Fixed split: a seed-0 random VAL_HOLDOUT of the samples (at least one) goes to val."""
    if len(samples) < 2:
        raise ValueError(f"{where} has only 1 readable image; need at least 2 to hold one out for validation")
    num_val = max(1, round(VAL_HOLDOUT * len(samples)))
    is_val = np.zeros(len(samples), dtype=bool)
    is_val[np.random.default_rng(0).permutation(len(samples))[:num_val]] = True
    return ([s for s, v in zip(samples, is_val) if not v], [s for s, v in zip(samples, is_val) if v])


def _drop_unreadable(samples: list[Sample], where: str) -> list[Sample]:
    """Decode every file once (thread pool) and drop the bad ones with one warning; error if none is left."""
    paths = [path for path, _ in samples]
    chunks = [paths[i:i + CHECK_CHUNK] for i in range(0, len(paths), CHECK_CHUNK)]
    with ThreadPoolExecutor() as pool:
        flags = [ok for chunk in pool.map(lambda c: [_is_readable(p) for p in c], chunks) for ok in chunk]
    bad = [path for path, ok in zip(paths, flags) if not ok]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable images of {len(paths)} under {where} (first: {bad[0]})",
                      stacklevel=3)
    if len(bad) == len(paths):
        raise ValueError(f"no readable images under {where}; all {len(paths)} files failed to decode")
    return [sample for sample, ok in zip(samples, flags) if ok]


def build_sources(name: str, img_size: int, root: str | os.PathLike | None = None,
                  list_file: str | os.PathLike | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, val) samples of a source ("folder" needs root, "list" needs list_file; digits need img_size).

    Folder and list files are all decoded once here; unreadable ones are skipped with a single warning.
    """
    if name == "digits":
        return _digits_samples(img_size)
    if name == "folder":
        if root is None or not Path(root).is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist; pass root=<folder of images>")
        root = Path(root)
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            return _hold_out(_drop_unreadable(_folder_samples(root)[0], str(root)), str(root))
        train, classes = _folder_samples(root / "train")
        val, _ = _folder_samples(root / "val", classes)
        val_paths = {path for path, _ in val}
        kept = _drop_unreadable(train + val, str(root))
        train, val = [s for s in kept if s[0] not in val_paths], [s for s in kept if s[0] in val_paths]
        for split, samples in (("train", train), ("val", val)):
            if not samples:
                raise ValueError(f"no readable images in {root / split}; check the files there")
        return train, val
    if name == "list":
        if list_file is None:
            raise FileNotFoundError("the list source needs list_file=<text file with one image path per line>")
        return _hold_out(_drop_unreadable(_list_samples(Path(list_file)), str(list_file)), str(list_file))
    raise ValueError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}")


def build_source(name: str, split: str, img_size: int, root: str | os.PathLike | None = None,
                 list_file: str | os.PathLike | None = None) -> list[Sample]:
    """The "train" or "val" samples of a source (see `build_sources`)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = build_sources(name, img_size, root, list_file)
    return train if split == "train" else val


# ------------------------------------------------------------------------------------------------ datasets
class ImageDataset(Dataset):
    """samples + transform -> (image float (3, H, W), label int).

    albumentations keeps its own random state, which forked DataLoader workers would all copy from the main
    process: every worker, and with non-persistent workers every epoch, would replay the same crops and flips.
    So inside a worker the transform is reseeded from the worker's torch seed (new each epoch and worker).
    """

    def __init__(self, samples: Sequence[Sample], transform: A.Compose):
        self.samples = list(samples)
        self.transform = transform
        self._worker_seed = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.samples[index]
        image = read_image(image) if isinstance(image, (str, os.PathLike)) else image
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        worker = get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            self.transform.set_random_seed(worker.seed % 2 ** 32)
        return self.transform(image=image)["image"], label


class MaskedImageDataset(Dataset):
    """Adds a SimMIM mask: item index or (index, epoch) -> (image (3, H, W), mask (h, w) int64, label).

    The mask is ``mask_generator(np.random.default_rng([seed, epoch, index]))``; a plain index means epoch 0.
    """

    def __init__(self, dataset: Dataset, mask_generator: Callable[[np.random.Generator], np.ndarray], seed: int = 0):
        self.dataset = dataset
        self.mask_generator = mask_generator
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        image, label = self.dataset[index]
        mask = self.mask_generator(np.random.default_rng([self.seed, epoch, index]))
        return image, torch.from_numpy(mask), label


class EpochSampler(DistributedSampler):
    """Yields (index, epoch) for this rank's share of the indices, shuffled by torch.Generator(seed + epoch) when
    shuffle.

    Lightning calls `set_epoch` before each epoch; with fixed_epoch set, set_epoch is ignored (fixed val masks).
    With num_replicas N, rank r gets every N-th index of the order, from the r-th (DistributedSampler's split):
    at each step the N ranks' batches of B / N together hold the samples of the one-device batch of B. drop_last
    cuts the order to a multiple of N, else it is padded with its first indices. Being a DistributedSampler, it is
    used as it is by Lightning, which would otherwise wrap it in a sampler that shuffles the order again.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, fixed_epoch: int | None = None,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.fixed_epoch = fixed_epoch
        self.epoch = 0 if fixed_epoch is None else fixed_epoch

    def set_epoch(self, epoch: int) -> None:
        if self.fixed_epoch is None:
            self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(index, self.epoch) for index in super().__iter__()])


def labels_per_class_subset(samples: Sequence[Sample], per_class: int, seed: int = 0) -> list[Sample]:
    """`per_class` samples of each label (all of a label that has fewer), drawn by `seed`, in their given order."""
    if per_class < 1:
        raise ValueError(f"data.labels_per_class={per_class} must be >= 1, or null for every label")
    labels = np.array([label for _, label in samples])
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    return [samples[i] for i in np.sort(keep)]


def labeled_datasets(source: str = "digits", img_size: int = 64, root: str | os.PathLike | None = None,
                     list_file: str | os.PathLike | None = None, crop_scale: Sequence[float] = (0.08, 1.0),
                     crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                     labels_per_class: int | None = None, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) ImageDatasets for a classification fine-tune: `finetune_transform` (crop, flip) / eval
    transform, same splits. `labels_per_class`: train on that many images per class (`labels_per_class_subset`
    with `seed`); val stays whole."""
    train, val = build_sources(source, img_size, root, list_file)
    if labels_per_class is not None:
        train = labels_per_class_subset(train, labels_per_class, seed)
    return (ImageDataset(train, finetune_transform(img_size, crop_scale, crop_ratio, hflip)),
            ImageDataset(val, eval_transform(img_size)))


# ------------------------------------------------------------------------------------------------ datamodule
class SimMIMDataModule(pl.LightningDataModule):
    """Masked (image, mask, label) batches for SimMIM: images (B, 3, S, S), masks (B, S/p, S/p) with p the
    model patch size, labels (B,).

    Train uses `pretrain_transform` (crop_scale, crop_ratio, hflip) and masks that change every epoch; val uses
    `eval_transform` and the fixed epoch-0 masks. Folder sources without train/ and val/ subfolders, and list
    sources, hold out a fixed 2 % of their readable files (at least one) for validation.
    """

    def __init__(self, source: str = "digits", root: str | None = None, list_file: str | None = None,
                 img_size: int = 64, batch_size: int = 32, num_workers: int = 0, mask_kind: str = "random",
                 mask_patch_size: int = 16, model_patch_size: int = 4, mask_ratio: float = 0.6, seed: int = 0,
                 pin_memory: bool = False, drop_last: bool = True, crop_scale: Sequence[float] = (0.67, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: MaskedImageDataset | None = None
        self.val_set: MaskedImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        train, val = build_sources(hp.source, hp.img_size, hp.root, hp.list_file)
        if hp.drop_last and len(train) < hp.batch_size:
            raise ValueError(f"only {len(train)} training images, fewer than batch_size={hp.batch_size} with "
                             f"drop_last=True; lower batch_size or set drop_last=False")
        masks = build_mask_generator(hp.mask_kind, input_size=hp.img_size, mask_patch_size=hp.mask_patch_size,
                                     model_patch_size=hp.model_patch_size, mask_ratio=hp.mask_ratio, seed=hp.seed)
        augment = pretrain_transform(hp.img_size, hp.crop_scale, hp.crop_ratio, hp.hflip)
        self.train_set = MaskedImageDataset(ImageDataset(train, augment), masks, hp.seed)
        self.val_set = MaskedImageDataset(ImageDataset(val, eval_transform(hp.img_size)), masks, hp.seed)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler(len(self.train_set), shuffle=True, seed=self.hparams.seed,
                               drop_last=self.hparams.drop_last, **self._ranks())
        return self._loader(self.train_set, sampler, drop_last=self.hparams.drop_last)

    def val_dataloader(self) -> DataLoader:
        sampler = EpochSampler(len(self.val_set), shuffle=False, fixed_epoch=0, **self._ranks())
        return self._loader(self.val_set, sampler, drop_last=False)

    def _ranks(self) -> dict:
        """This process's share of the samples: the trainer's world size and rank (none outside a Trainer)."""
        return {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank} if self.trainer else {}

    def _loader(self, dataset: Dataset, sampler: EpochSampler, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory, drop_last=drop_last,
            # Workers carry no state between epochs: the epoch reaches them with every index through the
            # sampler, so restarting them each epoch is safe and gives their transforms fresh seeds.
            persistent_workers=False,
        )
