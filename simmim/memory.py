"""Memory of a SimMIM training step: measure it (`peak_memory`) and plan it per GPU without one (`plan_memory`).

The plan counts the bytes of tensors, what `torch.cuda.max_memory_allocated` reports; the CUDA context and the
caching allocator's reserve come on top (the `headroom` fraction of the GPU is left for them).

Static memory, from the parameter count P of the model built on the meta device and `trainer.precision` as
Lightning runs it: `*-mixed` keeps float32 parameters and autocasts the forward, `*-true` converts the model
(bf16-true: bfloat16 parameters, no float32 master copy). Gradients have the parameters' dtype, AdamW keeps two
states (exp_avg, exp_avg_sq) in it too: 4 + 4 + 8 bytes per parameter under 32-true and *-mixed, 2 + 2 + 4 under
bf16-true / 16-true. Over N GPUs the sharding stages divide these:

    DDP (no sharding)   params P   grads P     optimizer P    + DDP's gradient buckets, a second copy of the gradients
    ZeRO-1              params P   grads P     optimizer P/N  + the same buckets
    ZeRO-2              params P   grads P/N   optimizer P/N  + the unsharded gradients of one unit (a SwinV2 block)
    ZeRO-3 / FSDP       params P/N grads P/N   optimizer P/N  + two units' gathered parameters (the one running
                                                                and the prefetched one) and one unit's gradients

where gathered parameters and unsharded gradients are in the compute dtype (FSDP's mixed precision under
Lightning). Model buffers (position indices, shift masks) are replicated on every GPU. The optimizer step
allocates one more state-sized temporary over its shard (torch's foreach AdamW); by then the activations are gone,
so the step peak is checked on its own.

Activations are derived from the model, not from formulas. A forward on the meta device under
`torch.autograd.graph.saved_tensors_hooks` records every tensor autograd saves for backward, counting each storage
once (views share it) and leaving out parameters and buffers; forward hooks attribute the bytes to the SwinV2 block
(and its attention) that saved them. Steps of 1 and 2 images give the bytes per image and the bytes per step that
do not grow with the batch (position-bias tables and the shift masks added to them, autocast copies of the
weights). One backward, without savers, is watched op by op (a TorchDispatchMode) for working sets: the new
tensors an op returns plus the gradients flowing into it, for each block's attention backward and for the largest
other op. The meta device runs what CUDA runs: under `*-mixed` the CUDA autocast rules for the ops of this model
(`_MetaAutocast`; autocast itself skips meta tensors), and 4-D attention through the memory-efficient kernel,
which saves q, k, v, the output and the log-sum-exp and whose backward writes the gradient of a broadcast bias
at the full (B, heads, N, N) size (`_Attention`). On another device (the CPU in the tests) the model's own ops run.

The activation peak of a saver setting is the largest, over the moments of backward, of what is still held (the
forward's saved bytes, less those of the blocks already backpropagated) plus what is transient then:

    none                      at each block: its attention backward's working set; at the start: the largest
                              other op's
    sequential attention      held: a forward with model.sequential_attn; where a block's windows are chunked,
                              one chunk's attention (its saved bytes and backward working set x chunk / windows),
                              recomputed in backward
    checkpointing             held: a forward with model.use_checkpoint (block inputs and what lies between
                              blocks); at each block: its saved bytes, recomputed, or those up to its attention
                              plus the attention backward's working set
    checkpointing+sequential  as checkpointing, with the blocks recomputed with sequential attention and their
                              attention chunked

Activations do not depend on the sharding stage. The largest batch per GPU is the largest B with
params + grads + optimizer + buffers + communication + activations(B) <= (1 - headroom) x gpu memory, and the
optimizer step's peak within it too. Gradients count at their full size through the whole backward, so the
prediction leans high when activations are small. Checked against CPU training steps (tests/test_plan_memory.py,
within 25 %) and CUDA steps of SwinV2-T at 192 px / window 12 and 384 px / window 24 (see the README).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from simmim.model import SimMIM
from simmim.module import build_simmim
from simmim.swinv2 import SwinTransformerV2Block

GIB = 2 ** 30
PRECISIONS = {  # trainer.precision -> (dtype of parameters, gradients and AdamW states; dtype of the forward)
    "64-true": (torch.float64, torch.float64),
    "32-true": (torch.float32, torch.float32),
    "16-mixed": (torch.float32, torch.float16),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "16-true": (torch.float16, torch.float16),
    "bf16-true": (torch.bfloat16, torch.bfloat16),
}
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}  # as Lightning's
SAVERS = {  # name -> (use_checkpoint, sequential_attn)
    "none": (False, False),
    "sequential": (False, True),
    "checkpointing": (True, False),
    "checkpointing+sequential": (True, True),
}
STAGES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3/FSDP")
STRATEGY_STAGES = {"ddp": 0, "ddp_zero1": 1, "deepspeed_stage_1": 1, "fsdp_grad_op": 2, "deepspeed_stage_2": 2,
                   "fsdp": 3, "deepspeed_stage_3": 3}
MAX_BATCH = 2 ** 20


# ------------------------------------------------------------------------------------------------ measuring
def peak_memory(step_fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated while `step_fn()` runs, above what was allocated when it started: memory that already
    exists (parameters, optimizer states of earlier steps) is not counted, memory freed during the step lowers
    the level. CUDA: torch.cuda.max_memory_allocated. CPU: the allocation and free events torch.profiler records
    with profile_memory=True, summed in the order they happened; the profiler does not see the size of memory
    allocated before it started, so free that before the step (e.g. optimizer.zero_grad(set_to_none=True)), or
    its release during the step is not subtracted."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step_fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures cpu or cuda devices, not {device}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    changes = [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]
    return max(0, *itertools.accumulate(changes)) if changes else 0


LOWER_PRECISION_OPS = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                       torch.baddbmm, F.scaled_dot_product_attention}
FLOAT32_OPS = {F.layer_norm, F.normalize, F.softmax, torch.softmax, torch.Tensor.softmax, torch.exp,
               torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.sum, torch.Tensor.sum,
               F.l1_loss}


class _MetaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", dtype) for meta tensors, which autocast skips: the ops of this model that CUDA
    autocast runs in lower precision get `dtype` inputs, those it runs in float32 get float32 inputs, the others
    follow type promotion. Parameters are cast once per forward, as autocast caches them."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype, self.casts = dtype, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.dtype if func in LOWER_PRECISION_OPS else torch.float32 if func in FLOAT32_OPS else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _cast(self, value, dtype: torch.dtype):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if not isinstance(value, nn.Parameter):
            return value.to(dtype)
        key = (id(value), dtype)
        if key not in self.casts:
            self.casts[key] = value.to(dtype)
        return self.casts[key]


class _SavedLedger:
    """Bytes of the storages autograd saves for backward, each counted once, attributed to the SwinV2 block that
    saved it first (None: outside blocks) and, within it, to its attention call."""

    def __init__(self, model: nn.Module):
        self.model_storages = {t.untyped_storage()._cdata for t in itertools.chain(model.parameters(), model.buffers())}
        self.seen: set[int] = set()
        self.block: int | None = None
        self.in_attention = False
        self.total = 0
        self.by_block: dict[int, int] = {}
        self.by_attention: dict[int, int] = {}
        self.through_attention: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if key not in self.model_storages and key not in self.seen:
            self.seen.add(key)
            self.total += nbytes
            if self.block is not None:
                self.by_block[self.block] = self.by_block.get(self.block, 0) + nbytes
                if self.in_attention:
                    self.by_attention[self.block] = self.by_attention.get(self.block, 0) + nbytes
        return tensor

    def enter(self, index: int):
        def hook(*_):
            self.block = index
        return hook

    def leave(self, *_):
        self.block = None

    def attention_done(self, *_):
        self.through_attention[self.block] = self.by_block.get(self.block, 0)


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale


class _Attention(TorchFunctionMode):
    """Tells the ledger when scaled_dot_product_attention runs and, on the meta device (which has no fused
    kernels), runs 4-D attention as CUDA does: the memory-efficient kernel, which saves q, k, v, the output and
    the log-sum-exp instead of the (N, N) matrices, and whose backward writes the gradient of a broadcast mask
    at the full (B, heads, N, N) size. Inputs of other ranks take the unfused path on CUDA too."""

    def __init__(self, ledger: "_SavedLedger", fused: bool):
        super().__init__()
        self.ledger, self.fused = ledger, fused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.ledger.in_attention = True
        try:
            q, k, v, mask, dropout, causal, scale = _sdpa_arguments(*args, **kwargs)
            if not (self.fused and q.dim() == 4):
                return func(*args, **kwargs)
            mask = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, mask))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, mask, needs_grad, dropout, causal, scale=scale)[0]
        finally:
            self.ledger.in_attention = False


class _BackwardTemporaries(TorchDispatchMode):
    """The working set of each op of a backward: the new storages it returns plus the inputs that earlier ops of
    the backward produced (the gradient flowing in). Kept for the attention backward ops (the fused kernel's,
    or the softmax's of the unfused path) in the order they run, and the largest of the other ops."""
    ATTENTION_OPS = ("attention_backward", "_softmax_backward_data")

    def __init__(self):
        super().__init__()
        self.produced: set[int] = set()
        self.attention: list[int] = []
        self.other = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                  for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                   for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        working = sum(n for key, n in outputs.items() if key not in inputs)
        working += sum(n for key, n in inputs.items() if key in self.produced)
        self.produced.update(outputs)
        if any(name in func.__name__ for name in self.ATTENTION_OPS):
            self.attention.append(working)
        else:
            self.other = max(self.other, working)
        return out


@dataclass(frozen=True)
class StepActivations:
    """Activation bytes of a training step, per SwinV2 block in model order. Held for backward after the forward:
    `total`, first saved in each block (`blocks`), of those inside its scaled_dot_product_attention
    (`attention`; not seen where sequential attention checkpoints it) and up to the end of its attention module
    (`through_attention`). Working sets of the backward (when run): each block's attention backward
    (`attention_backward`) and the largest other op's (`other_backward`)."""
    total: int
    blocks: tuple[int, ...]
    attention: tuple[int, ...]
    through_attention: tuple[int, ...]
    attention_backward: tuple[int, ...] = ()
    other_backward: int = 0


def step_activations(simmim: SimMIM, batch: int, precision: str = "32-true", checkpointing: bool = False,
                     sequential: bool = False, backward: bool = False) -> StepActivations:
    """A forward (and with `backward`, a backward) of `batch` images on the model's device (meta: no memory, with
    CUDA's autocast and attention kernels) with the given savers, counting what autograd saves. The model must be
    in the parameter dtype of `precision`; its gradients are dropped afterwards. Backward on the meta device
    needs savers off, as checkpoints recompute outside the emulated autocast."""
    _, compute_dtype = PRECISIONS[precision]
    encoder = simmim.encoder
    encoder.set_grad_checkpointing(checkpointing)
    encoder.set_sequential_attn(sequential)
    ledger = _SavedLedger(simmim)
    blocks = [m for m in encoder.modules() if isinstance(m, SwinTransformerV2Block)]
    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(ledger.enter(i)), block.register_forward_hook(ledger.leave),
                         block.attn.register_forward_hook(ledger.attention_done))]
    device = next(simmim.parameters()).device
    mixed = precision.endswith("-mixed")
    if not mixed:
        autocast = contextlib.nullcontext()
    elif device.type == "meta":
        autocast = _MetaAutocast(compute_dtype)
    else:
        autocast = torch.autocast(device.type, dtype=compute_dtype)
    size, grid = encoder.img_size, encoder.patches_resolution
    x = torch.zeros(batch, encoder.in_chans, size, size, device=device,
                    dtype=torch.float32 if mixed else compute_dtype)
    mask = torch.zeros(batch, grid, grid, dtype=torch.long, device=device)
    temporaries = _BackwardTemporaries()
    try:
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t), \
                _Attention(ledger, fused=device.type == "meta"), autocast:  # autocast casts before _Attention runs
            loss = simmim.train()(x, mask)
        if backward:
            with temporaries:
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        simmim.zero_grad(set_to_none=True)
    count = range(len(blocks))
    attention_backward = temporaries.attention[::-1]  # backward meets the blocks last to first
    if backward and len(attention_backward) != len(blocks):  # not one attention per block: charge each the largest
        attention_backward = [max(attention_backward, default=0)] * len(blocks)
    return StepActivations(ledger.total, *(tuple(found.get(i, 0) for i in count) for found in (
        ledger.by_block, ledger.by_attention, ledger.through_attention)), tuple(attention_backward), temporaries.other)


# ------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Affine:
    """bytes = fixed + per_image * batch."""
    fixed: float
    per_image: float

    @classmethod
    def through(cls, at_one: float, at_two: float) -> "Affine":
        return cls(2 * at_one - at_two, at_two - at_one)

    def at(self, batch: int) -> float:
        return self.fixed + self.per_image * batch

    def __add__(self, other: "Affine") -> "Affine":
        return Affine(self.fixed + other.fixed, self.per_image + other.per_image)

    def __sub__(self, other: "Affine") -> "Affine":
        return Affine(self.fixed - other.fixed, self.per_image - other.per_image)

    def __mul__(self, factor: float) -> "Affine":
        return Affine(self.fixed * factor, self.per_image * factor)


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one saver setting: the largest, at a batch, of the `moments` of backward, each what
    is still held for backward then plus what is transient then."""
    moments: tuple[Affine, ...]

    def at(self, batch: int) -> float:
        return max(moment.at(batch) for moment in self.moments)


def saver_activations(simmim: SimMIM, precision: str, chunk: int, savers=tuple(SAVERS)) -> dict[str, Activations]:
    """Activations of the named saver settings (see the module docstring), from steps of 1 and 2 images."""
    plain = SAVERS["none"]
    blocks = [m for m in simmim.encoder.modules() if isinstance(m, SwinTransformerV2Block)]
    windows = [(b.input_resolution[0] // b.window_size) * (b.input_resolution[1] // b.window_size) for b in blocks]

    @functools.cache
    def runs(key):
        return [step_activations(simmim, batch, precision, *key, backward=key == plain) for batch in (1, 2)]

    def fit(key, field, i=None):
        one, two = (getattr(run, field) if i is None else getattr(run, field)[i] for run in runs(key))
        return Affine.through(one, two)

    result = {}
    for name in savers:
        checkpointing, sequential = key = SAVERS[name]
        held = fit(key, "total")
        moments = [held + fit(plain, "other_backward")]  # backward starts: everything held, one op's working set
        for i in reversed(range(len(blocks))):  # block i backpropagates: the blocks after it freed what they held
            chunked = sequential and windows[i] > chunk
            share = chunk / windows[i] if chunked else 1.0
            recomputed = fit(plain, "attention", i) if chunked else Affine(0, 0)
            attention = (recomputed + fit(plain, "attention_backward", i)) * share
            if checkpointing:  # the recomputed block, or what of it is still there when its attention backpropagates
                moments.append(held + fit((False, sequential), "blocks", i))
                attention = fit((False, sequential), "through_attention", i) + attention
            moments.append(held + attention)
            held = held - fit(key, "blocks", i)
        result[name] = Activations(tuple(moments))
    return result


# ------------------------------------------------------------------------------------------------ per GPU
@dataclass(frozen=True)
class StaticMemory:
    """Bytes per GPU that do not depend on the batch, for one sharding stage."""
    params: float
    grads: float
    optimizer: float
    buffers: float
    communication: float

    @property
    def training(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers + self.communication

    @property
    def optimizer_step(self) -> float:
        """During the step: the foreach AdamW temporary, as large as one state of the shard, instead of the
        communication buffers."""
        return self.params + self.grads + 1.5 * self.optimizer + self.buffers


@dataclass(frozen=True)
class ModelMemory:
    """What the planner knows of a model: parameter counts, buffer bytes and activations per saver setting."""
    precision: str
    num_params: int
    unit_params: int  # the largest SwinV2 block: the unit ZeRO-2/3 gather
    buffer_bytes: int
    activations: dict[str, Activations]

    @classmethod
    def measure(cls, simmim: SimMIM, precision: str, chunk: int, savers=tuple(SAVERS)) -> "ModelMemory":
        """`simmim` in the parameter dtype of `precision`, on the meta device (or any other, e.g. to compare with
        a measured CPU step); `chunk` is the sequential attention chunk; activations of the named `savers`."""
        blocks = [m for m in simmim.modules() if isinstance(m, SwinTransformerV2Block)]
        return cls(precision=precision, num_params=sum(p.numel() for p in simmim.parameters()),
                   unit_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
                   buffer_bytes=sum(b.numel() * b.element_size() for b in simmim.buffers()),
                   activations=saver_activations(simmim, precision, chunk, savers))

    def static(self, stage: int = 0, world_size: int = 1) -> StaticMemory:
        """Per-GPU static bytes of a sharding stage (0 DDP, 1 ZeRO-1, 2 ZeRO-2, 3 ZeRO-3/FSDP; world_size 1: a
        single device, no DDP)."""
        param_dtype, compute_dtype = PRECISIONS[self.precision]
        stored, compute = param_dtype.itemsize, compute_dtype.itemsize
        shard = lambda first_stage: world_size if stage >= first_stage else 1  # noqa: E731
        if world_size == 1:
            communication = 0
        elif stage < 2:
            communication = self.num_params * stored  # DDP buckets (gradient_as_bucket_view=False, the default)
        else:
            communication = self.unit_params * compute * (3 if stage == 3 else 1)
        return StaticMemory(params=self.num_params * stored / shard(3), grads=self.num_params * stored / shard(2),
                            optimizer=2 * self.num_params * stored / shard(1), buffers=self.buffer_bytes,
                            communication=communication)

    def training_bytes(self, savers: str, batch: int, stage: int = 0, world_size: int = 1) -> float:
        """Predicted peak bytes per GPU of forward and backward: static memory + activations."""
        return self.static(stage, world_size).training + self.activations[savers].at(batch)

    def step_bytes(self, savers: str, batch: int, stage: int = 0, world_size: int = 1) -> float:
        """Predicted peak bytes per GPU of a training step: forward and backward, or the optimizer step."""
        return max(self.training_bytes(savers, batch, stage, world_size), self.static(stage, world_size).optimizer_step)

    def largest_batch(self, savers: str, budget: float, stage: int = 0, world_size: int = 1) -> int:
        """The largest batch whose training step fits `budget` bytes (0: not even one image)."""
        low, high = 0, MAX_BATCH
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.step_bytes(savers, mid, stage, world_size) <= budget else (low, mid - 1)
        return low


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PlanRow:
    """Bytes per GPU of one saver setting and sharding stage; activations = fixed + per_image x batch."""
    savers: str
    sharding: str
    params: float
    grads: float
    optimizer: float
    buffers: float
    communication: float
    activations_fixed: float
    activations_per_image: float
    max_batch: int
    recipe: bool


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    num_params: int
    img_size: int
    window_size: int
    precision: str
    world_size: int
    gpu_memory_gb: float
    headroom: float
    rows: tuple[PlanRow, ...]

    def to_dict(self) -> dict:
        """The plan with bytes, plus how it is made (this module's docstring)."""
        return {**asdict(self), "assumptions": __doc__}


def world_size(trainer: DictConfig) -> int:
    """GPUs of a run: trainer.devices (a count or a list of device ids) x trainer.num_nodes."""
    devices = trainer.get("devices", 1)
    count = len(devices) if OmegaConf.is_list(devices) else int(devices) if str(devices).isdigit() else 0
    if count < 1:
        raise ValueError(f"trainer.devices={devices} does not say how many GPUs; pass trainer.devices=N")
    return count * int(trainer.get("num_nodes", 1))


def unified_precision(precision) -> str:
    """Lightning's name of a trainer.precision (16 -> 16-mixed, ...), one the planner knows."""
    name = PRECISION_ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision} is not one the planner knows; use one of "
                         f"{', '.join(PRECISIONS)}")
    return name


def build_meta_simmim(cfg: DictConfig, precision: str) -> SimMIM:
    """The pretraining config's SimMIM on the meta device, in the parameter dtype of `precision`."""
    with torch.device("meta"):
        simmim = build_simmim(OmegaConf.to_container(cfg.model), cfg.simmim.norm_target_patch_size)
    return simmim.to(PRECISIONS[precision][0])


def plan_memory(cfg: DictConfig, gpu_memory_gb: float = 80.0, headroom: float = 0.1) -> MemoryPlan:
    """Per-GPU memory of pretraining `cfg` (a resolved pretrain config) for every saver setting and sharding
    stage, and the largest batch per GPU within (1 - headroom) x gpu_memory_gb GiB."""
    precision = unified_precision(cfg.trainer.precision)
    world = world_size(cfg.trainer)
    memory = ModelMemory.measure(build_meta_simmim(cfg, precision), precision, cfg.model.sequential_attn_chunk)
    budget = (1 - headroom) * gpu_memory_gb * GIB
    recipe = (next(k for k, v in SAVERS.items() if v == (cfg.model.use_checkpoint, cfg.model.sequential_attn)),
              STRATEGY_STAGES.get(str(cfg.trainer.get("strategy")), 0))
    rows = []
    for savers, activations in memory.activations.items():
        per_image = activations.at(2) - activations.at(1)
        for stage in range(len(STAGES)) if world > 1 else [0]:
            static = memory.static(stage, world)
            rows.append(PlanRow(
                savers=savers, sharding=STAGES[stage] if world > 1 else "single GPU", params=static.params,
                grads=static.grads, optimizer=static.optimizer, buffers=static.buffers,
                communication=static.communication, activations_fixed=activations.at(1) - per_image,
                activations_per_image=per_image, max_batch=memory.largest_batch(savers, budget, stage, world),
                recipe=(savers, stage) == recipe))
    return MemoryPlan(model=str(cfg.model.variant or "custom"), num_params=memory.num_params,
                      img_size=cfg.model.img_size, window_size=cfg.model.window_size, precision=precision,
                      world_size=world, gpu_memory_gb=gpu_memory_gb, headroom=headroom, rows=tuple(rows))


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table per GPU (GiB, or MiB for small models); `*` marks the recipe's savers and strategy."""
    largest = max(max(r.params + r.grads + r.optimizer, r.activations_per_image) for r in plan.rows)
    unit, name = (GIB, "GiB") if largest >= GIB else (2 ** 20, "MiB")
    columns = ("params", "grads", "optimizer", "buffers", "communication", "activations_fixed",
               "activations_per_image")
    lines = [f"SimMIM SwinV2-{plan.model}: {plan.num_params / 1e6:,.1f} M parameters, {plan.img_size} px, window "
             f"{plan.window_size}, {plan.precision}, {plan.world_size} GPU(s) with {plan.gpu_memory_gb:g} GiB "
             f"({(1 - plan.headroom) * plan.gpu_memory_gb:.1f} GiB for tensors)",
             f"{name} per GPU; activations per step = fixed + per image x batch, with the largest backward transient",
             f"  {'savers':<25}{'sharding':<13}{'params':>8}{'grads':>8}{'optim':>8}{'buffers':>8}{'comm':>8}"
             f"{'act fixed':>11}{'act/image':>11}{'max batch':>11}"]
    for r in plan.rows:
        values = "".join(f"{getattr(r, c) / unit:{11 if c.startswith('act') else 8}.2f}" for c in columns)
        lines.append(f"{'*' if r.recipe else ' '} {r.savers:<25}{r.sharding:<13}{values}{r.max_batch:11d}")
    return "\n".join(lines)
