"""Sources: lists of (train, val) samples ``(image, label)``; ``image`` is a file path (folder and list sources)
or a uint8 array (digits). Files are listed, not decoded (``verify=True`` decodes them once and drops the
unreadable ones); their paths and labels live in numpy arrays (`FileList`)."""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from pytorch_lightning.utilities import rank_zero_warn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from simmim.data.decode import read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SOURCES = ("folder", "list", "digits", "shards")
VAL_HOLDOUT = 0.02  # fraction of a folder / list held out for validation when it has no val split
VAL_FOLDERS = ("val", "validation")  # the validation folder beside root/train/ (a train / validation layout)
DIGITS_VAL_FRACTION = 0.2
CHECK_CHUNK = 256  # files per thread-pool task when checking that images decode
LIST_CHECK = 1000  # listed files checked to exist when a list is read
FEW_FILES = ("; a folder or list of few images holds out few for validation (2 %, at least one): remove the "
             "unreadable files, or give more images")

Sample = tuple[str | np.ndarray, int]


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


class FileList:
    """Image paths and integer labels held in numpy arrays; ``file_list[i]`` is ``(path str, label int)``.

    A Python list of tuples would be one refcounted object per file, which every DataLoader worker copies page
    by page as it reads them (pytorch/pytorch#13246); here the paths are one byte buffer plus offsets.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], classes: Sequence[str] = ()):
        self.classes = list(classes)  # label i's class name (a folder source's class folders), else []
        encoded = [os.fsencode(path) for path in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(len(encoded))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return os.fsdecode(self.data[start:end].tobytes()), int(self.labels[index])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def path(self, index: int) -> str:
        return self[index][0]

    def subset(self, indices: np.ndarray) -> "FileList":
        """The samples at `indices` (int array), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, lengths = self.offsets[indices], self.offsets[indices + 1] - self.offsets[indices]
        subset = FileList([], [], self.classes)
        subset.offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=subset.offsets[1:])
        subset.data = self.data[np.repeat(starts - subset.offsets[:-1], lengths) + np.arange(subset.offsets[-1])]
        subset.labels = self.labels[indices]
        return subset


def image_files(folder: str | os.PathLike, key: str = "data.root") -> list[str]:
    """Image files under folder (recursive, following links, each folder once), sorted, as paths relative to
    folder (plain strings: pathlib objects would cost minutes for millions of files); FileNotFoundError naming
    `key`, the option that gave the folder, when there is none."""
    files, listed, again = [], set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in listed:  # a link to a folder listed already (a loop: a link to a folder above it)
            dirnames.clear()
            again.append(dirpath)
            continue
        listed.add(real)
        dirnames.sort()
        relative = os.path.relpath(dirpath, folder)
        files += [name if relative == "." else os.path.join(relative, name) for name in sorted(filenames)
                  if name.lower().endswith(IMAGE_EXTENSIONS)]
    if again:
        rank_zero_warn(f"{len(again)} linked folder(s) under {folder} lead to a folder listed already (first: "
                       f"{again[0]} -> {os.path.realpath(again[0])}): its images are listed once, where first found")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}; "
                                f"point {key} at a folder that holds images (subfolders are searched)")
    return files


def _subfolders(folder: Path) -> list[str]:
    """The names of folder's first-level folders (links to folders too), hidden ones (.name) left out."""
    return [entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")]


def _folder_samples(folder: Path, classes: list[str] | None = None) -> tuple[FileList, list[str]]:
    """Samples under folder and the class names used for their labels.

    classes None: the sorted first-level subfolders when every image sits in one, else [] (every label 0).
    """
    files = image_files(folder)
    tops = [f.split(os.sep, 1)[0] if os.sep in f else None for f in files]
    if classes is None:
        classes = [] if None in tops else sorted(set(tops))
        folders = sorted(set(tops) - {None})
        if empty := sorted(set(_subfolders(folder)) - set(folders)) if classes else []:
            rank_zero_warn(f"{len(empty)} folder(s) of {folder} hold no images ({', '.join(empty[:3])}"
                           f"{', ...' if len(empty) > 3 else ''}): they are no class; labels number the {len(classes)} "
                           f"folders with images ({', '.join(f'{n}={i}' for i, n in enumerate(classes[:4]))}"
                           f"{', ...' if len(classes) > 4 else ''})")
        if None in tops and folders:  # a stray file at the top costs every class folder its label
            rank_zero_warn(f"{tops.count(None)} image(s) at the top of {folder} (first: {files[tops.index(None)]}) "
                           f"beside {len(folders)} subfolder(s) ({', '.join(folders[:3])}"
                           f"{', ...' if len(folders) > 3 else ''}): every label is 0; "
                           f"move them into a class folder, or away, for one label per subfolder")
    index = {name: i for i, name in enumerate(classes)}
    if classes and (stray := [f for f, top in zip(files, tops) if top not in index]):
        raise ValueError(f"{folder / stray[0]} is outside the train class folders; "
                         f"give train and val the same class folders")
    labels = [index[top] for top in tops] if classes else [0] * len(files)
    return FileList([os.path.join(folder, f) for f in files], labels, classes), classes


def _list_samples(list_file: Path) -> FileList:
    if not list_file.is_file():
        raise FileNotFoundError(f"image list {list_file} does not exist; pass data.list_file=<text file with one image "
                                f"path and an optional label per line>")
    paths, labels, unlabeled = [], [], []
    with open(list_file, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()  # -sig: a BOM (Notepad, Excel)
            except UnicodeDecodeError as error:
                raise ValueError(f"{list_file} line {number}: not UTF-8 text ({error.reason}); save the list as "
                                 f"UTF-8") from None
            if not line or line.startswith("#"):
                continue
            labeled = re.fullmatch(r"(.*\S)\s+(\S+)", line)
            # "path -1", "path cat", "path 1.5": a label that is not a class index (a last word with "." or "/" is
            # a path's, unless it is a number); a class index of more than 9 digits is no class index either
            word = labeled[2] if labeled else ""
            index = re.fullmatch(r"[0-9]{1,9}", word)
            if (labeled and not index and (not re.search(r"[./]", word) or re.fullmatch(r"[-+]?[0-9.]+", word))
                    and not (list_file.parent / line).exists()):
                raise ValueError(f"{list_file} line {number}: label {word!r} of {labeled[1]} is not a class index "
                                 f"(an integer from 0 to 999999999); write 'path' or 'path index'")
            paths.append(os.path.join(list_file.parent, labeled[1] if index else line))
            labels.append(int(word) if index else 0)
            if not index:
                unlabeled.append(number)
    if not paths:
        raise ValueError(f"image list {list_file} names no images; write one image path per line")
    if unlabeled and len(unlabeled) < len(paths):
        raise ValueError(f"{list_file} line {unlabeled[0]} has no label while {len(paths) - len(unlabeled)} other "
                         f"line(s) have one ({len(unlabeled)} without); give every line a class index, or none")
    samples = FileList(paths, labels)
    _check_listed_files(samples, list_file)
    return samples


def _check_listed_files(samples: FileList, list_file: Path) -> None:
    """FileNotFoundError when none of up to LIST_CHECK listed files (seed-0 random) exists, a warning when some do
    not: a list's relative paths are relative to its folder, not to the working directory."""
    tried = np.random.default_rng(0).permutation(len(samples))[:LIST_CHECK]
    missing = [samples.path(int(i)) for i in tried if not os.path.isfile(samples.path(int(i)))]
    rule = "a list's relative paths are relative to the list file's folder"
    if len(missing) == len(tried):
        raise FileNotFoundError(f"none of {len(tried)} files of {list_file} tried exists (first: {missing[0]}); {rule}")
    if missing:
        rank_zero_warn(f"{len(missing)} of {len(tried)} files of {list_file} tried do not exist (first: {missing[0]}): "
                       f"they will be skipped as unreadable; {rule}")


def _hold_out(samples: FileList, where: str) -> tuple[FileList, FileList]:
    """Fixed split: a seed-0 random VAL_HOLDOUT of the samples (at least one) goes to val."""
    if len(samples) < 2:
        raise ValueError(f"{where} has only 1 image; need at least 2 to hold one out for validation")
    num_val = max(1, round(VAL_HOLDOUT * len(samples)))
    is_val = np.zeros(len(samples), dtype=bool)
    is_val[np.random.default_rng(0).permutation(len(samples))[:num_val]] = True
    return samples.subset(np.flatnonzero(~is_val)), samples.subset(np.flatnonzero(is_val))


def _is_readable(path: str) -> bool:
    try:
        read_image(path)
    except (OSError, ValueError):
        return False
    return True

def _drop_unreadable(splits: tuple[FileList, ...], where: str) -> tuple[FileList, ...]:
    """Decode every file once (thread pool) and drop the bad ones with one warning; error if a split is left empty."""
    paths = [path for split in splits for path, _ in split]
    chunks = [paths[i:i + CHECK_CHUNK] for i in range(0, len(paths), CHECK_CHUNK)]
    with ThreadPoolExecutor() as pool:
        flags = np.array([ok for chunk in pool.map(lambda c: [_is_readable(p) for p in c], chunks) for ok in chunk],
                         dtype=bool)
    if not flags.all():
        bad = paths[int(np.argmin(flags))]
        rank_zero_warn(f"skipped {int((~flags).sum())} unreadable images of {len(paths)} under {where} "
                       f"(first: {bad})", stacklevel=6)  # every rank decodes them
    kept, start = [], 0
    for name, split in zip(("train", "validation"), splits):
        ok = flags[start:start + len(split)]
        start += len(split)
        if not ok.any():
            raise ValueError(f"no readable images in the {name} split of {where}: all {len(split)} of its files failed "
                             f"to decode (first: {split.path(0)}){FEW_FILES if len(split) <= 2 else ''}")
        kept.append(split.subset(np.flatnonzero(ok)))
    return tuple(kept)


def build_sources(name: str, img_size: int, root: str | os.PathLike | None = None,
                  list_file: str | os.PathLike | None = None,
                  verify: bool = False) -> tuple[FileList | list[Sample], FileList | list[Sample]]:
    """(train, val) samples of a source ("folder" needs root, "list" needs list_file; digits need img_size).

    Files are only listed here; with verify they are all decoded once and the unreadable ones dropped with a
    single warning (the split is made first, so it does not depend on verify).
    """
    if name == "digits":
        return _digits_samples(img_size)
    if name == "folder":
        if root is None:
            raise FileNotFoundError("the folder source needs data.root=<folder of images> (data.source=digits: the "
                                    "embedded digits)")
        if Path(root).is_file():
            raise FileNotFoundError(f"data.root={root} is a file; pass a folder of images (a file that lists images: "
                                    f"data.source=list data.list_file={root})")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist; pass data.root=<folder of images>")
        root = Path(root)
        val = next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), None)
        if (root / "train").is_dir() and val is not None:
            train, classes = _folder_samples(root / "train")
            splits = train, _folder_samples(val, classes)[0]
        else:
            if (root / "train").is_dir():  # e.g. train/ and test/: the split folders would be the classes
                rank_zero_warn(f"{root} has a train/ folder but no {' or '.join(f'{n}/' for n in VAL_FOLDERS)} "
                               f"beside it, so its folders ({', '.join(sorted(_subfolders(root))[:4])}) are taken as "
                               f"classes; for a train / validation layout name the validation folder val/")
            splits = _hold_out(_folder_samples(root)[0], str(root))
    elif name == "list":
        if list_file is None:
            raise FileNotFoundError("the list source needs data.list_file=<text file with one image path per line>")
        splits = _hold_out(_list_samples(Path(list_file)), str(list_file))
    elif name == "shards":
        raise ValueError("the shards source streams its samples: use simmim.data.shards (SimMIMDataModule does)")
    else:
        raise ValueError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}")
    return _drop_unreadable(splits, str(root if name == "folder" else list_file)) if verify else splits


def build_source(name: str, split: str, img_size: int, root: str | os.PathLike | None = None,
                 list_file: str | os.PathLike | None = None, verify: bool = False) -> FileList | list[Sample]:
    """The "train" or "val" samples of a source (see `build_sources`)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = build_sources(name, img_size, root, list_file, verify)
    return train if split == "train" else val


def fixed_subset(samples: FileList | Sequence[Sample], limit: int | None) -> FileList | list[Sample]:
    """A fixed (seed 0) random subset of `limit` of the samples, in their order; all of them when limit is None
    or not smaller."""
    if limit is None or len(samples) <= limit:
        return samples
    keep = np.sort(np.random.default_rng(0).permutation(len(samples))[:limit])
    return samples.subset(keep) if isinstance(samples, FileList) else [samples[i] for i in keep]

def labels_per_class_subset(samples: FileList | Sequence[Sample], per_class: int,
                            seed: int = 0) -> FileList | list[Sample]:
    """`per_class` samples of each label (all of a label that has fewer), drawn by `seed`, in their given order."""
    if per_class < 1:
        raise ValueError(f"data.labels_per_class={per_class} must be >= 1, or null for every label")
    labels = samples.labels if isinstance(samples, FileList) else np.array([label for _, label in samples])
    if per_class > (most := int(np.unique(labels, return_counts=True)[1].max())):
        rank_zero_warn(f"data.labels_per_class={per_class}: no class has more than {most} training images; every "
                       f"image is used")
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == label))[:per_class]
                                   for label in np.unique(labels)]))
    return samples.subset(keep) if isinstance(samples, FileList) else [samples[i] for i in keep]
