"""Pack an image folder or list into WebDataset tar shards for data.source=shards.

    python scripts/make_shards.py root=/data/imagenet out=/data/imagenet-shards
    python scripts/make_shards.py list_file=images.txt out=shards shard_mb=500 workers=16

The splits are those of the folder and list sources (root/train + root/val, else a fixed 2 % hold-out), written
to out/train/ and out/val/ as train-000000.tar, ... with each sample KEY.jpg|.jpeg|.png|.webp (the file's bytes
as they are; other formats re-encoded as .png) and KEY.cls (its label: class folders or the list's labels). The
samples are shuffled (seed 0) before packing, so every shard mixes the classes. Each directory gets a
shardindex.json (samples per shard) that the shards source reads instead of counting. A shard is written to a
.tmp file and renamed when complete: run the same command again after an interruption and the complete shards
are kept. Files are not decoded (verify=true decodes each once and leaves out the unreadable ones); training
skips and counts the ones that fail.
short_side=N stores smaller copies instead: an image whose short side is longer than N is decoded (EXIF
orientation applied), resized to a short side of N (area interpolation) and stored as a JPEG of `quality`
(90, as FFCV packs ImageNet; 95 keeps a little more and decodes about 15 % slower); smaller images stay as
they are. Decoding then costs a fraction as much CPU per image. Pick N from what the
training transform uses: pretraining at 192 px with crops of >= 67 % of the area (ratio 3/4-4/3) never
needs more than a 235 px short side of a 4:3 image for full detail (`simmim.data.decode_needs`), so 256
loses nothing there; fine-tuning's small crops (8 % of the area) do see less detail. The split directories
record the setting and the packing (make_shards.json: the files and how many per shard): resuming with other
settings, shard_mb or images is refused. A file that cannot be read, or has to be decoded (short_side, or a
format stored as png) and does not decode, is left out, counted and listed there.
Then: python scripts/pretrain.py data.source=shards data.shards=OUT/train data.val_shards=OUT/val
Arguments are key=value:
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm
from webdataset import TarWriter

from simmim.cli import check_output_folder
from simmim.data.decode import read_image
from simmim.data.sources import FileList, build_sources
from simmim.data.shards import IMAGE_SUFFIXES, PACKING, SHARD_INDEX
from simmim.train.checkpoint_io import written_atomically
from simmim.train.config import ConfigError, options_from_argv

QUALITY = 90  # the default JPEG quality of resized copies
SCHEMA = {
    "root": None,        # an image folder (class subfolders, or train/ and val/) ...
    "list_file": None,   # ... or a text file of image paths with optional labels
    "out": None,         # required: output directory (out/train, out/val)
    "shard_mb": 1000.0,  # target shard size in MB (files are not split: shards end at the first file past it)
    "workers": 8,        # shards written in parallel
    "verify": False,     # decode every file once and leave out the unreadable ones
    "short_side": None,  # store images resized to this short side (JPEG), when theirs is longer; null: as they are
    "quality": QUALITY,  # JPEG quality of the resized images
}
SIZE_SAMPLE = 1000  # files whose sizes estimate the mean file size


def plan(samples: FileList, shard_bytes: int) -> list[np.ndarray]:
    """Sample indices of each shard: a seed-0 shuffled order cut into runs of about shard_bytes (estimated from
    the mean size of up to SIZE_SAMPLE files)."""
    order = np.random.default_rng(0).permutation(len(samples))
    sizes = [os.path.getsize(path) for path in map(samples.path, order[:SIZE_SAMPLE]) if os.path.isfile(path)]
    per_shard = max(1, int(shard_bytes // max(1.0, float(np.mean(sizes)) if sizes else 1.0)))
    return [order[i:i + per_shard] for i in range(0, len(order), per_shard)]


def fingerprint(samples: FileList) -> str:
    """SHA-256 of the paths and labels, in order: which file each sample index of a shard plan is."""
    digest = hashlib.sha256()
    for array in (samples.offsets, samples.data, samples.labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def sample_of(path: str, label: int, key: str, short_side: int | None, quality: int) -> dict:
    """A WebDataset sample of an image file: its bytes under its suffix (others re-encoded as png; with
    short_side, a longer image resized to it and encoded as jpg), its label."""
    suffix = Path(path).suffix.lower().lstrip(".")
    image = read_image(path) if short_side is not None or suffix not in IMAGE_SUFFIXES else None  # decoded once
    if image is not None and min(image.shape[:2]) > (short_side or float("inf")):
        height, width = image.shape[:2]
        scale = short_side / min(height, width)
        size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        suffix, data = "jpg", _encode(".jpg", image, (cv2.IMWRITE_JPEG_QUALITY, quality))
    elif suffix in IMAGE_SUFFIXES:
        data = Path(path).read_bytes()
    else:
        suffix, data = "png", _encode(".png", image)
    return {"__key__": key, suffix: data, "cls": str(label).encode()}


def _encode(extension: str, image: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    """RGB uint8 (H, W, 3) -> the bytes of an `extension` file."""
    return cv2.imencode(extension, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), list(params))[1].tobytes()


def write_shard(samples: FileList, indices: np.ndarray, path: Path, short_side: int | None, quality: int) -> list[str]:
    """Write the samples at indices to path's .tmp file (`make_shards` renames it); returns the files left out
    because they could not be read, or had to be decoded (short_side, or a format stored as png) and did not."""
    left_out = []
    with open(_tmp(path), "wb") as stream:
        with TarWriter(stream, encoder=False, mtime=int(time.time())) as writer:  # whole seconds: no PAX headers
            for index in indices:
                file, label = samples[int(index)]
                try:
                    writer.write(sample_of(file, label, f"{int(index):09d}", short_side, quality))
                except (OSError, ValueError):
                    left_out.append(str(file))
    return left_out


def _read_record(path: Path) -> dict:
    """make_shards.json of an earlier packing; ConfigError naming it when it is not what this command writes."""
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} cannot be read ({error}): it records how the shards beside it were packed; "
                          f"give a new out=, or move that folder away") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} is not a record of this command; give a new out=, or move that folder away")
    return record


def make_shards(samples: FileList, out: Path, prefix: str, shard_bytes: int, workers: int,
                short_side: int | None = None, quality: int = QUALITY) -> list[Path]:
    """Shards of samples in out/PREFIX-NNNNNN.tar (complete ones already there are kept, unless their size differs
    from the one recorded when the packing completed) and out/shardindex.json;
    short_side / quality: see the module docstring. out/make_shards.json records the settings and, per shard,
    the files left out because they did not decode (recorded before the shard is renamed into place, so a
    kill never leaves a complete shard whose count is wrong)."""
    out.mkdir(parents=True, exist_ok=True)
    shards = plan(samples, shard_bytes)
    settings = {"short_side": short_side, "quality": quality if short_side is not None else None}
    packing = {"files": len(samples), "per_shard": len(shards[0]) if shards else 0, "fingerprint": fingerprint(samples)}
    record = _read_record(out / PACKING) if (out / PACKING).exists() else None
    started = any(out.glob(f"{prefix}-*.tar"))
    if record is None and started:  # whose packing nothing records (written before this one is, so not ours)
        raise ConfigError(f"{out} holds {prefix}-*.tar files but no {PACKING}: not shards of this command, whose "
                          f"contents a rerun could check; give a new out=, or move those files away")
    record = {**settings, **packing, "left_out": {}, **(record or {})}
    if (record["short_side"], record["quality"]) != (settings["short_side"], settings["quality"]):
        raise ConfigError(f"{out} holds shards packed with short_side={record['short_side']} "
                          f"quality={record['quality']}; rerun with those values to complete it, or give a new out=")
    if started and [record[key] for key in packing] != list(packing.values()):
        raise ConfigError(f"{out} holds shards of another packing ({record['files']} files, {record['per_shard']} per "
                          f"shard; now {packing['files']} files, {packing['per_shard']} per shard): the images, "
                          f"verify= or shard_mb= changed since; rerun with the first ones to complete it, or give a "
                          f"new out=")
    record.update(packing)  # a record without shards beside it (all deleted) describes an earlier packing
    if not started:
        record.pop("bytes", None)
    _write_json(out / PACKING, record)
    paths = [out / f"{prefix}-{i:06d}.tar" for i in range(len(shards))]
    done = record.get("bytes", {})  # shard sizes when the packing completed: a shard cut or replaced since is redone
    todo = [i for i, path in enumerate(paths)
            if not path.exists() or path.name in done and path.stat().st_size != done[path.name]]
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(shards), initial=len(shards) - len(todo),
                                                    desc=f"{prefix} shards", unit="shard") as bar:
        jobs = {pool.submit(write_shard, samples, shards[i], paths[i], short_side, quality): i for i in todo}
        try:
            for job in as_completed(jobs):
                path, left_out = paths[jobs[job]], job.result()
                stale = record["left_out"].pop(path.name, None)  # a shard redone after a kill before its rename
                if left_out:
                    record["left_out"][path.name] = left_out
                if left_out or stale:
                    _write_json(out / PACKING, record)
                _tmp(path).replace(path)
                bar.update()
        except BaseException:  # Ctrl-C, a full disk: the queued shards are not started (leaving the pool would
            pool.shutdown(cancel_futures=True)  # write them all first), the running ones end, no .tmp stays
            for i in todo:
                _tmp(paths[i]).unlink(missing_ok=True)
            raise
    record["bytes"] = {path.name: path.stat().st_size for path in paths}
    _write_json(out / PACKING, record)
    left_out = record["left_out"]
    _write_json(out / SHARD_INDEX, {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": prefix,
        "shardlist": [{"url": path.name, "nsamples": len(shard) - len(left_out.get(path.name, []))}
                      for path, shard in zip(paths, shards)]})
    if left_out:
        files = [file for names in left_out.values() for file in names]
        print(f"{prefix}: left out {len(files)} of {len(samples)} files that cannot be read or decoded (first: "
              f"{files[0]}; all are listed in {out / PACKING})")
    return paths


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_json(path: Path, value: dict) -> None:
    """value as JSON in path, written atomically."""
    with written_atomically(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1) + "\n")


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__)
    if cfg is None:
        return
    if not cfg.out:
        raise ConfigError("out=<directory for the shards> is required")
    if (cfg.root is None) == (cfg.list_file is None):
        raise ConfigError("give one of root=<image folder> or list_file=<text file of image paths>")
    if not (isinstance(cfg.shard_mb, (int, float)) and cfg.shard_mb > 0):
        raise ConfigError(f"shard_mb={cfg.shard_mb} must be a positive number of MB")
    if not (isinstance(cfg.workers, int) and cfg.workers > 0):
        raise ConfigError(f"workers={cfg.workers} must be a positive integer")
    if cfg.short_side is not None and not (isinstance(cfg.short_side, int) and cfg.short_side > 0):
        raise ConfigError(f"short_side={cfg.short_side} must be a positive number of pixels, or null to store "
                          f"images as they are")
    if not (isinstance(cfg.quality, int) and 1 <= cfg.quality <= 100):
        raise ConfigError(f"quality={cfg.quality} must be a JPEG quality from 1 to 100")
    folder = cfg.root is not None
    source = Path(cfg.root if folder else cfg.list_file).resolve()  # absolute: the same files from any directory
    if not (source.is_dir() if folder else source.is_file()):
        raise FileNotFoundError(f"{'root' if folder else 'list_file'}={source} is not an existing "
                                f"{'folder' if folder else 'file'}; pass root=<image folder> or list_file=<text file "
                                f"of image paths>")
    check_output_folder(cfg.out, "out")
    if folder and (source == Path(cfg.out).resolve() or source in Path(cfg.out).resolve().parents):
        raise ConfigError(f"out={cfg.out} is inside root={cfg.root}: its train/ and val/ would change how the folder "
                          f"reads; give an out= outside it")
    splits = (build_sources("folder", 0, root=source, verify=cfg.verify) if folder
              else build_sources("list", 0, list_file=source, verify=cfg.verify))
    out = Path(cfg.out)
    for name, samples in zip(("train", "val"), splits):
        paths = make_shards(samples, out / name, name, int(cfg.shard_mb * 1e6), cfg.workers, cfg.short_side,
                            cfg.quality)
        print(f"{name}: {len(paths)} shards of {len(samples)} files under {out / name}")
    print(f"train with: data.source=shards data.shards={out / 'train'} data.val_shards={out / 'val'}")
