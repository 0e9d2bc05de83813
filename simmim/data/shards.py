"""Streaming WebDataset tar shards: the ``data.source=shards`` input for collections of millions of images.

A shard is a tar of samples ``KEY.jpg`` (or .jpeg/.png/.webp) plus an optional ``KEY.cls`` (integer label,
else 0), read with the ``webdataset`` library from a local path or any fsspec URL (file://, https://, s3://,
gs://, ...). ``shard_urls`` expands ``data.shards``: a directory (its ``*.tar``), a brace pattern
(``train-{000000..000999}.tar``) or one shard.

Each epoch sees every sample once: the shards are split once into balanced groups (by sample count, from the
``shardindex.json`` that `simmim.tools.make_shards` writes beside them, else counted once), one group per
DataLoader worker of every rank. A worker reads its group in an order shuffled by (seed, epoch, group), through
a shuffle buffer of ``shuffle_buffer`` samples (raw bytes, decoded after), and tags every sample with its worker
and its position in that stream. `ShardLoader` strips the tags and keeps per worker the position reached, which
is its state: restored, each worker skips what it had delivered (without decoding) and the epoch continues with
the batches an uninterrupted run would have given. Every rank gives the same number of batches per epoch (the
smallest rank's), so distributed training never waits on a rank that ran out.

A sample whose image does not decode is counted (`simmim.data.datasets.SkipCounter`) and replaced by the worker's next
good one, so batch counts do not change. A shard whose read fails is read again (`_raw_samples`); if a
worker's shards still give fewer samples than counted, its missing batches repeat the batch before, up to one
shard's worth; a rank short of more stops the run (the storage is failing). Masks and augmentations are drawn
from (seed, epoch, shard name, key): neither the worker count nor a resume changes them.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
import time
import warnings
import zlib
from functools import partial
from typing import Callable, Iterator

import fsspec
import numpy as np
from braceexpand import braceexpand
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from simmim.data.workers import ShieldedDataLoader

__all__ = ["IMAGE_SUFFIXES", "SHARD_INDEX", "shard_urls", "shard_counts", "split_shards", "balanced_groups",
           "ShardDataset", "ShardLoader", "ShardSource", "ShardImages"]

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
READ_BUFFER = 1 << 20
READ_RETRIES, RETRY_WAIT = 5, 1.0  # a shard whose read fails is read again up to 5 times, 1, 2, ... 16 s later
HTTP_TIMEOUT = 120.0  # seconds an http(s) shard's server may take to connect, or to send the next bytes
SHARD_INDEX = "shardindex.json"  # {"shardlist": [{"url": NAME, "nsamples": N}, ...]} (the wids index format)
PACKING = "make_shards.json"  # scripts/make_shards.py's record of a directory's packing ("bytes" once complete)


def shard_urls(spec: str, key: str = "data.shards") -> list[str]:
    """The shard URLs of ``key=spec``: a directory (local or fsspec URL; its ``*.tar``, sorted), a brace pattern
    (whose shards must all exist; not checked over http(s), which cannot list) or one shard."""
    fs, path = _filesystem(spec, key)
    http = spec.startswith(("http://", "https://"))
    if http and "{" not in spec and (spec.endswith("/") or "." not in spec.rsplit("/", 1)[-1]):
        raise ValueError(f"{key}={spec} looks like an http folder, which cannot be listed; give its shards as a brace "
                         f"pattern ({spec.rstrip('/')}/train-{{000000..000099}}.tar) or one .tar URL")
    try:
        if "{" in spec:
            urls = list(braceexpand(spec))
            missing = [] if http else _not_listed(fs, urls)
            if missing:
                raise FileNotFoundError(f"{key}={spec}: {len(missing)} of its {len(urls)} shards do not exist "
                                        f"(first: {missing[0]}); fix the pattern's range")
            return urls
        if not http and fs.isdir(path):
            urls = sorted(fs.unstrip_protocol(p) if "://" in spec else p for p in fs.glob(path.rstrip("/") + "/*.tar"))
            if not urls:
                raise FileNotFoundError(f"no .tar shards in {key}={spec}; make them with scripts/make_shards.py")
            _check_packed(fs, path.rstrip("/") + "/" + PACKING, f"{key}={spec}", len(urls))
            return urls
        if not fs.exists(path):
            raise FileNotFoundError(f"{key}={spec} does not exist; give a directory of .tar shards, a brace "
                                    f"pattern (train-{{000000..000099}}.tar) or a URL")
        return [spec]
    except FileNotFoundError:
        raise
    except Exception as error:  # the store's own errors (credentials, permissions, network), of any library
        raise ValueError(f"{key}={spec} cannot be read ({type(error).__name__}: {error}); credentials and the "
                         f"endpoint come from the usual environment of its fsspec library (s3fs: AWS_* variables, "
                         f"~/.aws)") from error


def _check_packed(fs, record: str, where: str, found: int) -> None:
    """ValueError when the directory's make_shards.json says its packing has not completed (a kill, a full disk):
    training on the shards written so far would leave the rest out without a word."""
    try:
        with fs.open(record) as file:
            packing = json.load(file)
    except (OSError, ValueError):  # none (shards of another tool), or unreadable: nothing to check
        return
    if isinstance(packing, dict) and "bytes" not in packing and packing.get("per_shard"):
        planned = -(-int(packing.get("files", 0)) // int(packing["per_shard"]))
        raise ValueError(f"{where}: scripts/make_shards.py has not finished packing it ({found} of {planned} shards "
                         f"written, by {record}); run the same make_shards.py command again to complete it")


def _filesystem(spec: str, key: str):
    """fsspec's (filesystem, path) of spec; a protocol whose library is not installed names the package."""
    try:
        return fsspec.core.url_to_fs(spec)
    except ImportError as error:
        cause = error.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            package = cause.name.split(".")[0]
            raise ValueError(f"{key}={spec} needs {package}, which is not installed: pip install {package}") \
                from error
        raise ValueError(f"{key}={spec}: {error} ({cause})") from error
    except ValueError as error:  # an unknown protocol
        raise ValueError(f"{key}={spec}: {error}") from error


def _not_listed(fs, urls: list[str]) -> list[str]:
    """The urls whose folder listing (one per folder) does not hold them."""
    listings, missing = {}, []
    for url in urls:
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if folder not in listings:
            listings[folder] = ({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
                                if fs.isdir(folder) else set())
        if name not in listings[folder]:
            missing.append(url)
    return missing


def _open(url: str):
    """A binary stream of url, read through a 1 MiB buffer (tarfile reads in small pieces); http(s) is streamed
    (no range requests), a server silent for HTTP_TIMEOUT seconds fails the read."""
    if "://" not in url:
        return open(url, "rb", buffering=READ_BUFFER)
    options = {}
    if url.startswith(("http://", "https://")):  # aiohttp waits for a stalled server forever; then it is retried
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_TIMEOUT, sock_read=HTTP_TIMEOUT)
        options = {"block_size": 0, "client_kwargs": {"timeout": timeout}}
    stream = fsspec.open(url, "rb", **options).open()
    return io.BufferedReader(stream, buffer_size=READ_BUFFER)


def _raw_samples(url: str, on_error: Callable[[Exception], bool], retries: int = READ_RETRIES) -> Iterator[dict]:
    """The samples of one shard: dicts of suffix -> bytes plus __key__ and __url__.

    A read that fails (a dropped connection, a storage hiccup; fsspec's http says "not found" for a server that
    does not answer) is retried `retries` times, RETRY_WAIT x 1, 2, 4, ... seconds apart, from the start of the
    shard, passing over the samples already given; then ``on_error(error)`` is called and the rest of the shard
    is left out. A local file that is not a whole tar (cut short, overwritten) reads the same every time: it is
    not retried.
    """
    given = 0
    for attempt in range(retries + 1):
        try:
            with _open(url) as stream:
                files = tar_file_expander([{"url": url, "stream": stream}], handler=_reraise)
                for index, sample in enumerate(group_by_keys(files, handler=_reraise)):
                    if index >= given:
                        given += 1
                        yield sample
            return
        except Exception as error:  # storage clients raise their own types, not only OSError
            if attempt == retries or isinstance(error, tarfile.TarError) and "://" not in url:
                on_error(error)
                return
            warnings.warn(f"reading {url} failed after {given} samples ({_reason(error)}); retry {attempt + 1} of "
                          f"{retries} in {RETRY_WAIT * 2 ** attempt:g} s")
            time.sleep(RETRY_WAIT * 2 ** attempt)


def _index_next_to(url: str) -> dict[str, int]:
    """{shard file name: samples} from the shardindex.json beside url, or {} if there is none or it is not one."""
    index_url = url.rsplit("/", 1)[0] + "/" + SHARD_INDEX if "/" in url else SHARD_INDEX
    try:
        with _open(index_url) as stream:
            index = json.load(stream)
        return {entry["url"].rsplit("/", 1)[-1]: int(entry["nsamples"]) for entry in index.get("shardlist", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # none, or not JSON, or not an index
        return {}


def shard_counts(urls: list[str]) -> list[int]:
    """Samples per shard, from the shardindex.json beside them; shards it does not list are read and counted."""
    known = _index_next_to(urls[0])
    missing = [url for url in urls if url.rsplit("/", 1)[-1] not in known]
    if missing:
        rank_zero_warn(f"counting the samples of {len(missing)} shards by reading them (no readable {SHARD_INDEX} "
                       f"lists them; scripts/make_shards.py writes one)", stacklevel=5)  # every rank counts them
        for url in missing:
            known[url.rsplit("/", 1)[-1]] = sum(1 for sample in _raw_samples(url, partial(_unreadable, url), 0)
                                                if _image_key(sample))  # at start: fail at once
    return [known[url.rsplit("/", 1)[-1]] for url in urls]


def _member_suffixes(url: str, samples: int = 20) -> str:
    """The suffixes of the first samples' files of a shard, for a message: "suffixes 0001.jpg, 0002.jpg"."""
    found = []
    for sample in _raw_samples(url, partial(_unreadable, url), 0):
        found += [key for key in sample if not key.startswith("__") and key not in found]
        if (samples := samples - 1) == 0:
            break
    return f"suffixes {', '.join(found[:6])}{', ...' if len(found) > 6 else ''}" if found else "no files"


def _reason(error: Exception) -> str:
    """`ReadError: unexpected end of data`: the type and first argument (webdataset appends the stream and more)."""
    return f"{type(error).__name__}: {error.args[0] if error.args else ''}"


def _first_cause(error: Exception) -> Exception | None:
    """The first exception under `error` (its cause, else context, and so on) that is not a FileNotFoundError."""
    cause = error.__cause__ or error.__context__
    while isinstance(cause, FileNotFoundError):
        cause = cause.__cause__ or cause.__context__
    return cause


def _reraise(error: Exception) -> bool:
    raise error


def _unreadable(url: str, error: Exception) -> bool:
    if isinstance(error, TimeoutError):  # fsspec's FSTimeoutError: asyncio's, which is TimeoutError
        raise ValueError(f"shard {url} cannot be read: its server sent nothing for {HTTP_TIMEOUT:g} s; check the "
                         f"address, the network and the server") from error
    if isinstance(error, FileNotFoundError):  # over http(s), where a brace pattern is not checked at start
        cause = _first_cause(error)  # fsspec's http gives FileNotFoundError for any failed request
        if cause is None or getattr(cause, "status", None) in (404, 410):
            raise FileNotFoundError(f"shard {url} does not exist") from error
        raise ValueError(f"shard {url} cannot be read ({type(cause).__name__}: {cause}); check the address, the "
                         f"network and the server") from error
    raise ValueError(f"cannot read shard {url} ({_reason(error)}); it is cut short or not a tar: make it again "
                     f"(scripts/make_shards.py) or leave it out of data.shards") from error


def _image_key(sample: dict) -> str | None:
    return next((suffix for suffix in IMAGE_SUFFIXES if suffix in sample), None)


def _label(sample: dict) -> int:
    """The sample's .cls as an integer class index (0 without one); ValueError naming the sample otherwise."""
    if "cls" not in sample:
        return 0
    try:
        return int(sample["cls"])
    except ValueError:
        raise ValueError(f"{sample['__url__']}: {sample['__key__']}.cls holds {bytes(sample['cls'])[:40]!r}, not an "
                         f"integer class index; write class indices (0, 1, ...) in .cls (scripts/make_shards.py "
                         f"numbers class folders), or pack the shards without .cls") from None


def balanced_groups(counts: list[int], num_groups: int) -> list[list[int]]:
    """Shard indices split into num_groups groups of nearly equal sample totals (largest shard first to the
    lightest group; ties by index), each group sorted."""
    groups, totals = [[] for _ in range(num_groups)], np.zeros(num_groups, dtype=np.int64)
    for shard in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        lightest = int(np.argmin(totals))
        groups[lightest].append(shard)
        totals[lightest] += counts[shard]
    return [sorted(group) for group in groups]


class ShardDataset(IterableDataset):
    """Samples of shards for one rank: yields (*item, worker, position) where item is ``make_item(image uint8
    (H, W, 3) RGB, label, rng)``, with rng seeded by (seed, epoch, shard name, key).

    Set `epoch` and `skip` (raw samples each worker has already delivered this epoch) before iterating; with
    num_workers workers per rank, worker w of rank r reads group r * num_workers + w of `balanced_groups`.
    """

    def __init__(self, urls: list[str], counts: list[int], make_item: Callable, decode: Callable, skipped,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000, rank: int = 0,
                 world_size: int = 1):
        self.urls, self.counts = list(urls), list(counts)
        self.make_item, self.decode, self.skipped = make_item, decode, skipped
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, {}

    def groups(self, num_workers: int) -> list[list[int]]:
        """This rank's shard groups, one per worker."""
        groups = balanced_groups(self.counts, self.world_size * num_workers)
        return groups[self.rank * num_workers:(self.rank + 1) * num_workers]

    def _warn(self, error: Exception) -> bool:
        self.skipped.add(error)
        return True

    def _shard_failed(self, url: str, error: Exception) -> bool:
        return self._warn(ValueError(f"{url}: {_reason(error)}; the rest of the shard is left out"))

    def _stream(self, group: list[int], worker: int) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        order = [group[i] for i in rng.permutation(len(group))] if self.shuffle else group
        samples = (sample for shard in order for sample in _raw_samples(self.urls[shard],
                                                                        partial(self._shard_failed, self.urls[shard]))
                   if _image_key(sample))
        if self.shuffle and self.shuffle_buffer > 1:
            samples = shuffle(self.shuffle_buffer, self.shuffle_buffer,
                              rng=random.Random(int(rng.integers(2 ** 63))))(samples)
        return samples

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        group = self.groups(num_workers)[worker]
        skip, owed = self.skip.get(worker, 0), 0
        for position, sample in enumerate(self._stream(group, worker), 1):
            if position <= skip:
                continue
            label = _label(sample)  # not a decoding failure: a wrong .cls is the collection's, one line
            try:
                image = self.decode(sample[_image_key(sample)])
            except (OSError, ValueError) as error:
                self._warn(ValueError(f"{sample['__url__']}: {sample['__key__']}: {error}"))
                owed += 1  # replaced by the next good sample
                continue
            name = sample["__url__"].rsplit("/", 1)[-1] + "/" + sample["__key__"]
            for _ in range(1 + owed):
                rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(name.encode())])
                yield (*self.make_item(image, label, rng), worker, position)
            owed = 0


class ShardLoader:
    """Batches of a `ShardDataset` through a DataLoader, at most `num_batches` per epoch (the same on every
    rank), with a resumable state.

    Each DataLoader worker batches its own stream; a fresh DataLoader takes them round-robin from worker 0, so
    the batch order is by (batch number within its worker, worker). That order is kept on resume: the
    batches come back in it from a small reorder buffer (the per-worker batch counts follow from the shard
    sample counts). ``set_epoch`` starts an epoch (Lightning calls it through ``sampler``, as for a
    DistributedSampler); ``state(batches)`` is the state after the first `batches` batches of the current
    epoch (default: all given out so far; the last KEEP are kept, as Lightning fetches a batch ahead), and
    ``restore(state)`` continues from it. With fixed_epoch (validation) set_epoch is ignored and every
    iteration gives the whole epoch.
    """

    KEEP = 8  # states of the last batches given out

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int = 0, drop_last: bool = True,
                 pin_memory: bool = False, num_batches: int | None = None, fixed_epoch: int | None = None):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.drop_last, self.pin_memory = drop_last, pin_memory
        self.worker_batches = [self._worker_batches(rank) for rank in range(dataset.world_size)]
        self.per_rank = [sum(batches) for batches in self.worker_batches]
        self.num_batches = min(self.per_rank) if num_batches is None else num_batches
        self.sampler = self
        self.fixed_epoch = fixed_epoch
        self.epoch = fixed_epoch or 0
        self._reset()

    def _reset(self) -> None:
        self.positions, self.rounds, self.batches, self._history = {}, {}, 0, []

    def _worker_batches(self, rank: int) -> list[int]:
        """Batches of each of the rank's workers per epoch."""
        readers = max(self.num_workers, 1)
        groups = balanced_groups(self.dataset.counts, self.dataset.world_size * readers)
        samples = [sum(self.dataset.counts[i] for i in group) for group in groups[rank * readers:(rank + 1) * readers]]
        return [n // self.batch_size if self.drop_last else -(-n // self.batch_size) for n in samples]

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch and self.fixed_epoch is None:
            self.epoch = epoch
            self._reset()

    @staticmethod
    def epoch_start(epoch: int) -> dict:
        """The `state` before the first batch of `epoch`."""
        return {"epoch": epoch, "batches": 0, "positions": {}, "rounds": {}}

    def state(self, batches: int | None = None) -> dict:
        """{"epoch", "batches", "positions": {worker: raw samples delivered}, "rounds": {worker: batches}} after
        `batches` batches of this epoch (0: its start, also once a batch has been fetched ahead)."""
        if batches is None or batches == self.batches:
            return {"epoch": self.epoch, "batches": self.batches, "positions": dict(self.positions),
                    "rounds": dict(self.rounds)}
        if batches == 0:  # as the epoch starts (a signal as its first batch is fetched)
            return self.epoch_start(self.epoch)
        for state in self._history:
            if state["batches"] == batches:
                return state
        raise ValueError(f"no data state kept for batch {batches} of epoch {self.epoch} "
                         f"(given out: {self.batches}, kept: the last {self.KEEP})")

    def restore(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.positions = {int(worker): int(position) for worker, position in state["positions"].items()}
        self.rounds = {int(worker): int(count) for worker, count in state["rounds"].items()}
        self._history = []

    def _schedule(self) -> Iterator[int]:
        """The workers of the remaining batches, in order: by (batch number within the worker, worker)."""
        totals = self.worker_batches[self.dataset.rank]
        rounds = [self.rounds.get(w, 0) for w in range(len(totals))]
        while True:
            left = [(rounds[w], w) for w in range(len(totals)) if rounds[w] < totals[w]]
            if not left:
                return
            worker = min(left)[1]
            rounds[worker] += 1
            yield worker

    def __iter__(self):
        if self.fixed_epoch is not None:
            self._reset()
        self.dataset.epoch, self.dataset.skip = self.epoch, dict(self.positions)
        if self.batches >= self.num_batches:
            return
        batches = iter(ShieldedDataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                          drop_last=self.drop_last, pin_memory=self.pin_memory,
                                          persistent_workers=False))
        waiting, last, repeats = {}, None, 0
        allowed = -(-max(self.dataset.counts) // self.batch_size)  # the batches of one shard: a lost shard, no more
        for worker in self._schedule():
            while not waiting.get(worker) and (batch := next(batches, None)) is not None:
                *batch, workers, positions = batch
                waiting.setdefault(int(workers[0]), []).append((batch, int(positions.max())))
            if waiting.get(worker):
                batch, self.positions[worker] = waiting[worker].pop(0)
                last = batch
            elif last is not None and repeats < allowed:  # the worker's shards held fewer samples than counted
                warnings.warn(f"rank {self.dataset.rank}: the shards of worker {worker} ended before the samples "
                              f"their index counts (a shard cut short, or unreadable); its missing batches repeat "
                              f"the batch before, so that every rank gives {self.num_batches} batches")
                batch, repeats = last, repeats + 1
            else:
                raise ValueError(f"rank {self.dataset.rank}: its shards gave {self.batches - repeats} of the "
                                 f"epoch's {self.num_batches} batches, more than one shard's ({allowed}) short: is "
                                 f"the storage failing? (see the warnings above); resume the run when the shards "
                                 f"read again")
            self.rounds[worker] = self.rounds.get(worker, 0) + 1
            self.batches += 1
            self._history = [*self._history[-(self.KEEP - 1):], self.state()]
            yield batch
            if self.batches >= self.num_batches:
                return


class ShardSource:
    """The shards source of a LightningDataModule: train and val `ShardDataset`s (val: `val_shards`, else the
    last training shard held out), their `ShardLoader`s for the trainer's rank, and the training position. Each
    rank validates on val shards of its own (so there must be one per rank; its val loader has fewer workers
    than num_workers where there are not enough shards for them).

    items and decodes are (train, val) pairs of ShardDataset's make_item and decode.
    """

    def __init__(self, shards: str | None, val_shards: str | None, items: tuple, decodes: tuple, skipped,
                 seed: int = 0, shuffle_buffer: int = 1000):
        train, val = split_shards(shards, val_shards)
        self.shards, self.val_shards = shards, val_shards
        self.train_set = ShardDataset(train, shard_counts(train), items[0], decodes[0], skipped, seed=seed,
                                      shuffle=True, shuffle_buffer=shuffle_buffer)
        self.val_set = ShardDataset(val, shard_counts(val), items[1], decodes[1], skipped, seed=seed, shuffle=False)
        self.train_loader, self._pending = None, None

    def split(self, rank: int, world_size: int, num_workers: int, batch_size: int | None = None) -> None:
        """Give the datasets this process's rank of world_size; every reader (ranks x workers) needs a training
        shard, every rank a validation shard, and with batch_size, the epoch a full batch."""
        for dataset in (self.train_set, self.val_set):
            dataset.rank, dataset.world_size = rank, world_size
        readers = self.train_set.world_size * max(num_workers, 1)
        if len(self.train_set.urls) < readers:
            raise ValueError(f"data.shards={self.shards} has {len(self.train_set.urls)} training shards for "
                             f"{readers} readers (ranks x data.num_workers); make smaller shards "
                             f"(make_shards.py shard_mb=) or lower data.num_workers")
        ranks, shards = self.val_set.world_size, len(self.val_set.urls)
        if shards < ranks:
            named = (f"data.val_shards={self.val_shards} has" if self.val_shards else
                     f"data.shards={self.shards}: the held-out last shard is")
            raise ValueError(f"{named} {shards} validation shard(s) for {ranks} ranks, which each validate on shards "
                             f"of their own; give data.val_shards at least {ranks} shards (make_shards.py shard_mb=)")
        if not sum(self.train_set.counts):
            images = ", ".join(f"KEY.{suffix}" for suffix in IMAGE_SUFFIXES)
            raise ValueError(f"data.shards={self.shards} holds no samples with an image ({images}); its first shard "
                             f"has {_member_suffixes(self.train_set.urls[0])}; a sample's key ends at the first dot of "
                             f"its file names (img.0001.jpg: key img, suffix 0001.jpg)")
        if batch_size is not None and ShardLoader(self.train_set, batch_size, num_workers).num_batches == 0:
            raise ValueError(f"the training shards give no full batch of data.batch_size={batch_size} per epoch: "
                             f"{sum(self.train_set.counts)} samples over {readers} readers (ranks x data.num_workers), "
                             f"each filling batches from its own shards; lower data.batch_size or data.num_workers, "
                             f"or add samples")  # Lightning would stop at once, and the run end as if trained

    def loader(self, train: bool, rank: int, world_size: int, batch_size: int, num_workers: int,
               drop_last: bool = True, pin_memory: bool = False) -> ShardLoader:
        """This process's (`rank` of `world_size`) training or validation loader (`split` checks the shards)."""
        self.split(rank, world_size, num_workers, batch_size if train and drop_last else None)
        if not train:  # every rank reads all of its validation samples, from at least one shard
            workers = min(num_workers, len(self.val_set.urls) // self.val_set.world_size)
            loader = ShardLoader(self.val_set, batch_size, workers, drop_last=False, pin_memory=pin_memory,
                                 fixed_epoch=0)
            loader.num_batches = loader.per_rank[self.val_set.rank]
            return loader
        self.train_loader = ShardLoader(self.train_set, batch_size, num_workers, drop_last, pin_memory)
        if self._pending is not None:
            self.train_loader.restore(self._pending)
        return self.train_loader

    def state_dict(self, done: int | None, next_epoch: int | None = None) -> dict:
        """The training position after `done` batches of this epoch (None: all given out), or at an epoch's end the
        start of `next_epoch` ({} before training). Not the loader's own state at the end: a run resumed from a
        checkpoint saved in an epoch's end hooks runs them again, after Lightning has started the loader's next
        epoch."""
        if self.train_loader is None:
            return {}
        return self.train_loader.state(done) if next_epoch is None else ShardLoader.epoch_start(next_epoch)

    def load_state_dict(self, state: dict) -> None:
        self._pending = state or None
        if self.train_loader is not None and self._pending is not None:
            self.train_loader.restore(self._pending)


def split_shards(shards: str | None, val_shards: str | None) -> tuple[list[str], list[str]]:
    """(train, val) shard URLs of data.shards and data.val_shards; without val_shards the last shard is val."""
    if not shards:
        raise FileNotFoundError("data.source=shards needs data.shards=<directory, brace pattern or URL of .tar "
                                "shards>; scripts/make_shards.py makes them from a folder or list")
    train = shard_urls(shards)
    if val_shards:
        return train, shard_urls(val_shards, "data.val_shards")
    if len(train) < 2:
        raise ValueError(f"data.shards={shards} is 1 shard; need at least 2 to hold the last one out for "
                         f"validation, or set data.val_shards")
    return train[:-1], train[-1:]


class ShardImages(IterableDataset):
    """The samples of the first shards of urls that hold `limit` samples (None: every shard; whole shards, so at
    least `limit`), in shard order and unshuffled, as ``make_item(image, label, rng)``: a fixed labeled set for
    evaluation (the k-NN monitor, scripts/evaluate.py). DataLoader workers read shards of their own; a sample
    that does not decode is counted in `skipped` and replaced by the next one, as in `ShardDataset`."""

    def __init__(self, urls: list[str], counts: list[int], limit: int | None, make_item: Callable,
                 decode: Callable, skipped):
        keep = len(urls) if limit is None else min(int(np.searchsorted(np.cumsum(counts), limit)) + 1, len(urls))
        self.samples = ShardDataset(urls[:keep], counts[:keep], make_item, decode, skipped, shuffle=False)

    def __len__(self) -> int:
        """The samples its shards hold (as counted when listed)."""
        return sum(self.samples.counts)

    def __iter__(self):
        for *item, _worker, _position in self.samples:
            yield tuple(item)
