"""Optimizer groups, lr schedule, non-finite guard, precision and atomic saving of the pretraining module."""
import errno
import os
import signal
import time
import types
import warnings

import pytest
import pytorch_lightning as pl
import torch

from simmim.cli import run_cli
from simmim.data.datamodule import SimMIMDataModule
from simmim.data.transforms import normalize_images
from simmim.pretrain import SimMIMPretrainModule, ThroughputMonitor
from simmim.train.checkpoint_io import atomic_save
from simmim.train.config import load_config
from simmim.train.optim import adamw_per_step_schedule, lr_at_step, param_groups
from simmim.train.trainer import make_trainer

TINY_MODEL = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)


def test_weight_decay_groups():
    module = SimMIMPretrainModule(model=dict(TINY_MODEL, ape=True))
    decay, no_decay = param_groups(module.simmim, weight_decay=0.05)
    names = {id(p): n for n, p in module.simmim.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(names) and not decay_names & no_decay_names
    for name in ("encoder.mask_token", "encoder.absolute_pos_embed", "encoder.layers.0.blocks.0.attn.logit_scale",
                 "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight", "encoder.layers.0.blocks.0.attn.cpb_mlp.2.weight",
                 "encoder.layers.0.blocks.0.attn.q_bias", "encoder.layers.0.blocks.0.norm1.weight",
                 "encoder.layers.0.blocks.0.mlp.fc1.bias", "decoder.0.bias"):
        assert name in no_decay_names, name
    assert decay_names == {n for n in names.values() if n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight",
                                                           "reduction.weight", "patch_embed.proj.weight",
                                                           "decoder.0.weight"))}


def test_lr_schedule_warmup_cosine_and_multistep():
    kw = dict(peak_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert lr_at_step(0, **kw) == 1e-6
    assert lr_at_step(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at_step(10, **kw) == pytest.approx(1e-3)
    assert lr_at_step(60, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at_step(110, **kw) == pytest.approx(1e-5)
    step = dict(kw, schedule="multistep", milestone_steps=[50, 90], gamma=0.1)
    assert [lr_at_step(s, **step) for s in (49, 50, 89, 90)] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])


class LengthOnDemand(types.SimpleNamespace):
    """The trainer attributes `adamw_per_step_schedule` reads; counts the reads of the run's length, which
    Lightning computes by setting up the train loader."""
    reads = 0

    @property
    def estimated_stepping_batches(self):
        self.reads += 1
        return 40


@pytest.mark.parametrize("warmup_epochs, schedule, milestones", [
    (0, "cosine", []), (0.01, "cosine", []), (1.5, "cosine", []), (0, "multistep", [0, 0.01, 2.5])])
def test_the_schedule_reads_the_run_length_only_after_step_0(warmup_epochs, schedule, milestones):
    """configure_optimizers runs before a resumed run restores its place in the data, so the schedule must not
    ask for the run's length (which sets up the train loader) before its first step; its lrs are `lr_at_step`'s
    for 40 steps of 4 epochs, a positive number of epochs rounding to at least one step."""
    trainer = LengthOnDemand(datamodule=types.SimpleNamespace(hparams=types.SimpleNamespace(batch_size=512)),
                             world_size=1, accumulate_grad_batches=1, gradient_clip_val=None, precision="32-true",
                             strategy=None, max_epochs=4)
    weight = torch.nn.Parameter(torch.zeros(2))
    config = adamw_per_step_schedule(trainer, [{"params": [weight]}], base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5,
                                     betas=(0.9, 0.999), eps=1e-8, warmup_epochs=warmup_epochs, schedule=schedule,
                                     milestones=milestones)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert trainer.reads == 0
    steps = dict(warmup_steps=max(round(warmup_epochs * 10), 1) if warmup_epochs else 0, total_steps=40,
                 milestone_steps=[max(round(m * 10), 1) if m else 0 for m in milestones])
    lrs = []
    for _ in range(41):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([lr_at_step(step, peak_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, schedule=schedule,
                                            **steps) for step in range(41)], rel=1e-6)
    assert trainer.reads == 1


def _trainer(tmp_path, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)


def _data(batch_size=4):
    return SimMIMDataModule(img_size=32, batch_size=batch_size, num_workers=0, mask_patch_size=8)


def test_lr_is_scaled_by_total_batch(tmp_path):
    module = SimMIMPretrainModule(model=TINY_MODEL, base_lr=1e-3, warmup_epochs=0, min_lr=1e-3)
    _trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(module, datamodule=_data(batch_size=4))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 4 * 2 / 512)


def test_nonfinite_loss_skips_the_step_then_aborts(tmp_path):
    module = SimMIMPretrainModule(model=TINY_MODEL, max_nonfinite_steps=3)
    real_forward = module.simmim.forward
    calls = {"n": 0}

    def sometimes_nan(x, mask):
        calls["n"] += 1
        loss = real_forward(x, mask)
        return loss * float("nan") if calls["n"] == 2 else loss

    module.simmim.forward = sometimes_nan
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.warns(UserWarning, match=r"non-finite loss \(nan\) at step 1: step skipped \(1 skipped so far"):
        _trainer(tmp_path, max_steps=3).fit(module, datamodule=_data())
    assert module.global_step == 3 and module.nonfinite_total == 1
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())

    module = SimMIMPretrainModule(model=TINY_MODEL, max_nonfinite_steps=3)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.simmim.forward = lambda x, mask: real_forward(x, mask) * float("inf")
    with pytest.raises(RuntimeError, match="for 3 steps in a row .*lower optim.base_lr"), pytest.warns(UserWarning):
        _trainer(tmp_path, max_steps=10).fit(module, datamodule=_data())
    assert all(torch.equal(frozen[n], p) for n, p in module.named_parameters())  # no update was applied


class MemoryLogger(pl.loggers.Logger):
    """What Lightning writes to its loggers, by step."""
    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.rows = {}

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


class GradNorms(pl.Callback):
    """The norm of all gradients at each optimizer step, before clipping."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(float(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("every", [1, 3])
def test_logged_grad_norm_is_the_norm_of_all_gradients_before_clipping(tmp_path, every):
    """On one device (as under DDP, where every rank holds the whole gradient) train/grad_norm is the norm of all
    gradients, before gradient_clip_val scales them, of the step whose row it is written in (with
    log_every_n_steps=3 the rows of steps 2 and 5 showed the norms of steps 0 and 3)."""
    logger, recorded = MemoryLogger(), GradNorms()
    pl.Trainer(default_root_dir=tmp_path, logger=logger, callbacks=[recorded], max_steps=6, log_every_n_steps=every,
               gradient_clip_val=1e-3, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0).fit(
        SimMIMPretrainModule(model=TINY_MODEL, warmup_epochs=0), datamodule=_data())
    logged = {step: row["train/grad_norm"] for step, row in logger.rows.items() if "train/grad_norm" in row}
    assert list(logged) == list(range(every - 1, 6, every)) and min(recorded.norms) > 1e-2
    assert list(logged.values()) == pytest.approx([recorded.norms[step] for step in logged], rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_precisions_train(tmp_path, precision):
    module = SimMIMPretrainModule(model=TINY_MODEL)
    _trainer(tmp_path, max_steps=2, precision=precision, gradient_clip_val=5.0).fit(module, datamodule=_data())
    assert module.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-true", torch.bfloat16)])
def test_uint8_crops_reach_the_model_normalized_in_its_precision(tmp_path, precision, dtype):
    """The pretraining crop yields uint8; the DataModule normalizes on the device, then the precision's cast."""
    module = SimMIMPretrainModule(model=TINY_MODEL)
    real_forward, seen = module.simmim.forward, []
    module.simmim.forward = lambda x, mask: seen.append(x.detach().clone()) or real_forward(x, mask)
    _trainer(tmp_path, max_steps=1, precision=precision).fit(module, datamodule=_data(batch_size=4))
    data = _data(batch_size=4)  # the same first batch, outside a trainer
    data.setup("fit")
    raw = next(iter(data.train_dataloader()))[0]
    assert raw.dtype == torch.uint8 and seen[0].dtype == dtype
    assert torch.allclose(seen[0].float(), normalize_images(raw), atol=0.05)  # bf16: 8 bits of mantissa
    assert -2.2 < seen[0].float().min() < 0 < seen[0].float().max() < 2.7  # ImageNet-normalized, not 0..255


def test_saved_checkpoints_and_exports_are_readable_as_other_files(tmp_path, monkeypatch):
    """mkstemp (checkpoints, encoder.pth, official exports) and safetensors (timm, transformers exports) made files
    of mode 0600 under umask 022: a group sharing the cluster could not read them. Now as open() makes files."""
    import simmim.train.checkpoint_io as checkpoint_io
    from simmim.tools.export import _save_safetensors

    monkeypatch.setattr(checkpoint_io, "UMASK", 0o027, raising=False)  # a group-readable umask (shared clusters)
    before = os.umask(0o027)
    try:
        atomic_save({"step": 1}, tmp_path / "last.ckpt")
        _save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", {})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(before)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"last.ckpt": "0o640", "w.safetensors": "0o640", "plain.txt": "0o640"}


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary file left behind


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    """torch.save on a full disk raises a RuntimeError about zip positions while handling the ENOSPC OSError (seen
    on a full tmpfs); atomic_save turns it into one OSError naming the file and the fix, the scripts into one line."""
    path = tmp_path / "ckpt.pth"
    atomic_save({"step": 1}, path)

    def save_on_a_full_disk(obj, f):
        f.write(b"x" * 1000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6209152 vs 6209040")

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(OSError) as error:
        atomic_save({"step": 2}, path)
    assert error.value.errno == errno.ENOSPC
    assert str(path) in error.value.strerror and "output_dir=" in error.value.strerror
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]

    def main(argv):
        raise error.value

    with pytest.raises(SystemExit) as stopped:
        run_cli(main)
    assert stopped.value.code == f"error: no space left on device for {path}: the disk filled after 0 MiB of it; " \
                                 f"free space or pass output_dir= on another disk, then run the same command again " \
                                 f"(the checkpoints already saved are kept)"

    def failing_disk(argv):
        raise OSError(errno.EIO, "Input/output error")

    # OS errors other than a full, read-only or forbidden place are not turned into a line: their traceback tells more
    with pytest.raises(OSError, match="Input/output error"):
        run_cli(failing_disk)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank", [0, 1])
def test_ctrl_c_outside_training_is_one_line(capsys, monkeypatch, rank):
    """Ctrl-C while a script loads data or exports (training saves its step instead: test_resume): status 130 and
    one line, not a KeyboardInterrupt traceback; a terminal's Ctrl-C reaches every rank, and only rank 0 says it
    (every rank did)."""
    monkeypatch.setenv("RANK", str(rank))

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_cli(interrupted)
    assert stopped.value.code == 130 and capsys.readouterr().err == ("stopped by Ctrl-C\n" if rank == 0 else "")


@pytest.mark.timeout(60)
def test_lightning_leaves_sigusr1_to_us_in_a_slurm_job(tmp_path, slurm_job):
    """In a SLURM job Lightning would take SIGUSR1 for its own requeue (a checkpoint saved from inside its handler,
    mid-step, which resume=auto does not read) just before training; make_trainer turns that off, so that
    SignalCheckpoint (in training) and run_cli (outside) have it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(load_config("pretrain", "default", ["trainer.accelerator=cpu"]), tmp_path,
                               "val/loss", "min")
    trainer._signal_connector.register_signal_handlers()  # what Trainer.fit does before training (private API)
    try:
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    finally:
        trainer._signal_connector.teardown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank, scontrol_status", [(0, 0), (0, 1), (1, 0)])
def test_sigusr1_outside_training_is_one_line_and_requeues_the_slurm_job(capsys, monkeypatch, slurm_job, rank,
                                                                          scontrol_status):
    """SLURM's requeue signal (SIGUSR1) while a script sets up (training saves its step instead: test_resume): status
    138, one line, and rank 0 requeues the job (or says why it could not); SIGUSR1's handler is put back."""
    monkeypatch.setenv("SLURM_PROCID", str(rank))
    monkeypatch.setenv("SCONTROL_STATUS", str(scontrol_status))

    def setting_up(argv):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(30)  # the signal's handler runs before this ends

    with pytest.raises(SystemExit) as stopped:
        run_cli(setting_up)
    assert stopped.value.code == 138 and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    lines = ["stopped by SIGUSR1 (outside training: no step to save)"]
    if rank == 0:
        lines.append("requeued SLURM job 4242: its next start continues the run" if scontrol_status == 0 else
                     "could not requeue SLURM job 4242 (scontrol requeue: scontrol: error: Batch job 4242 is not "
                     "requeueable); submit the job again to continue the run, or let it be requeued: #SBATCH --requeue")
    assert capsys.readouterr().err.splitlines() == lines
    assert (slurm_job.read_text() if slurm_job.exists() else "") == ("requeue 4242\n" if rank == 0 else "")


@pytest.mark.timeout(120)
def test_logged_throughput_counts_the_wait_for_the_data(tmp_path):
    """train/images_per_s from one batch's end to the next's: a loader that takes 50 ms per image shows as at most
    20 images/s (it was measured from batch start to end, the model's time only, hundreds here)."""
    class SlowData(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            time.sleep(0.05)
            return torch.zeros(2), 0

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.rates = torch.nn.Linear(2, 1), []

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def on_train_batch_end(self, *args):  # after the callbacks' hooks
            self.rates.append(float(self.trainer.callback_metrics["train/images_per_s"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Model()
    pl.Trainer(max_epochs=1, callbacks=[ThroughputMonitor()], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(
        model, torch.utils.data.DataLoader(SlowData(), batch_size=1))
    assert len(model.rates) == 6 and all(rate <= 20 for rate in model.rates[1:]), model.rates
