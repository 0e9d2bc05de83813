"""`trainer.strategy` names -> configured Lightning strategies: what each device holds of the model.

    ddp                  Lightning's DDP: every device holds the weights, gradients and AdamW states
    ddp_zero1            DDP + ZeRO stage 1: each device keeps the AdamW states of ~1/N of the parameters
                         (torch.distributed.optim.ZeroRedundancyOptimizer); weights and gradients whole
    fsdp                 FSDP FULL_SHARD (ZeRO-3 style): weights, gradients and AdamW states sharded, one FSDP
                         unit per SwinV2 block (a block's weights are gathered for its forward and again for its
                         backward)
    fsdp_grad_op         FSDP SHARD_GRAD_OP (ZeRO-2 style): gradients and AdamW states sharded; weights sharded
                         between steps, gathered once per step and kept from forward to backward
    deepspeed_stage_1/2/3  DeepSpeed ZeRO stages 1-3 (pip install 'swinv2-simmim[deepspeed]')

Any other Lightning strategy name (auto, ddp_spawn, ddp_find_unused_parameters_true, ...) passes through.
Activation checkpointing stays the model's own (`model.use_checkpoint`: one checkpoint per block), under every
strategy; FSDP's activation_checkpointing_policy is not set, so no block is checkpointed twice.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
from contextlib import nullcontext

import torch
from pytorch_lightning import Callback
from pytorch_lightning.plugins.precision import FSDPPrecision
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy, StrategyRegistry
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from simmim.train.config import ConfigError
from simmim.train.optim import remember_ndims
from simmim.models.swinv2 import SwinTransformerV2Block

DEEPSPEED_STAGES = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}
FSDP_SHARDING = {"fsdp": "FULL_SHARD", "fsdp_grad_op": "SHARD_GRAD_OP"}
OUR_STRATEGIES = ("ddp", "ddp_zero1", *FSDP_SHARDING, *DEEPSPEED_STAGES)


class ZeRO1DDPStrategy(DDPStrategy):
    """DDP whose optimizer keeps only this rank's share of its states: the module builds it with
    `simmim.train.optim.make_adamw`, which wraps it in a ZeroRedundancyOptimizer under this strategy. Checkpoints
    hold the whole optimizer state (Lightning consolidates it on rank 0 before saving)."""

    shards_optimizer_states = True

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        plain = [type(o).__name__ for o in self.optimizers if not isinstance(o, ZeroRedundancyOptimizer)]
        if plain:
            raise ValueError(f"trainer.strategy=ddp_zero1 got a plain {plain[0]}: build the optimizer in "
                             f"configure_optimizers with simmim.train.optim.make_adamw(shard_states=True), or use trainer.strategy=ddp")


class RootClippingFSDPPrecision(FSDPPrecision):
    """Lightning's FSDPPrecision, but `gradient_clip_val` clips by the global norm through the root FSDP module
    (Lightning's refuses norm clipping: torch.nn.utils.clip_grad_norm_ would only see this rank's shards)."""

    def __init__(self, precision: str, strategy: FSDPStrategy):
        super().__init__(precision)
        self.strategy = strategy

    def clip_grad_by_norm(self, optimizer, clip_val: float) -> None:
        self.strategy.model.clip_grad_norm_(clip_val)


class BlockFSDPStrategy(FSDPStrategy):
    """FSDP with one unit per SwinV2 block (the rest in the root unit), clipping by the global gradient norm.

    FSDP shows sharded parameters as 1-D views; every parameter's ndim is recorded before wrapping, so the
    weight-decay groups (no decay for 1-D parameters) come out as without sharding."""

    def __init__(self, sharding_strategy: str, precision: str = "32-true", **kwargs):
        super().__init__(sharding_strategy=sharding_strategy, auto_wrap_policy={SwinTransformerV2Block},
                         precision_plugin=RootClippingFSDPPrecision(precision, self), **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        remember_ndims(model)
        return super()._setup_model(model)


def build_strategy(name: str | Strategy, precision: str | int | None = None, **strategy_kwargs) -> str | Strategy:
    """A Lightning strategy for `trainer.strategy`: our names (module docstring) become configured strategy
    objects (`precision`: the trainer's, which FSDP's precision plugin needs; `strategy_kwargs` go to the strategy
    class, e.g. start_method="fork"), other Lightning names and Strategy objects pass through."""
    if not isinstance(name, str):
        return name
    precision = "32-true" if precision is None else str(precision)
    if name == "ddp_zero1":
        return ZeRO1DDPStrategy(**strategy_kwargs)
    if name in FSDP_SHARDING:
        return BlockFSDPStrategy(FSDP_SHARDING[name], precision, **strategy_kwargs)
    if name in DEEPSPEED_STAGES:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"trainer.strategy={name} needs DeepSpeed: pip install 'swinv2-simmim[deepspeed]'")
        return DeepSpeedStrategy(stage=DEEPSPEED_STAGES[name], **strategy_kwargs)
    check_strategy_name(name)
    return name


def check_strategy_name(name: str) -> None:
    """ConfigError unless `name` is one of ours or a Lightning strategy name."""
    known = list(dict.fromkeys(["auto", *OUR_STRATEGIES, *StrategyRegistry.available_strategies()]))
    if name not in known:
        near = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ConfigError(f"unknown trainer.strategy {name!r}; {hint}ours: {', '.join(OUR_STRATEGIES)} "
                          f"(or any Lightning strategy name)")


def shards_parameters(strategy: Strategy) -> bool:
    """True when devices hold only shards of the weights between steps (FSDP, DeepSpeed ZeRO stage 3)."""
    return isinstance(strategy, FSDPStrategy) or bool(getattr(strategy, "zero_stage_3", False))


def global_grad_norm(module: nn.Module, strategy: Strategy) -> torch.Tensor | None:
    """The L2 norm of `module`'s whole gradient, every rank's shards together (0-d), as DDP has it on each rank; None
    where this rank holds no gradient (a skipped step) or DeepSpeed computed none. Every rank must call it (FSDP
    all-reduces), between backward and the optimizer step (before clipping), except under DeepSpeed: there it is
    the engine's norm of its last optimizer step (its ZeRO optimizer computes it in the step, before clipping).

    FSDP: the root unit's clip_grad_norm_ with max_norm=inf, which sums over its shard group (the whole model under
    hybrid sharding too) and multiplies this rank's gradient shards by exactly 1 (torch has no norm-only call)."""
    if isinstance(strategy, DeepSpeedStrategy):
        norm = strategy.deepspeed_engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if isinstance(strategy, FSDPStrategy):
        norm = strategy.model.clip_grad_norm_(math.inf)  # on every rank, as it all-reduces
        return norm if grads else None
    return torch.stack([g.norm() for g in grads]).norm() if grads else None


class GradNormMonitor(Callback):
    """Logs train/grad_norm, the `global_grad_norm` before clipping, every trainer.log_every_n_steps steps: from
    on_before_optimizer_step, or under DeepSpeed (whose norm exists only after the step) from on_train_batch_end."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not isinstance(trainer.strategy, DeepSpeedStrategy):
            self._log(trainer, pl_module, steps=trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self._log(trainer, pl_module, steps=trainer.global_step)

    @staticmethod
    def _log(trainer, pl_module, steps: int) -> None:
        """Log the norm when Lightning writes this batch's logs: when `steps`, the optimizer steps taken with this
        batch's, is a multiple of trainer.log_every_n_steps (a value logged at another step stays in the logs)."""
        if steps % trainer.log_every_n_steps == 0:
            norm = global_grad_norm(pl_module, trainer.strategy)
            if norm is not None:
                pl_module.log("train/grad_norm", norm)


def root_params_gathered(strategy: Strategy):
    """Context for calling a submodule outside the training loop under FSDP (e.g. pictures): the root unit's
    weights are gathered, the blocks gather their own. Every rank must enter it; elsewhere it does nothing."""
    if not isinstance(strategy, FSDPStrategy):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(strategy.model, recurse=False, writeback=False)


def full_state_dict(strategy: Strategy) -> dict:
    """The LightningModule's whole state dict, e.g. to export weights after fit. Every rank must call it:
    sharded strategies gather the weights (FSDP: only rank 0 gets them)."""
    if getattr(strategy, "zero_stage_3", False):
        import deepspeed

        module = strategy.lightning_module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return strategy.lightning_module_state_dict()

