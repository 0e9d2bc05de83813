"""Map-style datasets over a source's samples, with per-sample seeds: `ImageDataset` (decode, replace what
fails, transform), `MaskedImageDataset` (adds the SimMIM mask), `EpochSampler` (the (index, epoch) order of a
rank, resumable mid-epoch); the per-sample callables of the shards source; labeled sets for fine-tuning and
the k-NN monitor."""
from __future__ import annotations

import os
import warnings
from typing import Callable, Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from simmim.data.decode import decode_needs, read_image, shard_decode
from simmim.data.shards import ShardImages, shard_counts, split_shards
from simmim.data.sources import FEW_FILES, FileList, Sample, build_sources, fixed_subset, labels_per_class_subset
from simmim.data.transforms import TrainAugment, eval_transform, finetune_transform

MAX_REPLACEMENTS = 100  # a sample whose file and this many replacements all fail to decode is an error
SKIP_WARN_EVERY = 1000  # warn at the first undecodable file and then at every this many


class SkipCounter:
    """Counts the images that failed to decode, over the main process and every DataLoader worker.

    One int64 slot per worker (mod SLOTS - 1, the last slot is the main process) in shared memory, so
    workers never write the same slot. Warns at the first skip and at every SKIP_WARN_EVERY-th of a process.
    """
    SLOTS = 257

    def __init__(self):
        self.counts = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()

    def add(self, error: Exception) -> None:
        worker = get_worker_info()
        slot = self.SLOTS - 1 if worker is None else worker.id % (self.SLOTS - 1)
        self.counts[slot] += 1
        if (count := int(self.counts[slot])) == 1 or count % SKIP_WARN_EVERY == 0:
            warnings.warn(f"skipped {self.total} undecodable images so far, replaced by other samples "
                          f"(logged as data/skipped; latest: {error})", stacklevel=3)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class ImageDataset(Dataset):
    """samples + transform -> (image, label int); an item is an index or (index, epoch). The image is float
    (3, H, W) from an albumentations transform (eval), or uint8 (H, W, 3) from `TrainAugment`.

    A transform keeps its own random state (`TrainAugment` a numpy Generator, albumentations its own), which
    forked DataLoader workers would all copy from the main process. With `seed` the transform is reseeded for
    every item from (seed, epoch, index): the crops and flips of a sample depend on nothing else (not the worker
    count, not a resumed run). Without it, the transform is reseeded inside each worker from the worker's torch
    seed (new each epoch and worker).
    """

    def __init__(self, samples: FileList | Sequence[Sample], transform: TrainAugment | A.Compose,
                 seed: int | None = None):
        self.samples = samples if isinstance(samples, FileList) else list(samples)
        self.transform = transform
        self.seed = seed
        self._worker_seed = None
        self.skipped = SkipCounter()
        self.decode_needs = decode_needs(transform)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64: every sample's label, without reading an image."""
        if isinstance(self.samples, FileList):
            return self.samples.labels
        return np.array([label for _, label in self.samples], dtype=np.int64)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        image, label = self._load(index)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        if self.seed is not None:
            self.transform.set_random_seed(augmentation_seed(self.seed, epoch, index))
        elif (worker := get_worker_info()) is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            self.transform.set_random_seed(worker.seed % 2 ** 32)
        return self.transform(image=image)["image"], label

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        """The image and label at index; a file that does not decode is counted in `skipped` and replaced by
        another sample, drawn from np.random.default_rng([index, attempt]) (so always the same one)."""
        for attempt in range(MAX_REPLACEMENTS + 1):
            image, label = self.samples[index]
            if not isinstance(image, (str, os.PathLike)):
                return image, label
            try:
                return read_image(image, **self.decode_needs), label
            except (OSError, ValueError) as error:
                self.skipped.add(error)
                index = int(np.random.default_rng([index, attempt]).integers(len(self.samples)))
        if len(self.samples) <= MAX_REPLACEMENTS:  # a small split: its files were tried about all
            raise ValueError(f"{MAX_REPLACEMENTS + 1} tries over the {len(self.samples)} file(s) of a split all failed "
                             f"to decode (last: {image}){FEW_FILES if len(self.samples) <= 2 else ''}")
        raise ValueError(f"{MAX_REPLACEMENTS + 1} files in a row failed to decode (last: {image}, one of "
                         f"{len(self.samples)}); most of the data is unreadable, check it (data.verify=true lists what "
                         f"decodes at setup)")


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
    end-of-epoch checkpoint). `resume(epoch, count)` makes the next iteration that epoch, after its first `count`
    indices (a resumed run; the length stays the epoch's, as Lightning counts the batches already done): not the
    trainer's count, which, with DataLoader workers asking for indices before the epoch starts, is still the one
    before after an end-of-epoch checkpoint (the resumed epoch was drawn as that one, without a word).
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
        if self.skip[0] is not None:  # a resumed run's first epoch: the checkpoint's (see `resume`)
            (self.epoch, count), self.skip = self.skip, (None, 0)
        else:
            count = 0
            if self.epoch_fn is not None and self.fixed_epoch is None:
                self.epoch = self.epoch_fn()
        return iter([(index, self.epoch) for index in list(super().__iter__())[count:]])

def labeled_eval_sets(source: str, img_size: int, limit: int | None, root: str | os.PathLike | None = None,
                      list_file: str | os.PathLike | None = None, shards: str | None = None,
                      val_shards: str | None = None) -> tuple[Dataset, Dataset]:
    """A source's (train, val) splits as labeled (image float (3, S, S), label) sets through the eval transform,
    `limit` images of each (None: all): a fixed random subset of a listed source (`fixed_subset`), the first shards
    holding as many of the shards source (`simmim.data.shards.ShardImages`; val: val_shards, else the last shard)."""
    if source == "shards":
        return labeled_sets(img_size, limit, shards=[(urls, shard_counts(urls), SkipCounter())
                                                      for urls in split_shards(shards, val_shards)])
    return labeled_sets(img_size, limit, listed=build_sources(source, img_size, root, list_file))


def labeled_sets(img_size: int, limit: int | None, listed: Sequence | None = None,
                  shards: Sequence[tuple] | None = None) -> tuple[Dataset, ...]:
    """Labeled (image float (3, S, S), label) sets through the eval transform, one per split: `listed` splits
    (samples; a fixed random subset of `limit`: `fixed_subset`) or `shards` splits ((urls, counts, skipped); the
    first shards holding `limit` samples: `simmim.data.shards.ShardImages`); None: every image."""
    transform = eval_transform(img_size)
    if shards is None:
        return tuple(ImageDataset(fixed_subset(samples, limit), transform) for samples in listed)
    return tuple(ShardImages(urls, counts, limit, LabeledItem(transform), shard_decode(transform), skipped)
                 for urls, counts, skipped in shards)

def labeled_datasets(source: str = "digits", img_size: int = 64, root: str | os.PathLike | None = None,
                     list_file: str | os.PathLike | None = None, verify: bool = False,
                     labels_per_class: int | None = None, seed: int = 0,
                     **augment) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) ImageDatasets for a classification fine-tune: `finetune_transform` / eval transform, same
    splits; `augment`: the crop, flip and RandAugment arguments of `finetune_transform`.
    `labels_per_class`: train on that many images per class (`labels_per_class_subset` with `seed`); val stays
    whole."""
    train, val = build_sources(source, img_size, root, list_file, verify)
    if labels_per_class is not None:
        train = labels_per_class_subset(train, labels_per_class, seed)
    return ImageDataset(train, finetune_transform(img_size, **augment)), ImageDataset(val, eval_transform(img_size))


class MaskedItem:
    """(image, label, rng) -> (transformed image, mask (h, w) int64, label): the transform is seeded
    from rng, then the mask drawn from it (the per-sample randomness of the shards source)."""

    def __init__(self, transform: TrainAugment | A.Compose,
                 mask_generator: Callable[[np.random.Generator], np.ndarray]):
        self.transform, self.mask_generator = transform, mask_generator

    def __call__(self, image: np.ndarray, label: int, rng: np.random.Generator):
        self.transform.set_random_seed(int(rng.integers(2 ** 32)))
        return self.transform(image=image)["image"], torch.from_numpy(self.mask_generator(rng)), label


class LabeledItem:
    """(image, label, rng) -> (transformed image, label), the transform seeded from rng (the
    per-sample randomness of the shards source for a classifier)."""

    def __init__(self, transform: TrainAugment | A.Compose):
        self.transform = transform

    def __call__(self, image: np.ndarray, label: int, rng: np.random.Generator):
        self.transform.set_random_seed(int(rng.integers(2 ** 32)))
        return self.transform(image=image)["image"], label
