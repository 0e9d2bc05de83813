"""Training-step benchmark of SimMIM on SwinV2: images/s, peak memory, FLOPs and MFU, side by side in one run.

    python scripts/benchmark.py model=tiny img_size=192 window_size=12 batch_size=8
    python scripts/benchmark.py model=tiny img_size=512 window_size=16 batch_size=2 configs=[fast,fast_ckpt_seq]
    python scripts/benchmark.py norm_target=null peers=true configs=[fast,compiled]   # against timm, transformers

`model` is a variant (tiny | small | base | large | huge | giant); embed_dim, depths, num_heads override it.

One training step = forward (SimMIM loss on a 0.6 random mask), backward and an AdamW step, on random images.
The configurations (`configs=[...]`, default all that run on the device):
  reference       the official code's step: its attention order (attn_impl=reference), normalized targets by a
                  2-D 47x47 average pool, torch's default AdamW; eager
  fast_refattn    fast, but with the reference attention (what the attention path alone is worth)
  fast            our default: scale folded into q, one bias+mask term, SDPA where it has a fused kernel;
                  separable 47-px box filter for the targets; fused AdamW
  fast_ckpt       + activation checkpointing per block
  fast_ckpt_seq   + sequential (chunked) window attention
  fast_bf16       fast under bf16 autocast
  compiled        fast with each block under torch.compile, as model.compile=true trains (the compile time is
                  reported apart, in warmup_s, not in images/s)
  compiled_bf16   compiled under bf16 autocast
  flex_bf16       attn_impl=flex (FlexAttention, its kernel compiled) under bf16 autocast; CUDA only
  compiled_flex_bf16  compiled blocks with attn_impl=flex under bf16 autocast; CUDA only
`timer=cpu` (CPU only) times each step in CPU seconds of this process (`time.process_time`) instead of wall
clock: with `threads=1`, the measure that stays steady on a machine shared with other jobs (images/s are then
images per CPU second); the load average is printed and saved. `norm_target=null` trains against raw pixels
instead of 47-px normalized ones; `tf32=true` runs float32 matmuls on TF32 tensor cores (CUDA, as trainer.tf32
does in training). `peers=true` (needs norm_target=null) adds, for each of fast, fast_bf16, compiled,
compiled_bf16 chosen, the same step on timm's and transformers' SwinV2 where they are installed
(simmim/tools/peers.py; compiled: torch.compile of the whole peer model), named timm, timm_bf16, timm_compiled,
... The configurations run interleaved: after each one's warmup, every timed round runs one step of each, so
load that comes and goes hits all alike; step time is the median.
Peak memory is what a step allocates above what is held before it (parameters, optimizer states). FLOPs are
counted once per image (forward + backward, matmuls and convolutions, torch.utils.flop_counter) on the
reference path; MFU divides achieved FLOP/s by the peak: a measured matmul peak on CPU, the datasheet dense
peak on known GPUs (else measured). Writes a table to stdout and JSON to `out` (an earlier result there is kept
beside it under a dated name: benchmark.<UTC time it was written>.json for the default `out`; any other file
there is refused).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from masking import build_mask_generator
from simmim.train.config import ConfigError, as_list, options_from_argv
from simmim.tools.memory import peak_memory
from simmim.models.simmim import NORM_WINDOW_RULE, build_simmim, is_norm_window
from simmim.train.optim import make_adamw, param_groups
from simmim.cli import check_result_file, json_with, keeping_earlier, resolve_device
from simmim.models.swinv2 import VARIANTS
from simmim.tools.peers import available_peers, build_peer
from simmim.train.speed import set_tf32

CONFIGS = {
    "reference": dict(attn_impl="reference", fused_adamw=False, official_targets=True),
    "fast_refattn": dict(attn_impl="reference"),
    "fast": dict(),
    "fast_ckpt": dict(use_checkpoint=True),
    "fast_ckpt_seq": dict(use_checkpoint=True, sequential_attn=True),
    "fast_bf16": dict(bf16=True),
    "compiled": dict(compile=True),
    "compiled_bf16": dict(compile=True, bf16=True),
    "flex_bf16": dict(attn_impl="flex", bf16=True),
    "compiled_flex_bf16": dict(attn_impl="flex", compile=True, bf16=True),
}
CUDA_ONLY = ("flex_bf16", "compiled_flex_bf16")  # FlexAttention has no backward on CPU
PEER_SUFFIXES = {"fast": "", "fast_bf16": "_bf16", "compiled": "_compiled", "compiled_bf16": "_compiled_bf16"}
DEFAULTS = dict(model="tiny", embed_dim=None, depths=None, num_heads=None, img_size=192, window_size=12, batch_size=8,
                sequential_attn_chunk=16, norm_target=47, peers=False, tf32=False, timer="wall", steps=5, warmup=2,
                configs=None, device="auto", threads=0, seed=0, out="runs/benchmark/benchmark.json")
# Dense peaks (FLOP/s) from the datasheets: fp32 without tensor cores, tf32 and bf16 with them.
GPU_PEAKS = {"H100": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
             "H200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
             "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12}}


def peer_configs(names: list[str], peers: list[str]) -> dict[str, dict]:
    """The peers' configurations matching ours among `names`: {"timm_bf16": {"peer": "timm", "bf16": True}, ...}."""
    return {f"{peer}{PEER_SUFFIXES[name]}": dict(CONFIGS[name], peer=peer)
            for name in names if name in PEER_SUFFIXES for peer in peers}


def build(opts, settings: dict, device: torch.device):
    """SimMIM on a SwinV2 of `opts.model` size with one configuration's settings (ours, or a peer's), and its
    AdamW. Compiled configurations come back compiled: ours per block, a peer's as a whole."""
    torch.manual_seed(opts.seed)
    sizes = {k: opts[k] for k in ("embed_dim", "depths", "num_heads") if opts[k] is not None}
    model_cfg = dict(VARIANTS[opts.model], **sizes, img_size=opts.img_size, window_size=opts.window_size)
    if "peer" in settings:
        simmim = build_peer(settings["peer"], **{k: model_cfg[k] for k in ("img_size", "window_size", "embed_dim",
                                                                           "depths", "num_heads")}).to(device)
    else:
        model_cfg.update(attn_impl=settings.get("attn_impl", "fast"), use_checkpoint=settings.get("use_checkpoint", False),
                         sequential_attn=settings.get("sequential_attn", False),
                         sequential_attn_chunk=opts.sequential_attn_chunk)
        simmim = build_simmim(model_cfg, norm_target_patch_size=opts.norm_target).to(device)
        if settings.get("official_targets") and opts.norm_target is not None:
            simmim.target = partial(official_norm_targets, window=opts.norm_target)
    optimizer = make_adamw(param_groups(simmim, 0.05), lr=1e-4, fused=settings.get("fused_adamw", True))
    if settings.get("compile"):
        if "peer" in settings:
            simmim = torch.compile(simmim)
        else:
            simmim.encoder.compile_blocks()
    return simmim, optimizer


def official_norm_targets(x: torch.Tensor, window: int = 47) -> torch.Tensor:
    """Normalized targets as the official SimMIM release computes them: three 2-D average pools (window^2
    reads per pixel each); simmim/models/simmim.py gets the same numbers from separable 1-D passes."""
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(x ** 2, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(x), count_include_pad=True, **pool) * window ** 2
    var = ((mean_sq - mean ** 2) * (count / (count - 1))).clamp(min=0.0)
    return (x - mean) / (var + 1e-6) ** 0.5


def make_batch(opts, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (B, 3, H, W) and SimMIM masks (B, H/4, W/4) of 32 px patches at ratio 0.6."""
    generator = build_mask_generator("random", input_size=opts.img_size, mask_patch_size=32, model_patch_size=4,
                                     mask_ratio=0.6, seed=opts.seed)
    images = torch.randn(opts.batch_size, 3, opts.img_size, opts.img_size, generator=torch.Generator().manual_seed(0))
    masks = torch.stack([torch.from_numpy(generator()) for _ in range(opts.batch_size)])
    return images.to(device), masks.to(device)


def train_step_fn(simmim, optimizer, images, masks, settings: dict):
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=settings.get("bf16", False))

    def step() -> None:
        with autocast:
            loss = simmim(images, masks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(opts) -> float:
    """Counted on the meta device (no compute), where every matmul is a plain aten op the counter knows."""
    device = torch.device("meta")
    simmim, _ = build(opts, CONFIGS["reference"], device)
    images, masks = make_batch(OmegaConf.merge(opts, {"batch_size": 1}), device)
    with FlopCounterMode(display=False) as counter:
        simmim(images, masks).backward()
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul, the best of a few."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


@cache
def device_peak(device: torch.device, bf16: bool) -> tuple[float, str]:
    kind = "bf16" if bf16 else "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, peaks in GPU_PEAKS.items():
            if gpu in name:
                return peaks[kind], f"{gpu} datasheet {kind}"
    return matmul_peak(device, torch.bfloat16 if bf16 else torch.float32), f"measured {kind} matmul"


def run_configs(configs: dict[str, dict], opts, device: torch.device, flops: float) -> list[dict]:
    """Build and warm up every configuration, then time `opts.steps` rounds of one step each, interleaved."""
    clock = time.process_time if opts.timer == "cpu" else time.perf_counter
    runs = {}
    for name, settings in configs.items():
        simmim, optimizer = build(opts, settings, device)
        images, masks = make_batch(opts, device)
        step = train_step_fn(simmim, optimizer, images, masks, settings)
        start = time.perf_counter()
        for _ in range(opts.warmup):  # includes compilation
            step()
        synchronize(device)
        runs[name] = {"step": step, "warmup_s": time.perf_counter() - start, "times": []}
        print(f"  {name}: built and warmed up in {runs[name]['warmup_s']:.1f} s", flush=True)
    for _ in range(opts.steps):
        for run in runs.values():
            synchronize(device)
            start = clock()
            run["step"]()
            synchronize(device)
            run["times"].append(clock() - start)
    results = []
    for name, run in runs.items():
        settings = configs[name]
        step_s = sorted(run["times"])[len(run["times"]) // 2]  # median
        memory = peak_memory(run["step"], device)
        peak, peak_source = device_peak(device, settings.get("bf16", False))
        images_per_s = opts.batch_size / step_s
        results.append({"config": name, "images_per_s": images_per_s, "step_ms": 1000 * step_s,
                        "step_ms_all": [1000 * t for t in run["times"]], "peak_memory_mb": memory / 2 ** 20,
                        "warmup_s": run["warmup_s"], "tflops": flops * images_per_s / 1e12,
                        "mfu": flops * images_per_s / peak, "peak_flops": peak, "peak_source": peak_source})
    return results


def versus_peers(results: list[dict], peers: list[str]) -> dict[str, float]:
    """Ours / the faster peer in images/s, for each of our configurations that peers ran too."""
    rate = {r["config"]: r["images_per_s"] for r in results}
    ratios = {}
    for name, suffix in PEER_SUFFIXES.items():
        theirs = [rate[f"{peer}{suffix}"] for peer in peers if f"{peer}{suffix}" in rate]
        if name in rate and theirs:
            ratios[name] = rate[name] / max(theirs)
    return ratios


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(results: list[dict]) -> None:
    base = next((r for r in results if r["config"] == "reference"), results[0])
    header = f"{'config':<24} {'img/s':>8} {'x ' + base['config']:>12} {'step ms':>9} {'peak MB':>9} {'TFLOP/s':>8} {'MFU':>6}"
    print(header)
    for r in results:
        print(f"{r['config']:<24} {r['images_per_s']:>8.2f} {r['images_per_s'] / base['images_per_s']:>12.2f} "
              f"{r['step_ms']:>9.0f} {r['peak_memory_mb']:>9.0f} {r['tflops']:>8.3f} {r['mfu']:>6.1%}")


def main(argv: list[str]) -> None:
    opts = options_from_argv(DEFAULTS, argv, __doc__, nullable=("norm_target",))
    if opts is None:
        return
    if opts.model not in VARIANTS:
        raise ValueError(f"unknown model {opts.model!r}; choose one of {', '.join(VARIANTS)}")
    for key, low in (("steps", 1), ("warmup", 0), ("batch_size", 1), ("threads", 0)):
        if opts[key] < low:
            raise ConfigError(f"{key}={opts[key]}: expected an integer >= {low}")
    if opts.norm_target is not None and not is_norm_window(opts.norm_target):
        raise ConfigError(f"norm_target={opts.norm_target}: expected {NORM_WINDOW_RULE}, or null (raw pixels)")
    check_result_file(opts.out, json_with("settings", "results", "versus_peers"), "benchmark")
    device = resolve_device(opts.device)
    runnable = [c for c in CONFIGS if device.type == "cuda" or c not in CUDA_ONLY]
    names = runnable if opts.configs is None else as_list(opts.configs)
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    if any(c not in runnable for c in names):
        raise ValueError(f"configs {[c for c in names if c not in runnable]} need CUDA (FlexAttention has no "
                         f"backward on CPU); drop them or pass device=cuda")
    if opts.timer not in ("wall", "cpu") or (opts.timer == "cpu" and device.type != "cpu"):
        raise ValueError(f"timer={opts.timer!r} is not one of ['wall', 'cpu'] or needs device=cpu ({device}); "
                         f"use timer=wall, or timer=cpu with device=cpu")
    peers = available_peers() if opts.peers else []
    if opts.peers and opts.norm_target is not None:
        raise ValueError(f"peers=true compares raw-pixel targets (transformers has no normalized ones), got "
                         f"norm_target={opts.norm_target}; add norm_target=null")
    if opts.peers and not peers:
        print("peers=true: neither timm nor transformers is installed here; only our configurations run")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    set_tf32(opts.tf32, device)

    configs = {name: CONFIGS[name] for name in names} | peer_configs(names, peers)
    flops = flops_per_image(opts)
    targets = "raw-pixel" if opts.norm_target is None else f"{opts.norm_target}-px normalized"
    clock = "CPU seconds of this process" if opts.timer == "cpu" else "wall clock"
    load = [os.getloadavg()[0]]
    print(f"SwinV2-{opts.model} SimMIM, {opts.img_size} px, window {opts.window_size}, batch {opts.batch_size}, "
          f"{targets} targets, {device}, {torch.get_num_threads()} threads, {clock}; {flops / 1e9:.1f} GFLOP per "
          f"image (forward + backward); load average {load[0]:.1f}", flush=True)
    results = run_configs(configs, opts, device, flops)
    load.append(os.getloadavg()[0])
    print(f"load average {load[1]:.1f} at the end")
    print_table(results)
    ratios = versus_peers(results, peers)
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x the faster peer")

    out = Path(opts.out)
    report = {"settings": OmegaConf.to_container(opts), "machine": machine(device), "load_average": load,
              "gflops_per_image": flops / 1e9, "results": results, "versus_peers": ratios,
              "peer_versions": {p: importlib.metadata.version(p) for p in peers}}
    with keeping_earlier(out) as (tmp,):
        tmp.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
