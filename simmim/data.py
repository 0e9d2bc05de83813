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

Masks and pretraining augmentations depend only on (seed, epoch, index): `EpochSampler` hands the epoch to the
dataset with every index, so neither the worker count nor a resumed run changes them; a run resumed mid-epoch
continues the same order after the batches it had done (`SimMIMDataModule.state_dict`).
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
    "digits_split", "build_sources", "build_source", "labeled_datasets",
    "ImageDataset", "MaskedImageDataset", "EpochSampler", "ResumableDataModule", "SimMIMDataModule",
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


def pretrain_transform(img_size: int) -> A.Compose:
    """SimMIM pretraining augmentation: uint8 (H, W, 3) RGB -> normalized float (3, img_size, img_size)."""
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
        A.HorizontalFlip(p=0.5),
        *_normalize_to_tensor(),
    ])


def finetune_transform(img_size: int) -> A.Compose:
    """Classification fine-tune augmentation (bicubic, like the official recipe): -> float (3, img_size, img_size)."""
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=cv2.INTER_CUBIC),
        A.HorizontalFlip(p=0.5),
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
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labeled = re.fullmatch(r"(.*\S)\s+(\S+)", line)
        # "path -1", "path cat": a label that is not a class index (a last word with "." or "/" is a path's)
        if (labeled and not re.fullmatch(r"[0-9]+", labeled[2]) and not re.search(r"[./]", labeled[2])
                and not (list_file.parent / line).exists()):
            raise ValueError(f"{list_file} line {number}: label {labeled[2]!r} of {labeled[1]} is not a class index "
                             f"(an integer >= 0); write 'path' or 'path index'")
        path, label = (labeled[1], int(labeled[2])) if labeled and re.fullmatch(r"[0-9]+", labeled[2]) else (line, 0)
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
    """samples + transform -> (image float (3, H, W), label int); an item is an index or (index, epoch).

    albumentations keeps its own random state, which forked DataLoader workers would all copy from the main
    process. With `seed` the transform is reseeded for every item from (seed, epoch, index): the crops and flips
    of a sample depend on nothing else (not the worker count, not a resumed run). Without it, the transform is
    reseeded inside each worker from the worker's torch seed (new each epoch and worker).
    """

    def __init__(self, samples: Sequence[Sample], transform: A.Compose, seed: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self._worker_seed = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        image, label = self.samples[index]
        image = read_image(image) if isinstance(image, (str, os.PathLike)) else image
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        if self.seed is not None:
            self.transform.set_random_seed(augmentation_seed(self.seed, epoch, index))
        elif (worker := get_worker_info()) is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            self.transform.set_random_seed(worker.seed % 2 ** 32)
        return self.transform(image=image)["image"], label


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The 32-bit seed of one sample's augmentation in one epoch (a stream apart from its mask's)."""
    return int(np.random.SeedSequence([seed, epoch, index, 1]).generate_state(1)[0])


class MaskedImageDataset(Dataset):
    """Adds a SimMIM mask: item index or (index, epoch) -> (image (3, H, W), mask (h, w) int64, label).

    The mask is ``mask_generator(np.random.default_rng([seed, epoch, index]))``; a plain index means epoch 0.
    ``dataset`` gets the (index, epoch) item (an `ImageDataset` with a seed augments from it).
    """

    def __init__(self, dataset: Dataset, mask_generator: Callable[[np.random.Generator], np.ndarray], seed: int = 0):
        self.dataset = dataset
        self.mask_generator = mask_generator
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        image, label = self.dataset[(index, epoch)]
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
    `epoch_fn`, when given, is asked for the epoch whenever an epoch's iteration starts, instead of set_epoch (the
    DataModule passes the trainer's current epoch: Lightning's set_epoch count runs one ahead after a resume from an
    end-of-epoch checkpoint). `resume(epoch, count)` starts that epoch after its first `count` indices (a run
    resumed mid-epoch); the length stays the epoch's, as Lightning counts the batches already done.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, fixed_epoch: int | None = None,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False,
                 epoch_fn: Callable[[], int] | None = None):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.fixed_epoch = fixed_epoch
        self.epoch = 0 if fixed_epoch is None else fixed_epoch
        self.epoch_fn = epoch_fn
        self.skip = (None, 0)  # (epoch, indices of it already used)

    def set_epoch(self, epoch: int) -> None:
        if self.fixed_epoch is None:
            self.epoch = epoch

    def resume(self, epoch: int, count: int) -> None:
        self.skip = (epoch, count)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.epoch_fn is not None and self.fixed_epoch is None:
            self.epoch = self.epoch_fn()
        indices = list(super().__iter__())
        if self.skip[0] == self.epoch:
            indices = indices[self.skip[1]:]
        return iter([(index, self.epoch) for index in indices])


def labeled_datasets(source: str = "digits", img_size: int = 64, root: str | os.PathLike | None = None,
                     list_file: str | os.PathLike | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) ImageDatasets for a classification fine-tune: finetune / eval transforms, same splits."""
    train, val = build_sources(source, img_size, root, list_file)
    return ImageDataset(train, finetune_transform(img_size)), ImageDataset(val, eval_transform(img_size))


# ------------------------------------------------------------------------------------------------ datamodule
class ResumableDataModule(pl.LightningDataModule):
    """A DataModule whose training order continues exactly where a checkpoint left it, mid-epoch included.

    Subclasses build their train sampler with `train_sampler` and need `hparams.seed` and `hparams.batch_size`.
    The position (epoch, batches trained on) is saved in Lightning's checkpoints by `state_dict`.
    """

    def __init__(self):
        super().__init__()
        self._train_sampler: EpochSampler | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    def train_sampler(self, num_samples: int, drop_last: bool) -> EpochSampler:
        """This rank's shuffled (index, epoch) order, epochs from the trainer, resumed after the batches done."""
        sampler = EpochSampler(num_samples, shuffle=True, seed=self.hparams.seed, drop_last=drop_last,
                               **self._ranks(), epoch_fn=self._current_epoch if self.trainer else None)
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            sampler.resume(epoch, batches * self.hparams.batch_size)
        self._train_sampler = sampler
        return sampler

    def state_dict(self) -> dict:
        """Where training stands in the data: the epoch and how many of its batches were trained on (saved in
        Lightning's checkpoints; a resumed run continues with the next batch of the same order)."""
        if self._train_sampler is None or self.trainer is None:
            return {}
        done, epoch = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed, self.trainer.current_epoch
        if done >= self.trainer.num_training_batches:  # saved at the end of the epoch: the next one is due
            return {"epoch": epoch + 1, "batches": 0}
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (state["epoch"], state["batches"])

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch

    def _ranks(self) -> dict:
        """This process's share of the samples: the trainer's world size and rank (none outside a Trainer)."""
        return {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank} if self.trainer else {}


class SimMIMDataModule(ResumableDataModule):
    """Masked (image, mask, label) batches for SimMIM: images (B, 3, S, S), masks (B, S/p, S/p) with p the
    model patch size, labels (B,).

    Train uses `pretrain_transform` and masks that change every epoch; val uses `eval_transform` and the fixed
    epoch-0 masks. Folder sources without train/ and val/ subfolders, and list sources, hold out a fixed 2 %
    of their readable files (at least one) for validation.
    """

    def __init__(self, source: str = "digits", root: str | None = None, list_file: str | None = None,
                 img_size: int = 64, batch_size: int = 32, num_workers: int = 0, mask_kind: str = "random",
                 mask_patch_size: int = 16, model_patch_size: int = 4, mask_ratio: float = 0.6, seed: int = 0,
                 pin_memory: bool = False, drop_last: bool = True):
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
            raise ValueError(f"only {len(train)} training images, fewer than data.batch_size={hp.batch_size} (every "
                             f"batch is full); lower data.batch_size or add images")
        masks = build_mask_generator(hp.mask_kind, input_size=hp.img_size, mask_patch_size=hp.mask_patch_size,
                                     model_patch_size=hp.model_patch_size, mask_ratio=hp.mask_ratio, seed=hp.seed)
        self.train_set = MaskedImageDataset(ImageDataset(train, pretrain_transform(hp.img_size), hp.seed), masks,
                                            hp.seed)
        self.val_set = MaskedImageDataset(ImageDataset(val, eval_transform(hp.img_size)), masks, hp.seed)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler(len(self.train_set), self.hparams.drop_last)
        return self._loader(self.train_set, sampler, drop_last=self.hparams.drop_last)

    def val_dataloader(self) -> DataLoader:
        sampler = EpochSampler(len(self.val_set), shuffle=False, fixed_epoch=0, **self._ranks())
        return self._loader(self.val_set, sampler, drop_last=False)

    def _loader(self, dataset: Dataset, sampler: EpochSampler, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory, drop_last=drop_last,
            # Workers carry no state between epochs: the epoch reaches them with every index through the
            # sampler, so restarting them each epoch is safe and gives their transforms fresh seeds.
            persistent_workers=False,
        )
