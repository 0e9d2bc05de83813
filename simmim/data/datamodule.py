"""LightningDataModules whose training order continues exactly where a checkpoint left it, mid-epoch
included (`ResumableDataModule`), and SimMIM's masked batches (`SimMIMDataModule`)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from masking import build_mask_generator
from simmim.data.datasets import EpochSampler, ImageDataset, MaskedImageDataset, MaskedItem, SkipCounter, labeled_sets
from simmim.data.decode import shard_decode
from simmim.data.shards import ShardSource
from simmim.data.sources import build_sources
from simmim.data.transforms import eval_transform, normalize_images, pretrain_transform
from simmim.data.workers import ShieldedDataLoader

if TYPE_CHECKING:
    from simmim.train.checkpoint_io import Resumable


class LogSkipped(pl.Callback):
    """Logs ``data/skipped``, the images that failed to decode so far (`SkipCounter` of the datamodule)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        counter = getattr(trainer.datamodule, "skipped", None)
        if counter is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log("data/skipped", float(counter.total), reduce_fx="sum", sync_dist=True)


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
        self.shards, self._shards_state = None, None  # the shards source (simmim.data.shards.ShardSource), its state
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
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else None
        end_of_epoch = self.trainer is not None and done >= self.trainer.num_training_batches
        next_epoch = self.trainer.current_epoch + 1 if end_of_epoch else None  # at an epoch's end the next is due
        layout = {"layout": self._layout()} if done and not end_of_epoch else {}
        if self.shards is not None:  # outside a trainer (done None): all batches given out
            return {"shards": {"ranks": self._every_rank(self.shards.state_dict(done, next_epoch))}, **layout}
        if self._train_sampler is None or self.trainer is None:
            return {}
        if next_epoch is not None:
            return {"epoch": next_epoch, "batches": 0}
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
        rank, ranks = self._rank_and_world()
        if self.shards is not None or ranks == 1:
            return size
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
    (`simmim.data.shards`) streams ``shards`` (validation: ``val_shards``, else the last shard is held out); its
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
        transforms = (pretrain_transform(hp.img_size, hp.crop_scale, hp.crop_ratio, hp.hflip),
                      eval_transform(hp.img_size))
        if hp.source == "shards":
            self.stream_shards([MaskedItem(t, masks) for t in transforms], transforms)
            return
        train, val = build_sources(hp.source, hp.img_size, hp.root, hp.list_file, hp.verify)
        if hp.drop_last and len(train) < hp.batch_size and stage in (None, "fit"):  # validate trains no batch
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
        each split holding `limit` samples of the shards source (`simmim.data.shards.ShardImages`); None: every image.
        The samples listed and the shards counted at setup are used as they are. Their skips have counters of their
        own: data/skipped counts training's and validation's, not each k-NN pass over the same files again."""
        if self.shards is not None:
            return labeled_sets(self.hparams.img_size, limit, shards=[
                (split.urls, split.counts, SkipCounter()) for split in (self.shards.train_set, self.shards.val_set)])
        return labeled_sets(self.hparams.img_size, limit,
                             listed=[split.dataset.samples for split in (self.train_set, self.val_set)])


def uses_cuda(trainer) -> bool:
    """Whether the trainer (or, outside one, this machine) runs on CUDA: then DataLoaders pin memory."""
    return trainer.strategy.root_device.type == "cuda" if trainer is not None else torch.cuda.is_available()


def shard_source(hp, items: list, transforms: tuple, skipped: SkipCounter):
    """The `simmim.data.shards.ShardSource` of data hyperparameters (shards, val_shards, seed, shuffle_buffer): items
    and transforms are (train, val) pairs; JPEGs are decoded at the scale each transform needs."""
    return ShardSource(hp.shards, hp.val_shards, items, [shard_decode(t) for t in transforms], skipped,
                       seed=hp.seed, shuffle_buffer=hp.shuffle_buffer)
