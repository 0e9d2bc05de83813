"""Speed settings of a run, shared by both stages: per-block torch.compile (`model.compile`), TF32 matmuls
(`trainer.tf32`) and the check of the CPU threads of a node's ranks (`ThreadCheck`)."""
from __future__ import annotations

import os
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from simmim.models.swinv2 import SwinTransformerV2
from simmim.train.config import ConfigError

COMPILE_VALUES = (True, False, "auto")


def compile_wanted(setting, device: torch.device) -> bool:
    """`model.compile`: true, false, or auto (true when the run is on CUDA)."""
    if setting not in COMPILE_VALUES or isinstance(setting, int) and not isinstance(setting, bool):
        raise ConfigError(f"model.compile={setting!r} is not one of true, false, auto; use model.compile=auto "
                          f"(compile on CUDA) or true / false")
    return device.type == "cuda" if setting == "auto" else setting


def compile_encoder(encoder: SwinTransformerV2, setting, device: torch.device) -> bool:
    """Compile the encoder's blocks when `model.compile` asks for it on `device`; whether it did."""
    if not compile_wanted(setting, device):
        return False
    encoder.compile_blocks()
    return True


def set_tf32(enabled: bool, device: torch.device) -> bool:
    """`trainer.tf32`: float32 matmuls and convolutions on TF32 tensor cores where the GPU has them (compute
    capability 8.0 and newer; 10 mantissa bits in the products, float32 sums). Only CUDA runs are touched;
    whether TF32 is on."""
    if not enabled or device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    rank_zero_info("TF32 matmuls on (trainer.tf32=true): float32 matmuls and convolutions use tensor cores")
    return True


class CompileTime(pl.Callback):
    """Reports once how much longer the first training step took than the second, the time torch.compile
    spent on the blocks: printed and logged as `train/compile_s`. Silent unless the module's `compiled` is true."""

    def __init__(self):
        self.durations: list[float] = []
        self._start = 0.0
        self.compile_s: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not getattr(pl_module, "compiled", False):
            self.compile_s = 0.0
        if self.compile_s is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.compile_s is not None:
            return
        self.durations.append(time.perf_counter() - self._start)
        if len(self.durations) == 2:
            self.compile_s = max(self.durations[0] - self.durations[1], 0.0)
            rank_zero_info(f"torch.compile (model.compile): the first step took {self.compile_s:.1f} s longer "
                           f"than the second ({self.durations[0]:.1f} s against {self.durations[1]:.2f} s)")
            pl_module.log("train/compile_s", self.compile_s, rank_zero_only=True)


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def oversubscription(processes: int, threads: int, cores: int, node_cores: int) -> str | None:
    """The warning when `processes` ranks on a node of `node_cores` cores, each with `threads` torch threads and
    allowed on `cores` of them, run more threads than the cores and fewer would fit; None when they fit. Ranks
    allowed on all of the node's cores share them; ranks pinned to fewer (SLURM's --cpus-per-task with binding)
    are taken to have their own."""
    fitting = max(1, cores // processes) if cores >= node_cores else cores
    if threads <= fitting:
        return None
    where = (f"= {processes * threads} threads on {cores} CPU cores" if cores >= node_cores else
             f"on {cores} CPU cores each (their affinity)")
    return (f"{processes} process(es) on this node x {threads} torch threads each {where}: the threads wait for each "
            f"other; set OMP_NUM_THREADS={fitting}")


class ThreadCheck(pl.Callback):
    """Warns on rank 0 at fit start when this node's ranks run more torch threads than it has CPU cores (Lightning's
    launchers set OMP_NUM_THREADS to cores / ranks only where it is unset): checked in the ranks, once the launcher
    has set their threads."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and (message := oversubscription(trainer.num_devices, torch.get_num_threads(), cpu_cores(),
                                                            os.cpu_count() or 1)):
            rank_zero_warn(message)
