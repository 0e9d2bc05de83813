"""Strategy names, and two ranks on CPU (gloo, spawned processes: a fork after OpenMP threads exist can hang
when OMP_NUM_THREADS is set) against one process with the same total batch and seed.

The default recipe's model and data, with two changes that make a run a function of the seed alone: the train
images get the deterministic eval transform (the random crops come from each process's own RNG, so they could
not agree), and validation is off. The masks come from (seed, epoch, index) and the random mask generator masks
the same number of patches in every image, so the mean of the two ranks' losses is the loss of the whole batch.
"""
import copy
import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from lightning_utilities.core.rank_zero import rank_zero_only
from pytorch_lightning.strategies import DeepSpeedStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.optim import ZeroRedundancyOptimizer
from webdataset import TarWriter

from conftest import jpeg, randomize_
from finetune.module import ClassificationDataModule, SwinV2Classifier
from masking import MaskGenerator
from simmim.data.datamodule import SimMIMDataModule
from simmim.data.datasets import EpochSampler
from simmim.data.transforms import eval_transform
from simmim.pretrain import SimMIMPretrainModule
from simmim.train.checkpoint_io import newest_good_checkpoint
from simmim.train.config import ConfigError, load_config
from simmim.train.resume import _warn_changed_settings
from simmim.train.speed import cpu_cores, oversubscription
from simmim.train.strategies import (FSDP_SHARDING, BlockFSDPStrategy, GradNormMonitor, ZeRO1DDPStrategy,
                                     build_strategy, global_grad_norm)

TOTAL_BATCH = 16
STEPS = 3
# Only float32 rounding differs: the sums are taken in another order (two half batches, then an all-reduce). On
# 2 CPU cores the losses differed by 8e-8 (relative) and the weights by 2e-8 (absolute) after 3 steps; the bounds
# leave ~10x room (AdamW divides by sqrt(v), which can amplify rounding where gradients are near zero) and stay
# far below one step's change (lr up to 1.7e-4 here), so a batch with other samples or a missed update fails.
LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-6


class Recorder(pl.Callback):
    """Per step the logged train/loss (the mean over the ranks: the whole batch's; it was each rank's own half); at
    the end each rank's optimizer state bytes and the weights, saved to `<out>_rank<r>.pt`."""

    def __init__(self, out):
        self.out, self.losses = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        local = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
        state_bytes = sum(t.nbytes for state in local.state.values() for t in state.values() if torch.is_tensor(t))
        torch.save({"losses": self.losses, "state_bytes": state_bytes, "num_params": len(list(pl_module.parameters())),
                    "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
                   f"{self.out}_rank{trainer.global_rank}.pt")


def train(out, strategy, devices: int, max_epochs: int = 1, steps: int = STEPS, ckpt_path=None, callbacks=()):
    """Fit the default recipe for `steps` batches of TOTAL_BATCH images over `devices` ranks; rank results in
    `<out>_rank<r>.pt`, checkpoints under out's folder."""
    cfg = load_config("pretrain")
    data = SimMIMDataModule(source=cfg.data.source, img_size=cfg.model.img_size, batch_size=TOTAL_BATCH // devices,
                            mask_kind=cfg.simmim.mask_kind, mask_patch_size=cfg.simmim.mask_patch_size,
                            model_patch_size=cfg.model.patch_size, mask_ratio=cfg.simmim.mask_ratio, seed=cfg.seed)
    data.setup("fit")
    data.train_set.dataset.transform = eval_transform(cfg.model.img_size)
    torch.manual_seed(cfg.seed)
    module = SimMIMPretrainModule(model=OmegaConf.to_container(cfg.model),
                                  norm_target_patch_size=cfg.simmim.norm_target_patch_size,
                                  **OmegaConf.to_container(cfg.optim))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=max_epochs,
                         limit_train_batches=steps, limit_val_batches=0,
                         gradient_clip_val=cfg.trainer.gradient_clip_val,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out.parent, callbacks=[Recorder(out), *callbacks])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(out, "auto", devices=1)
    return torch.load(f"{out}_rank0.pt")


def assert_same_training(run: dict, reference: dict) -> None:
    torch.testing.assert_close(run["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
    assert run["weights"].keys() == reference["weights"].keys()
    for name, value in reference["weights"].items():
        torch.testing.assert_close(run["weights"][name], value, rtol=0, atol=PARAM_ATOL, msg=name)


def test_strategy_names():
    """Our names become configured strategies, Lightning's pass through, others and missing DeepSpeed fail."""
    assert isinstance(build_strategy("ddp_zero1"), ZeRO1DDPStrategy)
    fsdp, grad_op = build_strategy("fsdp", "bf16-mixed"), build_strategy("fsdp_grad_op")
    assert isinstance(fsdp, BlockFSDPStrategy) and fsdp.sharding_strategy.name == "FULL_SHARD"
    assert grad_op.sharding_strategy.name == "SHARD_GRAD_OP" and fsdp.precision_plugin.precision == "bf16-mixed"
    assert build_strategy("ddp") == "ddp" and build_strategy("ddp_spawn") == "ddp_spawn"
    with pytest.raises(ConfigError, match="unknown trainer.strategy 'fdsp'; did you mean fsdp"):
        build_strategy("fdsp")


def test_deepspeed_names_need_the_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"stage_3 needs DeepSpeed: pip install 'swinv2-simmim\[deepspeed\]'"):
        build_strategy("deepspeed_stage_3")


def test_two_rank_batches_hold_the_one_rank_batch():
    """Rank r takes every 2nd index from r: step k's two half batches are one rank's batch k, and with drop_last
    both ranks get the same number of samples, none twice."""
    one = [index for index, _ in EpochSampler(21, seed=3, drop_last=True)]
    halves = [[index for index, _ in EpochSampler(21, seed=3, num_replicas=2, rank=r, drop_last=True)] for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 10
    for step in range(2):
        merged = halves[0][step * 4:(step + 1) * 4] + halves[1][step * 4:(step + 1) * 4]
        assert sorted(merged) == sorted(one[step * 8:(step + 1) * 8])


@pytest.mark.parametrize("images, ranks, batch_size", [(79, 2, 8), (80, 2, 8), (17, 3, 4), (5, 4, 2), (9, 8, 1)])
def test_validation_counts_every_image_once_over_ranks(images, ranks, batch_size):
    """The validation sampler pads the split to a multiple of the ranks with its first images (every rank runs the
    same batches): 79 images on 2 ranks scored top-1 over 80, one image twice. `val_batch_own` keeps each rank's
    own images: over the ranks, every image once."""
    counted = []
    for rank in range(ranks):
        order = [index for index, _ in EpochSampler(images, shuffle=False, fixed_epoch=0, num_replicas=ranks,
                                                    rank=rank)]
        data = SimpleNamespace(shards=None, val_set=range(images), hparams=SimpleNamespace(batch_size=batch_size),
                               _rank_and_world=lambda rank=rank: (rank, ranks))  # the datamodule's, as a trainer has it
        for batch_idx, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start:start + batch_size]
            counted += batch[:SimMIMDataModule.val_batch_own(data, batch_idx, len(batch))]
    assert sorted(counted) == list(range(images))


def test_ddp_two_ranks_match_one_process(one_process, tmp_path):
    """2 ranks x 8 images see, step by step, the 16 images of the one-process batch: same losses, same weights."""
    train(tmp_path / "ddp", "ddp_spawn", devices=2)
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt") for r in range(2)]
    assert len(one_process["losses"]) == STEPS
    assert one_process["losses"][-1] != one_process["losses"][0]  # the weights did move
    for run in ranks:
        assert_same_training(run, one_process)


class ResumeCheck(pl.Callback):
    """On the resumed run's start, compare this rank's shard of the AdamW states with the checkpoint's."""

    def __init__(self, ckpt_path):
        self.saved = torch.load(ckpt_path, weights_only=False)["optimizer_states"][0]["state"]

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        owned = [i for i, p in enumerate(params) if p in optimizer.optim.state]
        assert 0 < len(owned) < len(params)
        for i in owned:
            torch.testing.assert_close(optimizer.optim.state[params[i]]["exp_avg_sq"], self.saved[i]["exp_avg_sq"])


def test_zero1_shards_optimizer_states_and_matches_unsharded(one_process, tmp_path):
    """ddp_zero1: each rank holds about half of the AdamW state bytes, the two halves make the whole; the weights
    and losses match unsharded one-process training; the checkpoint holds the whole state and resumes into shards."""
    train(tmp_path / "zero1", build_strategy("ddp_zero1", start_method="spawn"), devices=2)
    ranks = [torch.load(tmp_path / f"zero1_rank{r}.pt") for r in range(2)]
    total = one_process["state_bytes"]
    assert sum(run["state_bytes"] for run in ranks) == total
    for run in ranks:
        assert 0.35 * total < run["state_bytes"] < 0.65 * total
        assert_same_training(run, one_process)

    [checkpoint] = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    assert len(saved["optimizer_states"][0]["state"]) == one_process["num_params"]
    train(tmp_path / "resumed", build_strategy("ddp_zero1", start_method="spawn"), devices=2, max_epochs=2, steps=1,
          ckpt_path=checkpoint, callbacks=[ResumeCheck(checkpoint)])
    resumed = torch.load(tmp_path / "resumed_rank0.pt")
    assert len(resumed["losses"]) == 1


FSDP_MODEL = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                  drop_path_rate=0.0)


def fsdp_rank(rank: int, name: str, init_file: str, out: str) -> None:
    """Rank `rank` of 2 (gloo): a tiny SimMIM module and a batch of 4 (seeded: the same on both ranks); the norm of
    its unsharded gradient over the whole batch, then the module wrapped as trainer.strategy=`name` wraps it (FSDP
    refuses the CPU unless device_id names it) and backward on this rank's half. Saves to `<out>_rank<r>.pt`."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    module = randomize_(SimMIMPretrainModule(model=FSDP_MODEL))  # random post-norms: every block gets a gradient
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = MaskGenerator(32, mask_patch_size=8, model_patch_size=4, seed=0)  # the same count in every image
    mask = torch.stack([torch.from_numpy(masks()) for _ in range(4)])
    whole = copy.deepcopy(module)
    whole(images, mask).backward()
    strategy = build_strategy(name)
    strategy.model = FullyShardedDataParallel(module, sharding_strategy=strategy.sharding_strategy,
                                              device_id=torch.device("cpu"), **strategy.kwargs)
    strategy.model(images[2 * rank:2 * rank + 2], mask[2 * rank:2 * rank + 2]).backward()
    own = [p for p in module.parameters() if p.grad is not None]
    before = [p.grad.clone() for p in own]
    torch.save({"logged": global_grad_norm(module, strategy),
                "whole": torch.cat([p.grad.flatten() for p in whole.parameters()]).norm(),
                "own_shards": torch.stack([g.norm() for g in before]).norm(),
                "grads_kept": all(torch.equal(g, p.grad) for g, p in zip(before, own))}, f"{out}_rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(FSDP_SHARDING))
def test_fsdp_grad_norm_is_the_unsharded_norm(name, tmp_path):
    """Under FSDP each rank's gradients are 1-D shards: the norm over one rank's (what train/grad_norm was) falls
    short of the whole gradient's, which global_grad_norm gives on every rank, leaving the gradients as they were."""
    torch.multiprocessing.spawn(fsdp_rank, args=(name, str(tmp_path / "init"), str(tmp_path / name)), nprocs=2)
    for rank in range(2):
        run = torch.load(tmp_path / f"{name}_rank{rank}.pt")
        torch.testing.assert_close(run["logged"], run["whole"], rtol=1e-5, atol=0)
        assert run["grads_kept"]
        assert run["own_shards"] < 0.9 * run["whole"]


class EndRanksTogether(pl.Callback):
    """At the end of a spawned rank's run: wait for the other rank, then close the process group. Left to the
    exit of each process (Lightning's atexit), a rank that ended first could take the group down under the other:
    one CI run saw rank 0 of a 2-rank validate abort ("terminate called without an active exception") after it
    finished; 50 runs here did not."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def validate_on(devices: int, module: pl.LightningModule, data, tmp_path) -> dict:
    """The epoch's logged metrics of trainer.validate on `devices` CPU ranks (ddp_spawn: gloo)."""
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[EndRanksTogether()])
    [logged] = trainer.validate(module, datamodule=data, verbose=False)
    return logged


# 17: a multiple of neither the ranks nor the batch of 4 (rank 1 ends on a batch of padding only); 1: fewer images
# than ranks (rank 1 has only padding: it still logs, or rank 0 waits for it in the epoch's sync for ever)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("images, devices", [(17, 1), (17, 2), (1, 2)])
def test_pretraining_val_loss_counts_every_image_once(images, devices, tmp_path):
    """Pretraining's epoch val/loss is the loss of the split's images, each once: over 2 ranks the sampler's
    padding (the split's first image again) was averaged in; on one device it is that loss, as it was."""
    data = SimMIMDataModule(img_size=32, batch_size=4, mask_patch_size=8, model_patch_size=4)
    data.setup("validate")
    data.val_set.dataset.samples = data.val_set.dataset.samples[:images]  # the ranks' setup keeps the sets
    torch.manual_seed(0)
    module = SimMIMPretrainModule(model=FSDP_MODEL)
    logged = validate_on(devices, module, data, tmp_path)
    batch, masks, _ = zip(*(data.val_set[index] for index in range(images)))
    with torch.no_grad():  # one batch of the whole split
        expected = module.eval().simmim(torch.stack(batch), torch.stack(masks))
    torch.testing.assert_close(logged["val/loss"], expected.item(), rtol=1e-6, atol=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("images, devices", [(17, 1), (17, 2), (1, 2)])
def test_finetuning_val_metrics_count_every_image_once(images, devices, tmp_path):
    """Fine-tuning's epoch val/loss, top-1 and top-5 over the split's images, each once: over 2 ranks val/loss was
    Lightning's batch-size-weighted mean, whose summed counts it averages as integers (9 and 8 images: 8)."""
    data = ClassificationDataModule(img_size=32, batch_size=4)
    data.setup("validate")
    data.val_set.samples = data.val_set.samples[:images]
    torch.manual_seed(0)
    module = SwinV2Classifier(model={**FSDP_MODEL, "num_classes": 10})
    logged = validate_on(devices, module, data, tmp_path)
    batch, labels = zip(*(data.val_set[index] for index in range(images)))
    with torch.no_grad():
        logits = module.eval()(torch.stack(batch))
    labels = torch.tensor(labels)
    expected = {"val/loss": F.cross_entropy(logits, labels).item(),
                "val/top1": (logits.argmax(1) == labels).float().mean().item(),
                "val/top5": (logits.topk(5).indices == labels[:, None]).any(1).float().mean().item()}
    assert logged.keys() >= expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(logged[name], value, rtol=1e-6, atol=0, msg=name)


class NaNFrom(torch.utils.data.Dataset):
    """`dataset` with the images from index `start` on all NaN (what a diverged or overflowing model sees)."""

    def __init__(self, dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_epoch):  # the EpochSampler's (index, epoch)
        image, *rest = self.dataset[index_epoch]
        return (image * float("nan") if index_epoch[0] >= self.start else image, *rest)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_nan_validation_batch_makes_val_loss_nan(stage, tmp_path):
    """A batch whose loss is NaN makes the epoch's val/loss NaN, as self.log's mean did: torchmetrics' MeanMetric
    drops NaN values by default (with a warning), which made val/loss the other batches' mean, a finite loss that
    ModelCheckpoint could take as the best (it ranks a NaN one as the worst)."""
    if stage == "pretrain":
        data = SimMIMDataModule(img_size=32, batch_size=4, mask_patch_size=8, model_patch_size=4)
        module = SimMIMPretrainModule(model=FSDP_MODEL)
    else:
        data = ClassificationDataModule(img_size=32, batch_size=4)
        module = SwinV2Classifier(model={**FSDP_MODEL, "num_classes": 10})
    data.setup("validate")
    data.val_set = NaNFrom(data.val_set, start=len(data.val_set) - 4)  # the last batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = validate_on(1, module, data, tmp_path)
    assert math.isnan(logged["val/loss"])


class FakeEngine:
    """What global_grad_norm reads of a DeepSpeed engine."""

    def __init__(self, norm):
        self.norm = norm

    def get_global_grad_norm(self):
        return self.norm


def deepspeed_around(engine) -> DeepSpeedStrategy:
    """A DeepSpeedStrategy holding `engine`, made without DeepSpeed installed (its __init__ imports it)."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.model = engine
    return strategy


def test_deepspeed_grad_norm_is_the_engines_logged_after_the_step():
    """Under DeepSpeed ZeRO the gradients are the optimizer's partitions, not p.grad: the norm is the engine's,
    which its step computes, so GradNormMonitor logs it after the step (at on_train_batch_end) and not before."""
    module = torch.nn.Linear(2, 1)
    module(torch.ones(1, 2)).sum().backward()  # a p.grad that must not be read
    assert global_grad_norm(module, deepspeed_around(FakeEngine(2.5))) == torch.tensor(2.5)
    assert global_grad_norm(module, deepspeed_around(FakeEngine(None))) is None  # compute_grad_norm=false
    logged = []
    pl_module = SimpleNamespace(log=lambda name, value: logged.append((name, float(value))))
    monitor = GradNormMonitor()
    trainer = SimpleNamespace(strategy=deepspeed_around(FakeEngine(2.5)), global_step=3, log_every_n_steps=2)
    monitor.on_before_optimizer_step(trainer, pl_module, optimizer=None)
    assert logged == []
    trainer.global_step = 4  # the step taken: the 4th, whose logs are written
    monitor.on_train_batch_end(trainer, pl_module, outputs=None, batch=None, batch_idx=3)
    assert logged == [("train/grad_norm", 2.5)]


ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["data.img_size=32", "data.batch_size=8", "model.embed_dim=16", "model.num_heads=[2,2,4,8]",
            "trainer.max_epochs=-1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "logging.recon_every_n_steps=0", "data.num_workers=0",
            "trainer.accelerator=cpu", "trainer.devices=2"]


def pretrain_two_ranks(run_dir: Path, threads: int, *args: str) -> subprocess.CompletedProcess:
    """scripts/pretrain.py on two CPU ranks with OMP_NUM_THREADS=threads (`trainer.strategy=ddp`: Lightning starts
    rank 1 as a new interpreter; ddp_spawn spawns it; neither forks) -> its result, which must succeed."""
    command = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), f"output_dir={run_dir.parent}",
               f"run_name={run_dir.name}", *TINY_RUN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "always"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_ranks_on_shards(tmp_path_factory):
    """Two DDP ranks on shards without a shardindex.json, each with as many torch threads as the node has cores
    (at least 2), for 2 steps -> the result."""
    root = tmp_path_factory.mktemp("two_ranks")
    for split, shards, per_shard in (("train", 4, 8), ("val", 2, 4)):
        for s in range(shards):
            (root / split).mkdir(exist_ok=True)
            with open(root / split / f"{split}-{s:06d}.tar", "wb") as stream, TarWriter(stream, encoder=False) as tar:
                for i in range(per_shard):
                    seed = 1000 * (split == "val") + per_shard * s + i
                    tar.write({"__key__": f"{seed:05d}", "jpg": jpeg(seed, (40, 40, 3)), "cls": str(i % 2).encode()})
    args = ["trainer.strategy=ddp", "data.source=shards", f"data.shards={root / 'train'}",
            f"data.val_shards={root / 'val'}", "data.shuffle_buffer=8", "eval.knn_every_n_epochs=0"]
    return pretrain_two_ranks(root / "run", max(2, cpu_cores()), *args, "trainer.max_steps=2")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_more_threads_than_cores_is_warned_once(two_ranks_on_shards):
    """2 ranks x OMP_NUM_THREADS=cores: twice the node's cores in threads, which wait for each other; one warning
    names the numbers and the fix (there was none)."""
    first = two_ranks_on_shards
    cores = cpu_cores()
    threads = max(2, cores)
    message = (f"2 process(es) on this node x {threads} torch threads each = {2 * threads} threads on {cores} CPU "
               f"cores: the threads wait for each other; set OMP_NUM_THREADS={max(1, cores // 2)}")
    assert first.stderr.count(message) == 1, first.stderr[-3000:]


def test_ranks_pinned_to_their_own_cores_fit_threads_up_to_them():
    """Ranks pinned to cores of their own (SLURM's --cpus-per-task with binding) were taken to share them: 8 ranks x
    8 threads on a 64-core node, each rank on 8 cores, was warned of as 64 threads on 8 cores."""
    assert oversubscription(8, 8, cores=8, node_cores=64) is None
    assert oversubscription(8, 16, cores=8, node_cores=64) == (
        "8 process(es) on this node x 16 torch threads each on 8 CPU cores each (their affinity): the threads wait "
        "for each other; set OMP_NUM_THREADS=8")
    assert oversubscription(8, 2, cores=64, node_cores=64) is None  # sharing the node: 64 // 8 each
    assert "= 72 threads on 64 CPU cores" in oversubscription(8, 9, cores=64, node_cores=64)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_say_the_shards_count_once(two_ranks_on_shards):
    """Every rank counts the shards that no shardindex.json lists: rank 0 alone says so (every rank said it)."""
    first = two_ranks_on_shards
    assert first.stderr.count("counting the samples of 4 shards by reading them") == 1, first.stderr[-3000:]
    assert first.stderr.count("counting the samples of 2 shards by reading them") == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank", [0, 1])
def test_resume_checks_warn_on_rank_0_only(tmp_path, monkeypatch, rank):
    """Every rank reads the checkpoints before fit: a newer one passed over, and a resume with other settings, are
    said by rank 0 alone (every rank said them)."""
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    (tmp_path / "broken.ckpt").write_text("not a checkpoint")
    cfg = load_config("pretrain", overrides=["data.hflip=0.5"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert newest_good_checkpoint(tmp_path) is None
        _warn_changed_settings(cfg, {"datamodule_hyper_parameters": {"hflip": 0.0}}, "last.ckpt")
    messages = [str(w.message) for w in caught]
    assert len(messages) == (2 if rank == 0 else 0), messages
    if rank == 0:
        assert "broken.ckpt cannot be resumed from" in messages[0] and "data.hflip 0.0 -> 0.5" in messages[1]
        assert caught[0].filename == __file__  # the warning points at the caller, as before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_spawn_prints_the_knn_line(tmp_path):
    """Under ddp_spawn fit runs in spawned ranks: the k-NN monitor's history stayed there, and the line a run in one
    process prints after fit was missing; rank 0's callback states now come back with its weights."""
    result = pretrain_two_ranks(tmp_path / "run", 1, "trainer.strategy=ddp_spawn", "trainer.max_steps=2",
                                "eval.knn_every_n_epochs=1", "eval.knn_max_images=64")
    lines = [line for line in result.stdout.splitlines() if line.startswith("k-NN top-1 (val) by epoch: 0: ")]
    assert len(lines) == 1 and lines[0].endswith(f"; plot: {tmp_path / 'run' / 'knn.png'}"), result.stdout
