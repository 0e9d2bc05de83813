"""What both training stages share: weight-decay groups, AdamW, lr scaling and schedules."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn


def remember_ndims(model: nn.Module) -> None:
    """Record each parameter's ndim on it (`param.unsharded_ndim`): FSDP later shows its shards as 1-D views."""
    for param in model.parameters():
        param.unsharded_ndim = param.ndim


def skip_weight_decay(name: str, param: torch.Tensor, skip_names: Iterable[str], skip_keywords: Iterable[str]) -> bool:
    """1-D parameters (biases, norms), the model's named exceptions and keyword matches get no weight decay."""
    ndim = getattr(param, "unsharded_ndim", param.ndim)
    return ndim <= 1 or name.endswith(".bias") or name in skip_names or any(k in name for k in skip_keywords)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: with and without weight decay (names from `no_weight_decay[_keywords]()`)."""
    skip_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    skip_keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if skip_weight_decay(name, param, skip_names, skip_keywords) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(lr: float, total_batch: int) -> float:
    """The official linear scaling rule: lr * total batch / 512."""
    return lr * total_batch / 512


SCHEDULES = ("cosine", "multistep")  # after the warmup: cosine to min_lr, or x gamma at each milestone


def lr_at_step(step: int, *, peak_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
               schedule: str = "cosine", milestone_steps: Iterable[int] = (), gamma: float = 0.1) -> float:
    """Per-step lr: linear warmup warmup_lr -> peak_lr, then cosine to min_lr or multistep decay by gamma."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    if schedule == "cosine":
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "multistep":
        return peak_lr * gamma ** sum(step >= m for m in milestone_steps)
    raise ValueError(f"unknown lr schedule {schedule!r}; use {' or '.join(SCHEDULES)}")


def make_adamw(groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8, fused: bool = True,
               shard_states: bool = False) -> torch.optim.Optimizer:
    """AdamW over `groups`, fused (one kernel for all parameters) where PyTorch has it for their device.
    `shard_states` (trainer.strategy=ddp_zero1) wraps it in a ZeroRedundancyOptimizer that keeps only this
    rank's share of the states; param groups and their extra keys (lr_scale) are kept."""
    fused = fused and {p.device.type for g in groups for p in g["params"]} <= {"cpu", "cuda"}
    defaults = dict(lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
    if shard_states:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **defaults)
    return torch.optim.AdamW(groups, **defaults)


def epoch_steps(total_steps: int, steps_per_epoch: float, warmup_epochs: float, milestones: Iterable[float]) -> dict:
    """The step counts of `lr_at_step` from epochs; a positive number of epochs is at least one step."""
    def steps(epochs: float) -> int:
        return max(round(epochs * steps_per_epoch), 1) if epochs > 0 else 0

    return dict(warmup_steps=steps(warmup_epochs), total_steps=total_steps,
                milestone_steps=[steps(m) for m in milestones])


class PerStepLR(torch.optim.lr_scheduler.LambdaLR):
    """The per-step LambdaLR of `adamw_per_step_schedule`, which can set its optimizer's lrs itself (`restart`).
    Its base lrs are the peak lr of its run's `total_batch`, which a checkpoint's state does not replace."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambdas: list, total_batch: int):
        self.total_batch = total_batch
        super().__init__(optimizer, lr_lambdas)

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved step, keeping the base lrs (and total batch) of this run, so that a run resumed with another total
        batch (data.batch_size, devices, accumulation) trains at its own lrs, not the saved run's; rank 0 warns once
        when they differ."""
        base_lrs, total_batch = self.base_lrs, self.total_batch
        super().load_state_dict(state_dict)
        if state_dict.get("base_lrs", base_lrs) != base_lrs:
            was = state_dict.get("total_batch", "another")  # (checkpoints before it was saved)
            rank_zero_warn(f"the total batch is {total_batch} (was {was} when step {self.last_epoch} was saved): the "
                           f"learning rate follows it, peak {_lr(base_lrs[0])} (was {_lr(state_dict['base_lrs'][0])}; "
                           f"optim.base_lr x total batch / 512)")
        self.base_lrs, self.total_batch = base_lrs, total_batch

    def restart(self) -> None:
        """Set the optimizer's lrs (and initial lrs) to the schedule's at this step. A resumed optimizer comes back
        with the lrs the run it was saved by was at, which were another schedule's when that run had another length
        (a finished run extended with a larger trainer.max_epochs) or total batch: LambdaLR sets them only after a
        step, so the first step after the resume trained (and logged train/lr) at the old schedule's lr."""
        self._last_lr = [base * rule(self.last_epoch) for base, rule in zip(self.base_lrs, self.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, self._last_lr):
            group["initial_lr"], group["lr"] = base, lr


def _lr(value: float) -> str:
    """2.5e-04, 1.25e-04."""
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def adamw_per_step_schedule(trainer, groups: list[dict], *, base_lr: float, warmup_lr: float, min_lr: float,
                            betas, eps: float, warmup_epochs: float, schedule: str = "cosine",
                            milestones: Iterable[float] = (), gamma: float = 0.1) -> dict:
    """Lightning's optimizer config: AdamW over `groups` and a per-step LambdaLR (`PerStepLR`: warmup, then cosine or
    multistep). Every lr is scaled by the total batch (per-device batch x devices x accumulation) / 512; a
    group's optional "lr_scale" (layer-wise decay) multiplies its lr."""
    total_batch = trainer.datamodule.hparams.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    peak_lr = scaled_lr(base_lr, total_batch)
    # Lightning refuses to clip gradients of a fused optimizer under mixed precision (it unscales internally).
    fused = not (trainer.gradient_clip_val and "mixed" in str(trainer.precision))
    optimizer = make_adamw(groups, lr=peak_lr, betas=betas, eps=eps, fused=fused,
                           shard_states=getattr(trainer.strategy, "shards_optimizer_states", False))
    lrs = dict(peak_lr=peak_lr, warmup_lr=scaled_lr(warmup_lr, total_batch), min_lr=scaled_lr(min_lr, total_batch),
               schedule=schedule, gamma=gamma)
    counts = {}

    def step_counts(step: int) -> dict:
        """Warmup, total and milestone steps. Step 0 needs to know only which of them are 0, which the epochs
        say; later steps read `trainer.estimated_stepping_batches` (once). Reading it here, in
        configure_optimizers, would start the train loader before a resumed run has restored its place in the
        data, and Lightning keeps that first iterator for the resumed epoch."""
        if step == 0 and not counts:
            return epoch_steps(1, 1, warmup_epochs, milestones)
        if not counts:
            total = int(trainer.estimated_stepping_batches)
            counts.update(epoch_steps(total, total / max(trainer.max_epochs or 1, 1), warmup_epochs, milestones))
        return counts

    lambdas = [lambda step, s=g.get("lr_scale", 1.0): s * lr_at_step(step, **lrs, **step_counts(step)) / peak_lr
               for g in groups]
    scheduler = PerStepLR(optimizer, lambdas, total_batch)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

