"""Train a few SimMIM steps under each training strategy on one device; print images/s and peak memory.

    python scripts/gpu_check.py                                  # SwinV2-T, 192 px / window 12, bf16, all strategies
    python scripts/gpu_check.py model.variant=small batch_size=64 steps=30 out=gpu_check.json
    python scripts/gpu_check.py compile=true strategies=single,fsdp     # compiled blocks under FSDP
    python scripts/gpu_check.py device=cpu precision=32-true strategies=single,ddp_zero1 model.variant=null \\
        model.img_size=64 model.window_size=4 model.embed_dim=16 model.depths=[1,1,1,1] model.num_heads=[1,1,1,1]

Synthetic images and SimMIM masks (no dataset needed). Strategies: single (one device, no process group), ddp,
ddp_zero1, fsdp, fsdp_grad_op and deepspeed_stage_1/2/3 (skipped with a line when DeepSpeed is not installed);
see simmim/train/strategies.py for what each shards. On one device nothing is split: FSDP then runs unsharded
(NO_SHARD), so the table measures each strategy's overhead; the memory savings need trainer.devices >= 2.
The model defaults to activation checkpointing and sequential window attention; `out=PATH` writes the table as
JSON (an earlier table there is kept beside it as <name>.<UTC time it was written>.json, any other file is
refused). Peak memory is torch.cuda.max_memory_allocated (null on CPU).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import time

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from masking import MaskGenerator
from simmim.cli import check_result_file, json_with, keeping_earlier
from simmim.models.arguments import model_defaults, model_section, resolve_model
from simmim.train.config import ConfigError, options_from_argv
from simmim.pretrain import SimMIMPretrainModule
from simmim.train.strategies import DEEPSPEED_STAGES, build_strategy
from simmim.train.validate import check_mask_patch

STRATEGIES = ("single", "ddp", "ddp_zero1", "fsdp", "fsdp_grad_op", *DEEPSPEED_STAGES)
BASE_MODEL = dict(img_size=192, window_size=12, use_checkpoint=True, sequential_attn=True)
SCHEMA = {
    "device": "cuda",            # cuda | cpu
    "strategies": "all",         # all, or a comma list of STRATEGIES
    "steps": 20,                 # training steps per strategy, the first `warmup` untimed
    "warmup": 5,
    "batch_size": 32,
    "precision": "bf16-mixed",
    "mask_patch_size": 32,
    "seed": 0,
    "out": None,                 # JSON file for the table
    "compile": False,            # the blocks under torch.compile, as model.compile=true trains (true | false | auto)
    "model": {**model_section(), "variant": "tiny"},   # SwinTransformerV2 arguments; null: BASE_MODEL or default
}


class SyntheticMaskedImages(Dataset):
    """`length` random (image (3, S, S), SimMIM mask (S/p, S/p), label 0) items, fixed by the seed."""

    def __init__(self, length: int, img_size: int, patch_size: int, mask_patch_size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(length, 3, img_size, img_size, generator=generator)
        masks = MaskGenerator(img_size, mask_patch_size, patch_size, mask_ratio=0.6, seed=seed)
        self.masks = torch.stack([torch.from_numpy(masks()) for _ in range(length)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index], 0


class SyntheticData(pl.LightningDataModule):
    """Batches of SyntheticMaskedImages (`hparams.batch_size` is what the lr scaling reads)."""

    def __init__(self, batch_size: int, num_batches: int, img_size: int, patch_size: int, mask_patch_size: int,
                 seed: int):
        super().__init__()
        self.save_hyperparameters()
        self.dataset = SyntheticMaskedImages(batch_size * num_batches, img_size, patch_size, mask_patch_size, seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, drop_last=True)


class StepTimer(pl.Callback):
    """Wall time from the end of step `warmup` to the end of the last step (device synchronized)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.timed_steps = warmup, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.end, self.timed_steps = time.perf_counter(), self.timed_steps + 1


def chosen_strategies(names: str) -> list[str]:
    """`all` or a comma list -> strategy names, unknown ones rejected."""
    chosen = list(STRATEGIES) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r} in strategies=; choose from all, {', '.join(STRATEGIES)}")
    return chosen


def patch_size(model: dict) -> int:
    """The model's patch_size in pixels (SwinTransformerV2's default where not given)."""
    return model.get("patch_size", model_defaults()["patch_size"])


def run_strategy(name: str, cfg, model: dict) -> dict:
    """Train cfg.steps steps under one strategy; a table row: images/s, peak memory (GiB), loss."""
    device = torch.device(cfg.device)
    data = SyntheticData(cfg.batch_size, cfg.steps, model["img_size"], patch_size(model), cfg.mask_patch_size,
                         cfg.seed)
    torch.manual_seed(cfg.seed)
    module = SimMIMPretrainModule(model={**model, "compile": cfg.compile}, warmup_epochs=0)
    timer = StepTimer(cfg.warmup)
    strategy = "auto" if name == "single" else build_strategy(name, cfg.precision)
    trainer = pl.Trainer(accelerator=device.type, devices=1, strategy=strategy, precision=cfg.precision,
                         max_steps=cfg.steps, gradient_clip_val=5.0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    gc.collect()  # the previous strategy's model and optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, datamodule=data)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"strategy": name, "images_per_s": cfg.batch_size * timer.timed_steps / (timer.end - timer.start),
            "peak_memory_gib": peak, "loss": float(trainer.callback_metrics["train/loss"]), "error": None}


def print_table(rows: list[dict]) -> None:
    print(f"{'strategy':<18}{'images/s':>10}{'peak GiB':>10}{'loss':>9}")
    for row in rows:
        if row["error"]:
            print(f"{row['strategy']:<18}  {row['error']}")
            continue
        peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(f"{row['strategy']:<18}{row['images_per_s']:>10.1f}{peak:>10}{row['loss']:>9.4f}")


def main(argv: list[str]) -> None:
    cfg = options_from_argv(SCHEMA, argv, __doc__, mixed=("compile",), nullable=("model.variant",))
    if cfg is None:
        return
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available here; pass device=cpu (with a small model)")
    if cfg.steps <= cfg.warmup:
        raise ValueError(f"steps={cfg.steps} leaves no timed step after warmup={cfg.warmup}; raise steps")
    if cfg.out:
        check_result_file(cfg.out, json_with("model", "config", "rows"), "GPU check")  # before the runs
    if cfg.compile not in (True, False, "auto"):
        raise ConfigError(f"compile={cfg.compile}: expected true, false or auto")
    if cfg.batch_size < 1 or cfg.warmup < 0:
        raise ConfigError(f"batch_size={cfg.batch_size}, warmup={cfg.warmup}: expected batch_size >= 1, warmup >= 0")
    model = resolve_model(BASE_MODEL, OmegaConf.to_container(cfg.model))
    check_mask_patch("mask_patch_size", cfg.mask_patch_size, model["img_size"], patch_size(model))  # before the runs
    print(f"model: {model}\nbatch {cfg.batch_size}, {cfg.precision}, {cfg.steps} steps ({cfg.warmup} untimed), "
          f"on {torch.cuda.get_device_name() if cfg.device == 'cuda' else 'cpu'}")
    rows = []
    for name in chosen_strategies(cfg.strategies):
        if name in DEEPSPEED_STAGES and importlib.util.find_spec("deepspeed") is None:
            print(f"{name}: skipped, DeepSpeed is not installed (pip install 'swinv2-simmim[deepspeed]')")
            continue
        try:
            rows.append(run_strategy(name, cfg, model))
        except Exception as error:  # one broken strategy must not hide the others' numbers
            rows.append({"strategy": name, "images_per_s": None, "peak_memory_gib": None, "loss": None,
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
    print_table(rows)
    if cfg.out:
        with keeping_earlier(cfg.out) as (tmp,):
            tmp.write_text(json.dumps({"model": model, "config": OmegaConf.to_container(cfg), "rows": rows}, indent=2))
    if any(row["error"] for row in rows):
        raise ValueError(f"{sum(bool(row['error']) for row in rows)} strategies failed (see the table)")

