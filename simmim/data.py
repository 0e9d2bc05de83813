"""Data for SimMIM pretraining and the later fine-tune: image sources, transforms, masked datasets.

A *source* gives lists of samples ``(image, label)``, one for train and one for val. ``image`` is a file path
(folder and list sources) or a uint8 array (digits). Sources:

- ``folder``: every image under ``root`` (recursive). Labels are the sorted first-level subfolders when every
  image sits in one, else 0. ``root/train`` + ``root/val`` are used as the splits when both exist; otherwise a
  fixed 2 % of the files (at least one) is held out for validation.
- ``list``: a text file with one image path per line and an optional integer label after a space or tab;
  relative paths are relative to the list file; blank lines and ``#`` comments are skipped. Split as above.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, labels 0..9, offline), upscaled once to
  ``img_size``, with a fixed stratified 20 % validation split (`digits_split`).
- ``shards``: WebDataset tar shards, streamed (`simmim.shards`).

Folder and list files are not decoded at setup (``verify=True`` does, and drops the unreadable ones): a file
that fails to decode when read is replaced by another sample of the split and counted (`SkipCounter`). Their
paths and labels live in numpy arrays (`FileList`), so DataLoader workers share them instead of copying.

Masks and pretraining augmentations depend only on (seed, epoch, index): `EpochSampler` hands the epoch to the
dataset with every index, so neither the worker count nor a resumed run changes them; a run resumed mid-epoch
continues the same order after the batches it had done (`SimMIMDataModule.state_dict`).
"""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import simplejpeg
import torch
from albumentations.pytorch import ToTensorV2
from pytorch_lightning.utilities import rank_zero_warn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from masking import build_mask_generator
from simmim.augment import RandAugment
from simmim.workers import ShieldedDataLoader

if TYPE_CHECKING:
    from simmim.train.checkpoint_io import Resumable

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SOURCES",
    "pretrain_transform", "TrainAugment", "normalize_images", "finetune_transform", "eval_transform",
    "image_files", "read_image", "decode_image", "decode_needs",
    "FileList", "SkipCounter", "LogSkipped", "MaskedItem", "LabeledItem", "uses_cuda", "shard_source", "shard_decode",
    "digits_split", "build_sources", "build_source", "fixed_subset", "labeled_eval_sets",
    "labels_per_class_subset", "labeled_datasets",
    "ImageDataset", "MaskedImageDataset", "EpochSampler", "ResumableDataModule", "SimMIMDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SOURCES = ("folder", "list", "digits", "shards")
VAL_HOLDOUT = 0.02  # fraction of a folder / list held out for validation when it has no val split
VAL_FOLDERS = ("val", "validation")  # the validation folder beside root/train/ (a train / validation layout)
DIGITS_VAL_FRACTION = 0.2
CHECK_CHUNK = 256  # files per thread-pool task when checking that images decode
LIST_CHECK = 1000  # listed files checked to exist when a list is read
MAX_REPLACEMENTS = 100  # a sample whose file and this many replacements all fail to decode is an error
FEW_FILES = ("; a folder or list of few images holds out few for validation (2 %, at least one): remove the "
             "unreadable files, or give more images")
SKIP_WARN_EVERY = 1000  # warn at the first undecodable file and then at every this many
EXIF_SEARCH = 1 << 18  # bytes at the start of a JPEG searched for its EXIF segment (it precedes the image data)

Sample = tuple[str | np.ndarray, int]


# ------------------------------------------------------------------------------------------------ transforms
def check_crop_flip(crop_scale: Sequence[float], crop_ratio: Sequence[float], hflip: float) -> None:
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
                       crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> "TrainAugment":
    """SimMIM pretraining augmentation: uint8 (H, W, 3) RGB -> uint8 (img_size, img_size, 3), normalized later
    on the device (`normalize_images`).

    A random crop of `crop_scale` (fractions of the area) and `crop_ratio` (width / height) resized bilinearly
    to img_size, a horizontal flip with probability `hflip` (`TrainAugment`).
    """
    check_crop_flip(crop_scale, crop_ratio, hflip)
    return TrainAugment(img_size, crop_scale, crop_ratio, hflip)


def finetune_transform(img_size: int, crop_scale: Sequence[float] = (0.08, 1.0),
                       crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, randaug_ops: int = 0,
                       randaug_magnitude: float = 9.0, randaug_magnitude_std: float = 0.5) -> "TrainAugment":
    """Classification fine-tune augmentation: uint8 (H, W, 3) RGB -> uint8 (img_size, img_size, 3), normalized
    (and randomly erased: `simmim.augment.random_erasing`) later on the device.

    Random resized crop (bicubic, like the official recipe) and flip as in `pretrain_transform` (the defaults are
    the ImageNet recipe's), then RandAugment when `randaug_ops` > 0 (the official recipe: 2 ops, magnitude 9,
    std 0.5).
    """
    check_crop_flip(crop_scale, crop_ratio, hflip)
    randaug = RandAugment(randaug_ops, randaug_magnitude, randaug_magnitude_std) if randaug_ops else None
    return TrainAugment(img_size, crop_scale, crop_ratio, hflip, cv2.INTER_CUBIC, randaug)


class TrainAugment:
    """Random resized crop + horizontal flip (+ RandAugment) on uint8 pixels: (H, W, C) -> uint8 tensor (S, S, C).

    The crop's area is drawn uniformly from `scale` (fractions of the image) and its aspect ratio (width / height)
    log-uniformly from `ratio`, up to 10 tries for one that fits, else the largest centered crop of an allowed
    ratio (torchvision's rule); it is resized to size x size with `interpolation` (one OpenCV resize of the
    crop's pixels) and flipped with probability `hflip`; `randaug` (simmim.augment.RandAugment) follows. Pixels
    stay uint8 and channels last: the batch is permuted and normalized on the device (`normalize_images`, called
    by the DataModules' `on_after_batch_transfer`), which spares the workers the float work and the collation
    a strided copy, and the host-to-device copy three quarters of its bytes. Used like an albumentations
    transform: ``augment(image=array)["image"]``, ``augment.set_random_seed(seed)``.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.67, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: int = cv2.INTER_LINEAR, randaug: RandAugment | None = None):
        self.size, self.scale, self.ratio, self.hflip = (size, size), tuple(scale), tuple(ratio), hflip
        self.interpolation, self.randaug = interpolation, randaug
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of the next random crop of a height x width image."""
        area, log_ratio = height * width, np.log(self.ratio)
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = np.exp(self.rng.uniform(*log_ratio))
            w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(self.rng.integers(height - h + 1)), int(self.rng.integers(width - w + 1)), h, w
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        h, w = (height, min(width, round(height * aspect))) if width / height >= aspect else \
            (min(height, round(width / aspect)), width)
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, *, image: np.ndarray) -> dict[str, torch.Tensor]:
        top, left, h, w = self.box(*image.shape[:2])
        out = cv2.resize(image[top:top + h, left:left + w], self.size, interpolation=self.interpolation)
        if self.rng.random() < self.hflip:
            out = cv2.flip(out, 1)
        out = out.reshape(*self.size, -1)  # cv2 drops a single channel's axis
        if self.randaug is not None:
            out = self.randaug(out, self.rng)
        return {"image": torch.from_numpy(out)}


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB, as `TrainAugment` leaves them -> float32 (B, 3, H, W), ImageNet-normalized like
    the float transforms' output."""
    images = images.permute(0, 3, 1, 2).contiguous()
    mean = images.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = images.new_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def eval_transform(img_size: int) -> A.Compose:
    """Resize the short side to img_size / 0.875, center-crop: -> float (3, img_size, img_size)."""
    return A.Compose([
        A.SmallestMaxSize(max_size=round(img_size / 0.875), interpolation=cv2.INTER_CUBIC),
        A.CenterCrop(height=img_size, width=img_size),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
        ToTensorV2(),
    ])


# ------------------------------------------------------------------------------------------------ reading
def read_image(path: str | os.PathLike, min_short: int = 0, min_area: int = 0) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB (see `decode_image`). Raises OSError if the file cannot be
    read, ValueError if it does not decode."""
    return decode_image(np.fromfile(path, dtype=np.uint8), str(path), min_short, min_area)


def decode_image(data: bytes | np.ndarray, name: str = "image", min_short: int = 0, min_area: int = 0) -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, 3) RGB, EXIF orientation applied (JPEG, PNG, WebP).

    JPEGs are decoded by libjpeg-turbo (simplejpeg) at 1/2, 1/4 or 1/8 scale (DCT scaling: the inverse DCT,
    upsampling and color conversion shrink, the entropy decoding does not) when the result still has a short
    side >= min_short and an area >= min_area (both 0: full size): give what the transform needs
    (`decode_needs`). Other formats, and JPEGs simplejpeg does not take (CMYK), go through
    ``cv2.imdecode(IMREAD_UNCHANGED)``: grayscale is repeated to 3 channels, an alpha channel composited onto
    black, 16-bit values divided by 257 (rounded). Truncated or corrupt files raise ValueError naming `name`.
    """
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    image = None
    if data[:2].tobytes() == b"\xff\xd8":
        image = _decode_jpeg(data, name, min_short, min_area)
    if image is None:
        image = _decode_cv2(data, name)
    return _orient(image, _exif_orientation(data))


def _decode_jpeg(data: np.ndarray, name: str, min_short: int, min_area: int) -> np.ndarray | None:
    """simplejpeg at the largest 1/f (f = 8, 4, 2, 1) that keeps min_short and min_area; None if it cannot."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):
            return None
        factor = next(f for f in (8, 4, 2, 1) if f == 1 or (min_short or min_area) and (
            min(height, width) / f >= min_short and height * width / f ** 2 >= min_area))
        scale = {} if factor == 1 else {"min_height": -(-height // factor), "min_width": -(-width // factor)}
        image = simplejpeg.decode_jpeg(data, colorspace="GRAY" if colorspace == "Gray" else "RGB", **scale)
    except ValueError as error:
        raise ValueError(f"cannot decode image {name}: the file is corrupt, truncated or not an image ({error})")
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 or image.shape[2] == 1 else image


def _decode_cv2(data: np.ndarray, name: str) -> np.ndarray:
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        width, height = (int.from_bytes(data[i:i + 4].tobytes(), "big") for i in (16, 20))  # a PNG's IHDR
        limit = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))  # OpenCV's, default 2^30
        if data[:8].tobytes() == b"\x89PNG\r\n\x1a\n" and width * height > limit:
            raise ValueError(f"cannot decode image {name}: it is {width}x{height} pixels, above OpenCV's limit of "
                             f"{limit}; resize it, or raise the limit (environment variable "
                             f"OPENCV_IO_MAX_IMAGE_PIXELS)")
        raise ValueError(f"cannot decode image {name}: the file is corrupt, truncated or not an image")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype} in {name}: only 8- and 16-bit images are supported")
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] in (2, 4):  # gray + alpha or BGRA
        alpha = image[..., -1:].astype(np.float32) / 255
        image = np.rint(image[..., :-1] * alpha).astype(np.uint8)
    if image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation (1..8) of a JPEG (APP1 segment), PNG (eXIf chunk) or WebP (EXIF chunk) in its first
    EXIF_SEARCH bytes; 1 when it has none (other formats: their decoder's)."""
    raw = data[:EXIF_SEARCH].tobytes()
    if raw[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(raw) and raw[pos] == 0xFF:
            marker, length = raw[pos + 1], int.from_bytes(raw[pos + 2:pos + 4], "big")
            if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
                return 1
            segment = raw[pos + 4:pos + 2 + length]
            if marker == 0xE1 and segment[:6] == b"Exif\0\0":
                return _tiff_orientation(segment[6:])
            pos += 2 + length
    elif raw[:8] == b"\x89PNG\r\n\x1a\n":  # chunks: length (big-endian), type, data, CRC
        pos = 8
        while pos + 8 <= len(raw):
            length, kind = int.from_bytes(raw[pos:pos + 4], "big"), raw[pos + 4:pos + 8]
            if kind == b"eXIf":
                return _tiff_orientation(raw[pos + 8:pos + 8 + length])
            pos += 12 + length
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":  # chunks: type, length (little-endian), data padded to even
        pos = 12
        while pos + 8 <= len(raw):
            kind, length = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
            if kind == b"EXIF":
                tiff = raw[pos + 8:pos + 8 + length]
                return _tiff_orientation(tiff[6:] if tiff[:6] == b"Exif\0\0" else tiff)
            pos += 8 + length + length % 2
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of EXIF's TIFF structure (IFD0), 1 when absent or out of 1..8."""
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    for i in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        if int.from_bytes(entry[:2], order) == 0x0112:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """The upright image of EXIF orientation 1..8: 2 mirrored, 3 turned 180, 4 flipped, 5 transposed, 6 turned
    90 counterclockwise, 7 transversed, 8 turned 90 clockwise (as stored)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 0, 2)  # 5; then 6 = mirror, 7 = both, 8 = flip
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        image = image[:, ::-1]
    if orientation in (3, 4):
        image = image[::-1]
    return np.ascontiguousarray(image)


def decode_needs(transform: A.Compose | TrainAugment) -> dict[str, int]:
    """{"min_short", "min_area"} of a decoded image (`decode_image`) for the transform's output to keep full
    detail: a random resized crop must still span img_size pixels across its smallest crop (area fraction
    scale[0], aspect ratio within `ratio`); a resize of the short side to S needs a short side >= S. Zeros
    (a full decode) for other transforms."""
    if isinstance(transform, TrainAugment):
        size = max(transform.size)
        area = size ** 2 / (transform.scale[0] * min(transform.ratio[0], 1 / transform.ratio[1]))
        return {"min_short": size, "min_area": int(np.ceil(area))}
    first = transform.transforms[0]
    if isinstance(first, A.SmallestMaxSize):
        return {"min_short": first.max_size if isinstance(first.max_size, int) else max(first.max_size),
                "min_area": 0}
    return {"min_short": 0, "min_area": 0}


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


def _drop_unreadable(splits: tuple[FileList, ...], where: str) -> tuple[FileList, ...]:
    """Decode every file once (thread pool) and drop the bad ones with one warning; error if a split is left empty."""
    paths = [path for split in splits for path, _ in split]
    chunks = [paths[i:i + CHECK_CHUNK] for i in range(0, len(paths), CHECK_CHUNK)]
    with ThreadPoolExecutor() as pool:
        flags = np.array([ok for chunk in pool.map(lambda c: [_is_readable(p) for p in c], chunks) for ok in chunk],
                         dtype=bool)
    if not flags.all():
        bad = paths[int(np.argmin(flags))]
        warnings.warn(f"skipped {int((~flags).sum())} unreadable images of {len(paths)} under {where} "
                      f"(first: {bad})", stacklevel=3)
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
        if root is None:  # was "image folder None does not exist"
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
        raise ValueError("the shards source streams its samples: use simmim.shards (SimMIMDataModule does)")
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


class LogSkipped(pl.Callback):
    """Logs ``data/skipped``, the images that failed to decode so far (`SkipCounter` of the datamodule)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        counter = getattr(trainer.datamodule, "skipped", None)
        if counter is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log("data/skipped", float(counter.total), reduce_fx="sum", sync_dist=True)


# ------------------------------------------------------------------------------------------------ datasets
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


def fixed_subset(samples: FileList | Sequence[Sample], limit: int | None) -> FileList | list[Sample]:
    """A fixed (seed 0) random subset of `limit` of the samples, in their order; all of them when limit is None
    or not smaller."""
    if limit is None or len(samples) <= limit:
        return samples
    keep = np.sort(np.random.default_rng(0).permutation(len(samples))[:limit])
    return samples.subset(keep) if isinstance(samples, FileList) else [samples[i] for i in keep]


def labeled_eval_sets(source: str, img_size: int, limit: int | None, root: str | os.PathLike | None = None,
                      list_file: str | os.PathLike | None = None, shards: str | None = None,
                      val_shards: str | None = None) -> tuple[Dataset, Dataset]:
    """A source's (train, val) splits as labeled (image float (3, S, S), label) sets through the eval transform,
    `limit` images of each (None: all): a fixed random subset of a listed source (`fixed_subset`), the first shards
    holding as many of the shards source (`simmim.shards.ShardImages`; val: val_shards, else the last shard)."""
    if source == "shards":
        from simmim.shards import shard_counts, split_shards

        return _labeled_sets(img_size, limit, shards=[(urls, shard_counts(urls), SkipCounter())
                                                      for urls in split_shards(shards, val_shards)])
    return _labeled_sets(img_size, limit, listed=build_sources(source, img_size, root, list_file))


def _labeled_sets(img_size: int, limit: int | None, listed: Sequence | None = None,
                  shards: Sequence[tuple] | None = None) -> tuple[Dataset, ...]:
    """Labeled (image float (3, S, S), label) sets through the eval transform, one per split: `listed` splits
    (samples; a fixed random subset of `limit`: `fixed_subset`) or `shards` splits ((urls, counts, skipped); the
    first shards holding `limit` samples: `simmim.shards.ShardImages`); None: every image."""
    transform = eval_transform(img_size)
    if shards is None:
        return tuple(ImageDataset(fixed_subset(samples, limit), transform) for samples in listed)
    from simmim.shards import ShardImages

    return tuple(ShardImages(urls, counts, limit, LabeledItem(transform), shard_decode(transform), skipped)
                 for urls, counts, skipped in shards)


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


# ------------------------------------------------------------------------------------------------ datamodule
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


class ResumableDataModule(pl.LightningDataModule):
    """A DataModule whose training order continues exactly where a checkpoint left it, mid-epoch included.

    Subclasses set `train_set`, `val_set` and `skipped` in `setup` (or call `stream_shards`), give
    `train_dataloader` through `_train_loader`, and have hparams seed, batch_size, num_workers, pin_memory (None:
    pin on CUDA) and the shards source's keys. The position (epoch, batches trained on) is saved in Lightning's
    checkpoints by `state_dict`; in the middle of an epoch with the layout it holds for (`_layout`), which a
    resumed run must keep to continue that epoch (`_check_layout`).
    """

    def __init__(self):
        super().__init__()
        self._train_sampler: EpochSampler | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self.shards, self._shards_state = None, None  # the shards source (simmim.shards.ShardSource), its state
        self._saved_layout: dict | None = None  # the `_layout` of a checkpoint saved mid-epoch

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
        Lightning's checkpoints; a resumed run continues with the next batch of the same order); for the shards
        source, its own place in the stream."""
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        end_of_epoch = self.trainer is not None and done >= self.trainer.num_training_batches
        layout = {"layout": self._layout()} if done and not end_of_epoch else {}
        if self.shards is not None:
            return {"shards": {"ranks": self._every_rank(self.shards.state_dict(self.trainer))}, **layout}
        if self._train_sampler is None or self.trainer is None:
            return {}
        if end_of_epoch:  # the next one is due
            return {"epoch": self.trainer.current_epoch + 1, "batches": 0}
        return {"epoch": self.trainer.current_epoch, "batches": done, **layout}

    def _every_rank(self, state: dict) -> list[dict]:
        """Every rank's `state`, in rank order (a collective: every rank saves). Lightning writes rank 0's
        datamodule state only, and the ranks' places in their shards differ once a worker of one rank has used up
        its shards before the others (that rank then takes its batches from its other workers)."""
        if self.trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [state]
        states = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def _layout(self, ranks: int | None = None) -> dict:
        """What this rank's place in an epoch's data is relative to: the ranks (the trainer's), data.batch_size
        (per rank), data.num_workers and the training data the epoch's order is drawn over (`_train_data`)."""
        hp = self.hparams
        return {"ranks": ranks or self.trainer.world_size, "batch_size": hp.batch_size, "num_workers": hp.num_workers,
                "train_data": self._train_data()}

    def _train_data(self) -> str:
        """The size of the training data, which the epoch's order depends on: "N images", "K shards of N samples"."""
        if self.shards is not None:
            return f"{len(self.shards.train_set.urls)} shards of {sum(self.shards.train_set.counts)} samples"
        return f"{len(self.train_set)} images"

    def _check_layout(self) -> None:
        """A run resumed in the middle of an epoch continues that epoch's order with the same images per batch
        over all ranks (ranks x data.batch_size; the ranks' shares of a batch interleave in one order: see
        `EpochSampler`), on shards with the same ranks, workers and batch size (each reader has its own place in
        its shards); anything else would repeat or skip samples of the epoch, so it is refused with the fixes.
        Training data of another size (files added or removed since) is warned of: the user cannot fix that."""
        set_up = getattr(self, "train_set", None) is not None or self.shards is not None
        state = getattr(self.trainer, "state", None)  # validate reads no training position
        fitting = self.trainer is not None and getattr(state, "fn", "fit") == "fit"
        if self._saved_layout and fitting and set_up:
            self._check_saved_layout(self._saved_layout, self.trainer.world_size, Path(str(self.trainer.ckpt_path)))
            self._saved_layout = None  # checked: on restore (set up by then), else when the train loader is made

    def check_fit(self, resume: Resumable | None, ranks: int) -> None:
        """Before fit, for a run of `ranks` ranks, what the loaders or the restore would refuse, so that a refused
        start writes nothing (Lightning's fit starts the loggers' files before it makes the loaders or restores the
        datamodule): shards for every reader (`ShardSource.split`), and the checkpoint to resume (`prepare_run`'s)
        against the layout (`_check_layout`)."""
        if self.shards is not None:
            self.shards.split(0, ranks, self.hparams.num_workers, self.hparams.batch_size)
        if resume is None or resume.checkpoint is None:  # a DeepSpeed folder: checked on restore
            return
        if saved := resume.checkpoint.get(type(self).__qualname__, {}).get("layout"):
            self._check_saved_layout(saved, ranks, Path(resume.path), warn=False)  # warned on restore

    def _check_saved_layout(self, saved: dict, ranks: int, ckpt: Path, warn: bool = True) -> None:
        now = self._layout(ranks)
        last = ckpt.parent / "last.ckpt"
        fix = (f"or resume from the end of an epoch (resume={last}, saved at each epoch's end)" if last.is_file() else
               "or start a new run (another run_name): no epoch of this one has ended yet")
        if self.shards is None and saved["ranks"] * saved["batch_size"] != now["ranks"] * now["batch_size"]:
            raise ValueError(
                f"{ckpt} was saved in the middle of an epoch by {saved['ranks']} rank(s) x data.batch_size="
                f"{saved['batch_size']}, this run has {now['ranks']} x {now['batch_size']}: the epoch continues "
                f"only with {saved['ranks'] * saved['batch_size']} images per batch over all ranks; set "
                f"trainer.devices (x trainer.num_nodes) and data.batch_size to give that, {fix}")
        readers = [(layout["ranks"], max(layout["num_workers"], 1), layout["batch_size"]) for layout in (saved, now)]
        if self.shards is not None and readers[0] != readers[1]:
            raise ValueError(
                f"{ckpt} was saved in the middle of an epoch on shards by {saved['ranks']} rank(s) x "
                f"data.num_workers={saved['num_workers']} x data.batch_size={saved['batch_size']}, this run has "
                f"{now['ranks']} x {now['num_workers']} x {now['batch_size']}: each rank's workers hold their own "
                f"place in their shards, so the epoch continues only with the same three; set them as saved, {fix}")
        if warn and saved.get("train_data", now["train_data"]) != now["train_data"]:
            rank_zero_warn(  # every rank sees the same data
                f"{ckpt} was saved in the middle of an epoch over {saved['train_data']}, the training data now has "
                f"{now['train_data']}: the rest of that epoch follows another order, so some of its samples may come "
                f"twice and others not at all (the epochs after it are whole). To continue exactly, give the data "
                f"as it was, {fix}")

    def load_state_dict(self, state: dict) -> None:
        self._saved_layout = state.get("layout")
        self._check_layout()
        if state:  # Lightning's check for resumable loaders sees the DataLoaders only, not this restored position
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        if "shards" in state:
            ranks = state["shards"].get("ranks", [state["shards"]])  # older checkpoints hold rank 0's only
            rank = self.trainer.global_rank if self.trainer is not None else 0
            # more ranks than saved: only from an epoch's end (`_check_layout`), where every rank's place is the same
            self._shards_state = ranks[rank] if rank < len(ranks) else ranks[0]
            if self.shards is not None:
                self.shards.load_state_dict(self._shards_state)
        elif state:
            self._resume_at = (state["epoch"], state["batches"])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Train images leave the loader uint8 (B, H, W, 3) (`TrainAugment`); here, on the device, they are
        normalized to (B, 3, H, W) (`normalize_images`), augmented further (`device_augment`), then cast as the
        precision casts float inputs (Lightning does that before the transfer, when they were still uint8)."""
        images, *rest = batch
        if images.dtype == torch.uint8:
            images = self.device_augment(normalize_images(images))
            if self.trainer is not None:
                images = self.trainer.precision_plugin.convert_input(images)
        return [images, *rest]

    def device_augment(self, images: torch.Tensor) -> torch.Tensor:
        """A normalized train batch (B, 3, H, W) -> the same, augmented on the device (here: unchanged)."""
        return images

    def stream_shards(self, items: list, transforms: tuple) -> None:
        """Set up the shards source (`shard_source`) with the stage's (train, val) items and transforms, at the
        position a checkpoint restored."""
        self.shards = shard_source(self.hparams, items, transforms, self.skipped)
        self.shards.split(*self._rank_and_world(), self.hparams.num_workers, self.hparams.batch_size)
        if self._shards_state:
            self.shards.load_state_dict(self._shards_state)
        self.train_set, self.val_set = self.shards.train_set, self.shards.val_set

    def _train_loader(self, drop_last: bool) -> DataLoader:
        self._check_layout()
        hp = self.hparams
        if self.shards is not None:
            return self.shards.loader(True, *self._rank_and_world(), hp.batch_size, hp.num_workers, drop_last,
                                      self._pin_memory())
        return self._loader(self.train_set, self.train_sampler(len(self.train_set), drop_last), drop_last)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        if self.shards is not None:
            return self.shards.loader(False, *self._rank_and_world(), hp.batch_size, hp.num_workers,
                                      pin_memory=self._pin_memory())
        sampler = EpochSampler(len(self.val_set), shuffle=False, fixed_epoch=0, **self._ranks())
        return self._loader(self.val_set, sampler, drop_last=False)

    def val_batch_own(self, batch_idx: int, size: int) -> int:
        """How many images at the start of this rank's validation batch `batch_idx` (of `size`) are the split's
        own: over several ranks the sampler pads the split to a multiple of them with its first images (every rank
        then runs as many batches), which the metrics must not count twice. Rank r's k-th image is the padded
        order's k * ranks + r-th, padding from the split's length on; shards are not padded."""
        if self.shards is not None or self.trainer is None or self.trainer.world_size == 1:
            return size
        ranks, rank = self.trainer.world_size, self.trainer.global_rank
        own = -(-(len(self.val_set) - rank) // ranks)  # k with k * ranks + rank < len(val_set)
        return max(0, min(size, own - batch_idx * self.hparams.batch_size))

    def _pin_memory(self) -> bool:
        """hparams.pin_memory, or when None: whether the trainer (or, outside one, this machine) uses CUDA."""
        return uses_cuda(self.trainer) if self.hparams.pin_memory is None else self.hparams.pin_memory

    def _loader(self, dataset: Dataset, sampler: EpochSampler, drop_last: bool) -> DataLoader:
        hp = self.hparams
        return ShieldedDataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                                  pin_memory=self._pin_memory(), drop_last=drop_last,
                                  persistent_workers=hp.num_workers > 0)

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch

    def _rank_and_world(self) -> tuple[int, int]:
        """(rank, world size) of this process: the trainer's, (0, 1) outside one."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _ranks(self) -> dict:
        """This process's share of the samples, as EpochSampler's arguments (`_rank_and_world`)."""
        rank, world_size = self._rank_and_world()
        return {"num_replicas": world_size, "rank": rank}


class SimMIMDataModule(ResumableDataModule):
    """Masked (image, mask, label) batches for SimMIM: images (B, 3, S, S), masks (B, S/p, S/p) with p the
    model patch size, labels (B,). Train images leave the loader uint8 and are normalized on the device
    (`on_after_batch_transfer`); val images are normalized floats already.

    Train uses `pretrain_transform` (crop_scale, crop_ratio, hflip) and masks that change every epoch; val uses
    `eval_transform` and the fixed epoch-0 masks. Folder sources without train/ and val/ subfolders, and list
    sources, hold out a fixed 2 % of their files (at least one) for validation. The shards source
    (`simmim.shards`) streams ``shards`` (validation: ``val_shards``, else the last shard is held out); its
    position in the epoch is the datamodule's state, saved in Lightning checkpoints.
    """

    def __init__(self, source: str = "digits", root: str | None = None, list_file: str | None = None,
                 img_size: int = 64, batch_size: int = 32, num_workers: int = 0, mask_kind: str = "random",
                 mask_patch_size: int = 16, model_patch_size: int = 4, mask_ratio: float = 0.6, seed: int = 0,
                 pin_memory: bool | None = None, drop_last: bool = True, verify: bool = False,
                 shards: str | None = None, val_shards: str | None = None, shuffle_buffer: int = 1000,
                 crop_scale: Sequence[float] = (0.67, 1.0), crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: MaskedImageDataset | None = None
        self.val_set: MaskedImageDataset | None = None
        self.skipped = SkipCounter()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        masks = build_mask_generator(hp.mask_kind, input_size=hp.img_size, mask_patch_size=hp.mask_patch_size,
                                     model_patch_size=hp.model_patch_size, mask_ratio=hp.mask_ratio, seed=hp.seed)
        transforms = pretrain_transform(hp.img_size, hp.crop_scale, hp.crop_ratio, hp.hflip), eval_transform(hp.img_size)
        if hp.source == "shards":
            self.stream_shards([MaskedItem(t, masks) for t in transforms], transforms)
            return
        train, val = build_sources(hp.source, hp.img_size, hp.root, hp.list_file, hp.verify)
        if hp.drop_last and len(train) < hp.batch_size:
            raise ValueError(f"only {len(train)} training images, fewer than data.batch_size={hp.batch_size} (every "
                             f"batch is full); lower data.batch_size or add images")
        self.train_set = MaskedImageDataset(ImageDataset(train, transforms[0], hp.seed), masks, hp.seed)
        self.val_set = MaskedImageDataset(ImageDataset(val, transforms[1]), masks, hp.seed)
        self.train_set.dataset.skipped = self.val_set.dataset.skipped = self.skipped

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.hparams.drop_last)

    def knn_sets(self, limit: int | None) -> tuple[Dataset, Dataset]:
        """The k-NN monitor's labeled train and val sets, (image float (3, S, S), label) through the eval transform:
        a fixed random subset of `limit` images per split of a listed source (`fixed_subset`), the first shards of
        each split holding `limit` samples of the shards source (`simmim.shards.ShardImages`); None: every image.
        The samples listed and the shards counted at setup are used as they are. Their skips have counters of their
        own: data/skipped counts training's and validation's, not each k-NN pass over the same files again."""
        if self.shards is not None:
            return _labeled_sets(self.hparams.img_size, limit, shards=[
                (split.urls, split.counts, SkipCounter()) for split in (self.shards.train_set, self.shards.val_set)])
        return _labeled_sets(self.hparams.img_size, limit,
                             listed=[split.dataset.samples for split in (self.train_set, self.val_set)])


def uses_cuda(trainer) -> bool:
    """Whether the trainer (or, outside one, this machine) runs on CUDA: then DataLoaders pin memory."""
    return trainer.strategy.root_device.type == "cuda" if trainer is not None else torch.cuda.is_available()


def shard_source(hp, items: list, transforms: tuple, skipped: SkipCounter):
    """The `simmim.shards.ShardSource` of data hyperparameters (shards, val_shards, seed, shuffle_buffer): items
    and transforms are (train, val) pairs; JPEGs are decoded at the scale each transform needs."""
    from simmim.shards import ShardSource

    return ShardSource(hp.shards, hp.val_shards, items, [shard_decode(t) for t in transforms], skipped,
                       seed=hp.seed, shuffle_buffer=hp.shuffle_buffer)


def shard_decode(transform: TrainAugment | A.Compose) -> Callable[[bytes], np.ndarray]:
    """A shard sample's image bytes -> uint8 (H, W, 3), decoded at the scale the transform needs (`decode_needs`)."""
    return partial(decode_image, name="sample", **decode_needs(transform))
