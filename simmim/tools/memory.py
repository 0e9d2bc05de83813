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

Activations are derived from the model, not from formulas: a whole training step (forward and backward, with
the saver setting's checkpoints recomputing in backward) runs on the meta device, where nothing is allocated, under
a TorchDispatchMode that follows every storage an op creates from that op until it is freed (a finalizer on the
storage) and samples the bytes alive after each op, when its inputs and outputs are both alive. Parameters and
buffers do not count, nor do parameter gradients (counted at full size above); the input batch does. So what a
step holds for backward, what checkpoints and sequential attention free and recompute, and each op's transients
(gradients flowing in, a kernel's full-size outputs, the sums that reduce broadcast gradients) come out of the
model's own code, in the order they happen. Not seen: memory a kernel allocates inside itself (workspaces, such
as the memory-efficient attention backward's float32 accumulators).

The meta device runs what CUDA runs. Under `*-mixed`, CUDA autocast's rules for the ops of this model
(`_MetaAutocast`; autocast itself skips meta tensors): inputs cast to the lower precision or to float32, or a
float32 result of inputs left as they are (softmax, sum, F.normalize's norm), and the casts of parameters cached
over the forward. Attention goes through the memory-efficient kernel (`_MetaAttention`), as SDPA picks on CUDA for
4-D inputs with an additive mask: it expands the mask to (B, heads, N, N), saves q, k, v, the mask, the output and
the log-sum-exp, and its backward writes the mask's gradient at that expanded size before autograd sums it to the
mask's own shape. On another device (the CPU in the tests) the model's own ops run.

Each op's bytes are affine in the batch from 2 images on (at 1 image some broadcast-gradient sums are skipped), so
steps of 2 and 3 images give every moment as fixed + per image x batch; the activations of a batch are the
largest moment at that batch, and the table shows the moment that is the peak at the row's largest batch. At
1 image this leans high by those skipped sums. Activations do not depend on the sharding stage (under FSDP,
whose gathered parameters are already bfloat16, the cached autocast casts counted here do not exist). The largest
batch per GPU is the largest B with params + grads + optimizer + buffers + communication + activations(B) <=
(1 - headroom) x gpu memory, and the optimizer step's peak within it too. Gradients count at their full size
through the whole backward, so the prediction leans high when activations are small. Checked against CPU training
steps (tests/test_plan_memory.py, within 25 %) and against the peaks of H200 steps of SwinV2-T (torch 2.11;
predicted grads + activations over measured): 192 px / window 12, batch 64: 0.99 without savers, 1.01 with
checkpointing (with or without sequential attention), 1.00 under bf16 autocast without savers; 512 px / window 16,
batch 8: 0.96 without savers, 0.98 with checkpointing and sequential attention.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.autograd.graph import _engine_run_backward
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from simmim.models.simmim import SimMIM
from simmim.models.simmim import build_simmim
from simmim.models.swinv2 import SwinTransformerV2Block

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


# CUDA autocast's policies for the ops of this model: inputs cast to the lower precision, inputs cast to float32,
# float32 results of the inputs as they are (the op's dtype argument set to float32); others follow type promotion.
LOWER_PRECISION_OPS = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                       torch.baddbmm, F.scaled_dot_product_attention}
FLOAT32_OPS = {F.layer_norm, torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, F.l1_loss}
FLOAT32_RESULT_OPS = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.sum, torch.Tensor.sum}


def _normalize_in_float32(input, p=2.0, dim=1, eps=1e-12, out=None):
    """F.normalize (its signature; this model passes no `out`) as CUDA autocast runs it: the norm
    (linalg_vector_norm) in float32 of the input as it is, so the quotient is float32 without a float32 copy of
    the input."""
    norm = torch.linalg.vector_norm(input, p, dim, keepdim=True, dtype=torch.float32)
    return input / norm.clamp_min(eps).expand_as(input)


class _MetaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", dtype) for meta tensors, which autocast skips: the ops of this model that CUDA
    autocast runs in lower precision get `dtype` inputs, those it runs in float32 get float32 inputs, those it
    asks for a float32 result get dtype=float32 (F.normalize: its norm), the others follow type promotion. With
    `cache`, parameters are cast once and the casts live until the mode exits, as autocast caches them over a
    forward; without (recomputation in backward, where each checkpoint caches anew), each use casts anew."""

    def __init__(self, dtype: torch.dtype, cache: bool = True):
        super().__init__()
        self.dtype, self.cache, self.casts = dtype, cache, {}

    def __exit__(self, *exc):
        self.casts.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.normalize:
            return _normalize_in_float32(*args, **kwargs)
        if func in FLOAT32_RESULT_OPS and args[0].is_floating_point() and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        dtype = self.dtype if func in LOWER_PRECISION_OPS else torch.float32 if func in FLOAT32_OPS else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _cast(self, value, dtype: torch.dtype):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if not (self.cache and isinstance(value, nn.Parameter)):
            return value.to(dtype)
        key = (id(value), dtype)
        if key not in self.casts:
            self.casts[key] = value.to(dtype)
        return self.casts[key]


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale


class _MetaAttention(TorchFunctionMode):
    """scaled_dot_product_attention on meta tensors (no fused kernels there) as CUDA runs it for this model: the
    memory-efficient kernel, after expanding the additive mask to (B, heads, N, N) as torch does. It saves q, k,
    v, the mask, the output and the log-sum-exp instead of the (N, N) matrices; its backward (meta kernel as the
    CUDA one) writes the mask's gradient at the expanded size, which autograd then sums to the mask's shape."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, mask, dropout, causal, scale = _sdpa_arguments(*args, **kwargs)
        if q.dim() != 4:  # the fused kernels take 4-D inputs only
            return func(*args, **kwargs)
        mask = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, mask))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, needs_grad, dropout, causal, scale=scale)[0]


def _storages(tree) -> dict[int, torch.UntypedStorage]:
    """The storages of the tensors in a pytree, by identity."""
    storages = (t.untyped_storage() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))
    return {storage._cdata: storage for storage in storages}


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create, sampled after every op (when its outputs and inputs are
    both alive, the op's peak): a storage counts from the op that returns it until it is freed (a finalizer on
    the storage). Storages made before (parameters, buffers) do not count."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.samples: list[int] = []
        self.created: dict[int, tuple[int, int]] = {}  # live storage -> (sample it was created at, bytes)
        self.finalizers: list[weakref.finalize] = []

    def __exit__(self, *exc):
        for finalizer in self.finalizers:  # what outlives the step (parameter gradients) is not followed further
            finalizer.detach()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages((args, kwargs))
        for key, storage in _storages(out).items():
            if key not in inputs and key not in self.created:  # a new storage, not a view or an in-place result
                self.live += storage.nbytes()
                self.created[key] = (len(self.samples), storage.nbytes())
                self.finalizers.append(weakref.finalize(storage, self._free, key))
        self.samples.append(self.live)
        return out

    def _free(self, key: int):
        self.live -= self.created.pop(key)[1]

    def without(self, storages: set[int]) -> list[int]:
        """The samples less the bytes of the given storages (still alive) from when they were created."""
        change = [0] * len(self.samples)
        for key in storages & self.created.keys():
            start, nbytes = self.created[key]
            change[start] -= nbytes
        return [sample + less for sample, less in zip(self.samples, itertools.accumulate(change))]


def _backward(loss: torch.Tensor) -> None:
    """loss.backward() with the active torch-function modes in force while it runs (checkpointed blocks
    recompute under them). Tensor.backward would run with the modes popped, as any function a mode handles;
    the engine's own entry point does not go through the modes."""
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def step_timeline(simmim: SimMIM, batch: int, precision: str = "32-true", checkpointing: bool = False,
                  sequential: bool = False, chunk: int | None = None) -> list[int]:
    """Activation bytes after each op of a forward and backward of `batch` images (input, mask and everything
    the step creates; parameter gradients left out) with the given savers (`chunk`: windows per sequential
    attention call). On the model's device; on the meta device nothing is allocated and CUDA's autocast and
    attention kernel are emulated. The model must be in the parameter dtype of `precision`; its gradients are
    dropped afterwards."""
    _, compute_dtype = PRECISIONS[precision]
    encoder = simmim.encoder
    encoder.set_grad_checkpointing(checkpointing)
    encoder.set_sequential_attn(sequential, chunk)
    device = next(simmim.parameters()).device
    mixed, meta = precision.endswith("-mixed"), device.type == "meta"
    if not mixed:
        forward_autocast = backward_autocast = contextlib.nullcontext()
    elif meta:
        forward_autocast, backward_autocast = _MetaAutocast(compute_dtype), _MetaAutocast(compute_dtype, cache=False)
    else:  # checkpoints recompute under the forward's torch.autocast state by themselves
        forward_autocast = torch.autocast(device.type, dtype=compute_dtype)
        backward_autocast = contextlib.nullcontext()
    attention = _MetaAttention() if meta else contextlib.nullcontext()
    live = _LiveBytes()
    size, grid = encoder.img_size, encoder.patches_resolution
    try:
        with live:
            x = torch.zeros(batch, encoder.in_chans, size, size, device=device,
                            dtype=torch.float32 if mixed else compute_dtype)
            mask = torch.zeros(batch, grid, grid, dtype=torch.long, device=device)
            with attention, forward_autocast:
                loss = simmim.train()(x, mask)
            del x, mask
            with attention, backward_autocast:
                _backward(loss)
            del loss
            return live.without({p.grad.untyped_storage()._cdata for p in simmim.parameters() if p.grad is not None})
    finally:
        simmim.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ activations
FIT_BATCHES = (2, 3)  # from 2 images on a step runs the same ops at every batch (at 1, sums over a broadcast batch
# dimension are skipped), so each op's bytes are affine in the batch


@dataclass(frozen=True)
class Affine:
    """bytes = fixed + per_image * batch."""
    fixed: float
    per_image: float

    @classmethod
    def through(cls, batches: tuple[int, int], values: tuple[float, float]) -> "Affine":
        (b1, b2), (v1, v2) = batches, values
        per_image = (v2 - v1) / (b2 - b1)
        return cls(v1 - per_image * b1, per_image)

    def at(self, batch: int) -> float:
        return self.fixed + self.per_image * batch


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one saver setting: the largest, at a batch, of the `moments` of the step (after each
    op: what is held for backward plus what is transient then), each affine in the batch."""
    moments: tuple[Affine, ...]

    def peak(self, batch: int) -> Affine:
        """The moment with the most bytes at `batch`."""
        return max(self.moments, key=lambda moment: moment.at(batch))

    def at(self, batch: int) -> float:
        return self.peak(batch).at(batch)


def _upper_moments(moments: list[Affine]) -> tuple[Affine, ...]:
    """The moments not below another at every batch (none has both less fixed and less per image)."""
    kept, most_fixed = [], -float("inf")
    for moment in sorted(moments, key=lambda m: (m.per_image, m.fixed), reverse=True):
        if moment.fixed > most_fixed:
            kept.append(moment)
            most_fixed = moment.fixed
    return tuple(kept)


def saver_activations(simmim: SimMIM, precision: str, chunk: int, savers=tuple(SAVERS)) -> dict[str, Activations]:
    """Activations of the named saver settings, op by op from steps of FIT_BATCHES images (the module
    docstring); `chunk`: windows per sequential attention call."""
    result = {}
    for name in savers:
        timelines = [step_timeline(simmim, batch, precision, *SAVERS[name], chunk=chunk) for batch in FIT_BATCHES]
        if len({len(t) for t in timelines}) != 1:
            raise RuntimeError(f"steps of {FIT_BATCHES} images ran different ops under {name}; the planner needs "
                               "the same ops at every batch")
        result[name] = Activations(_upper_moments([Affine.through(FIT_BATCHES, v) for v in zip(*timelines)]))
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
    """Bytes per GPU of one saver setting and sharding stage; activations = fixed + per_image x batch at the
    step's peak moment for max_batch images (1 where none fits)."""
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
        for stage in range(len(STAGES)) if world > 1 else [0]:
            static = memory.static(stage, world)
            max_batch = memory.largest_batch(savers, budget, stage, world)
            peak = activations.peak(max(max_batch, 1))
            rows.append(PlanRow(
                savers=savers, sharding=STAGES[stage] if world > 1 else "single GPU", params=static.params,
                grads=static.grads, optimizer=static.optimizer, buffers=static.buffers,
                communication=static.communication, activations_fixed=peak.fixed,
                activations_per_image=peak.per_image, max_batch=max_batch, recipe=(savers, stage) == recipe))
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
             f"{name} per GPU; activations = fixed + per image x batch at the step's peak for max batch (1 if 0)",
             f"  {'savers':<25}{'sharding':<13}{'params':>8}{'grads':>8}{'optim':>8}{'buffers':>8}{'comm':>8}"
             f"{'act fixed':>11}{'act/image':>11}{'max batch':>11}"]
    for r in plan.rows:
        values = "".join(f"{getattr(r, c) / unit:{11 if c.startswith('act') else 8}.2f}" for c in columns)
        lines.append(f"{'*' if r.recipe else ' '} {r.savers:<25}{r.sharding:<13}{values}{r.max_batch:11d}")
    return "\n".join(lines)
