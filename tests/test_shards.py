import contextlib
import csv
import functools
import http.server
import importlib
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
import warnings
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from webdataset import TarWriter

from conftest import jpeg
from simmim.data.datamodule import SimMIMDataModule
from simmim.data.datasets import SkipCounter
from simmim.data.decode import decode_image
from simmim.data import shards
from simmim.data.shards import ShardDataset, ShardLoader, balanced_groups, shard_counts, shard_urls
from simmim.tools import make_shards
from simmim.train.config import ConfigError



REGISTERED = importlib.import_module("fsspec.registry")._registry  # protocol -> imported filesystem class


def write_shard(path, samples):
    """samples: (key, {suffix: bytes})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream, TarWriter(stream, encoder=False) as writer:
        for key, fields in samples:
            writer.write({"__key__": key, **fields})


def numbered_shards(folder, sizes):
    """Shards of JPEG samples whose .cls is a unique number: shard i holds sizes[i] samples."""
    number = 0
    for i, size in enumerate(sizes):
        write_shard(folder / f"part-{i:03d}.tar",
                    [(f"s{number + j:05d}", {"jpg": jpeg(number + j), "cls": str(number + j).encode()})
                     for j in range(size)])
        number += size
    return number


def label_item(image, label, rng):
    return (label,)


def image_item(image, label, rng):
    return torch.from_numpy(image.copy()), label, int(rng.integers(1 << 30))


def dataset(urls, make_item=label_item, **kwargs):
    return ShardDataset(urls, shard_counts(urls), make_item, decode_image, SkipCounter(), **kwargs)


@contextlib.contextmanager
def serving(folder, handler=None):
    """A local HTTP server (127.0.0.1, own thread) of folder with `handler` (a SimpleHTTPRequestHandler class,
    default _QuietHandler): yields its root URL, stopped on exit."""
    handler = functools.partial(handler or _QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server serving tmp_path during the test."""
    with serving(tmp_path) as root:
        yield root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_shard_urls_directory_brace_pattern_and_errors(tmp_path):
    numbered_shards(tmp_path / "d", [2, 2, 2])
    names = [f"part-{i:03d}.tar" for i in range(3)]
    assert shard_urls(str(tmp_path / "d")) == [str(tmp_path / "d" / n) for n in names]
    assert shard_urls(f"file://{tmp_path}/d") == [f"file://{tmp_path}/d/{n}" for n in names]
    assert shard_urls(str(tmp_path / "d" / "part-{000..002}.tar")) == [str(tmp_path / "d" / n) for n in names]
    with pytest.raises(FileNotFoundError, match="data.shards=.*missing does not exist"):
        shard_urls(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        shard_urls(str(tmp_path / "empty"))
    for spec in (str(tmp_path / "d" / "part-{000..009}.tar"), f"file://{tmp_path}/d/part-{{001..009}}.tar"):
        with pytest.raises(FileNotFoundError, match=r"data.val_shards=.*: 7 of its .* shards do not exist \(first: "
                                                    r".*part-003.tar\); fix the pattern's range"):
            shard_urls(spec, "data.val_shards")  # found at start, from one listing of the folder
    with pytest.raises(FileNotFoundError, match="2 of its 2 shards do not exist"):
        shard_urls(str(tmp_path / "missing" / "part-{000..001}.tar"))
    with pytest.raises(ValueError, match="data.shards=nosuch://bucket/train: Protocol not known: nosuch"):
        shard_urls("nosuch://bucket/train")


@pytest.mark.parametrize("spec", ["s3://bucket/train", "s3://bucket/train-{000..009}.tar"])
def test_a_url_whose_fsspec_library_is_missing_names_the_package(monkeypatch, spec):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` fails, installed or not
    monkeypatch.delitem(REGISTERED, "s3", raising=False)  # fsspec imports it again
    with pytest.raises(ValueError) as error:
        shard_urls(spec)
    assert str(error.value) == f"data.shards={spec} needs s3fs, which is not installed: pip install s3fs"


@pytest.mark.timeout(120)
def test_the_scripts_say_it_in_one_line(tmp_path):
    """scripts/pretrain.py where s3fs is missing (a module of that name that fails to import shadows any installed
    one): no traceback, one error line."""
    (tmp_path / "s3fs.py").write_text("raise ModuleNotFoundError(\"No module named 's3fs'\", name='s3fs')\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"
    result = subprocess.run([sys.executable, str(script), f"output_dir={tmp_path}", "data.source=shards",
                             "data.shards=s3://bucket/train"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
                            cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    expected = "error: data.shards=s3://bucket/train needs s3fs, which is not installed: pip install s3fs"
    assert result.stderr.splitlines()[-1] == expected
    assert list(tmp_path.iterdir()) == [tmp_path / "s3fs.py"]  # no run directory left behind


class NoCredentials(Exception):
    """Not an OSError, as botocore's NoCredentialsError."""


class RefusingFileSystem(fsspec.AbstractFileSystem):
    """A store that answers every request with `error`, as s3fs does without credentials or permission (its isdir
    and exists raise too, where fsspec's defaults would answer False)."""

    protocol = "refusing"
    error = PermissionError("Access Denied")

    def _refuse(self, path, *args, **kwargs):
        raise self.error

    ls = info = isdir = exists = _refuse


@pytest.mark.parametrize("error", [PermissionError("Access Denied"), NoCredentials("Unable to locate credentials")])
@pytest.mark.parametrize("spec", ["refusing://bucket/train", "refusing://bucket/train-{000..009}.tar"])
def test_a_store_that_refuses_is_one_line_naming_the_key(monkeypatch, spec, error):
    monkeypatch.setitem(REGISTERED, "refusing", RefusingFileSystem)
    monkeypatch.setattr(RefusingFileSystem, "error", error)
    with pytest.raises(ValueError) as raised:
        shard_urls(spec, "data.val_shards")
    name = type(error).__name__
    assert str(raised.value) == (f"data.val_shards={spec} cannot be read ({name}: {error}); credentials and the "
                                 f"endpoint come from the usual environment of its fsspec library (s3fs: AWS_* "
                                 f"variables, ~/.aws)")


def test_a_missing_http_shard_is_named_when_counted(tmp_path, http_root):
    numbered_shards(tmp_path / "shards", [2, 2])
    urls = shard_urls(f"{http_root}/shards/part-{{000..002}}.tar")  # http cannot list: not checked here
    with pytest.raises(FileNotFoundError, match=f"^shard {http_root}/shards/part-002.tar does not exist$"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shard_counts(urls)


def test_an_http_shard_that_cannot_be_reached_is_not_called_missing():
    """fsspec's http raises FileNotFoundError for every failed request; a refused connection said "does not
    exist", which sent the user looking for a file instead of at the address or the network."""
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/part-000.tar"
    with pytest.raises(ValueError, match=rf"^shard {re.escape(url)} cannot be read \(ClientConnectorError: Cannot "
                                         rf"connect to host 127.0.0.1:{port} .*\); check the address, the network and "
                                         rf"the server$"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shard_counts([url])


def test_balanced_groups():
    assert balanced_groups([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    groups = balanced_groups([3] * 7, 3)
    assert sorted(i for g in groups for i in g) == list(range(7)) and [len(g) for g in groups] == [3, 2, 2]


@pytest.mark.parametrize("index", ["{not json", "[1, 2]", '{"shardlist": [{"url": "part-000.tar"}]}'])
def test_a_shard_index_that_cannot_be_read_is_counted_around(tmp_path, index):
    """A shardindex.json that is not JSON, or not an index, was an AttributeError / KeyError traceback (a list,
    entries without nsamples), or warned of as missing: the shards are counted, the warning says it is unreadable."""
    numbered_shards(tmp_path, [3, 4])
    (tmp_path / "shardindex.json").write_text(index)
    with pytest.warns(UserWarning, match="counting the samples of 2 shards by reading them \\(no readable "
                                         "shardindex.json lists them"):
        assert shard_counts(shard_urls(str(tmp_path))) == [3, 4]


@pytest.mark.parametrize("where", ["path", "file", "http"])
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, http_root, where):
    total = numbered_shards(tmp_path / "shards", [5, 4, 6, 3, 5, 4, 2, 7])
    spec = {"path": str(tmp_path / "shards"), "file": f"file://{tmp_path}/shards",
            "http": f"{http_root}/shards/part-{{000..007}}.tar"}[where]
    urls = shard_urls(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shardindex.json here: counted, with a warning
        with pytest.raises(UserWarning, match="counting the samples of 8 shards"):
            shard_counts(urls)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rank in range(2):
            data = dataset(urls, shuffle_buffer=4, rank=rank, world_size=2)
            loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=2)
            seen += [int(label) for label, _, _ in loader]
    assert len(seen) == total and set(seen) == set(range(total))


def epoch_batches(loader, epoch, stop=None):
    loader.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == stop:
            break
    return out


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(batches_a, batches_b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_rest_of_the_epoch(tmp_path, num_workers):
    numbered_shards(tmp_path, [7, 6, 8, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        urls = shard_urls(str(tmp_path))

        def loader():
            return ShardLoader(dataset(urls, image_item, seed=3, shuffle_buffer=5), batch_size=2,
                               num_workers=num_workers)
        full = epoch_batches(loader(), 1)
        assert len(full) == len(loader()) == (13 // 2 + 13 // 2 if num_workers else 26 // 2)
        interrupted = loader()
        head = epoch_batches(interrupted, 1, stop=3)
        state = json.loads(json.dumps(interrupted.state()))  # as a checkpoint would carry it
        resumed = loader()
        resumed.restore(state)
        resumed_rest = list(resumed)
        assert same(head, full[:3]) and same(resumed_rest, full[3:])
        assert interrupted.state(2)["batches"] == 2  # the states of the last batches are kept
        # a signal as the next epoch starts: one batch fetched ahead, none trained on (it was "no data state kept for
        # batch 0 of epoch 2": the signal checkpoint failed)
        started = loader()
        epoch_batches(started, 2, stop=1)
        resumed = loader()
        resumed.restore(json.loads(json.dumps(started.state(0))))
        resumed.set_epoch(2)
        other_epoch = epoch_batches(loader(), 2)
        assert same(list(resumed), other_epoch)
    labels = [int(label) for batch in full for label in batch[1]]
    assert labels != [int(label) for batch in other_epoch for label in batch[1]]  # shuffled per epoch
    assert len(set(labels)) == len(labels)


def test_a_worker_short_of_its_counted_samples_repeats_batches_to_keep_the_count(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "RETRY_WAIT", 0.001)
    numbered_shards(tmp_path, [6, 6, 6, 6])
    urls = shard_urls(str(tmp_path))
    counts = [6, 10, 6, 6]  # the index overstates part-001: worker 0 (part-001, part-003 by balance) is short
    data = ShardDataset(urls, counts, label_item, decode_image, SkipCounter(), shuffle=False)
    loader = ShardLoader(data, batch_size=2, num_workers=2)
    assert loader.worker_batches[0] == [8, 6] and len(loader) == 14
    with pytest.warns(UserWarning, match="rank 0: the shards of worker 0 ended before the samples their index"):
        batches = [[int(label) for label in batch[0]] for batch in loader]
    assert len(batches) == 14 and sorted(sum(batches[:12], [])) == list(range(24))  # every sample once, then
    assert batches[12] == batches[13] == batches[11]  # worker 0's missing 2 of 8 batches: the batch before, again
    data.counts = [30] * 4  # each worker 24 batches short, more than one shard's 15: the storage is failing
    with pytest.raises(ValueError, match=r"rank 0: its shards gave 12 of the epoch's 60 batches, more than one "
                                         r"shard's \(15\) short: is the storage failing"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(ShardLoader(data, batch_size=2, num_workers=2))
    gone = ShardDataset([str(tmp_path / "gone-0.tar"), str(tmp_path / "gone-1.tar")], [6, 6], label_item,
                        decode_image, SkipCounter(), shuffle=False)  # no batch at all: no epoch of nothing either
    with pytest.raises(ValueError, match="rank 0: its shards gave 0 of the epoch's 6 batches"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(ShardLoader(gone, batch_size=2, num_workers=0))


def test_corrupt_samples_are_skipped_counted_and_replaced(tmp_path):
    good = [(f"k{i}", {"jpg": jpeg(i), "cls": str(i).encode()}) for i in range(6)]
    write_shard(tmp_path / "a.tar", good[:3] + [("bad", {"jpg": jpeg(9)[:100], "cls": b"99"})] + good[3:])
    write_shard(tmp_path / "b.tar", [("x", {"png": cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()}),
                                     ("txt-only", {"txt": b"no image"})])
    urls = shard_urls(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = dataset(urls, shuffle=False)
        labels = [item[0] for item in data]
    assert data.skipped.total == 1
    assert labels == [0, 1, 2, 3, 3, 4, 5, 0]  # the bad one replaced by the next good one; png without .cls -> 0


class _CuttingHandler(_QuietHandler):
    """Serves files, but the first GET of each name in `cut` sends the headers and the first `part` of the file,
    then nothing for `pause` seconds, and closes the connection: a dropped connection, or a stalled server."""

    cut: set = set()
    part, pause = 0.5, 0.0

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.cut:
            return super().do_GET()
        self.cut.discard(name)
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:int(len(data) * self.part)])
        self.wfile.flush()
        time.sleep(self.pause)
        self.close_connection = True


@pytest.mark.timeout(60)
def test_a_stalled_http_server_fails_the_read_which_is_retried(tmp_path, monkeypatch):
    """A server that stops sending mid-shard hung the run without a word (aiohttp has no read timeout)."""
    monkeypatch.setattr(shards, "RETRY_WAIT", 0.01)
    monkeypatch.setattr(shards, "HTTP_TIMEOUT", 1.0)
    numbered_shards(tmp_path / "shards", [6])
    monkeypatch.setattr(_CuttingHandler, "cut", {"part-000.tar"})
    monkeypatch.setattr(_CuttingHandler, "part", 0.25)
    monkeypatch.setattr(_CuttingHandler, "pause", 10.0)
    with serving(tmp_path, _CuttingHandler) as root:
        url = f"{root}/shards/part-000.tar"
        data = ShardDataset([url], [6], label_item, decode_image, SkipCounter(), shuffle=False)
        started = time.monotonic()
        with pytest.warns(UserWarning, match=r"reading http://.*part-000.tar failed after \d samples .*retry 1 of"):
            labels = [item[0] for item in data]
        assert labels == list(range(6)) and time.monotonic() - started < 8
        monkeypatch.setattr(_CuttingHandler, "cut", {"part-000.tar"})  # counted at start: one line, no retry
        with pytest.raises(ValueError, match=r"shard http://.*part-000.tar cannot be read: its server sent nothing for "
                                             r"1 s; check the address, the network and the server"):
            shard_counts([url])


def test_a_shard_whose_read_fails_is_read_again_from_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "RETRY_WAIT", 0.01)
    for i in range(2):  # 12 samples of ~230 KB a shard: the connection drops after the first 1 MiB read
        write_shard(tmp_path / "shards" / f"part-{i:03d}.tar",
                    [(f"s{n:05d}", {"jpg": jpeg(n, (384, 512, 3)), "cls": str(n).encode()})
                     for n in range(12 * i, 12 * i + 12)])
    monkeypatch.setattr(_CuttingHandler, "cut", {"part-000.tar", "part-001.tar"})
    with serving(tmp_path, _CuttingHandler) as root:
        urls = [f"{root}/shards/part-{i:03d}.tar" for i in range(2)]
        data = ShardDataset(urls, [12, 12], label_item, decode_image, SkipCounter(), shuffle=False)
        with pytest.warns(UserWarning) as warned:
            labels = [item[0] for item in data]
    assert labels == list(range(24)) and data.skipped.total == 0  # each sample once, in order
    # the client sees the drop after the samples in its first read, or (about one run in four, as aiohttp buffers)
    # at once: after 0 samples; each sample is given once either way (labels above)
    retried = rf"reading http://.*part-00(\d).tar failed after \d+ samples .*retry 1 of {shards.READ_RETRIES}"
    # only ours: in a full run, the garbage collector may warn here of a file or socket of another test
    ours = [str(w.message) for w in warned if str(w.message).startswith("reading ")]
    assert len(ours) == 2 and all(re.match(retried, m) for m in ours), ours
    assert [re.match(retried, m).group(1) for m in ours] == ["0", "1"]  # once each

    cut = tmp_path / "cut" / "part-000.tar"  # a shard cut short on disk: the rest is left out, at once (it read
    cut.parent.mkdir()                        # the same 5 times more, for 31 s, every epoch)
    whole = (tmp_path / "shards" / "part-000.tar").read_bytes()
    cut.write_bytes(whole[:len(whole) // 2])
    data = ShardDataset([str(cut), str(tmp_path / "shards" / "part-001.tar")], [12, 12], label_item, decode_image,
                        SkipCounter(), shuffle=False)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        labels = [item[0] for item in data]
    given = len(labels) - 12  # the samples before the cut, then all of the next shard
    assert data.skipped.total == 1 and 0 < given < 12 and labels == [*range(given), *range(12, 24)]
    messages = [str(w.message) for w in warned if "part-000.tar" in str(w.message)]
    assert len(messages) == 1 and "retry" not in messages[0], messages
    assert re.search(rf"latest: {re.escape(str(cut))}: ReadError: [a-z ]+; the rest of the shard is left out\)$",
                     messages[0]), messages  # not webdataset's tuple of the message, the stream and the url
    with pytest.raises(ValueError, match=r"cannot read shard .*cut/part-000.tar \(ReadError: [a-z ]+\); .*make it "
                                         r"again"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shard_counts([str(cut)])  # no shardindex.json: counting reads it


def test_shards_that_fill_no_batch_are_refused_at_setup(tmp_path):
    """18 samples over 2 readers cannot fill a batch of 16 in either: Lightning stopped at once ("No training
    batches") and the run ended with status 0 and an untrained encoder.pth."""
    numbered_shards(tmp_path / "train", [6, 6, 6])
    numbered_shards(tmp_path / "val", [3])
    for batch_size, workers, fails in ((16, 2, True), (16, 0, False), (9, 2, False)):
        dm = SimMIMDataModule(source="shards", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                              img_size=32, batch_size=batch_size, mask_patch_size=8, model_patch_size=4,
                              num_workers=workers)
        if fails:
            with pytest.raises(ValueError, match=r"the training shards give no full batch of data.batch_size=16 per "
                                                 r"epoch: 18 samples over 2 readers"):
                dm.setup("fit")
        else:
            dm.setup("fit")
            assert len(dm.train_dataloader()) >= 1


def test_datamodule_shards_source_and_state(tmp_path):
    numbered_shards(tmp_path / "train", [6, 6, 6])
    numbered_shards(tmp_path / "val", [3])
    dm = SimMIMDataModule(source="shards", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                          img_size=32, batch_size=4, mask_patch_size=8, model_patch_size=4, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
        loader = dm.train_dataloader()
        images, masks, labels = next(iter(loader))
        assert images.shape == (4, 32, 32, 3) and masks.shape == (4, 8, 8) and labels.shape == (4,)
        one_rank = {"epoch": 0, "batches": 1, "positions": {0: 4}, "rounds": {0: 1}}
        assert dm.state_dict() == {"shards": {"ranks": [one_rank]}}
        val = list(dm.val_dataloader())
        assert [len(b[0]) for b in val] == [3] and [len(b[0]) for b in dm.val_dataloader()] == [3]
        dm2 = SimMIMDataModule(**dm.hparams)
        dm2.load_state_dict(dm.state_dict())
        dm2.setup("fit")
        rest = list(dm2.train_dataloader())
    assert len(rest) == len(loader) - 1 == 3
    with pytest.raises(FileNotFoundError, match="data.shards="):
        SimMIMDataModule(source="shards").setup("fit")
    with pytest.raises(FileNotFoundError, match="data.val_shards=.*missing does not exist"):
        SimMIMDataModule(source="shards", shards=str(tmp_path / "train"),
                         val_shards=str(tmp_path / "missing")).setup("fit")
    with pytest.raises(ValueError, match="1 shard; need at least 2"):
        SimMIMDataModule(source="shards", shards=str(tmp_path / "val")).setup("fit")
    with pytest.raises(ValueError, match="2 training shards for 3 readers"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SimMIMDataModule(source="shards", shards=str(tmp_path / "train"), num_workers=3).setup("fit")


def test_every_rank_validates_on_shards_of_its_own(tmp_path):
    """2 ranks x 2 workers, 3 val shards: each rank gets a shard (its val loader 1 worker); every val sample once.
    Fewer val shards than ranks is one line at start (Lightning stops a rank whose val loader is empty)."""
    from simmim.data.shards import ShardSource

    numbered_shards(tmp_path / "train", [5, 5, 5, 5])
    total = numbered_shards(tmp_path / "val", [2, 3, 4])
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rank in range(2):
            source = ShardSource(str(tmp_path / "train"), str(tmp_path / "val"), (label_item, label_item),
                                 (decode_image, decode_image), SkipCounter())
            loader = source.loader(False, rank, 2, batch_size=2, num_workers=2)
            batches = list(loader)
            assert loader.num_workers == 1 and 0 < len(batches) == len(loader)
            seen += [int(label) for (labels,) in batches for label in labels]
        assert sorted(seen) == list(range(total))
        source = ShardSource(str(tmp_path / "train"), str(tmp_path / "val" / "part-000.tar"),
                             (label_item, label_item), (decode_image, decode_image), SkipCounter())
        with pytest.raises(ValueError, match=r"data.val_shards=.*part-000.tar has 1 validation shard\(s\) for 2 ranks"):
            source.loader(False, 1, 2, batch_size=2, num_workers=0)
        source = ShardSource(str(tmp_path / "train"), None, (label_item, label_item), (decode_image, decode_image),
                             SkipCounter())
        with pytest.raises(ValueError, match="the held-out last shard is 1 validation shard.* give data.val_shards "
                                             "at least 2 shards"):
            source.loader(False, 0, 2, batch_size=2, num_workers=0)


def test_make_shards_keeps_labels_and_resumes(tmp_path, capsys, monkeypatch):
    for cls in ("cat", "dog"):
        for i in range(10):
            (tmp_path / "src" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / cls / f"{i}.jpg").write_bytes(jpeg(i + 100 * (cls == "dog")))
    assert cv2.imwrite(str(tmp_path / "src" / "cat" / "x.bmp"), np.full((6, 6, 3), 7, np.uint8))
    out = tmp_path / "out"
    make_shards.main([f"root={tmp_path / 'src'}", f"out={out}", "shard_mb=0.004", "workers=2"])
    shards = sorted((out / "train").glob("*.tar"))
    assert len(shards) > 2 and "data.shards=" in capsys.readouterr().out
    index = json.loads((out / "train" / "shardindex.json").read_text())
    assert [e["url"] for e in index["shardlist"]] == [p.name for p in shards]

    seen = {}
    for split in ("train", "val"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for image, label, *_ in dataset(shard_urls(str(out / split)), image_item, shuffle=False):
                seen[(image.shape, int(image[0, 0, 0]))] = label
    assert len(seen) >= 20 and seen[((6, 6, 3), 7)] == 0  # bmp re-encoded, cat = 0
    counts = shard_counts(shard_urls(str(out / "train"))) + shard_counts(shard_urls(str(out / "val")))
    assert sum(counts) == 21

    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    (out / "train" / "train-000000.tar.tmp").write_bytes(b"partial")
    make_shards.main([f"root={tmp_path / 'src'}", f"out={out}", "shard_mb=0.004", "workers=2"])
    assert shards[1].exists() and all(p.stat().st_mtime_ns == stamps[p] for p in shards if p != shards[1])
    with pytest.raises(Exception, match="out=<directory"):
        make_shards.main([f"root={tmp_path / 'src'}"])

    # another shard size, or another set of images, would cut other shards than the ones on disk: refused
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    with pytest.raises(ConfigError, match=r"train holds shards of another packing \(20 files, \d+ per shard; now 20 "
                                          r"files, \d+ per shard\): the images, verify= or shard_mb= changed"):
        make_shards.main([f"root={tmp_path / 'src'}", f"out={out}", "shard_mb=0.04"])
    (tmp_path / "src" / "dog" / "9.jpg").rename(tmp_path / "src" / "dog" / "9b.jpg")  # as many files, not the same
    with pytest.raises(ConfigError, match="holds shards of another packing"):
        make_shards.main([f"root={tmp_path / 'src'}", f"out={out}", "shard_mb=0.004"])
    (tmp_path / "src" / "dog" / "9b.jpg").rename(tmp_path / "src" / "dog" / "9.jpg")
    monkeypatch.chdir(tmp_path)  # the same images named from another directory: the same packing, resumed
    shards[0].unlink()
    make_shards.main(["root=src", f"out={out}", "shard_mb=0.004", "workers=2"])
    assert shards[0].exists() and all(p.stat().st_mtime_ns == stamps[p] for p in shards[1:])
    assert list((out / "train").glob("*.tar")) and not list(out.glob("*/*.tmp"))
    with pytest.raises(ValueError, match=f"out={tmp_path / 'src' / 'cat' / '0.jpg'}: .*is a file; pass a folder"):
        make_shards.main(["root=src", f"out={tmp_path / 'src' / 'cat' / '0.jpg'}"])


def test_make_shards_remakes_a_shard_cut_or_replaced_since(tmp_path):
    """Training says of a shard it cannot read: make it again (scripts/make_shards.py). The rerun kept it (it
    exists); now a shard whose size differs from the one recorded at the end of the packing is written again."""
    (tmp_path / "src" / "cat").mkdir(parents=True)
    for i in range(12):
        (tmp_path / "src" / "cat" / f"{i}.jpg").write_bytes(jpeg(i))
    args = [f"root={tmp_path / 'src'}", f"out={tmp_path / 'out'}", "shard_mb=0.002", "workers=1"]
    make_shards.main(args)
    shards = sorted((tmp_path / "out" / "train").glob("*.tar"))

    def members(path):  # the samples, without the tar headers' times
        with tarfile.open(path) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]

    whole = {path: members(path) for path in shards}
    shards[0].write_bytes(shards[0].read_bytes()[:5000])
    shards[1].write_text("not a tar")
    untouched = shards[2].stat().st_mtime_ns
    make_shards.main(args)
    assert {path: members(path) for path in shards} == whole and shards[2].stat().st_mtime_ns == untouched
    for path in (tmp_path / "out" / "train").glob("*.tar"):  # shards deleted, the record kept: a new packing
        path.unlink()                                          # starts, and the record is that packing's
    make_shards.main([*args[:2], "shard_mb=0.004", "workers=1"])
    record = json.loads((tmp_path / "out" / "train" / "make_shards.json").read_text())
    assert record["bytes"] == {p.name: p.stat().st_size for p in (tmp_path / "out" / "train").glob("*.tar")}
    make_shards.main([*args[:2], "shard_mb=0.004", "workers=1"])  # was refused: the record kept the first packing
    record_file = tmp_path / "out" / "train" / "make_shards.json"
    for broken in ("{not json", "[1, 2]"):  # the error did not name the file ("Expecting property name ...")
        record_file.write_text(broken)
        with pytest.raises(ConfigError, match=rf"^{record_file} (cannot be read|is not a record of this command)"):
            make_shards.main([*args[:2], "shard_mb=0.004", "workers=1"])
        assert record_file.read_text() == broken


def test_make_shards_stops_at_ctrl_c_without_writing_the_queued_shards(tmp_path, monkeypatch):
    """Leaving the thread pool on Ctrl-C waited for every queued shard (hours on a large collection, and the disk
    filled with .tmp files): now the queued ones are dropped and no .tmp file stays; a rerun completes."""
    (tmp_path / "src" / "cat").mkdir(parents=True)
    for i in range(12):
        (tmp_path / "src" / "cat" / f"{i}.jpg").write_bytes(jpeg(i))
    calls, write = [], make_shards.write_shard

    def interrupted_at_the_third(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        if len(calls) > 3:  # the one started meanwhile waits, so that a slow main thread (a busy machine) reacts
            time.sleep(3)   # before the pool's one worker takes more from the queue
        return write(*args)

    monkeypatch.setattr(make_shards, "write_shard", interrupted_at_the_third)
    args = [f"root={tmp_path / 'src'}", f"out={tmp_path / 'out'}", "shard_mb=0.0005", "workers=1"]
    with pytest.raises(KeyboardInterrupt):
        make_shards.main(args)
    left = sorted(p.name for p in (tmp_path / "out" / "train").glob("*.tar*"))
    # done before the interrupt, at most (a done one met after it is written again by the rerun); at most one started
    assert set(left) <= {p.name for p in calls[:2]} and len(calls) <= 4  # meanwhile
    monkeypatch.setattr(make_shards, "write_shard", write)
    make_shards.main(args)
    assert len(list((tmp_path / "out" / "train").glob("*.tar"))) == 11 and not list(tmp_path.rglob("*.tmp"))


def test_make_shards_short_side_stores_smaller_copies(tmp_path):
    smooth = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8), (0, 0), 4)
    for cls, shape in (("big", (90, 120, 3)), ("small", (30, 40, 3))):
        (tmp_path / "src" / "train" / cls).mkdir(parents=True)
        (tmp_path / "src" / "val" / cls).mkdir(parents=True)
        for split in ("train", "val"):
            assert cv2.imwrite(str(tmp_path / "src" / split / cls / "a.png"), smooth[:shape[0], :shape[1]])
    out = tmp_path / "out"
    make_shards.main([f"root={tmp_path / 'src'}", f"out={out}", "short_side=60", "workers=1"])
    seen = {label: image.numpy() for image, label, *_ in dataset(shard_urls(str(out / "train")), image_item,
                                                                  shuffle=False)}
    assert seen[0].shape == (60, 80, 3) and seen[1].shape == (30, 40, 3)  # big: resized; small: as it was
    expected = cv2.resize(smooth[..., ::-1], (80, 60), interpolation=cv2.INTER_AREA)
    assert np.abs(seen[0].astype(int) - expected).mean() < 2  # a JPEG of quality 90 of the area resize
    assert np.array_equal(seen[1], smooth[:30, :40, ::-1])  # the PNG's own bytes
    assert json.loads((out / "train" / "make_shards.json").read_text())["short_side"] == 60
    with pytest.raises(Exception, match=r"packed with short_side=60 quality=90; rerun with those values"):
        make_shards.main([f"root={tmp_path / 'src'}", f"out={out}", "short_side=100"])
    with pytest.raises(Exception, match=r"short_side=-3 must be a positive number of pixels"):
        make_shards.main([f"root={tmp_path / 'src'}", f"out={tmp_path / 'other'}", "short_side=-3"])


@pytest.mark.timeout(60)
def test_make_shards_leaves_out_files_that_do_not_decode_and_lists_them(tmp_path, capsys):
    """With short_side every file is decoded: a corrupt JPEG or BMP is left out, counted in the index, listed in
    make_shards.json and named on the console; packing goes on, and a second run keeps the record."""
    for split in ("train", "val"):
        (tmp_path / "src" / split / "cat").mkdir(parents=True)
        for i in range(4):
            assert cv2.imwrite(str(tmp_path / "src" / split / "cat" / f"{i}.jpg"), np.full((20, 30, 3), 40 * i, np.uint8))
    (tmp_path / "src" / "train" / "cat" / "torn.jpg").write_bytes(jpeg(1)[:60])
    (tmp_path / "src" / "train" / "cat" / "empty.bmp").write_bytes(b"")
    out = tmp_path / "out"
    for _ in range(2):  # the second run finds the shards complete
        make_shards.main([f"root={tmp_path / 'src'}", f"out={out}", "short_side=10", "workers=1", "shard_mb=0.001"])
    printed = capsys.readouterr().out
    assert "train: left out 2 of 6 files that cannot be read or decoded" in printed and str(out / "train") in printed
    record = json.loads((out / "train" / "make_shards.json").read_text())
    assert sorted(Path(f).name for files in record["left_out"].values() for f in files) == ["empty.bmp", "torn.jpg"]
    urls = shard_urls(str(out / "train"))
    assert sum(shard_counts(urls)) == 4 == len(list(dataset(urls, shuffle=False)))


def test_make_shards_leaves_out_a_listed_file_that_is_missing(tmp_path, capsys):
    """One missing path in a list of millions must not stop the packing (it did, in the size estimate)."""
    (tmp_path / "images").mkdir()
    for i in range(6):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg(i))
    lines = [f"images/{i}.jpg {i % 2}" for i in range(6)] + ["images/gone.jpg 1"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    make_shards.main([f"list_file={tmp_path / 'list.txt'}", f"out={out}", "workers=1"])
    assert "left out 1 of " in capsys.readouterr().out
    record = json.loads((out / "train" / "make_shards.json").read_text())
    assert [Path(f).name for files in record["left_out"].values() for f in files] == ["gone.jpg"]
    urls = shard_urls(str(out / "train")) + shard_urls(str(out / "val"))
    assert sum(shard_counts(urls)) == 6 == len(list(dataset(urls, shuffle=False)))
    (tmp_path / "elsewhere.txt").write_text("".join(f"{line}\n" for line in lines))  # relative to another folder
    (tmp_path / "lists").mkdir()
    (tmp_path / "elsewhere.txt").rename(tmp_path / "lists" / "list.txt")
    with pytest.raises(FileNotFoundError, match=r"none of 7 files of .*list.txt tried exists \(first: .*lists/"
                                                r"images/\w+.jpg\); a list's relative paths are relative to the list "
                                                r"file's folder"):
        make_shards.main([f"list_file={tmp_path / 'lists' / 'list.txt'}", f"out={tmp_path / 'out2'}"])  # was: 0 samples
    with pytest.raises(ConfigError, match=r"out=.*images/shards is inside root=.*images: its train/ and val/"):
        make_shards.main([f"root={tmp_path / 'images'}", f"out={tmp_path / 'images' / 'shards'}"])


def test_make_shards_does_not_adopt_tars_it_did_not_write(tmp_path):
    """out= a folder holding someone else's train-000000.tar (a downloaded collection): a rerun kept it as the
    first shard of this packing, and the index counted this packing's samples for it."""
    (tmp_path / "images" / "cat").mkdir(parents=True)
    for i in range(6):
        (tmp_path / "images" / "cat" / f"{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "out" / "train").mkdir(parents=True)
    foreign = tmp_path / "out" / "train" / "train-000000.tar"
    with TarWriter(str(foreign)) as sink:
        sink.write({"__key__": "other", "jpg": jpeg(99), "cls": 5})
    before = foreign.read_bytes()
    with pytest.raises(ConfigError, match=r"^.*out/train holds train-\*.tar files but no make_shards.json: not "
                                          r"shards of this command, .*; give a new out=, or move those files away$"):
        make_shards.main([f"root={tmp_path / 'images'}", f"out={tmp_path / 'out'}", "workers=1"])
    assert foreign.read_bytes() == before and sorted(p.name for p in foreign.parent.iterdir()) == [foreign.name]


class LabelRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.labels = []

    def training_step(self, batch, batch_idx):
        self.labels.append(batch[2].tolist())
        return self.weight * batch[0].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, datamodule, max_steps=-1, ckpt_path=None, warned=None):
    """The labels of every batch trained on in 2 epochs (or max_steps); the warnings' messages go to `warned`."""
    model = LabelRecorder()
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = pl.Trainer(max_epochs=2, max_steps=max_steps, limit_val_batches=0, logger=False,
                         callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if warned is not None:
        warned += [str(warning.message) for warning in caught]
    return model.labels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resumes_mid_epoch_from_a_step_checkpoint(tmp_path, num_workers):
    """Killed after 3 steps of epoch 0 (5 steps per epoch), resumed: the batches of an uninterrupted run."""
    numbered_shards(tmp_path / "train", [6, 7, 5, 8])
    numbered_shards(tmp_path / "val", [2])

    def datamodule():
        return SimMIMDataModule(source="shards", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                                img_size=16, batch_size=2, mask_patch_size=8, model_patch_size=4,
                                num_workers=num_workers, shuffle_buffer=4, seed=5)
    whole = fit(tmp_path / "whole", datamodule())
    assert len(whole) == 2 * (13 if num_workers == 0 else 6 + 6)
    head = fit(tmp_path / "cut", datamodule(), max_steps=3)
    rest = fit(tmp_path / "cut", datamodule(), ckpt_path=str(tmp_path / "cut" / "ckpt" / "last.ckpt"))
    assert head == whole[:3] and rest == whole[3:]


def rank_batches(rank: int, root: str) -> None:
    """One of 2 gloo ranks, as Lightning drives the datamodule: the labels of the uninterrupted epoch; of one
    stopped after 6 batches, saved as Lightning saves (every rank calls state_dict, rank 0's dict is written) and
    resumed from that file by a new datamodule (every rank loads the same dict). -> <root>/rank<r>.json"""
    torch.set_num_threads(1)  # no OpenMP pool in this process: its DataLoaders may fork their workers
    multiprocessing.set_start_method("fork", force=True)  # spawn (inherited) re-imports the tests in every worker
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/group", rank=rank, world_size=2)
    done = types.SimpleNamespace(processed=0)
    trainer = types.SimpleNamespace(world_size=2, global_rank=rank, num_training_batches=8, current_epoch=0,
                                    ckpt_path=f"{root}/ckpt",
                                    fit_loop=types.SimpleNamespace(epoch_loop=types.SimpleNamespace(
                                        batch_progress=types.SimpleNamespace(current=done))))

    def batches(state=None):
        datamodule = SimMIMDataModule(source="shards", shards=f"{root}/train", val_shards=f"{root}/val", img_size=16,
                                      batch_size=2, mask_patch_size=8, model_patch_size=4, num_workers=2,
                                      shuffle_buffer=4, seed=5, pin_memory=False)
        datamodule.trainer = trainer
        if state is not None:
            datamodule.load_state_dict(state)
        datamodule.setup("fit")
        return datamodule, (batch[2].tolist() for batch in datamodule.train_dataloader())

    whole = list(batches()[1])
    datamodule, head = batches()
    head = [next(head) for _ in range(6)]
    done.processed = 6
    state = datamodule.state_dict()
    if rank == 0:
        torch.save(state, f"{root}/state.pt")
    torch.distributed.barrier()
    rest = list(batches(torch.load(f"{root}/state.pt"))[1])
    Path(f"{root}/rank{rank}.json").write_text(json.dumps({"whole": whole, "resumed": head + rest}))
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_ranks_resume_each_from_its_own_place(tmp_path):
    """2 ranks x 2 workers on shards of 20, 4, 12 and 12 samples, batches of 2: rank 1's workers hold 12 and 4
    samples, so from batch 4 on its batches come from one worker while rank 0's still alternate, and the ranks'
    places in their shards differ. Stopped after batch 6 and resumed, each rank gives the batches of the epoch
    never stopped (every rank used to restore rank 0's place, the only one Lightning writes: rank 1 then
    repeated a batch and skipped one). The ranks are spawned: safe with OpenMP threads."""
    numbered_shards(tmp_path / "train", [20, 4, 12, 12])
    numbered_shards(tmp_path / "val", [2, 2])
    torch.multiprocessing.spawn(rank_batches, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        labels = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(labels["whole"]) == 8 and labels["resumed"] == labels["whole"], f"rank {rank}"


def test_a_mid_epoch_resume_with_other_readers_is_refused(tmp_path):
    """Each worker of each rank has its own place in its shards: a run resumed mid-epoch with another
    data.num_workers or data.batch_size would repeat or skip samples, so it stops with the values and the fixes."""
    numbered_shards(tmp_path / "train", [6, 7, 5, 8])
    numbered_shards(tmp_path / "val", [2])

    def datamodule(num_workers=0, batch_size=2):
        return SimMIMDataModule(source="shards", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                                img_size=16, batch_size=batch_size, mask_patch_size=8, model_patch_size=4,
                                num_workers=num_workers, shuffle_buffer=4, seed=5)
    fit(tmp_path / "cut", datamodule(), max_steps=3)
    ckpt = tmp_path / "cut" / "ckpt" / "last.ckpt"
    for changed, now in (({"num_workers": 2}, "1 x 2 x 2"), ({"batch_size": 1}, "1 x 0 x 1")):
        with pytest.raises(ValueError, match=rf"{ckpt} was saved in the middle of an epoch on shards by 1 rank\(s\) x "
                                             rf"data.num_workers=0 x data.batch_size=2, this run has {now}: .*set "
                                             rf"them as saved, or resume from the end of an epoch"):
            fit(tmp_path / "cut", datamodule(**changed), ckpt_path=str(ckpt))


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_a_mid_epoch_resume_over_other_data_warns_with_both_sizes(tmp_path, source):
    """Training data added since a checkpoint saved mid-epoch (a shard; image files): the rest of that epoch cannot
    follow the interrupted order, so the resume warns once with both sizes (before: silently) and trains the
    epochs to their end over the data as it now is."""
    if source == "shards":
        numbered_shards(tmp_path / "train", [6, 7, 5, 8])
        numbered_shards(tmp_path / "val", [2])
        keys, sizes = dict(shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val")), (
            "4 shards of 26 samples", "5 shards of 30 samples")
    else:
        for split, count in (("train", 20), ("val", 2)):
            for i in range(count):
                (tmp_path / "images" / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
                (tmp_path / "images" / split / f"class{i % 2}" / f"{i:03d}.jpg").write_bytes(jpeg(i))
        keys, sizes = dict(root=str(tmp_path / "images")), ("20 images", "24 images")

    def datamodule():
        return SimMIMDataModule(source=source, **keys, img_size=16, batch_size=2, mask_patch_size=8,
                                model_patch_size=4, num_workers=0, shuffle_buffer=4, seed=5)
    fit(tmp_path / "cut", datamodule(), max_steps=3)
    if source == "shards":
        write_shard(tmp_path / "train" / "part-004.tar",
                    [(f"new{j}", {"jpg": jpeg(100 + j), "cls": str(100 + j).encode()}) for j in range(4)])
    else:
        for i in range(20, 24):
            (tmp_path / "images" / "train" / f"class{i % 2}" / f"{i:03d}.jpg").write_bytes(jpeg(i))
    ckpt, warned = tmp_path / "cut" / "ckpt" / "last.ckpt", []
    labels = fit(tmp_path / "cut", datamodule(), ckpt_path=str(ckpt), warned=warned)
    ours = [message for message in warned if "in the middle of an epoch" in message]
    assert len(ours) == 1 and ours[0].startswith(
        f"{ckpt} was saved in the middle of an epoch over {sizes[0]}, the training data now has {sizes[1]}: the "
        f"rest of that epoch follows another order"), warned
    assert len(labels) == 2 * 15 - 3 if source == "shards" else len(labels) == 12 - 3 + 12


@pytest.mark.parametrize("limit, expected", [(5, 5), (7, 11), (11, 11), (None, 16), (100, 16)])
def test_shard_images_are_the_first_shards_holding_the_limit(tmp_path, limit, expected):
    numbered_shards(tmp_path, [5, 6, 5])  # labels 0..15 in shard order
    urls = shard_urls(str(tmp_path))
    images = shards.ShardImages(urls, shard_counts(urls), limit, label_item, decode_image, SkipCounter())
    assert [y for (y,) in images] == list(range(expected))  # whole shards, in order, unshuffled
    loader = torch.utils.data.DataLoader(images, batch_size=4, num_workers=2)
    assert sorted(int(y) for (batch,) in loader for y in batch) == list(range(expected))  # each sample once over the workers


def test_pretrain_script_on_shards_made_from_a_folder(tmp_path, capsys):
    from simmim import pretrain

    for i in range(40):
        path = tmp_path / "src" / f"class{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(i, (40, 40, 3)))
    (tmp_path / "src" / "class0" / "broken.jpg").write_bytes(jpeg(99)[:50])
    make_shards.main([f"root={tmp_path / 'src'}", f"out={tmp_path / 'shards'}", "shard_mb=0.01", "workers=2"])
    args = [f"output_dir={tmp_path}", "run_name=demo", "data.batch_size=4", "data.num_workers=0",
            "data.source=shards", f"data.shards={tmp_path / 'shards' / 'train'}",
            f"data.val_shards={tmp_path / 'shards' / 'val'}", "data.img_size=32", "simmim.mask_patch_size=8",
            "model.embed_dim=16", "model.depths=[2,2]", "model.num_heads=[2,4]", "trainer.max_epochs=2",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "logging.recon_every_n_steps=0",
            "logging.recon_images=2", "eval.knn_every_n_epochs=1", "eval.knn_max_images=8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain.main(args)
    printed = capsys.readouterr().out
    assert "encoder: " in printed
    # the k-NN monitor on the labeled shards: before training and after each epoch
    assert re.search(r"k-NN top-1 \(val\) by epoch: 0: [0-9.]+, 1: [0-9.]+, 2: [0-9.]+;", printed)
    assert (tmp_path / "demo" / "knn.png").is_file()
    lines = (tmp_path / "demo" / "csv" / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("data/skipped")
    skipped = [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]
    assert skipped and skipped[-1] >= 1  # the broken file, met in epoch 0 and again in epoch 1

    # stopped by max_steps at the end of epoch 2, then resumed to epoch 4: from last.ckpt, saved in epoch 2's end
    # hooks, which the resumed run runs again after Lightning has started the loader's next epoch; their checkpoint
    # failed ("no data state kept for batch 10 of epoch 2")
    per_epoch = len([row for row in csv.DictReader((tmp_path / "demo" / "csv" / "metrics.csv").open())
                     if row["train/loss"]]) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for stop in (f"trainer.max_steps={3 * per_epoch}", "trainer.max_steps=-1"):
            pretrain.main([arg.replace("max_epochs=2", "max_epochs=4") for arg in args] + [stop])
    rows = list(csv.DictReader((tmp_path / "demo" / "csv" / "metrics.csv").open()))
    steps = [[row["step"] for row in rows if row["train/loss"] and row["epoch"] == str(epoch)] for epoch in range(4)]
    assert per_epoch and [len(epoch) for epoch in steps] == [per_epoch] * 4  # every epoch trained whole, once


def test_knn_passes_do_not_add_to_data_skipped(tmp_path):
    """The k-NN monitor reads the same shards at every measurement; its skips went into the datamodule's counter,
    so data/skipped grew by the broken samples at each k-NN pass, not by what training met."""
    numbered_shards(tmp_path / "train", [4])
    write_shard(tmp_path / "train" / "part-001.tar", [("bad", {"jpg": jpeg(9)[:100], "cls": b"1"}),
                                                      ("good", {"jpg": jpeg(8), "cls": b"0"})])
    numbered_shards(tmp_path / "val", [2])
    dm = SimMIMDataModule(source="shards", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                          img_size=16, batch_size=2, mask_patch_size=8, model_patch_size=4, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
        for _ in range(2):
            train, _ = dm.knn_sets(None)
            assert len(list(DataLoader(train, batch_size=4))) == 2  # 6 samples, the bad one replaced
    assert dm.skipped.total == 0 and train.samples.skipped.total == 1


def test_finetune_datamodule_streams_labeled_shards(tmp_path):
    from finetune.module import ClassificationDataModule

    total = numbered_shards(tmp_path / "train", [5, 6, 5])
    numbered_shards(tmp_path / "val", [3])
    dm = ClassificationDataModule(source="shards", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                                  img_size=16, batch_size=4, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        images, labels = batches[0]
        assert images.shape == (4, 16, 16, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert len(batches) == 3 and len({int(x) for _, y in batches for x in y}) == 12 <= total
        assert dm.state_dict()["shards"]["ranks"][0]["batches"] == 3
        assert [len(y) for _, y in dm.val_dataloader()] == [3]


def test_shards_the_run_cannot_use_are_one_line_at_start(tmp_path):
    """A packing make_shards.py did not finish (it trained on the shards written so far, without a word); shards
    whose file names hold more dots (img.0001.jpg: no KEY.jpg samples; was "no full batch of data.batch_size");
    a .cls that is no class index (each sample counted undecodable, then "is the storage failing?")."""
    def setup(folder):
        SimMIMDataModule(source="shards", shards=str(folder), img_size=16, batch_size=2, mask_patch_size=8,
                         model_patch_size=4).setup("fit")

    numbered_shards(tmp_path / "cut", [3, 3])
    (tmp_path / "cut" / "make_shards.json").write_text(json.dumps({"files": 12, "per_shard": 3, "left_out": {}}))
    with pytest.raises(ValueError, match=r"data.shards=.*cut: scripts/make_shards.py has not finished packing it "
                                         r"\(2 of "
                                         r"4 shards written, by .*make_shards.json\); run the same make_shards.py "):
        setup(tmp_path / "cut")
    write_shard(tmp_path / "dots" / "a.tar", [(f"img.{i:04d}", {"jpg": jpeg(i)}) for i in range(4)])
    write_shard(tmp_path / "dots" / "b.tar", [(f"img.{i:04d}", {"jpg": jpeg(i)}) for i in range(4, 6)])
    with pytest.raises(ValueError, match=r"holds no samples with an image \(KEY.jpg, KEY.jpeg, KEY.png, KEY.webp\); "
                                         r"its "
                                         r"first shard has suffixes 0000.jpg, 0001.jpg, 0002.jpg, 0003.jpg; a sample's "
                                         r"key ends at the first dot"):
        setup(tmp_path / "dots")
    for name, start in (("a", 0), ("b", 4)):
        write_shard(tmp_path / "words" / f"{name}.tar",
                    [(f"s{i}", {"jpg": jpeg(i), "cls": b"cat"}) for i in range(start, start + 4)])
    data = dataset(shard_urls(str(tmp_path / "words")), shuffle=False)
    with pytest.raises(ValueError, match=r"a.tar: s0.cls holds b'cat', not an integer class index; write class "
                                         r"indices"):
        next(iter(data))


def test_shards_too_few_for_the_runs_ranks_are_refused_before_fit(tmp_path):
    """Set up before the Trainer exists, the shards were checked for one process: with 2 ranks the refusal came in
    the fit, after config.yaml, a dated copy and a TensorBoard file were written. `check_fit` checks them for the
    run's ranks first."""
    numbered_shards(tmp_path / "train", [4, 4, 4])
    numbered_shards(tmp_path / "val", [2])
    data = SimMIMDataModule(source="shards", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                            img_size=16, batch_size=2, mask_patch_size=8, model_patch_size=4, num_workers=2)
    data.setup("fit")
    data.check_fit(None, 1)
    with pytest.raises(ValueError, match=r"has 3 training shards for 4 readers \(ranks x data.num_workers\)"):
        data.check_fit(None, 2)
    data.hparams.num_workers = 1
    with pytest.raises(ValueError, match=r"data.val_shards=.*val has 1 validation shard\(s\) for 2 ranks"):
        data.check_fit(None, 2)


def test_finetuning_stops_at_a_streamed_label_outside_num_classes(tmp_path):
    """A shard's .cls of 4 with model.num_classes=3: one line naming both (was torchmetrics' traceback)."""
    from finetune.train import main as finetune

    numbered_shards(tmp_path / "train", [4, 4])
    numbered_shards(tmp_path / "val", [2])
    with pytest.raises(ValueError, match=r"model.num_classes=3: the data has label [3-7], expected 0..2; set "
                                         r"model.num_classes to the number of classes of the data"):
        finetune([f"output_dir={tmp_path}", "pretrained=null", "data.source=shards",
                  f"data.shards={tmp_path / 'train'}",
                  f"data.val_shards={tmp_path / 'val'}", "model.num_classes=3", "data.img_size=32",
                  "model.embed_dim=16", "data.batch_size=2", "data.num_workers=0", "trainer.max_epochs=1",
                  "trainer.enable_progress_bar=false"])
