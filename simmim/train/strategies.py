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
from contextlib import nullcontext

from pytorch_lightning.plugins.precision import FSDPPrecision
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, Strategy, StrategyRegistry
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
        from pytorch_lightning.strategies import DeepSpeedStrategy

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
